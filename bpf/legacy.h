/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The legacy variant of the capture programs (issue 10): included by blkrewind.bpf.c when
 * bpf/build.py compiles it with -DBR_LEGACY into blkrewind-legacy.bpf.o. tracer/capture.py
 * loads it where the kernel lacks what the modern programs use (tracer/features.py):
 * BPF atomic fetch-and-add and cmpxchg (5.12), bpf_loop (5.17), ring buffer dynptrs (5.19).
 * It needs the BPF ring buffer (5.8), bounded loops (5.3) and BTF (CO-RE). Same maps, same
 * records, same counters: everything after the ring buffer is unchanged.
 *
 *   order stamps, seq    a claim instead of a fetch-and-add: the claimer of number c is the
 *                        program whose BPF_NOEXIST insert of key c into claim_map succeeds
 *                        (the hash map's bucket lock serialises it). It starts at the
 *                        counter, tries c, c + 1, ... (a claim fails only when c is taken),
 *                        then raises the counter past c. Every number below the counter is
 *                        claimed (no holes), none twice (an entry lives until
 *                        BR_CLAIM_KEEP later numbers were claimed; the counter never falls
 *                        back that far). A program that cannot claim (BR_CLAIM_TRIES taken
 *                        in a row, or the map busy) counts `unstamped`: the tracer treats it
 *                        as a run it never saw (reads the devices whole).
 *   payload              records of a constant size (no dynptr): 4 KiB of payload while
 *                        4 KiB remain, 512 bytes after; bounded loops instead of bpf_loop;
 *                        one record per call of a global function, verified once.
 *   dirty map            a plain "store if larger" (no cmpxchg): a program that took its
 *                        stamp earlier can overwrite a newer stamp with its own. Such a
 *                        program was running when the newer one stored, so its stamp is at
 *                        least the checkpoint before the one a resync reads since: the
 *                        tracer reads from there (tracer/resync.py dirty_floor).
 *   kernel differences   raw_tp programs (BPF_CORE_READ everywhere); block_bio_queue has
 *                        (q, bio) before 5.11 (capture_raw_q) and (bio) after (capture_raw):
 *                        the loader attaches the first the kernel takes. bio->bi_bdev or
 *                        bi_disk (before 5.12), hd_struct (5.10), enum req_opf (before 6.0),
 *                        rq->rq_disk or q->disk, writeback_dirty_page (before 5.17): CO-RE.
 *
 * What both variants do alike is written once in blkrewind.bpf.c and used here: wake_flags,
 * grace_enter, dirty_regions, INFLIGHT_SET, the walk's WALK_FNS / WALK_START, BIO_TARGET,
 * BIO_HEADER, REMEMBER_DIRTIER, DIRTIER_REC, COMPLETE_HDR, DONE1_REC, POINT_REC (macros where
 * a function compiled to other instructions). This file holds only what differs.
 */

#define BR_LPIECE 4096          /* payload bytes of a full record */
#define BR_LSMALL 512           /* ... of a record for the last < 4 KiB of a bio */
#define BR_LREC_MAX 4096        /* records of one bio: 16 MiB (the rest: F_TRUNC, counted) */
#define BR_LSEGS 8              /* bvec segments gathered into one record */
#define BR_LDIRTY_MAX 4096      /* dirty-map regions of one bio (more: dirty_races) */
#define BR_CLAIM_TRIES 64
#define BR_CLAIM_KEEP 16384
#define BR_CLAIM_STAMP 0
#define BR_CLAIM_SEQ 1
#define BR_CLAIM_ERR 2
#define BR_SEQ_BLOCK 4096       /* seq numbers one claim of the seq counter gives (>= BR_LREC_MAX + 1) */
#define BR_EEXIST 17

struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 3 * BR_CLAIM_KEEP + 4096);
	 __type(key, __u64); __type(value, __u8); } claim_map SEC(".maps");

/* see the modern br_walk; tmp holds up to 2 pieces so that a variable offset below 4 KiB
 * plus a length up to 4 KiB stays inside it (the verifier relates no two registers) */
struct br_lwalk {
	__u64 page_offset_base;
	__u64 vmemmap_base;
	__u64 page_struct_size;
	__u64 iovec;
	__u64 seg_va;
	__u64 seg_page;
	__u32 idx;
	__u32 done;
	__u32 remaining;
	__u32 seg_left;
	__u32 offset;
	__u32 wake_bytes;
	__u32 filled;     /* br_lgather: bytes gathered into tmp */
	__u32 err;        /* br_lgather: a read failed */
	__u64 seq;        /* the next seq of the bio's block of them */
	struct br_rec h;
	__u8 tmp[2 * BR_LPIECE];
};

struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct br_lwalk); } walk_map SEC(".maps");

struct br_lrec_big {
	struct br_rec h;
	__u8 data[BR_LPIECE];
};

struct br_lrec_small {
	struct br_rec h;
	__u8 data[BR_LSMALL];
};

/* ------------------------------------------------------------------------ */
/* claims: numbers without a fetch-and-add                                  */

/* Claim the next number of counter `which` (stamp, seq, write_errs); 0 when none could be
 * claimed (unstamped counted). A global function: verified once, not at every call.
 * The seq counter goes in blocks of BR_SEQ_BLOCK: a claim owns c .. c + BR_SEQ_BLOCK - 1
 * (one claim per bio, not per record; seq numbers need only be unique, docs/internals.md). */
__noinline __u64 br_claim(__u32 which)
{
	__u32 k = 0;
	struct br_state *s = bpf_map_lookup_elem(&state_map, &k);
	__u8 one = 1;

	if (!s)
		return 0;
	__u64 *ctr = which == BR_CLAIM_STAMP ? &s->stamp : which == BR_CLAIM_SEQ ? &s->seq
		: &s->write_errs;
	__u64 space = (__u64)which << 62;
	__u64 step = which == BR_CLAIM_SEQ ? BR_SEQ_BLOCK : 1;
	__u64 c = *(volatile __u64 *)ctr;

	for (int i = 0; i < BR_CLAIM_TRIES; i++) {
		__u64 key = c ^ space;
		long r = bpf_map_update_elem(&claim_map, &key, &one, BPF_NOEXIST);

		if (r == 0) {
			key = (c - BR_CLAIM_KEEP * step) ^ space;
			bpf_map_delete_elem(&claim_map, &key);
			if (*(volatile __u64 *)ctr <= c)
				*(volatile __u64 *)ctr = c + step;
			return c;
		}
		if (r == -BR_EEXIST)
			c += step;
		/* else the bucket is busy (a program interrupted on this CPU holds it): again */
	}
	__sync_fetch_and_add(&s->unstamped, 1);
	return 0;
}

/* ------------------------------------------------------------------------ */
/* kernel differences (CO-RE)                                               */

/* 5.10: partitions are struct hd_struct, gendisk embeds part0, bios point at their disk */
struct hd_struct___br {
	sector_t start_sect;
	struct device __dev;
} __attribute__((preserve_access_index));

struct gendisk___br {
	struct hd_struct___br part0;
} __attribute__((preserve_access_index));

struct bio___br {
	struct gendisk *bi_disk;
} __attribute__((preserve_access_index));

struct request___br {
	struct hd_struct___br *part;
	struct gendisk *rq_disk;
} __attribute__((preserve_access_index));

/* enum req_opf before 6.0 (enum req_op after): the enumerators of the flavour match by
 * their names without the ___br suffix */
enum req_opf___br {
	REQ_OP_WRITE___br = 1,
	REQ_OP_FLUSH___br = 2,
	REQ_OP_DISCARD___br = 3,
	REQ_OP_SECURE_ERASE___br = 5,
	REQ_OP_WRITE_ZEROES___br = 9,
};

static __always_inline __u8 lnorm_op(__u32 opf)
{
	if (bpf_core_enum_value_exists(enum req_op, REQ_OP_WRITE))
		return norm_op(opf);
	__u32 op = opf & 0xff;

	if (op == bpf_core_enum_value(enum req_opf___br, REQ_OP_WRITE___br))
		return BR_OP_WRITE;
	if (op == bpf_core_enum_value(enum req_opf___br, REQ_OP_FLUSH___br))
		return BR_OP_FLUSH;
	if (op == bpf_core_enum_value(enum req_opf___br, REQ_OP_DISCARD___br))
		return BR_OP_DISCARD;
	if (op == bpf_core_enum_value(enum req_opf___br, REQ_OP_SECURE_ERASE___br))
		return BR_OP_SECURE_ERASE;
	if (op == bpf_core_enum_value(enum req_opf___br, REQ_OP_WRITE_ZEROES___br))
		return BR_OP_WRITE_ZEROES;
	return BR_OP_NONE;
}

/* the dev_t of a disk (its part0) */
static __always_inline __u32 disk_dev(struct gendisk *disk)
{
	struct gendisk___br *g = (void *)disk;

	if (!disk)
		return 0;
	if (bpf_core_field_exists(g->part0))  /* 5.10: an embedded hd_struct */
		return BPF_CORE_READ(g, part0.__dev.devt);
	return BPF_CORE_READ(disk, part0, bd_dev);
}

