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
CHUNK = 1024       # segments per pass of distinct() (its table: 256 KiB, in cache)
_ROW = (np.arange(CHUNK, dtype=np.int32) << 8)[:, None]
CPU_S = [0.0, 0]   # thread CPU seconds and minor faults ingest spent here (serve logs it: BLKREWIND_DEBUG_DETECTOR)


def distinct(buf: np.ndarray, starts: np.ndarray, seg: int) -> np.ndarray:
    """How many distinct byte values each of the seg-byte pieces buf[s:s + seg] holds (every
    piece inside buf). The pieces are gathered through a strided view (no index array per
    byte); CHUNK pieces at a time mark their values in a table of CHUNK x 256 flags."""
    k = len(starts)
    out = np.zeros(k, np.int64)
    if k == 0:
        return out
    win = np.lib.stride_tricks.as_strided(buf, shape=(len(buf) - seg + 1, seg),
                                          strides=(1, 1), writeable=False)
    seen = np.zeros(CHUNK * 256, np.bool_)
    for a in range(0, k, CHUNK):
        b = win[starts[a:a + CHUNK]]
        m = len(b)
        seen[:] = False
        seen[b + _ROW[:m]] = True
        out[a:a + m] = np.count_nonzero(seen.reshape(CHUNK, 256)[:m], axis=1)
    return out


def randomness(values, offsets: np.ndarray, ends: np.ndarray | None = None) -> np.ndarray:
    """Per row of a binary column (value buffer `values`, `offsets` n+1 int64; or row starts
    `offsets` and `ends`): the fraction of its sampled segments that look random. Rows shorter
    than SEG bytes get NaN (unknown)."""
    offsets = np.asarray(offsets, np.int64)
    if ends is None:
        starts, ends = offsets[:-1], offsets[1:]
    else:
        starts, ends = offsets, np.asarray(ends, np.int64)
    n = len(starts)
    out = np.full(n, np.nan, np.float32)
    if n <= 0:
        return out
    buf = np.frombuffer(values, np.uint8)
    lens = ends - starts
    nseg = np.where(lens >= SEG, np.clip(lens // PER, 1, SEGMENTS), 0)
    total = int(nseg.sum())
    if total == 0:
        return out
    rows = np.repeat(np.arange(n), nseg)
    first = np.cumsum(nseg) - nseg
    j = np.arange(total) - np.repeat(first, nseg)
    span = lens[rows] - SEG
    sstart = starts[rows] + (j * span) // np.maximum(nseg[rows] - 1, 1)
    hits = distinct(buf, sstart, SEG) > RANDOM
    sums = np.bincount(rows, weights=hits, minlength=n)
    has = nseg > 0
    out[has] = (sums[has] / nseg[has]).astype(np.float32)
    return out


def of_bytes(data: bytes) -> float:
    """randomness() of one buffer (tests, tools)."""
    return float(randomness(data, np.array([0, len(data)], np.int64))[0])


BLOCK = 4096
B_ZERO, B_RANDOM, B_DATA = 254, 100, 0   # block states (replayer/detector.py's scale)


BSEG = 64          # bytes sampled per block by block_states
BRANDOM = 40       # distinct values above which a 64-byte sample is random (random: 57 +- 3)


def block_states(values, starts: np.ndarray, ends: np.ndarray,
                 block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Per row, one state byte per `block` bytes of it (the last block may be partial), from
    BSEG bytes at the block's start: B_ZERO (all zero), B_RANDOM (random-looking) or B_DATA
    (anything else; also a block shorter than BSEG). Returns (states, row offsets into
    states, n+1 int64). For baseline chunks: a 1 MiB chunk holds free space, text and media
    side by side, which one number per chunk cannot say. Row i is values[starts[i]:ends[i]]."""
    starts = np.asarray(starts, np.int64)
    ends = np.asarray(ends, np.int64)
    n = len(starts)
    lens = ends - starts
    nb = -(-lens // block)
    roff = np.zeros(n + 1, np.int64)
    np.cumsum(nb, out=roff[1:])
    total = int(roff[-1])
    states = np.full(total, B_DATA, np.uint8)
    if total == 0:
        return states, roff
    buf = np.frombuffer(values, np.uint8)
    rows = np.repeat(np.arange(n), nb)
    bstart = starts[rows] + (np.arange(total) - roff[:-1][rows]) * block
    full = np.nonzero(ends[rows] - bstart >= BSEG)[0]
    if len(buf) % 8 == 0 and len(full):   # zero blocks (free space) first, 8 bytes at a time
        w = np.frombuffer(values, np.uint64)
        aligned = full[bstart[full] % 8 == 0]
        q = bstart[aligned] // 8
        z = np.zeros(len(aligned), bool)
        z[:] = True
        for i in range(BSEG // 8):
            z &= w[q + i] == 0
        states[aligned[z]] = B_ZERO
        full = np.setdiff1d(full, aligned[z], assume_unique=True)
    if len(full):
        cnt = distinct(buf, bstart[full], BSEG)
        st = np.where(cnt > BRANDOM, B_RANDOM, B_DATA).astype(np.uint8)
        st[(cnt == 1) & (buf[bstart[full]] == 0)] = B_ZERO
        states[full] = st
    return states, roff


def fraction_random(states: np.ndarray, roff: np.ndarray) -> np.ndarray:
    """Per row of block_states(): the fraction of its blocks that are B_RANDOM (float32)."""
    nb = np.diff(roff)
    rows = np.repeat(np.arange(len(nb)), nb)
    hits = np.bincount(rows, weights=(states == B_RANDOM), minlength=len(nb))
    return np.where(nb > 0, hits / np.maximum(nb, 1), np.nan).astype(np.float32)


def blocks_column(base_blocks, idx: np.ndarray):
    """The `base.blocks` column (binary, one state byte per 4 KiB; NULL without payload) of
    records idx of a batch; base_blocks = (row_of, kb, states, offsets): the payload row of
    every record, the payload rows block_states() ran on (sorted) and its result; None: not
    computed. Baseline chunks are 1 MiB: a few dozen rows per batch."""
    import pyarrow as pa

    if base_blocks is None:
        return pa.nulls(len(idx), pa.binary())
    row_of, kb, st, so = base_blocks
    out = []
    for p in np.asarray(row_of)[np.asarray(idx)].tolist():
        k = int(np.searchsorted(kb, p)) if p >= 0 else -1
        out.append(st[so[k]:so[k + 1]].tobytes() if 0 <= k < len(kb) and kb[k] == p else None)
    return pa.array(out, pa.binary())
