// SPDX-License-Identifier: GPL-2.0
/*
 * blkrewind capture: every write-class bio queued to the traced block devices,
 * with its payload and an order stamp, into one BPF ring buffer.
 *
 * CO-RE C, compiled by bpf/build.py against the running kernel's BTF
 * (vmlinux.h) and loaded through libbpf (tracer/libbpf.py). The record layout
 * (struct br_rec, BR_* constants) comes from record.h, which build.py
 * generates from blkrewind/formats/record.py: the one definition.
 *
 * Programs
 *   capture_btf / capture_raw   tp_btf (raw_tp fallback) block_bio_queue: one
 *                               stamp per bio; header + payload records
 *   rqdone_btf / rqdone_raw     block_rq_complete (blk-mq devices): R_COMPLETE
 *   biodone_btf                 block_bio_complete (bio-based devices: dm, md)
 *   dirtier_btf                 tp_btf writeback_dirty_folio (optional): who made a
 *                               folio of a traced device dirty, for R_DIRTY
 *   point                       run by the tracer (BPF_PROG_TEST_RUN): R_MARK /
 *                               R_POINT with a stamp from the same counter
 *   reader                      run by the tracer: reads kernel memory for the
 *                               direct-map discovery (tracer/calibrate.py)
 *
 * Dirty map (docs/internals.md, "Gaps and resync"): per traced device a range
 * of dirty_map, one u64 per region of 1 << region_shift bytes, holding the
 * largest stamp of any write-type bio that touched the region. Updated right
 * after the bio's stamp is taken and before its ring buffer reservation, so a
 * bio whose records are dropped still marks its regions. grace_map (per CPU)
 * counts the bio programs active on the CPU and the times that count fell to
 * zero: the tracer's grace period (every program that took a stamp before a
 * given moment has finished). err_map remembers the last BR_ERR_SLOTS write
 * completions that carried an error (the tracer resyncs their ranges).
 *
 * Payload: the bio_vec pages are read through the kernel direct map:
 *   va(page) = page_offset_base + (page - vmemmap_base) / sizeof(struct page) * 4096
 * The bases are found and verified by the loader before capture is enabled.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "record.h"

char LICENSE[] SEC("license") = "GPL";

#define PIECE 4096
#define PAGE_SHIFT_X86 12

struct br_cfg {
	__u64 page_offset_base;
	__u64 vmemmap_base;
	__u64 enabled_ktime;   /* capture start (bpf_ktime_get_ns) */
	__u32 page_struct_size;
	__u32 enabled;
	__u32 calib_tgid;      /* capture any bio (reads too) of this tgid as R_CALIB */
	__u32 piece;           /* payload bytes per record (<= BR_MAX_PIECE) */
	__u32 dirty;           /* 1: keep the dirty map (the default; 0 only for benches) */
	__u32 wake_bytes;      /* 0: submit as libbpf does (wake a consumer that caught up);
				* else submit without a wake-up and force one when a record
				* takes the unconsumed data past this many bytes (the
				* consumer's poll timeout bounds the latency) */
	__u64 dev_bloom;       /* bit dev_bit(d) set for every dev_t d in dev_map: a bio or
				* request whose device and disk bits are both clear is not
				* traced, known without a hash lookup */
	__u32 dirtier;         /* 1: record who dirties page-cache folios of traced devices
				* and emit R_DIRTY for writeback bios (trace --dirtier;
				* benches switch it) */
	__u32 dirtier_shift;   /* the dirtier is kept per 2^dirtier_shift pages of a file
				* (dirtier_map's key: the folio index >> it; 0: per folio) */
	__u32 dirtier_owner;   /* 1: a file dirtied by one thread only is kept in owner_map
				* alone (one hot entry per file: no per-range entry); 2: the
				* same, and a CPU's thread dirtying more of the file it
				* dirtied last within a jiffy or two is not looked up again
				* (dlast_map); 0: per range always (benches compare) */
	__u32 pad2;
};

struct br_state {
	__u64 stamp;           /* next order stamp */
	__u64 seq;             /* next record sequence number */
	__u64 drops;           /* records lost: ring buffer full */
	__u64 drop_bytes;      /* payload bytes of the bios those records belonged to */
	__u64 bios;            /* bios captured */
	__u64 bytes;           /* payload bytes captured */
	__u64 read_errs;       /* payload reads from kernel memory that failed */
	__u64 truncs;          /* bios not walked to their end */
	__u64 completes;       /* R_COMPLETE records emitted */
	__u64 old_bios;        /* completed bios queued before capture began */
	__u64 write_errs;      /* write-type completions with an error (slots in err_map) */
	__u64 dirty_races;     /* dirty map updates given up after BR_DIRTY_TRIES cmpxchg */
	__u64 unstamped;       /* legacy variant: bios and points that could claim no stamp
				* (bpf/legacy.h; the modern programs never count it) */
};

struct br_dev {
	__u64 part_start;      /* start sector of the traced partition (0: whole disk) */
	__u32 traced;          /* 1: this dev_t is traced */
	__u32 region_shift;    /* dirty map: log2 of the region size in bytes */
	__u32 region_base;     /* dirty map: index of the device's first region */
	__u32 nregions;        /* dirty map: regions of the device */
};

/* per CPU: bio programs between their stamp and their end */
struct br_grace {
	__u64 active;          /* programs running on this CPU (nesting, preemption) */
	__u64 quiet;           /* times active fell back to 0 */
};

#define BR_ERR_SLOTS 64
#define BR_DIRTY_TRIES 32
struct br_err {
	__u64 n;               /* 1 + index of the error this slot holds (written last) */
	__u64 sector;          /* device-relative */
	__u64 ktime_ns;
	__u32 dev;
	__u32 bytes;
	__u32 error;
	__u32 pad;
};

struct br_point {
	__u64 stamp;           /* out: the stamp taken */
	__u32 ok;              /* out: 1 when the record reached the ring buffer */
	__u32 pad;
	struct br_rec h;       /* in: header template (rtype, len, tgid, tid, comm);
				* this use also puts struct br_rec into the object's
				* BTF, where the loader checks its layout */
	__u8 data[BR_MAX_POINT_PAYLOAD];
};

struct br_rdbuf {
	__u64 v[4];
	__u8 data[4096];
};

struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct br_cfg); } cfg_map SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct br_state); } state_map SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 256);
	 __type(key, __u32); __type(value, struct br_dev); } dev_map SEC(".maps");
/* captured bios in flight: bio pointer -> stamp (for completions) */
struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, 65536);
	 __type(key, __u64); __type(value, __u64); } inflight_map SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct br_point); } point_map SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct br_rdbuf); } rd_map SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_RINGBUF);
	 __uint(max_entries, 64 * 1024 * 1024); } rb SEC(".maps");
/* sized by the loader (bpf_map__set_max_entries) from the traced devices */
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
	 __uint(map_flags, BPF_F_MMAPABLE);
	 __type(key, __u32); __type(value, __u64); } dirty_map SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct br_grace); } grace_map SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, BR_ERR_SLOTS);
	 __type(key, __u32); __type(value, struct br_err); } err_map SEC(".maps");

