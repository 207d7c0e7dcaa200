"""The ring buffer walk: tracer/ringwalk.c (native) against the Python loop, on a synthetic
ring with discarded and busy records and a wrap-around (unit test, no BPF)."""
import ctypes
import os
import random
import struct

import pytest

from blkrewind.formats.record import RB_BUSY, RB_DISCARD
from blkrewind.tracer import native
from blkrewind.tracer.ringbuf import walk_py


def need_native():
    if native.ring_walk is None:
        msg = f"{native.DEFAULT_LIB} is not built: run .venv/bin/python bpf/build.py"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def synthetic_ring(rng, size, start, nrec, busy_at=None):
    """A ring of size bytes (the data area mapped twice, as the kernel maps it) holding nrec
    records from position start; returns (buffer, positions, live flags)."""
    buf = (ctypes.c_char * (2 * size))()
    view = memoryview(buf).cast("B")
    pos, out = start, []
    for i in range(nrec):
        ln = rng.choice([120, 128, 4096 + 120, 17, 0])
        word = ln
        if rng.random() < 0.2:
            word |= RB_DISCARD
        if i == busy_at:
            word |= RB_BUSY
        for base in (0, size):  # both mappings
            struct.pack_into("<I", view, base + (pos & (size - 1)), word)
        out.append((pos, not word & RB_DISCARD))
        pos += (ln + 8 + 7) & ~7
    return buf, view, out, pos


@pytest.mark.parametrize("seed", range(20))
def test_native_walk_matches_python(seed):
    need_native()
    rng = random.Random(seed)
    size = 1 << 20  # > 120 records of <= 4224 bytes: the ring never overwrites itself
    start = rng.randrange(0, 1 << 40) & ~7
    nrec = rng.randrange(1, 120)
    busy = rng.choice([None, rng.randrange(nrec)])
    buf, view, recs, end = synthetic_ring(rng, size, start, nrec, busy)
    words = view.cast("I")
    mask = size - 1
    n = ctypes.c_uint64()
    stop = len(recs) if busy is None else busy
    expect = (recs[stop][0] if stop < len(recs) else end, sum(live for _, live in recs[:stop]))
    for limit in (end, start + rng.randrange(0, end - start + 1)):
        want = walk_py(words, mask, start, limit)
        got = native.ring_walk(ctypes.addressof(buf), mask, start, limit, ctypes.byref(n))
        assert (got, n.value) == want
        if limit == end:
            assert want == expect
    words.release()
    view.release()