/* a bio's device: dev_t, its disk's dev_t, the partition's start sector */
static __always_inline void bio_dev(struct bio *bio, __u32 *dev, __u32 *disk, __u64 *start)
{
	struct bio___br *b = (void *)bio;

	if (bpf_core_field_exists(bio->bi_bdev)) {
		struct block_device *bdev = BPF_CORE_READ(bio, bi_bdev);
		*dev = BPF_CORE_READ(bdev, bd_dev);
		*disk = BPF_CORE_READ(bdev, bd_disk, part0, bd_dev);
		*start = BPF_CORE_READ(bdev, bd_start_sect);
	} else {
		/* before 5.12: at block_bio_queue the partition is already remapped onto its
		 * disk (absolute sectors, bi_partno 0) */
		*dev = *disk = disk_dev(BPF_CORE_READ(b, bi_disk));
		*start = 0;
	}
}

/* a request's partition (dev_t, start) and disk dev_t */
static __always_inline void rq_dev(struct request *rq, __u32 *pdev, __u64 *pstart,
				   __u32 *disk)
{
	struct request___br *ro = (void *)rq;
	struct request_queue *q = BPF_CORE_READ(rq, q);

	*pdev = 0;
	*pstart = 0;
	if (bpf_core_type_exists(struct hd_struct___br)) {
		struct hd_struct___br *p = BPF_CORE_READ(ro, part);
		if (p) {
			*pdev = BPF_CORE_READ(p, __dev.devt);
			*pstart = BPF_CORE_READ(p, start_sect);
		}
	} else {
		struct block_device *p = BPF_CORE_READ(rq, part);
		if (p) {
			*pdev = BPF_CORE_READ(p, bd_dev);
			*pstart = BPF_CORE_READ(p, bd_start_sect);
		}
	}
	if (bpf_core_field_exists(q->disk))
		*disk = disk_dev(BPF_CORE_READ(q, disk));
	else
		*disk = disk_dev(BPF_CORE_READ(ro, rq_disk));
}

/* ------------------------------------------------------------------------ */
/* grace period (grace_enter: blkrewind.bpf.c), counters                 */

/* per CPU: a program nested on this CPU runs to its end before this one goes on, so the
 * value read after the decrement is exact */
static __always_inline void lgrace_exit(struct br_grace *g)
{
	if (!g)
		return;
	__sync_fetch_and_add(&g->active, -1);
	if (*(volatile __u64 *)&g->active == 0)
		__sync_fetch_and_add(&g->quiet, 1);
}

static __always_inline void lcount_drop(struct br_state *s, __u64 bytes)
{
	__sync_fetch_and_add(&s->drops, 1);
	/* not for a constant 0: LLVM turns an atomic add of 0 into an atomic or (5.12) */
	if (bytes)
		__sync_fetch_and_add(&s->drop_bytes, bytes);
}

/* ------------------------------------------------------------------------ */
/* the dirty map                                                            */

/* dirty_map[key + i] = max(dirty_map[key + i], stamp) for i < min(n, BR_LRUN), without
 * cmpxchg (see the top). Loops come in runs of BR_LRUN inside global functions: the
 * verifier walks each loop iteration by iteration, a run once, not at every call. */
#define BR_LRUN 64

__noinline int br_ldirty_run(__u32 key, __u32 n, __u64 stamp)
{
	for (__u32 i = 0; i < BR_LRUN; i++) {
		if (i >= n)
			return 0;
		__u32 k = key + i;
		__u64 *v = bpf_map_lookup_elem(&dirty_map, &k);
		if (!v)
			return 1;
		if (*(volatile __u64 *)v < stamp)
			*(volatile __u64 *)v = stamp;
	}
	return 0;
}

static __always_inline void lmark_dirty(struct br_state *s, struct br_dev *d, __u64 stamp,
					__u64 sector, __u32 size)
{
	__u64 first, last;

	if (!dirty_regions(d, sector, size, &first, &last))
		return;
	__u32 n = (__u32)(last - first + 1), base = d->region_base + (__u32)first;

	if (n > BR_LDIRTY_MAX) {
		/* the tracer treats a move of this counter as "dirty map incomplete" */
		__sync_fetch_and_add(&s->dirty_races, 1);
		n = BR_LDIRTY_MAX;
	}
	for (__u32 i = 0; i < BR_LDIRTY_MAX / BR_LRUN; i++) {
		if (i * BR_LRUN >= n)
			break;
		if (br_ldirty_run(base + i * BR_LRUN, n - i * BR_LRUN, stamp))
			break;
	}
}