/* Who dirtied a page-cache folio (dirtier_btf), keyed by (mapping, folio index): read when
 * a bio another task submits writes the folio back (R_DIRTY). LRU: a folio whose entry was
 * evicted before its writeback (more than max_entries folios dirtied since) has no dirtier. */
struct br_dkey {
	__u64 mapping;         /* struct address_space * */
	__u64 index;           /* folio->index (in pages) */
};

struct br_dirtier {
	__u64 cgroup_id;
	__u64 ktime_ns;        /* when the folio went dirty */
	__u32 tgid;
	__u32 tid;
	char comm[16];
};

struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, 131072);
	 __type(key, struct br_dkey); __type(value, struct br_dirtier); } dirtier_map SEC(".maps");

/* The first thread that dirtied a page of a file (mapping pointer -> br_downer), while no
 * other thread has (shared 0): its pages need no entry per range in dirtier_map, and a
 * dirtying by the same thread again costs one lookup in a small map whose entries the
 * writers keep in the caches. Once another thread dirties a page of it (shared 1), every
 * dirtying also goes to dirtier_map per range, and a writeback looks there first (the owner
 * stays the dirtier of the pages dirtied before: they have no range entry). */
struct br_downer {
	struct br_dirtier d;
	__u32 shared;
	__u32 pad;
};

struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, 16384);
	 __type(key, __u64); __type(value, struct br_downer); } owner_map SEC(".maps");

/* per CPU: the file (mapping) whose owner last dirtied a page of it on this CPU, the owner
 * (pid_tgid) and when (jiffies): the same thread dirtying more of the same file within the
 * next jiffy or two costs no lookup and no store (its owner's time is then up to that old).
 * Set only where owner_map named the thread the file's one writer: if another thread makes
 * the file shared meanwhile, the pages skipped have no range entry, and a writeback finds
 * the owner, who dirtied them. */
struct br_dlast {
	__u64 mapping;
	__u64 pt;
	__u64 jiffies;
};

struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct br_dlast); } dlast_map SEC(".maps");

/* kallsyms data symbols: resolved by libbpf when the kernel exports them
 * (CONFIG_KALLSYMS_ALL); 0 otherwise. Read by the reader program. */
extern const void page_offset_base __ksym __weak;
extern const void vmemmap_base __ksym __weak;

/* ------------------------------------------------------------------------ */
/* normalisation of the running kernel's op and flag numbering             */

static __always_inline __u8 norm_op(__u32 opf)
{
	__u32 op = opf & 0xff; /* REQ_OP_MASK (REQ_OP_BITS = 8) */

	if (op == bpf_core_enum_value(enum req_op, REQ_OP_WRITE))
		return BR_OP_WRITE;
	if (op == bpf_core_enum_value(enum req_op, REQ_OP_FLUSH))
		return BR_OP_FLUSH;
	if (op == bpf_core_enum_value(enum req_op, REQ_OP_DISCARD))
		return BR_OP_DISCARD;
	if (op == bpf_core_enum_value(enum req_op, REQ_OP_SECURE_ERASE))
		return BR_OP_SECURE_ERASE;
	if (op == bpf_core_enum_value(enum req_op, REQ_OP_WRITE_ZEROES))
		return BR_OP_WRITE_ZEROES;
	return BR_OP_NONE;
}

static __always_inline __u32 norm_flags(__u32 opf)
{
	__u32 f = 0;

	if (opf & (1u << bpf_core_enum_value(enum req_flag_bits, __REQ_FUA)))
		f |= BR_F_FUA;
	if (opf & (1u << bpf_core_enum_value(enum req_flag_bits, __REQ_PREFLUSH)))
		f |= BR_F_PREFLUSH;
	if (opf & (1u << bpf_core_enum_value(enum req_flag_bits, __REQ_SYNC)))
		f |= BR_F_SYNC;
	if (opf & (1u << bpf_core_enum_value(enum req_flag_bits, __REQ_META)))
		f |= BR_F_META;
	return f;
}

static __always_inline __u64 next_seq(struct br_state *s)
{
	return __sync_fetch_and_add(&s->seq, 1);
}

static __always_inline void count_drop(struct br_state *s, __u64 bytes)
{
	next_seq(s);  /* a lost record still consumes its number: the gap shows */
	__sync_fetch_and_add(&s->drops, 1);
	__sync_fetch_and_add(&s->drop_bytes, bytes);
}

/* the bit of a dev_t in cfg.dev_bloom (tracer/capture.py dev_bit computes the same) */
static __always_inline __u64 dev_bit(__u32 dev)
{
	return 1ULL << ((dev * 0x9E3779B1u) >> 26);
}

/* Not traced for sure: the early exit of every bio and request of every device on the
 * machine, traced or not (hundreds of ns with hash lookups and probe reads; a few with
 * the bloom bits and the tp_btf programs' plain loads). */
static __always_inline int surely_untraced(struct br_cfg *c, __u32 dev, __u32 disk)
{
	return !c->calib_tgid && !(c->dev_bloom & (dev_bit(dev) | dev_bit(disk)));
}

/* the submit flags of a record of len bytes already reserved (t: cfg.wake_bytes) */
static __always_inline __u64 wake_flags(__u64 t, __u32 len)
{
	__u64 avail;

	if (!t)
		return 0;
	avail = bpf_ringbuf_query(&rb, BPF_RB_AVAIL_DATA);
	return avail >= t && avail < t + len ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
}

/* a program in flight: see grace_map (grace_exit: the modern and the legacy one differ) */
static __always_inline struct br_grace *grace_enter(void)
{
	__u32 k = 0;
	struct br_grace *g = bpf_map_lookup_elem(&grace_map, &k);

	if (g)
		__sync_fetch_and_add(&g->active, 1);
	return g;
}

/* The walk's segment functions for a walk type T (struct br_walk, or the legacy br_lwalk):
 * page_va, the direct-map address of a struct page; load_seg, make sure there is a current
 * segment (0 when the bio is exhausted). */
#define WALK_FNS(T, page_va, load_seg)							\
static __always_inline __u64 page_va(struct T *w, __u64 page)				\
{											\
	__u64 sz = w->page_struct_size ? w->page_struct_size : 64;			\
											\
	return w->page_offset_base + (((page - w->vmemmap_base) / sz) << PAGE_SHIFT_X86); \
}											\
											\
static __always_inline int load_seg(struct T *w)					\
{											\
	if (w->remaining == 0)								\
		return 0;								\
	if (w->seg_left)								\
		return 1;								\
	/* the bvec read whole: one probe read instead of one per field */		\
	__u64 bvb[4] = {};								\
	__u32 bvsz = bpf_core_type_size(struct bio_vec);				\
											\
	if (bvsz > sizeof(bvb))								\
		bvsz = sizeof(bvb);							\
	bpf_probe_read_kernel(bvb, bvsz, (void *)(w->iovec +				\
		(__u64)w->idx * bpf_core_type_size(struct bio_vec)));			\
	__u64 page = *(__u64 *)((__u8 *)bvb +						\
				bpf_core_field_offset(struct bio_vec, bv_page));	\
	__u32 bvlen = *(__u32 *)((__u8 *)bvb +						\
				 bpf_core_field_offset(struct bio_vec, bv_len));	\
	__u32 bvoff = *(__u32 *)((__u8 *)bvb +						\
				 bpf_core_field_offset(struct bio_vec, bv_offset));	\
											\
	w->idx++;									\
	if (bvlen <= w->done) {  /* nothing left in this bvec: take the next */		\
		w->done = 0;								\
		return 1;								\
	}										\
	__u32 l = bvlen - w->done;							\
	if (l > w->remaining)								\
		l = w->remaining;							\
	w->seg_left = l;								\
	w->seg_va = page_va(w, page) + bvoff + w->done;					\
	w->seg_page = page;								\
	w->done = 0;									\
	return 1;									\
}

