"""How random a write's payload looks: one number per payload row, computed at ingest.

`randomness(values, offsets)` takes the payload column of a batch (its value buffer and its
int64 offsets, n+1 of them) and returns, per row, the fraction in [0, 1] of sampled segments
that look random (float32). A row is sampled at one segment of SEG (128) bytes per PER (4 KiB)
of its length, at most SEGMENTS (16), spread evenly over it (a 4 KiB write: one segment; a
1 MiB baseline chunk: 16); a segment counts as random when it holds more than RANDOM distinct
byte values (a cheap stand-in for its byte entropy).

Why segments and not one histogram per row: the byte distribution of a mix is dominated by
its random part (a block half text, half ciphertext has nearly 8 bits per byte), while the
fraction of random segments says "half". Why a histogram and not lz4: one numpy pass for all rows
of a batch (a Python call per row costs more than the whole histogram). What it cannot tell
apart: ciphertext from compressed data (gzip, zstd, jpeg, zip) -- all look random; the
detector (replayer/detector.py) therefore looks at what a write *replaces*. Text encodings of
ciphertext (base64: 64 symbols) do not count as random; a 128-byte segment of a png is random
in 95 % of cases, of machine code in a few %: the fraction over a write says it.

Cost: bench/bench_store.py --randomness-ab compares ingest with and without (README).
"""
from __future__ import annotations

import numpy as np

SEG = 128          # bytes per segment
PER = 4096         # one segment per PER bytes of a row ...
SEGMENTS = 16      # ... and at most this many per row (a 1 MiB baseline chunk: 16)
RANDOM = 80        # distinct byte values above which a 128-byte segment counts as random.
                   # Measured (1st-99.9th percentile of 128-byte segments): random 92-111,
                   # gzip/xz output 91-110, png 65-111 (5th percentile 82), English text and
                   # source 22-51, libc 14-104 (95th: 65), base64 at most 64, zeroes 1
CHUNK = 8192       # segments per pass (bounds the temporary memory to ~2 MiB)

_AR = np.arange(SEG, dtype=np.int64)


def randomness(values, offsets: np.ndarray) -> np.ndarray:
    """Per row of a binary column (value buffer `values`, `offsets` n+1 int64): the fraction of
    its sampled segments that look random. Rows shorter than SEG bytes get NaN (unknown)."""
    offsets = np.asarray(offsets, np.int64)
    n = len(offsets) - 1
    out = np.full(n, np.nan, np.float32)
    if n <= 0:
        return out
    buf = np.frombuffer(values, np.uint8)
    starts = offsets[:-1]
    lens = offsets[1:] - starts
    nseg = np.where(lens >= SEG, np.clip(lens // PER, 1, SEGMENTS), 0)
    total = int(nseg.sum())
    if total == 0:
        return out
    rows = np.repeat(np.arange(n), nseg)
    first = np.cumsum(nseg) - nseg
    j = np.arange(total) - np.repeat(first, nseg)
    span = lens[rows] - SEG
    sstart = starts[rows] + (j * span) // np.maximum(nseg[rows] - 1, 1)
    hits = np.empty(total, np.float64)
    seen = np.zeros((CHUNK, 256), np.bool_)
    rix = np.arange(CHUNK)[:, None]
    for a in range(0, total, CHUNK):
        e = min(total, a + CHUNK)
        k = e - a
        b = buf[sstart[a:e, None] + _AR[None, :]]
        m = seen[:k]
        m[:] = False
        m[rix[:k], b] = True          # which byte values each segment holds
        hits[a:e] = np.count_nonzero(m, axis=1) > RANDOM
    sums = np.bincount(rows, weights=hits, minlength=n)
    has = nseg > 0
    out[has] = (sums[has] / nseg[has]).astype(np.float32)
    return out


def of_bytes(data: bytes) -> float:
    """randomness() of one buffer (tests, tools)."""
    return float(randomness(data, np.array([0, len(data)], np.int64))[0])
