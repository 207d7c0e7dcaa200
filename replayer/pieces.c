/* The restore's and the read path's per-piece copy (replayer/payload.py copy_pieces), native.
 *
 * Built by bpf/build.py (replayer/native.py) with the clang that builds the BPF object.
 * Loaded with ctypes (the GIL is released during the call); without it, copy_pieces copies
 * with a memoryview slice per piece (the same result). The caller has checked every bound:
 * this only copies.
 */
#include <stdint.h>
#include <string.h>

/* dst[d_off[k] .. +n[k]) = src[slot[k]][s_off[k] .. +n[k]) for k < count; slot NULL: src[0]. */
void br_copy_pieces(uint8_t *dst, const int64_t *d_off, const uint8_t *const *src,
		    const int64_t *slot, const int64_t *s_off, const int64_t *n, int64_t count)
{
	for (int64_t k = 0; k < count; k++) {
		const uint8_t *s = src[slot ? slot[k] : 0];

		memcpy(dst + d_off[k], s + s_off[k], (size_t)n[k]);
	}
}

/* The pages of a row group that ingest wrote alike (replayer/payload.py _Template): from p,
 * while they fit before end, at most maxpages of them, each
 *     pre, the CRC as a zigzag varint of 1-5 bytes, suf, then nrows rows of a 4-byte length
 *     word == rowlen and rowlen bytes, the page's body being `size` bytes from
 *     (the end of suf - skip).
 * For each page found: body[k] (its body's start) and crc[k] (the CRC its header holds).
 * Returns the number found; *endp the end of the last one (p when none). */
int64_t br_walk_pages(const uint8_t *b, int64_t p, int64_t end, int64_t maxpages,
		      const uint8_t *pre, int64_t npre, const uint8_t *suf, int64_t nsuf,
		      int64_t skip, int64_t size, int64_t nrows, int64_t rowlen,
		      int64_t *body, uint32_t *crc, int64_t *endp)
{
	int64_t k = 0;

	while (k < maxpages) {
		int64_t q = p + npre, bd, r;
		uint64_t v = 0;
		int i;

		if (q + 5 + nsuf > end || memcmp(b + p, pre, (size_t)npre) != 0)
			break;
		for (i = 0; i < 5; i++) {
			v |= (uint64_t)(b[q + i] & 0x7F) << (7 * i);
			if (b[q + i] < 0x80)
				break;
		}
		if (i == 5)
			break;
		q += i + 1;
		if (memcmp(b + q, suf, (size_t)nsuf) != 0)
			break;
		bd = q + nsuf - skip;
		if (bd < q || bd + size > end)
			break;
		for (r = 0; r < nrows; r++) {
			int32_t w;

			memcpy(&w, b + bd + skip + r * (4 + rowlen), 4);
			if (w != rowlen)
				break;
		}
		if (r != nrows)
			break;
		body[k] = bd;
		crc[k] = (uint32_t)((v >> 1) ^ (0 - (v & 1)));
		k++;
		p = bd + size;
	}
	*endp = p;
	return k;
}

/* ---- A Parquet footer's column chunks (replayer/payload.py _Footer), thrift compact. ----
 * Every read is bounds-checked against [0, n): a damaged footer is an error (-1), never a
 * read outside the buffer; the caller then parses it in Python or asks pyarrow. */
struct rd {
	const uint8_t *b;
	int64_t n, p;
	int err;
};

static uint8_t rd_byte(struct rd *r)
{
	if (r->p >= r->n) {
		r->err = 1;
		return 0;
	}
	return r->b[r->p++];
}

static uint64_t rd_varint(struct rd *r)
{
	uint64_t v = 0;
	int s;

	for (s = 0; s <= 63 && !r->err; s += 7) {
		uint8_t c = rd_byte(r);

		v |= (uint64_t)(c & 0x7F) << s;
		if (c < 0x80)
			return v;
	}
	r->err = 1;
	return 0;
}

static int64_t zigzag(uint64_t v)
{
	return (int64_t)(v >> 1) ^ -(int64_t)(v & 1);
}

static void rd_skip(struct rd *r, int t, int depth);

/* Skip a struct's fields up to and including its stop byte. */
static void rd_skip_struct(struct rd *r, int depth)
{
	if (depth > 32) {
		r->err = 1;
		return;
	}
	while (!r->err) {
		uint8_t h = rd_byte(r);

		if (h == 0 || r->err)
			return;
		if ((h >> 4) == 0)
			rd_varint(r);
		rd_skip(r, h & 0x0F, depth + 1);
	}
}

/* A container's element: bools are one byte there. */
static void rd_skip_elem(struct rd *r, int t, int depth)
{
	if (t == 1 || t == 2)
		rd_byte(r);
	else
		rd_skip(r, t, depth);
}

static void rd_skip(struct rd *r, int t, int depth)
{
	uint64_t k;
	uint8_t h;

	if (depth > 32) {
		r->err = 1;
		return;
	}
	switch (t) {
	case 1: case 2:		/* bool: in the field header */
		return;
	case 3:
		rd_byte(r);
		return;
	case 4: case 5: case 6:
		rd_varint(r);
		return;
	case 7:
		if (r->n - r->p < 8)
			r->err = 1;
		else
			r->p += 8;
		return;
	case 8:
		k = rd_varint(r);
		if (r->err || k > (uint64_t)(r->n - r->p))
			r->err = 1;
		else
			r->p += (int64_t)k;
		return;
	case 9: case 10:
		h = rd_byte(r);
		k = h >> 4;
		if (k == 15)
			k = rd_varint(r);
		while (k-- > 0 && !r->err)
			rd_skip_elem(r, h & 0x0F, depth + 1);
		return;
	case 11:
		k = rd_varint(r);
		if (k > 0 && !r->err) {
			h = rd_byte(r);
			while (k-- > 0 && !r->err) {
				rd_skip_elem(r, h >> 4, depth + 1);
				rd_skip_elem(r, h & 0x0F, depth + 1);
			}
		}
		return;
	case 12:
		rd_skip_struct(r, depth + 1);
		return;
	default:
		r->err = 1;
	}
}