/* inflight_map[bio] = stamp. A bio's address is mostly one a completed bio had (the slab
 * reuses them, and entries are not deleted: see chain_cb), so its entry is usually there:
 * overwritten in place, which costs a lookup; bpf_map_update_elem would take the bucket lock,
 * a free LRU node for the new element and give the old one back (bench_cpu side by side:
 * -0.3 to -0.75 us per captured bio, docs/costs.md, fifth pass). In place is safe: no bio
 * with this address is in flight (the last one completed before its bio was freed), so no
 * completion reads the entry meanwhile; an LRU eviction of the entry just looked up (so
 * referenced) would need the map full and this entry the least recently used. A macro:
 * both variants. */
#define INFLIGHT_SET(bio_, stamp_) do {						\
	__u64 ikey = (__u64)(bio_), ist = (stamp_);				\
	__u64 *isp = bpf_map_lookup_elem(&inflight_map, &ikey);			\
	if (isp)								\
		*isp = ist;							\
	else									\
		bpf_map_update_elem(&inflight_map, &ikey, &ist, BPF_ANY);	\
} while (0)

/* the regions [first, last] of d a write of size bytes at sector touches; 0: none (no
 * dirty map for d, or past its end) */
static __always_inline int dirty_regions(struct br_dev *d, __u64 sector, __u32 size,
					 __u64 *pfirst, __u64 *plast)
{
	if (!d->nregions || d->region_shift < 16 || d->region_shift > 40)
		return 0;
	__u64 start = sector << 9;
	__u64 end = start + (size ? size : 1) - 1;
	__u64 first = start >> d->region_shift, last = end >> d->region_shift;

	if (first >= d->nregions)
		return 0;
	if (last >= d->nregions)
		last = d->nregions - 1;
	*pfirst = first;
	*plast = last;
	return 1;
}

#ifndef BR_LEGACY
/* ------------------------------------------------------------------------ */
/* walking a bio's payload                                                  */

/* The walk's state lives in a per-CPU map value, not on the stack: the verifier
 * tracks stack slots exactly, so every bound it needs (a piece's length) made the
 * counters of the walk precise and each bpf_loop iteration a new state to explore
 * (clang 14's code: over 1M instructions on 6.18; clang 16's: 545k). Loads from a
 * map value are unknown scalars the programs bound themselves: ~1k instructions
 * with any clang. Exclusive per CPU: a program does not nest on its CPU (the
 * kernel skips such a run: recursion_misses) and the capture programs are
 * alternatives, one of them attached. */
struct br_walk {
	__u64 page_offset_base;  /* from cfg: the direct map */
	__u64 vmemmap_base;
	__u64 page_struct_size;
	__u64 iovec;      /* bio->bi_io_vec */
	__u64 seg_va;     /* direct-map address of the current position */
	__u64 seg_page;   /* struct page * of the current bvec */
	__u32 idx;        /* next bvec to load */
	__u32 done;       /* bytes already consumed in bvec[idx] (bi_bvec_done) */
	__u32 remaining;  /* bytes of the bio not yet copied */
	__u32 seg_left;   /* bytes left in the current segment */
	__u32 offset;     /* byte offset within the bio */
	__u32 piece;      /* payload bytes per record */
	__u32 want;       /* the current record: payload bytes it holds */
	__u32 filled;     /* the current record: payload bytes copied */
	__u32 err;        /* the current record: a read failed */
	__u32 wake_bytes; /* from cfg (wake_flags) */
	struct br_rec h;  /* header template */
	__u8 tmp[PIECE];  /* a partial piece on its way into the ring buffer */
};

struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1);
	 __type(key, __u32); __type(value, struct br_walk); } walk_map SEC(".maps");

/* bpf_loop contexts (on the stack: the helper wants them there) */
struct br_rec_ctx {
	struct br_walk *w;
	struct br_state *s;
};

struct br_piece_ctx {
	struct br_walk *w;
	struct bpf_dynptr *dp;
};

WALK_FNS(br_walk, page_va, load_seg)

/* copy one <= 4 KiB piece of the current segment into the record */
static long piece_cb(__u64 i, void *ctx)
{
	struct br_piece_ctx *pc = ctx;
	struct br_walk *w = pc->w;

	if (w->filled >= w->want)
		return 1;
	if (!load_seg(w))
		return 1;
	if (w->seg_left == 0)
		return 0;
	__u32 n = w->seg_left;
	if (n > PIECE)
		n = PIECE;
	if (n > w->want - w->filled)
		n = w->want - w->filled;
	__u32 at = sizeof(struct br_rec) + w->filled;

	if (n == PIECE) {
		/* whole window: read straight into the ring buffer */
		__u8 *win = bpf_dynptr_data(pc->dp, at, PIECE);
		if (!win) {
			w->err = 1;
			return 1;
		}
		if (bpf_probe_read_kernel(win, PIECE, (void *)w->seg_va))
			w->err = 1;
	} else {
		/* a partial piece goes through the walk's scratch page. The mask is
		 * redundant to clang, which would drop it, not to the verifier: before
		 * 6.2 it learns no bound from the register compare above */
		barrier_var(n);
		n &= (PIECE - 1);
		if (n == 0)
			return 1;
		if (bpf_probe_read_kernel(w->tmp, n, (void *)w->seg_va))
			w->err = 1;
		if (bpf_dynptr_write(pc->dp, at, w->tmp, n, 0))
			w->err = 1;
	}
	w->filled += n;
	w->seg_left -= n;
	w->seg_va += n;
	w->remaining -= n;
	w->offset += n;
	return 0;
}

/* a record of the header template alone, with its own seq (NULL: dropped, counted) */
static __always_inline struct br_rec *header_rec(struct br_state *s, struct br_walk *w)
{
	struct br_rec *r = bpf_ringbuf_reserve(&rb, sizeof(struct br_rec), 0);

	if (!r) {
		count_drop(s, 0);
		return 0;
	}
	__builtin_memcpy(r, &w->h, sizeof(*r));
	r->seq = next_seq(s);
	return r;
}