/* ------------------------------------------------------------------------ */
/* walking a bio's payload                                                  */

WALK_FNS(br_lwalk, lpage_va, lload_seg)

/* Gather up to `want` (<= 4 KiB) bytes of the walk into its scratch (w->tmp); returns the
 * bytes gathered, w->err set on a failed read. A global function whose state lives in the
 * map value, reloaded at every step: unknown scalars to the verifier, so the states of its
 * loop converge (the 5.10 verifier took longer than 15 min under emulation on a version
 * that kept the count in a register and gathered into the record itself). */
__noinline int br_lgather(__u32 want)
{
	__u32 k = 0;
	struct br_lwalk *w = bpf_map_lookup_elem(&walk_map, &k);

	if (!w)
		return 0;
	w->filled = 0;
	w->err = 0;
	for (int i = 0; i < BR_LSEGS; i++) {
		__u32 filled = w->filled;
		if (filled >= want || !lload_seg(w))
			break;
		if (w->seg_left == 0)
			continue;
		__u32 n = w->seg_left;
		if (n > want - filled)
			n = want - filled;
		/* the mask and the bound are redundant to clang, which would drop them, not to
		 * the verifier (5.10: 'R1 max value is outside of the allowed memory range'):
		 * at + n stays inside tmp */
		__u32 at = filled;
		barrier_var(at);
		at &= BR_LPIECE - 1;
		barrier_var(n);
		if (n > BR_LPIECE)
			n = BR_LPIECE;
		/* a direct-map address off the kernel half (the calibration's first tries, before
		 * the bases are known): not read. 5.10's copy_from_kernel_nofault reads a
		 * non-canonical address and WARNs ('General protection fault in user access');
		 * later kernels refuse it themselves */
		if (w->seg_va < 0xffff800000000000ULL ||
		    bpf_probe_read_kernel(w->tmp + at, n, (void *)w->seg_va))
			w->err = 1;
		w->filled = filled + n;
		w->seg_left -= n;
		w->seg_va += n;
		w->remaining -= n;
		w->offset += n;
	}
	return w->filled;
}

/* the header of a data record, the payload gathered: flags, len, counters */
static __always_inline void lfinish(struct br_state *s, struct br_lwalk *w, struct br_rec *r,
				    __u32 offset, __u64 page, __u32 filled, __u32 err)
{
	__builtin_memcpy(r, &w->h, sizeof(*r));
	r->seq = w->seq++;
	r->offset = offset;
	r->aux = page;
	if (offset == 0)
		r->flags |= BR_F_FIRST;
	r->len = filled;
	if (err) {
		r->flags |= BR_F_READERR;
		__sync_fetch_and_add(&s->read_errs, 1);
	} else {
		__sync_fetch_and_add(&s->bytes, filled);
	}
	if (w->remaining == 0)
		r->flags |= BR_F_LAST;
}

/* One record of the bio being walked (walk_map). Returns 1 when the bio is done (or its
 * record dropped: the rest is given up, the consumer sees a bio whose pieces do not add
 * up). A global function: verified once. */
__noinline int br_lrecord(__u32 unused)
{
	__u32 k = 0;
	struct br_lwalk *w = bpf_map_lookup_elem(&walk_map, &k);
	struct br_state *s = bpf_map_lookup_elem(&state_map, &k);

	if (!w || !s || w->remaining == 0)
		return 1;
	lload_seg(w);
	__u32 offset = w->offset, err = 0;
	__u64 page = w->seg_page;

	if (w->remaining >= BR_LPIECE) {
		struct br_lrec_big *r = bpf_ringbuf_reserve(&rb, sizeof(*r), 0);
		if (!r) {
			lcount_drop(s, w->remaining);
			w->remaining = 0;
			return 1;
		}
		/* a record more fragmented than BR_LSEGS segments ends short: the next one
		 * goes on at its end (records are pieces at their offset) */
		__u32 filled = br_lgather(BR_LPIECE);
		if (bpf_probe_read_kernel(r->data, BR_LPIECE, w->tmp) || w->err)
			err = 1;
		lfinish(s, w, &r->h, offset, page, filled, err);
		bpf_ringbuf_submit(r, wake_flags(w->wake_bytes, sizeof(*r)));
	} else {
		__u32 want = w->remaining < BR_LSMALL ? w->remaining : BR_LSMALL;
		struct br_lrec_small *r = bpf_ringbuf_reserve(&rb, sizeof(*r), 0);
		if (!r) {
			lcount_drop(s, w->remaining);
			w->remaining = 0;
			return 1;
		}
		__u32 filled = br_lgather(want);
		if (bpf_probe_read_kernel(r->data, BR_LSMALL, w->tmp) || w->err)
			err = 1;
		lfinish(s, w, &r->h, offset, page, filled, err);
		bpf_ringbuf_submit(r, wake_flags(w->wake_bytes, sizeof(*r)));
	}
	return w->remaining ? 0 : 1;
}