/* A field header: its id (from the previous one's) and type; 0 at the stop byte. */
static int rd_field(struct rd *r, int *fid, int *t)
{
	uint8_t h = rd_byte(r);

	if (h == 0 || r->err)
		return 0;
	*t = h & 0x0F;
	if (h >> 4)
		*fid += h >> 4;
	else
		*fid = (int)zigzag(rd_varint(r));
	return 1;
}

/* A list header: its element count (bounded by the bytes left) and element type. */
static int64_t rd_list(struct rd *r, int *et)
{
	uint8_t h = rd_byte(r);
	uint64_t k = h >> 4;

	*et = h & 0x0F;
	if (k == 15)
		k = rd_varint(r);
	if (k > (uint64_t)(r->n - r->p))
		r->err = 1;
	return r->err ? 0 : (int64_t)k;
}

enum { CH_FOUND, CH_TYPE, CH_CODEC, CH_VALUES, CH_SIZE, CH_DATA, CH_HAS_DICT, CH_DICT, CH_N };

/* ColumnMetaData at r->p: its values into o (o[CH_FOUND] = 1) when its path is [name]. */
static void rd_column_meta(struct rd *r, const uint8_t *name, int64_t nname, int64_t *o)
{
	int fid = 0, t, et, match = 0;
	int64_t v[12] = {0}, k, i;
	int have = 0;

	while (!r->err && rd_field(r, &fid, &t)) {
		if (fid == 3 && t == 9) {
			k = rd_list(r, &et);
			if (et != 8) {
				r->err = 1;
				return;
			}
			match = k == 1;
			for (i = 0; i < k && !r->err; i++) {
				uint64_t m = rd_varint(r);

				if (r->err || m > (uint64_t)(r->n - r->p)) {
					r->err = 1;
					return;
				}
				if ((int64_t)m != nname || memcmp(r->b + r->p, name, (size_t)m) != 0)
					match = 0;
				r->p += (int64_t)m;
			}
		} else if ((fid == 1 || fid == 4 || fid == 5 || fid == 7 || fid == 9 || fid == 11)
			   && (t == 5 || t == 6)) {
			v[fid] = zigzag(rd_varint(r));
			have |= 1 << fid;
		} else {
			rd_skip(r, t, 1);
		}
	}
	if (r->err || !match)
		return;
	if ((have & 0x2B2) != 0x2B2) {		/* fields 1, 4, 5, 7, 9 */
		r->err = 1;
		return;
	}
	o[CH_FOUND] = 1;
	o[CH_TYPE] = v[1];
	o[CH_CODEC] = v[4];
	o[CH_VALUES] = v[5];
	o[CH_SIZE] = v[7];
	o[CH_DATA] = v[9];
	o[CH_HAS_DICT] = (have >> 11) & 1;
	o[CH_DICT] = v[11];
}

/* The next field of the struct being read that is a list of structs numbered `want` (the
 * other fields skipped; *fid carries the struct's field-id delta base): its length, -1 when
 * that field is not a list of structs (or the bytes are bad), -2 at the struct's end. */
static int64_t rd_struct_list(struct rd *r, int *fid, int want, int depth)
{
	int t, et;
	int64_t k;

	while (!r->err && rd_field(r, fid, &t)) {
		if (!(*fid == want && t == 9)) {
			rd_skip(r, t, depth);
			continue;
		}
		k = rd_list(r, &et);
		return et == 12 && !r->err ? k : -1;
	}
	return r->err ? -1 : -2;
}

/* The FileMetaData at p (its bytes end at n): per row group, CH_N values of its column
 * named `name` (CH_FOUND 0: none) into out, at most maxrg row groups. Returns the number of
 * row groups, -1 when the footer is not what it should be, -2 when more than maxrg. */
int64_t br_parquet_chunks(const uint8_t *b, int64_t n, int64_t p, const uint8_t *name,
			  int64_t nname, int64_t maxrg, int64_t *out)
{
	struct rd r = { b, n, p, 0 };
	int fid = 0;
	int64_t nrg = 0, k;

	if (p < 0 || p > n)
		return -1;
	while ((k = rd_struct_list(&r, &fid, 4, 1)) != -2) {
		int64_t i;

		if (k < 0)
			return -1;
		for (i = 0; i < k && !r.err; i++) {	/* RowGroup */
			int gfid = 0;
			int64_t *o, kc;

			if (nrg >= maxrg)
				return -2;
			o = out + nrg * CH_N;
			memset(o, 0, sizeof(int64_t) * CH_N);
			nrg++;
			while ((kc = rd_struct_list(&r, &gfid, 1, 2)) != -2) {
				int64_t j;

				if (kc < 0)
					return -1;
				for (j = 0; j < kc && !r.err; j++) {	/* ColumnChunk */
					int cfid = 0, ct;

					while (!r.err && rd_field(&r, &cfid, &ct)) {
						if (cfid == 3 && ct == 12)
							rd_column_meta(&r, name, nname, o);
						else
							rd_skip(&r, ct, 3);
					}
				}
			}
		}
	}
	return r.err ? -1 : nrg;
}