/* one record: header + up to w->piece bytes of payload */
static long record_cb(__u64 i, void *ctx)
{
	struct br_rec_ctx *rc = ctx;
	struct br_walk *w = rc->w;
	struct bpf_dynptr dp;
	__u32 want = w->remaining;

	if (want == 0)
		return 1;
	if (want > w->piece)
		want = w->piece;
	if (bpf_ringbuf_reserve_dynptr(&rb, sizeof(struct br_rec) + want, 0, &dp)) {
		bpf_ringbuf_discard_dynptr(&dp, 0);
		/* give up on the rest of the bio: the consumer sees the seq gap
		 * and a bio whose pieces do not add up */
		count_drop(rc->s, w->remaining);
		w->remaining = 0;
		return 1;
	}
	struct br_rec *r = bpf_dynptr_data(&dp, 0, sizeof(struct br_rec));
	if (!r) {
		bpf_ringbuf_discard_dynptr(&dp, 0);
		count_drop(rc->s, w->remaining);
		w->remaining = 0;
		return 1;
	}
	load_seg(w);
	__builtin_memcpy(r, &w->h, sizeof(*r));
	r->seq = next_seq(rc->s);
	r->offset = w->offset;
	r->aux = w->seg_page;
	if (w->offset == 0)
		r->flags |= BR_F_FIRST;

	w->want = want;
	w->filled = 0;
	w->err = 0;
	struct br_piece_ctx pc = { .w = w, .dp = &dp };
	/* pieces can be tiny: an O_DIRECT buffer may split a sector across pages */
	bpf_loop(4096, piece_cb, &pc, 0);
	__u32 filled = w->filled;
	r->len = filled;
	if (w->err || filled != want) {
		r->flags |= BR_F_READERR;
		__sync_fetch_and_add(&rc->s->read_errs, 1);
	} else {
		__sync_fetch_and_add(&rc->s->bytes, filled);
	}
	if (filled < want) {
		/* the bvecs ran out before bi_size: never expose a short record as whole */
		w->remaining = 0;
		r->flags |= BR_F_TRUNC;
	}
	if (w->remaining == 0)
		r->flags |= BR_F_LAST;
	bpf_ringbuf_submit_dynptr(&dp, wake_flags(w->wake_bytes, sizeof(struct br_rec) + want));
	return w->remaining ? 0 : 1;
}

/* ------------------------------------------------------------------------ */
/* the dirty map                                                            */

struct br_dirty_ctx {
	struct br_state *s;
	__u64 stamp;
	__u32 first;      /* dirty_map index of the first region */
};

/* dirty_map[first + i] = max(dirty_map[first + i], stamp) */
static long dirty_cb(__u64 i, void *ctx)
{
	struct br_dirty_ctx *dc = ctx;
	__u32 key = dc->first + (__u32)i;
	__u64 *v = bpf_map_lookup_elem(&dirty_map, &key);

	if (!v)
		return 1;
	for (int k = 0; k < BR_DIRTY_TRIES; k++) {
		__u64 old = *(volatile __u64 *)v;
		if (old >= dc->stamp)
			return 0;
		if (__sync_val_compare_and_swap(v, old, dc->stamp) == old)
			return 0;
	}
	/* never seen: every failed cmpxchg means a larger value was stored; the
	 * tracer treats a move of this counter as "dirty map incomplete" */
	__sync_fetch_and_add(&dc->s->dirty_races, 1);
	return 0;
}

static __always_inline void mark_dirty(struct br_state *s, struct br_dev *d, __u64 stamp,
				       __u64 sector, __u32 size)
{
	__u64 first, last;

	if (!dirty_regions(d, sector, size, &first, &last))
		return;
	struct br_dirty_ctx dc = { .s = s, .stamp = stamp, .first = d->region_base + (__u32)first };
	if (first == last) {
		dirty_cb(0, &dc);
		return;
	}
	bpf_loop((__u32)(last - first + 1), dirty_cb, &dc, 0);
}

static __always_inline void grace_exit(struct br_grace *g)
{
	if (g && __sync_fetch_and_add(&g->active, -1) == 1)
		__sync_fetch_and_add(&g->quiet, 1);
}

#endif /* !BR_LEGACY */

/* Bytes of bvec[bi_idx] the bio's iterator has consumed: bi_iter.bi_bvec_done up to 6.x,
 * bi_iter.bi_offset from 7.x (Debian's 7.3) -- the same field renamed. CO-RE picks the one
 * the running kernel has (the other branch is dead code to the verifier). */
struct bvec_iter___v7 {
	unsigned int bi_offset;
} __attribute__((preserve_access_index));

struct bio___v7 {
	struct bvec_iter___v7 bi_iter;
} __attribute__((preserve_access_index));

static __always_inline __u32 bvec_done(struct bio *bio)
{
	struct bio___v7 *b7 = (void *)bio;

	if (bpf_core_field_exists(bio->bi_iter.bi_bvec_done))
		return BPF_CORE_READ(bio, bi_iter.bi_bvec_done);
	return BPF_CORE_READ(b7, bi_iter.bi_offset);
}

/* The traced device d of a bio (not a calibration read): a traced partition (or disk), its
 * sectors made relative to it, or the traced disk of a partition (dev becomes the disk's),
 * sectors absolute. d NULL: neither traced. A macro: see BIO_HEADER. */
#define BIO_TARGET(d, dev, disk, part_start, sector) do {		\
	d = bpf_map_lookup_elem(&dev_map, &(dev));			\
	if (d && d->traced == 1) {					\
		if ((sector) >= (part_start))				\
			(sector) -= (part_start);			\
		else							\
			(sector) = 0;					\
	} else {							\
		d = bpf_map_lookup_elem(&dev_map, &(disk));		\
		if (!d || d->traced != 1)				\
			d = 0;						\
		else							\
			(dev) = (disk);					\
	}								\
} while (0)

/* the header template of a bio's records (after its stamp and dirty map: they come first).
 * A macro, not a function: the arguments are read where the fields are stored, as written
 * out in place (a function's by-value arguments moved the loads: other instructions). */
#define BIO_HEADER(hdr, sector_, part_start_, dev_, opf_, size_, pt_, rtype_, op_, flags_) do {	\
	(hdr).ktime_ns = bpf_ktime_get_ns();						\
	(hdr).sector = (sector_);							\
	(hdr).part_start = (part_start_);						\
	(hdr).cgroup_id = bpf_get_current_cgroup_id();					\
	(hdr).dev = (dev_);								\
	(hdr).opf = (opf_);								\
	(hdr).bio_size = (size_);							\
	(hdr).tgid = (pt_) >> 32;							\
	(hdr).tid = (__u32)(pt_);							\
	(hdr).rtype = (rtype_);								\
	(hdr).op = (op_);								\
	(hdr).flags = (flags_) | norm_flags(opf_);					\
	bpf_get_current_comm(&(hdr).comm, sizeof((hdr).comm));				\
} while (0)

/* the walk (struct br_walk, or the legacy br_lwalk) at the start of bio's size bytes. A macro:
 * the two walks are two types. */
#define WALK_START(w, c, bio, size) do {					\
	(w)->page_offset_base = (c)->page_offset_base;				\
	(w)->vmemmap_base = (c)->vmemmap_base;					\
	(w)->page_struct_size = (c)->page_struct_size;				\
	(w)->iovec = (__u64)BPF_CORE_READ(bio, bi_io_vec);			\
	(w)->idx = BPF_CORE_READ(bio, bi_iter.bi_idx);				\
	(w)->done = bvec_done(bio);						\
	(w)->remaining = (size);						\
	(w)->seg_left = 0;							\
	(w)->offset = 0;							\
} while (0)