/* BR_LRUN records of the bio (br_lrecord); 1 when the bio is done */
__noinline int br_lrecords(__u32 unused)
{
	for (int i = 0; i < BR_LRUN; i++) {
		if (br_lrecord(0))
			return 1;
	}
	return 0;
}

/* a record of the header template alone (NULL: dropped, counted) */
static __always_inline struct br_rec *lheader_rec(struct br_state *s, struct br_lwalk *w)
{
	struct br_rec *r = bpf_ringbuf_reserve(&rb, sizeof(struct br_rec), 0);

	if (!r) {
		lcount_drop(s, 0);
		return 0;
	}
	__builtin_memcpy(r, &w->h, sizeof(*r));
	r->seq = w->seq++;
	return r;
}

/* ------------------------------------------------------------------------ */
/* the dirtier of a bio's first page                                       */

struct page___ulong {
	unsigned long flags;
} __attribute__((preserve_access_index));

/* a page cache page before folios took over its fields */
struct page___br {
	struct address_space *mapping;
	unsigned long index;
} __attribute__((preserve_access_index));

struct page___memdesc {
	struct br_memdesc_flags flags;
} __attribute__((preserve_access_index));

static __always_inline __u64 lpage_flags(void *page)
{
	struct page___ulong *pu = page;
	struct page___memdesc *pm = page;
	__u64 v = 0;

	if (bpf_core_field_exists(pu->flags))
		bpf_core_read(&v, sizeof(v), &pu->flags);
	else if (bpf_core_field_exists(pm->flags))
		bpf_core_read(&v, sizeof(v), &pm->flags);
	return v;
}

/* emit_dirtier's legacy form: the folio where the kernel has folios, else the (head) page */
static __always_inline void lemit_dirtier(struct bio *bio, struct br_cfg *c, struct br_state *s,
					  struct br_lwalk *w)
{
	struct bio_vec *bv = (struct bio_vec *)((__u64)BPF_CORE_READ(bio, bi_io_vec) +
		(__u64)BPF_CORE_READ(bio, bi_iter.bi_idx) * bpf_core_type_size(struct bio_vec));
	struct page *page = BPF_CORE_READ(bv, bv_page);
	struct br_dkey key;
	__u64 flags;

	if (!page || !bpf_core_enum_value_exists(enum pageflags, PG_writeback))
		return;
	if (bpf_core_field_exists(page->compound_head)) {
		__u64 head = BPF_CORE_READ(page, compound_head);
		if (head & 1)
			page = (struct page *)(head - 1);
	}
	if (bpf_core_type_exists(struct folio)) {
		struct folio *folio = (struct folio *)page;
		if (!bpf_core_field_exists(folio->mapping) || !bpf_core_field_exists(folio->index))
			return;
		flags = folio_flags(folio);
		key.mapping = (__u64)BPF_CORE_READ(folio, mapping);
		key.index = BPF_CORE_READ(folio, index);
	} else {
		struct page___br *pb = (void *)page;
		if (!bpf_core_field_exists(pb->mapping) || !bpf_core_field_exists(pb->index))
			return;
		flags = lpage_flags(page);
		key.mapping = (__u64)BPF_CORE_READ(pb, mapping);
		key.index = BPF_CORE_READ(pb, index);
	}
	if (!(flags & (1ULL << bpf_core_enum_value(enum pageflags, PG_writeback))))
		return;
	DIRTIER_REC(c, s, w, key, lheader_rec);
}

/* who dirtied a page-cache page (folio) of a traced device: index is the page's (folio's) */
static __always_inline int ldirtier(__u64 index, struct address_space *mapping)
{
	__u32 k = 0;
	struct br_cfg *c = bpf_map_lookup_elem(&cfg_map, &k);

	if (!c || !c->enabled || !c->dirtier || !mapping)
		return 0;
	struct inode *host = BPF_CORE_READ(mapping, host);
	if (!host)
		return 0;
	__u32 dev, disk;
	if ((BPF_CORE_READ(host, i_mode) & BR_S_IFMT) == BR_S_IFBLK) {
		dev = BPF_CORE_READ(host, i_rdev);
		disk = dev;
	} else {
		struct super_block *sb = BPF_CORE_READ(host, i_sb);
		struct block_device *sbdev = BPF_CORE_READ(sb, s_bdev);
		dev = BPF_CORE_READ(sb, s_dev);
		disk = sbdev ? disk_dev(BPF_CORE_READ(sbdev, bd_disk)) : dev;
	}
	if (!(c->dev_bloom & (dev_bit(dev) | dev_bit(disk))))
		return 0;
	struct br_dkey key = { .mapping = (__u64)mapping, .index = index };
	REMEMBER_DIRTIER(c, key);
	return 0;
}

