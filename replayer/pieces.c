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