#ifndef BR_LEGACY
/* the records of one stamped bio (or calibration read) */
static __always_inline void emit_bio(struct bio *bio, struct br_cfg *c, struct br_state *s,
				     struct br_walk *w, __u32 size)
{
	__sync_fetch_and_add(&s->bios, 1);

	if (w->h.rtype == BR_R_BIO)
		INFLIGHT_SET(bio, w->h.stamp);

	int has_data = (w->h.op == BR_OP_WRITE || w->h.rtype == BR_R_CALIB) && size > 0;
	if (!has_data) {
		/* flush, discard, write-zeroes, secure erase, empty PREFLUSH */
		struct br_rec *r = header_rec(s, w);
		if (!r)
			return;
		r->flags |= BR_F_FIRST | BR_F_LAST | BR_F_NODATA;
		bpf_ringbuf_submit(r, wake_flags(c->wake_bytes, sizeof(*r)));
		return;
	}

	WALK_START(w, c, bio, size);
	w->piece = c->piece;
	w->wake_bytes = c->wake_bytes;
	if (w->piece < PIECE || w->piece > BR_MAX_PIECE)
		w->piece = BR_MAX_PIECE;
	struct br_rec_ctx rc = { .w = w, .s = s };
	bpf_loop(size / PIECE + 2, record_cb, &rc, 0);
	if (w->remaining)
		__sync_fetch_and_add(&s->truncs, 1);
}

/* ------------------------------------------------------------------------ */
/* the dirtier of a bio's pages (buffered writes, written back by another task) */

#endif /* !BR_LEGACY */

#define BR_S_IFMT 0170000
#define BR_S_IFBLK 0060000

/* the current thread dirtied the page-cache folio (page) key: remembered for its range of
 * 2^dirtier_shift pages (the same thread dirtying more of the range, the common case, then
 * costs a lookup and a store, no new LRU node). A macro: as an always_inline function (key
 * by pointer) the stack slots moved, other instructions. */
#define REMEMBER_DIRTIER(c, key) do {							\
	__u64 pt = bpf_get_current_pid_tgid();						\
	__u32 zk = 0;									\
	struct br_dlast *dl = (c)->dirtier_owner == 2 ?					\
		bpf_map_lookup_elem(&dlast_map, &zk) : 0;				\
	__u64 jf = 0;									\
	if (dl) {									\
		jf = bpf_jiffies64();							\
		if (dl->mapping == (key).mapping && dl->pt == pt && jf - dl->jiffies < 2) \
			break;		/* this CPU's last file, its owner, just now */	\
	}										\
	__u64 now = bpf_ktime_get_ns();							\
	if ((c)->dirtier_owner) {							\
		__u64 mk = (key).mapping;						\
		struct br_downer *o = bpf_map_lookup_elem(&owner_map, &mk);		\
		if (o && !o->shared && o->d.tgid == (__u32)(pt >> 32)			\
		    && o->d.tid == (__u32)pt) {						\
			o->d.ktime_ns = now;	/* the file's one writer again */	\
			if (dl) {							\
				dl->mapping = mk;					\
				dl->pt = pt;						\
				dl->jiffies = jf;					\
			}								\
			break;								\
		}									\
		if (!o) {		/* the file's first dirtier: its owner */	\
			struct br_downer ov;						\
			__builtin_memset(&ov, 0, sizeof(ov));				\
			ov.d.cgroup_id = bpf_get_current_cgroup_id();			\
			ov.d.ktime_ns = now;						\
			ov.d.tgid = pt >> 32;						\
			ov.d.tid = (__u32)pt;						\
			bpf_get_current_comm(ov.d.comm, sizeof(ov.d.comm));		\
			if (!bpf_map_update_elem(&owner_map, &mk, &ov, BPF_NOEXIST))	\
				break;							\
			o = bpf_map_lookup_elem(&owner_map, &mk);  /* raced */		\
		}									\
		if (o && !o->shared)	/* a second thread: per range from now on */	\
			o->shared = 1;							\
	}										\
	(key).index >>= ((c)->dirtier_shift & 31);					\
	struct br_dirtier *old = bpf_map_lookup_elem(&dirtier_map, &(key));		\
	if (old && old->tgid == (__u32)(pt >> 32) && old->tid == (__u32)pt) {		\
		/* dirtied again by the same thread (the common case: a file		\
		 * rewritten): only the time, in place -- an update would take a new	\
		 * LRU node (and may evict) */						\
		old->ktime_ns = now;							\
	} else {									\
		struct br_dirtier v;							\
		v.cgroup_id = bpf_get_current_cgroup_id();				\
		v.ktime_ns = now;							\
		v.tgid = pt >> 32;							\
		v.tid = (__u32)pt;							\
		bpf_get_current_comm(v.comm, sizeof(v.comm));				\
		bpf_map_update_elem(&dirtier_map, &(key), &v, BPF_ANY);			\
	}										\
} while (0)

#ifndef BR_LEGACY
/* A folio of a traced device went clean -> dirty (folio_account_dirtied, in the dirtying
 * task's context, with the mapping's xa_lock held): remember who. Plain BTF loads only;
 * folios of devices the bloom rules out cost a few loads. */
SEC("tp_btf/writeback_dirty_folio")
int BPF_PROG(dirtier_btf, struct folio *folio, struct address_space *mapping)
{
	__u32 k = 0;
	struct br_cfg *c = bpf_map_lookup_elem(&cfg_map, &k);

	if (!c || !c->enabled || !c->dirtier || !mapping)
		return 0;
	struct inode *host = mapping->host;
	if (!host)
		return 0;
	__u32 dev, disk;
	if ((host->i_mode & BR_S_IFMT) == BR_S_IFBLK) {
		/* the block device's own page cache (buffer heads: file-system metadata) */
		dev = host->i_rdev;
		disk = dev;
	} else {
		struct super_block *sb = host->i_sb;
		struct block_device *sbdev = sb->s_bdev;
		dev = sb->s_dev;
		disk = sbdev ? sbdev->bd_disk->part0->bd_dev : dev;
	}
	if (!(c->dev_bloom & (dev_bit(dev) | dev_bit(disk))))
		return 0;
	struct br_dkey key = { .mapping = (__u64)mapping, .index = folio->index };
	REMEMBER_DIRTIER(c, key);
	return 0;
}

#endif /* !BR_LEGACY */

/* folio->flags: unsigned long up to 6.17, memdesc_flags_t (a struct holding it) from 6.18.
 * CO-RE does not match a field of another kind, so one flavour per kind; the other one's
 * branch is dead code to the verifier (its relocation fails harmlessly). */
struct br_memdesc_flags {
	unsigned long f;
};

struct folio___memdesc {
	struct br_memdesc_flags flags;
} __attribute__((preserve_access_index));

struct folio___ulong {
	unsigned long flags;
} __attribute__((preserve_access_index));

/* 0 where neither is known (the caller then gives up) */
static __always_inline __u64 folio_flags(void *folio)
{
	struct folio___ulong *fu = folio;
	struct folio___memdesc *fm = folio;
	__u64 v = 0;

	if (bpf_core_field_exists(fu->flags))
		bpf_core_read(&v, sizeof(v), &fu->flags);
	else if (bpf_core_field_exists(fm->flags))
		bpf_core_read(&v, sizeof(v), &fm->flags);
	return v;
}