SEC("raw_tp/writeback_dirty_folio")
int BPF_PROG(dirtier_folio_raw, struct folio *folio, struct address_space *mapping)
{
	return ldirtier(BPF_CORE_READ(folio, index), mapping);
}

/* before 5.17 */
SEC("raw_tp/writeback_dirty_page")
int BPF_PROG(dirtier_page_raw, struct page *page, struct address_space *mapping)
{
	struct page___br *pb = (void *)page;

	if (!bpf_core_field_exists(pb->index))  /* pages without an index of their own */
		return 0;
	return ldirtier(BPF_CORE_READ(pb, index), mapping);
}

/* ------------------------------------------------------------------------ */
/* bios                                                                     */

static __always_inline int lhandle_bio(struct bio *bio)
{
	__u32 k = 0;
	struct br_cfg *c = bpf_map_lookup_elem(&cfg_map, &k);
	__u32 dev, disk;
	__u64 part_start;

	if (!c || !c->enabled)
		return 0;
	bio_dev(bio, &dev, &disk, &part_start);
	if (surely_untraced(c, dev, disk))
		return 0;
	struct br_state *s = bpf_map_lookup_elem(&state_map, &k);
	if (!s)
		return 0;

	__u64 pt = bpf_get_current_pid_tgid();
	__u32 opf = BPF_CORE_READ(bio, bi_opf);
	__u64 sector = BPF_CORE_READ(bio, bi_iter.bi_sector);
	__u16 rtype = BR_R_BIO;
	__u32 flags = 0;
	struct br_dev *d = 0;
	__u8 op;

	if (c->calib_tgid && (pt >> 32) == c->calib_tgid) {
		rtype = BR_R_CALIB;
		flags = BR_F_CALIB;
		op = BR_OP_NONE;
	} else {
		BIO_TARGET(d, dev, disk, part_start, sector);
		if (!d)
			return 0;
		op = lnorm_op(opf);
		if (op == BR_OP_NONE)
			return 0;
	}

	struct br_lwalk *w = bpf_map_lookup_elem(&walk_map, &k);
	if (!w)
		return 0;
	__u32 size = BPF_CORE_READ(bio, bi_iter.bi_size);
	struct br_grace *g = grace_enter();
	__u64 stamp = br_claim(BR_CLAIM_STAMP);
	if (!stamp) {  /* counted (unstamped): the tracer reads the devices whole */
		lgrace_exit(g);
		return 0;
	}
	w->seq = br_claim(BR_CLAIM_SEQ);  /* the bio's records: R_DIRTY, then its pieces */
	__builtin_memset(&w->h, 0, sizeof(w->h));
	w->h.stamp = stamp;
	if (rtype == BR_R_BIO && op != BR_OP_FLUSH && c->dirty && d)
		lmark_dirty(s, d, stamp, sector, size);
	BIO_HEADER(w->h, sector, part_start, dev, opf, size, pt, rtype, op, flags);
	if (rtype == BR_R_BIO && op == BR_OP_WRITE && size && c->dirtier)
		lemit_dirtier(bio, c, s, w);

	__sync_fetch_and_add(&s->bios, 1);
	if (rtype == BR_R_BIO)
		INFLIGHT_SET(bio, stamp);
	int has_data = (op == BR_OP_WRITE || rtype == BR_R_CALIB) && size > 0;
	if (!has_data) {
		struct br_rec *r = lheader_rec(s, w);
		if (r) {
			r->flags |= BR_F_FIRST | BR_F_LAST | BR_F_NODATA;
			bpf_ringbuf_submit(r, wake_flags(c->wake_bytes, sizeof(*r)));
		}
		lgrace_exit(g);
		return 0;
	}
	WALK_START(w, c, bio, size);
	w->wake_bytes = c->wake_bytes;
	for (int i = 0; i < BR_LREC_MAX / BR_LRUN; i++) {
		if (br_lrecords(0))
			break;
	}
	if (w->remaining)
		__sync_fetch_and_add(&s->truncs, 1);
	lgrace_exit(g);
	return 0;
}

