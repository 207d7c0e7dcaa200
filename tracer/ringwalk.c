/* The ring buffer consumer's hot loop (tracer/ringbuf.py RingConsumer.peek), native.
 *
 * Built by bpf/build.py (tracer/native.py) with the clang that builds the BPF object; the
 * ring buffer's record-prefix bits come from blkrewind/formats/record.py as -D flags (the format has
 * one definition). Loaded with ctypes; without it, peek() walks in Python (the same loop).
 */
#include <stdint.h>

#if !defined(BR_RB_BUSY) || !defined(BR_RB_DISCARD) || !defined(BR_RB_LEN_MASK) || \
    !defined(BR_RB_PREFIX)
#error "build with tracer/native.py (the constants come from blkrewind/formats/record.py)"
#endif

/* Walk the record prefixes of the ring's data area from cons to the first record still
 * being written (BUSY), at most to limit: returns the end position, *nrec the live
 * (not discarded) records. data: the double-mapped data area, mask: its size - 1. */
uint64_t br_ring_walk(const uint8_t *data, uint64_t mask, uint64_t cons, uint64_t limit,
		      uint64_t *nrec)
{
	uint64_t end = cons, n = 0;

	while (end < limit) {
		uint32_t w = __atomic_load_n((const uint32_t *)(data + (end & mask)),
					     __ATOMIC_ACQUIRE);
		if (w & BR_RB_BUSY)
			break;
		if (!(w & BR_RB_DISCARD))
			n++;
		end += ((w & BR_RB_LEN_MASK) + BR_RB_PREFIX + 7) & ~(uint64_t)7;
	}
	*nrec = n;
	return end;
}