/* The end of emit_dirtier (both variants; header_rec: the variant's): the dirtier of the
 * folio (page) key under writeback either flags the bio (the submitter dirtied it:
 * F_DIRTYSELF) or goes out as an R_DIRTY record. A macro: the walks are two types. */
#define DIRTIER_REC(c, s, w, key, header_rec) do {					\
	if ((key).mapping && !((key).mapping & 3)) {  /* none, or anon / movable_ops */	\
		__u64 mk = (key).mapping;						\
		struct br_downer *o = (c)->dirtier_owner ?				\
			bpf_map_lookup_elem(&owner_map, &mk) : 0;			\
		struct br_dirtier *d = 0;						\
		if (o && !o->shared) {							\
			d = &o->d;							\
		} else {								\
			struct br_dkey rk = { .mapping = (key).mapping,			\
				.index = (key).index >> ((c)->dirtier_shift & 31) };	\
			d = bpf_map_lookup_elem(&dirtier_map, &rk);			\
			if (!d && o)							\
				d = &o->d;						\
		}									\
		if (!d)									\
			break;								\
		if (d->tgid == (w)->h.tgid && d->tid == (w)->h.tid) {			\
			(w)->h.flags |= BR_F_DIRTYSELF;					\
			break;								\
		}									\
		struct br_rec *r = header_rec(s, w);					\
		if (!r)									\
			break;								\
		r->rtype = BR_R_DIRTY;							\
		r->flags = BR_F_NODATA;							\
		r->len = 0;								\
		r->aux = (key).index;							\
		r->ktime_ns = d->ktime_ns;						\
		r->cgroup_id = d->cgroup_id;						\
		r->tgid = d->tgid;							\
		r->tid = d->tid;							\
		__builtin_memcpy(r->comm, d->comm, sizeof(r->comm));			\
		bpf_ringbuf_submit(r, wake_flags((c)->wake_bytes, sizeof(*r)));	\
	}										\
} while (0)

#ifndef BR_LEGACY
/* A write bio with data: if its first page is a page-cache folio under writeback whose
 * dirtier is known, either flag the bio (the submitter dirtied it: F_DIRTYSELF) or emit an
 * R_DIRTY record with the bio's stamp and the dirtier (before the bio's records). O_DIRECT
 * bios carry user pages, not under writeback: the submitter is the writer, nothing added. */
static __always_inline void emit_dirtier(struct bio *bio, struct br_cfg *c, struct br_state *s,
					 struct br_walk *w)
{
	struct bio_vec *bv = (struct bio_vec *)((__u64)BPF_CORE_READ(bio, bi_io_vec) +
		(__u64)BPF_CORE_READ(bio, bi_iter.bi_idx) * bpf_core_type_size(struct bio_vec));
	struct page *page = BPF_CORE_READ(bv, bv_page);
	struct folio *folio = (struct folio *)page;

	/* everything CO-RE relocates here is checked first: a kernel that lacks a field or
	 * flag loses the attribution, never the capture program */
	if (!page || !bpf_core_field_exists(folio->mapping) || !bpf_core_field_exists(folio->index)
	    || !bpf_core_enum_value_exists(enum pageflags, PG_writeback))
		return;
	if (bpf_core_field_exists(page->compound_head)) {
		__u64 head = BPF_CORE_READ(page, compound_head);
		if (head & 1)  /* a tail page: its folio is the head */
			folio = (struct folio *)(head - 1);
	}
	if (!(folio_flags(folio) & (1ULL << bpf_core_enum_value(enum pageflags, PG_writeback))))
		return;
	struct br_dkey key = { .mapping = (__u64)BPF_CORE_READ(folio, mapping),
			       .index = BPF_CORE_READ(folio, index) };
	DIRTIER_REC(c, s, w, key, header_rec);
}

/* dev: the dev_t of bio->bi_bdev, disk: its disk's; opf, sector, part_start (the bdev's
 * bd_start_sect), size: the bio's (read by the caller: plain loads in tp_btf, a probe read
 * each in raw_tp) */
static __always_inline int handle_bio(struct bio *bio, __u32 dev, __u32 disk, __u32 opf,
				      __u64 sector, __u64 part_start, __u32 size)
{
	__u32 k = 0;
	struct br_cfg *c = bpf_map_lookup_elem(&cfg_map, &k);

	if (!c || !c->enabled || surely_untraced(c, dev, disk))
		return 0;
	struct br_state *s = bpf_map_lookup_elem(&state_map, &k);
	if (!s)
		return 0;

	__u64 pt = bpf_get_current_pid_tgid();
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
		op = norm_op(opf);
		if (op == BR_OP_NONE)
			return 0;
	}

	struct br_walk *w = bpf_map_lookup_elem(&walk_map, &k);
	if (!w)
		return 0;
	struct br_grace *g = grace_enter();  /* before the stamp: see grace_map */
	__builtin_memset(&w->h, 0, sizeof(w->h));
	w->h.stamp = __sync_fetch_and_add(&s->stamp, 1);
	/* the dirty map first: before any reservation can fail */
	if (rtype == BR_R_BIO && op != BR_OP_FLUSH && c->dirty && d)
		mark_dirty(s, d, w->h.stamp, sector, size);
	BIO_HEADER(w->h, sector, part_start, dev, opf, size, pt, rtype, op, flags);
	if (rtype == BR_R_BIO && op == BR_OP_WRITE && size && c->dirtier)
		emit_dirtier(bio, c, s, w);
	emit_bio(bio, c, s, w, size);
	grace_exit(g);
	return 0;
}

SEC("tp_btf/block_bio_queue")
int BPF_PROG(capture_btf, struct bio *bio)
{
	struct block_device *bdev = bio->bi_bdev;  /* BTF pointers: plain loads */

	return handle_bio(bio, bdev->bd_dev, bdev->bd_disk->part0->bd_dev, bio->bi_opf,
			  bio->bi_iter.bi_sector, bdev->bd_start_sect, bio->bi_iter.bi_size);
}

SEC("raw_tp/block_bio_queue")
int BPF_PROG(capture_raw, struct bio *bio)
{
	struct block_device *bdev = BPF_CORE_READ(bio, bi_bdev);

	return handle_bio(bio, BPF_CORE_READ(bdev, bd_dev),
			  BPF_CORE_READ(bdev, bd_disk, part0, bd_dev), BPF_CORE_READ(bio, bi_opf),
			  BPF_CORE_READ(bio, bi_iter.bi_sector), BPF_CORE_READ(bdev, bd_start_sect),
			  BPF_CORE_READ(bio, bi_iter.bi_size));
}

#endif /* !BR_LEGACY */

/* ------------------------------------------------------------------------ */
/* completions                                                              */

#ifndef BR_LEGACY
/* a bio-based device's completion: one bio, one stamp (blk-mq requests: handle_rq_done) */
struct br_done1 {
	struct br_rec h;
	__u64 stamp;
};

#endif /* !BR_LEGACY */

struct br_chain_ctx {
	__u64 stamps[BR_MAX_COMPLETE_BIOS];
	__u64 bio;
	__u32 left;      /* bytes completed not yet attributed */
	__u32 n;
	__u32 flags;     /* BR_F_OLD */
};