/* block_bio_queue(bio), 5.11 on */
SEC("raw_tp/block_bio_queue")
int BPF_PROG(capture_raw, struct bio *bio)
{
	return lhandle_bio(bio);
}

/* block_bio_queue(q, bio), before 5.11: a program reading a second argument the
 * tracepoint does not have cannot attach (EINVAL), so the loader tries this one first */
SEC("raw_tp/block_bio_queue")
int BPF_PROG(capture_raw_q, struct request_queue *q, struct bio *bio)
{
	return lhandle_bio(bio);
}

/* ------------------------------------------------------------------------ */
/* completions                                                              */

struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct br_chain_ctx); } chain_map SEC(".maps");

/* chain_cb over the request's bios into chain_map (global: its loop verified once, on
 * map-value state) */
__noinline int br_lchain(__u64 bio, __u32 left)
{
	__u32 k = 0;
	struct br_chain_ctx *cc = bpf_map_lookup_elem(&chain_map, &k);

	if (!cc)
		return 0;
	cc->bio = bio;
	cc->left = left;
	cc->n = 0;
	cc->flags = 0;
	for (int i = 0; i < BR_MAX_COMPLETE_BIOS; i++) {
		if (chain_cb(i, cc))
			break;
	}
	return 0;
}

struct br_done1 {
	struct br_rec h;
	__u64 stamp;
};

struct br_doneN {
	struct br_rec h;
	__u64 stamps[BR_MAX_COMPLETE_BIOS];
};

static __always_inline void lnote_error(__u32 dev, __u64 sector, __u32 bytes, __u32 error)
{
	__u64 n1 = br_claim(BR_CLAIM_ERR);  /* write_errs + 1 is the count after this one */
	__u64 n = n1;
	__u32 k = (__u32)(n & (BR_ERR_SLOTS - 1));
	struct br_err *e = bpf_map_lookup_elem(&err_map, &k);

	if (!e)
		return;
	e->sector = sector;
	e->ktime_ns = bpf_ktime_get_ns();
	e->dev = dev;
	e->bytes = bytes;
	e->error = error;
	barrier();
	*(volatile __u64 *)&e->n = n + 1;  /* last: the slot is complete */
}

static __always_inline void lcomplete_hdr(struct br_rec *h, __u64 aux, __u64 sector,
					  __u64 part_start, __u32 dev, __u32 opf, __u8 op,
					  __u32 nr_bytes, int error, __u32 flags, __u32 n)
{
	COMPLETE_HDR(h, br_claim(BR_CLAIM_SEQ), aux, sector, part_start, dev, opf, op, nr_bytes,
		     error, flags, n * 8);
}

static __always_inline int lhandle_rq_done(struct request *rq, int error, unsigned int nr_bytes)
{
	__u32 opf = BPF_CORE_READ(rq, cmd_flags);
	__u8 op = lnorm_op(opf);
	if (op == BR_OP_NONE || op == BR_OP_FLUSH)
		return 0;
	__u32 k = 0;
	struct br_cfg *c = bpf_map_lookup_elem(&cfg_map, &k);
	if (!c || !c->enabled)
		return 0;
	__u32 pdev, disk;
	__u64 pstart;
	rq_dev(rq, &pdev, &pstart, &disk);
	if (surely_untraced(c, pdev, disk))
		return 0;
	struct br_state *s = bpf_map_lookup_elem(&state_map, &k);
	if (!s)
		return 0;
	__u64 bio = (__u64)BPF_CORE_READ(rq, bio);
	if (!bio)
		return 0;
	__u32 dev = 0;
	__u64 part_start = 0;
	struct br_dev *d = 0;
	if (pdev) {
		dev = pdev;
		part_start = pstart;
		d = bpf_map_lookup_elem(&dev_map, &dev);
	}
	if (!d || d->traced != 1) {
		dev = disk;
		part_start = 0;
		d = bpf_map_lookup_elem(&dev_map, &dev);
		if (!d || d->traced != 1)
			return 0;
	}
	__u64 sector = BPF_CORE_READ(rq, __sector);
	if (error)
		lnote_error(dev, sector >= part_start ? sector - part_start : 0,
			    nr_bytes ? nr_bytes : BPF_CORE_READ(rq, __data_len), (__u32)error);
	br_lchain(bio, nr_bytes);
	struct br_chain_ctx *ccp = bpf_map_lookup_elem(&chain_map, &k);
	if (!ccp)
		return 0;
	struct br_chain_ctx cc = *ccp;
	__u32 n = cc.n < BR_MAX_COMPLETE_BIOS ? cc.n : BR_MAX_COMPLETE_BIOS;
	/* two separate paths, one reservation each: the 5.10 verifier loses track of a
	 * reservation reached through an alias ('Unreleased reference') */
	__u64 aux = *(volatile __u64 *)&s->stamp;
	__u64 rel = sector >= part_start ? sector - part_start : 0;
	__u32 fl = norm_flags(opf) | cc.flags;
	if (n <= 1) {
		struct br_done1 *r = bpf_ringbuf_reserve(&rb, sizeof(*r), 0);
		if (!r) {
			lcount_drop(s, 0);
			return 0;
		}
		lcomplete_hdr(&r->h, aux, rel, part_start, dev, opf, op, nr_bytes, error, fl, n);
		r->stamp = n ? cc.stamps[0] : 0;
		bpf_ringbuf_submit(r, wake_flags(c->wake_bytes, sizeof(*r)));
	} else {
		struct br_doneN *r = bpf_ringbuf_reserve(&rb, sizeof(*r), 0);
		if (!r) {
			lcount_drop(s, 0);
			return 0;
		}
		lcomplete_hdr(&r->h, aux, rel, part_start, dev, opf, op, nr_bytes, error, fl, n);
		for (int i = 0; i < BR_MAX_COMPLETE_BIOS; i++)
			r->stamps[i] = cc.stamps[i];
		bpf_ringbuf_submit(r, wake_flags(c->wake_bytes, sizeof(*r)));
	}
	if (cc.flags & BR_F_OLD)
		__sync_fetch_and_add(&s->old_bios, 1);
	__sync_fetch_and_add(&s->completes, 1);
	return 0;
}