static long chain_cb(__u64 i, void *ctx)
{
	struct br_chain_ctx *cc = ctx;
	struct bio *bio = (struct bio *)cc->bio;

	if (!bio || cc->left == 0 || cc->n >= BR_MAX_COMPLETE_BIOS)
		return 1;
	__u32 size = BPF_CORE_READ(bio, bi_iter.bi_size);
	__u64 key = (__u64)bio, st = 0;
	__u64 *sp = bpf_map_lookup_elem(&inflight_map, &key);
	if (!sp) {
		/* a clone split off a captured bio points at its parent */
		key = (__u64)BPF_CORE_READ(bio, bi_private);
		sp = bpf_map_lookup_elem(&inflight_map, &key);
	}
	/* Entries are not deleted here: the remainder of a split keeps the
	 * parent's pointer and may complete before the split-off front, which
	 * then finds its parent through bi_private. A freed bio's address is
	 * re-inserted when reused (queued after capture began), and a bio queued
	 * before capture cannot share an address with a live captured one, so
	 * stale entries never hide an old bio; the LRU bounds the map. */
	if (sp) {
		st = *sp;
	} else {
		cc->flags |= BR_F_OLD;
	}
	cc->stamps[cc->n & (BR_MAX_COMPLETE_BIOS - 1)] = st;
	cc->n++;
	cc->left = size < cc->left ? cc->left - size : 0;
	cc->bio = (__u64)BPF_CORE_READ(bio, bi_next);
	return 0;
}

/* the header of a request's completion record (seq, aux: the variant's); a macro: the
 * arguments are evaluated where they are stored, as written out in place */
#define COMPLETE_HDR(h, seq_, aux_, sector_, part_start_, dev_, opf_, op_, bytes_, error_,	\
		     flags_, len_) do {							\
	__builtin_memset(h, 0, sizeof(*(h)));						\
	(h)->seq = (seq_);								\
	(h)->ktime_ns = bpf_ktime_get_ns();						\
	(h)->aux = (aux_);								\
	(h)->sector = (sector_);							\
	(h)->part_start = (part_start_);						\
	(h)->dev = (dev_);								\
	(h)->opf = (opf_);								\
	(h)->op = (op_);								\
	(h)->bio_size = (bytes_);							\
	(h)->error = (__u16)(error_);							\
	(h)->rtype = BR_R_COMPLETE;							\
	(h)->flags = (flags_);								\
	(h)->len = (len_);								\
} while (0)

/* the completion record of one bio (struct br_done1 r; seq, aux: the variant's); a macro:
 * the arguments are evaluated where they are stored, as written out in place */
#define DONE1_REC(r, seq_, aux_, dev_, opf_, op_, error_, stamp_) do {	\
	__builtin_memset(r, 0, sizeof(*(r)));				\
	(r)->h.seq = (seq_);						\
	(r)->h.ktime_ns = bpf_ktime_get_ns();				\
	(r)->h.aux = (aux_);						\
	(r)->h.dev = (dev_);						\
	(r)->h.opf = (opf_);						\
	(r)->h.op = (op_);						\
	(r)->h.error = (error_);					\
	(r)->h.rtype = BR_R_COMPLETE;					\
	(r)->h.flags = norm_flags(opf_);				\
	(r)->h.len = 8;							\
	(r)->stamp = (stamp_);						\
} while (0)

/* a point's record: its request's header, then its payload */
struct br_pointrec {
	struct br_rec h;
	__u8 data[BR_MAX_POINT_PAYLOAD];
};

/* a point's record (struct br_pointrec r, reserved) from the request p, submitted; seq: the
 * variant's, evaluated after the stamp is stored */
#define POINT_REC(r, p, stamp_, seq_) do {				\
	__builtin_memcpy(&(r)->h, &(p)->h, sizeof((r)->h));		\
	(r)->h.stamp = (stamp_);					\
	(r)->h.seq = (seq_);						\
	(r)->h.ktime_ns = bpf_ktime_get_ns();				\
	if ((r)->h.len > BR_MAX_POINT_PAYLOAD)				\
		(r)->h.len = BR_MAX_POINT_PAYLOAD;			\
	(r)->h.flags |= BR_F_FIRST | BR_F_LAST | BR_F_NODATA;		\
	__builtin_memcpy((r)->data, (p)->data, sizeof((r)->data));	\
	bpf_ringbuf_submit(r, 0);					\
	(p)->ok = 1;							\
} while (0)

#ifndef BR_LEGACY
/* a write-type completion with an error: remember its range (before any
 * reservation, so it is known even when the record is dropped) */
static __always_inline void note_error(struct br_state *s, __u32 dev, __u64 sector,
				       __u32 bytes, __u32 error)
{
	__u64 n = __sync_fetch_and_add(&s->write_errs, 1);
	__u32 k = (__u32)(n & (BR_ERR_SLOTS - 1));
	struct br_err *e = bpf_map_lookup_elem(&err_map, &k);

	if (!e)
		return;
	e->sector = sector;
	e->ktime_ns = bpf_ktime_get_ns();
	e->dev = dev;
	e->bytes = bytes;
	e->error = error;
	__sync_lock_test_and_set(&e->n, n + 1);  /* last: the slot is complete */
}

/* opf: rq->cmd_flags; part: rq->part, pdev: its dev_t (0 without part); disk: the dev_t of
 * the request queue's disk; bio: rq->bio, rsector: rq->__sector, pstart: the part's
 * bd_start_sect (read by the caller: plain loads in tp_btf) */
static __always_inline int handle_rq_done(struct request *rq, int error, unsigned int nr_bytes,
					  __u32 opf, struct block_device *part, __u32 pdev,
					  __u32 disk, __u64 bio, __u64 rsector, __u64 pstart)
{
	__u8 op = norm_op(opf);
	if (op == BR_OP_NONE || op == BR_OP_FLUSH)
		return 0;
	__u32 k = 0;
	struct br_cfg *c = bpf_map_lookup_elem(&cfg_map, &k);
	if (!c || !c->enabled || surely_untraced(c, pdev, disk))
		return 0;
	struct br_state *s = bpf_map_lookup_elem(&state_map, &k);
	if (!s)
		return 0;
	if (!bio)
		return 0;
	__u32 dev = 0;
	__u64 part_start = 0;
	struct br_dev *d = 0;
	if (part) {
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
	__u64 sector = rsector;
	if (error)
		note_error(s, dev, sector >= part_start ? sector - part_start : 0,
			   nr_bytes ? nr_bytes : BPF_CORE_READ(rq, __data_len), (__u32)error);
	/* the stamps first: the record is as long as they are (usually one) */
	struct br_chain_ctx cc = { .bio = bio, .left = nr_bytes };
	/* the first bio called directly, not through bpf_loop: usually it is the only one */
	if (!chain_cb(0, &cc) && cc.bio && cc.left)
		bpf_loop(BR_MAX_COMPLETE_BIOS - 1, chain_cb, &cc, 0);
	__u32 n = cc.n < BR_MAX_COMPLETE_BIOS ? cc.n : BR_MAX_COMPLETE_BIOS;
	if (n == 1) {
		/* one stamp, the usual case: a record of a fixed size, reserved and submitted
		 * without the dynptr calls (bench_cpu side by side: completion -0.1 us per
		 * captured bio, docs/costs.md, sixth pass). The same bytes as below. */
		struct br_done1 *r1 = bpf_ringbuf_reserve(&rb, sizeof(*r1), 0);
		if (!r1) {
			count_drop(s, 0);
			return 0;
		}
		COMPLETE_HDR(&r1->h, next_seq(s), s->stamp,
			     sector >= part_start ? sector - part_start : 0, part_start, dev, opf,
			     op, nr_bytes, error, norm_flags(opf) | cc.flags, 8);
		r1->stamp = cc.stamps[0];
		if (cc.flags & BR_F_OLD)
			__sync_fetch_and_add(&s->old_bios, 1);
		__sync_fetch_and_add(&s->completes, 1);
		bpf_ringbuf_submit(r1, wake_flags(c->wake_bytes, sizeof(*r1)));
		return 0;
	}
	__u32 len = n * 8;
	/* clang knows len <= sizeof(stamps) and would drop this; before 6.2 the verifier
	 * does not (the register compare above): 'R4 unbounded memory access' on 6.1 */
	barrier_var(len);
	if (len > sizeof(cc.stamps))
		len = sizeof(cc.stamps);
	struct bpf_dynptr dp;
	if (bpf_ringbuf_reserve_dynptr(&rb, sizeof(struct br_rec) + len, 0, &dp)) {
		bpf_ringbuf_discard_dynptr(&dp, 0);
		count_drop(s, 0);
		return 0;
	}
	struct br_rec *h = bpf_dynptr_data(&dp, 0, sizeof(struct br_rec));
	if (!h) {
		bpf_ringbuf_discard_dynptr(&dp, 0);
		count_drop(s, 0);
		return 0;
	}
	COMPLETE_HDR(h, next_seq(s), s->stamp, sector >= part_start ? sector - part_start : 0,
		     part_start, dev, opf, op, nr_bytes, error, norm_flags(opf) | cc.flags, len);
	if (len && bpf_dynptr_write(&dp, sizeof(struct br_rec), cc.stamps, len, 0))
		h->len = 0;  /* never: the reservation has room for n stamps */
	if (cc.flags & BR_F_OLD)
		__sync_fetch_and_add(&s->old_bios, 1);
	__sync_fetch_and_add(&s->completes, 1);
	bpf_ringbuf_submit_dynptr(&dp, wake_flags(c->wake_bytes, sizeof(struct br_rec) + n * 8));
	return 0;
}

SEC("tp_btf/block_rq_complete")
int BPF_PROG(rqdone_btf, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct block_device *part = rq->part;  /* BTF pointers: plain loads */

	return handle_rq_done(rq, error, nr_bytes, rq->cmd_flags, part, part ? part->bd_dev : 0,
			      rq->q->disk->part0->bd_dev, (__u64)rq->bio, rq->__sector,
			      part ? part->bd_start_sect : 0);
}

SEC("raw_tp/block_rq_complete")
int BPF_PROG(rqdone_raw, struct request *rq, blk_status_t error, unsigned int nr_bytes)
{
	struct block_device *part = BPF_CORE_READ(rq, part);

	return handle_rq_done(rq, error, nr_bytes, BPF_CORE_READ(rq, cmd_flags), part,
			      part ? BPF_CORE_READ(part, bd_dev) : 0,
			      BPF_CORE_READ(rq, q, disk, part0, bd_dev), (__u64)BPF_CORE_READ(rq, bio),
			      BPF_CORE_READ(rq, __sector), part ? BPF_CORE_READ(part, bd_start_sect) : 0);
}

/* bio-based devices (dm, md) complete bios, not requests */
SEC("tp_btf/block_bio_complete")
int BPF_PROG(biodone_btf, struct request_queue *q, struct bio *bio)
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
	struct block_device *bdev = BPF_CORE_READ(bio, bi_bdev);
	__u32 opf = BPF_CORE_READ(bio, bi_opf);
	__u8 bstatus = BPF_CORE_READ(bio, bi_status);
	if (bstatus && norm_op(opf) != BR_OP_FLUSH && norm_op(opf) != BR_OP_NONE) {
		/* bi_iter has advanced by completion time: the range is unknown
		 * here, the tracer resyncs the whole device (bytes = 0) */
		note_error(s, BPF_CORE_READ(bdev, bd_dev), 0, 0, bstatus);
	}
	struct br_done1 *r = bpf_ringbuf_reserve(&rb, sizeof(struct br_done1), 0);
	if (!r) {
		count_drop(s, 0);
		return 0;
	}
	DONE1_REC(r, next_seq(s), s->stamp, BPF_CORE_READ(bdev, bd_dev), opf, norm_op(opf),
		  bstatus, stamp);
	__sync_fetch_and_add(&s->completes, 1);
	bpf_ringbuf_submit(r, wake_flags(c->wake_bytes, sizeof(*r)));
	return 0;
}

/* ------------------------------------------------------------------------ */
/* points and marks: a stamp from the same counter as the writes           */

SEC("raw_tp")
int point(void *ctx)
{
	__u32 k = 0;
	struct br_point *p = bpf_map_lookup_elem(&point_map, &k);
	struct br_state *s = bpf_map_lookup_elem(&state_map, &k);

	if (!p || !s)
		return 1;
	__u64 stamp = __sync_fetch_and_add(&s->stamp, 1);
	p->stamp = stamp;
	p->ok = 0;
	struct br_pointrec *r = bpf_ringbuf_reserve(&rb, sizeof(struct br_pointrec), 0);
	if (!r) {
		count_drop(s, 0);
		return 1;
	}
	POINT_REC(r, p, stamp, next_seq(s));
	return 0;
}

#endif /* !BR_LEGACY */

#ifdef BR_LEGACY
#include "legacy.h"
#endif

/* ------------------------------------------------------------------------ */
/* kernel memory reader for the direct-map discovery (BPF_PROG_TEST_RUN)
 * ctx[0] = op, ctx[1] = addr, ctx[2] = len
 * op 0: copy len (<= 4096) bytes at addr into rd_map.data; returns 1 on a fault
 * op 1: v[0] = current task (a direct-map address)
 * op 2: v[0..1] = addresses of page_offset_base / vmemmap_base (0 when not
 *       exported), v[2] = sizeof(struct page), v[3] = sizeof(struct bio_vec)
 */
SEC("raw_tp")
int reader(__u64 *ctx)
{
	__u32 k = 0;
	struct br_rdbuf *b = bpf_map_lookup_elem(&rd_map, &k);

	if (!b)
		return 2;
	__u64 op = ctx[0], addr = ctx[1], len = ctx[2];
	if (op == 0) {
		if (len > 4096)
			len = 4096;
		return bpf_probe_read_kernel(b->data, len, (void *)addr) ? 1 : 0;
	} else if (op == 1) {
		b->v[0] = bpf_get_current_task();
	} else if (op == 2) {
		b->v[0] = (__u64)&page_offset_base;
		b->v[1] = (__u64)&vmemmap_base;
		b->v[2] = bpf_core_type_size(struct page);
		b->v[3] = bpf_core_type_size(struct bio_vec);
	}
	return 0;
}