SEC("raw_tp/block_rq_complete")
int BPF_PROG(rqdone_raw, struct request *rq, int error, unsigned int nr_bytes)
{
	return lhandle_rq_done(rq, error, nr_bytes);
}

/* bio-based devices (dm, md) complete bios, not requests */
SEC("raw_tp/block_bio_complete")
int BPF_PROG(biodone_raw, struct request_queue *q, struct bio *bio)
{
	__u32 k = 0;
	struct br_cfg *c = bpf_map_lookup_elem(&cfg_map, &k);
	struct br_state *s = bpf_map_lookup_elem(&state_map, &k);

	if (!c || !s || !c->enabled || BPF_CORE_READ(q, mq_ops))
		return 0;
	__u64 key = (__u64)bio;
	__u64 *sp = bpf_map_lookup_elem(&inflight_map, &key);
	if (!sp)
		return 0;
	__u64 stamp = *sp;
	bpf_map_delete_elem(&inflight_map, &key);
	__u32 dev, disk;
	__u64 start;
	bio_dev(bio, &dev, &disk, &start);
	__u32 opf = BPF_CORE_READ(bio, bi_opf);
	__u8 bstatus = BPF_CORE_READ(bio, bi_status);
	__u8 op = lnorm_op(opf);
	if (bstatus && op != BR_OP_FLUSH && op != BR_OP_NONE)
		lnote_error(dev, 0, 0, bstatus);
	struct br_done1 *r = bpf_ringbuf_reserve(&rb, sizeof(struct br_done1), 0);
	if (!r) {
		lcount_drop(s, 0);
		return 0;
	}
	DONE1_REC(r, br_claim(BR_CLAIM_SEQ), *(volatile __u64 *)&s->stamp, dev, opf, op, bstatus,
		  stamp);
	__sync_fetch_and_add(&s->completes, 1);
	bpf_ringbuf_submit(r, wake_flags(c->wake_bytes, sizeof(*r)));
	return 0;
}

/* ------------------------------------------------------------------------ */
/* points and marks                                                         */

SEC("raw_tp")
int point(void *ctx)
{
	__u32 k = 0;
	struct br_point *p = bpf_map_lookup_elem(&point_map, &k);
	struct br_state *s = bpf_map_lookup_elem(&state_map, &k);

	if (!p || !s)
		return 1;
	__u64 stamp = br_claim(BR_CLAIM_STAMP);
	p->stamp = stamp;
	p->ok = 0;
	if (!stamp)
		return 1;
	struct br_pointrec *r = bpf_ringbuf_reserve(&rb, sizeof(struct br_pointrec), 0);
	if (!r) {
		lcount_drop(s, 0);
		return 1;
	}
	POINT_REC(r, p, stamp, br_claim(BR_CLAIM_SEQ));
	return 0;
}
