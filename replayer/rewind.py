"""Roll a device that holds one point of its history to another point, writing only what differs.

Between two points A < B of one session, the bytes that can differ are those some extent with
A < position <= B covers (rebuild.extents: a bio at its stamp; a resync chunk from its
resync's end; a prune layer from its stamp). Everything else reads the same at A and B. So a
device at FROM goes to TO by writing TO's bytes (replayer/image.py) over exactly those ranges
-- its cost follows what changed, not the device size -- whichever way (back or forward).

Before it writes, it checks that the device really is at FROM: sampled blocks (half inside the
ranges it will write, where FROM and TO differ, half anywhere) read with O_DIRECT and compared
with the image at FROM. The device is opened O_EXCL (a mounted or held device is refused), its
writes go through the block layer with O_DIRECT: a traced device's tracer captures them like
any other write, so its history stays exact.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import stat
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from blkrewind.errors import UserError
from blkrewind.replayer import rebuild
from blkrewind.replayer.image import Image

ALIGN = 4096
CHUNK = 4 << 20
SAMPLE = 64 << 10


@dataclass
class Result:
    ranges: int
    bytes_written: int
    samples: int
    seconds: float


def changed_ranges(ex: rebuild.Extents, a: int, b: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) byte ranges that extents applying in (min(a,b), max(a,b)] cover, merged,
    aligned out to ALIGN."""
    lo, hi = min(a, b), max(a, b)
    k = (ex.act > lo) & (ex.act <= hi)
    s, n = ex.s[k], ex.n[k]
    if len(s) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ps, pe, w = rebuild.visible_pieces(size, s, s + n)
    keep = w >= 0
    ps, pe = ps[keep] // ALIGN * ALIGN, np.minimum(size, -(-pe[keep] // ALIGN) * ALIGN)
    # merge touching or overlapping (after alignment)
    brk = np.flatnonzero(ps[1:] > np.maximum.accumulate(pe)[:-1]) + 1
    starts = ps[np.concatenate([[0], brk])]
    ends = np.maximum.reduceat(pe, np.concatenate([[0], brk]))
    return starts, ends


def open_device(path: str, size: int) -> tuple[int, int]:
    """(fd, bytes) of the target, O_RDWR|O_DIRECT|O_EXCL; one line on every refusal."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise UserError(f"{path} is neither a block device nor an image file")
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT | (os.O_EXCL if stat.S_ISBLK(st.st_mode) else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UserError(f"{path} is in use (mounted, or held open by another program); "
                            f"refusing to rewind it") from None
        raise UserError(f"{path}: {e.strerror}") from None
    try:
        if stat.S_ISBLK(st.st_mode):
            have = struct.unpack("<Q", fcntl.ioctl(fd, rebuild.BLKGETSIZE64, b"\0" * 8))[0]
        else:
            have = os.fstat(fd).st_size
        if have != size:
            raise UserError(f"{path} has {have} bytes, the device {size}: not the same device")
    except BaseException:
        os.close(fd)
        raise
    return fd, have


def _aligned(n: int) -> mmap.mmap:
    return mmap.mmap(-1, max(ALIGN, -(-n // ALIGN) * ALIGN))


def check_at(fd: int, img: Image, starts, ends, size: int, *, samples: int = 64,
             seed: int = 0) -> int:
    """Compare sampled blocks of the device with the image; UserError at the first
    difference. Returns how many blocks were compared."""
    rng = random.Random(seed)
    spots: list[int] = []
    if len(starts):
        lens = (ends - starts).astype(np.float64)
        pick = np.random.default_rng(seed).choice(len(starts), size=min(samples // 2, len(starts)),
                                                  replace=False, p=lens / lens.sum())
        for i in pick.tolist():
            a, e = int(starts[i]), int(ends[i])
            spots.append(a + rng.randrange(0, max(1, (e - a) // ALIGN)) * ALIGN)
    while len(spots) < samples and size > 0:
        spots.append(rng.randrange(0, max(1, size // ALIGN)) * ALIGN)
    spots = sorted(set(spots))
    img.prefetch(spots, [x + SAMPLE for x in spots])
    lens = [min(SAMPLE, size - off) // 512 * 512 for off in spots]
    spots, lens = [o for o, n in zip(spots, lens) if n > 0], [n for n in lens if n > 0]
    buf = _aligned(SAMPLE * len(spots))
    want = bytearray(SAMPLE)

    def read(i: int) -> int:    # the device's blocks, read all at once (GIL released)
        with memoryview(buf) as v:
            return os.preadv(fd, [v[i * SAMPLE:i * SAMPLE + lens[i]]], spots[i])
    try:
        with ThreadPoolExecutor(min(8, max(1, len(spots))), thread_name_prefix="rewind-check") \
                as ex:
            reads = [ex.submit(read, i) for i in range(len(spots))]
            for i, (off, n) in enumerate(zip(spots, lens)):
                img.read_into(memoryview(want)[:n], off)
                if reads[i].result() != n:
                    raise UserError(f"short read at byte {off} of the device")
                if buf[i * SAMPLE:i * SAMPLE + n] != want[:n]:
                    raise UserError(f"the device is not at the point it should be: sampled "
                                    f"bytes {off}..{off + n - 1} differ from the store's image "
                                    f"(give --from the point it holds)")
    finally:
        buf.close()
    return len(spots)


def rewind(fd: int, img_to: Image, starts, ends, *, progress=None) -> tuple[int, int]:
    """Write img_to over the ranges; fsync. (ranges, bytes written). The ranges are read into
    CHUNK buffers, several small ones to a buffer, which two writer threads write while the
    next is read (O_DIRECT writes wait for the disk: two in flight keep it busier)."""
    from blkrewind.replayer.writebehind import WriteBehind

    def write(buf, parts) -> None:
        with memoryview(buf) as v:
            for off, at, n in parts:
                w = os.pwritev(fd, [v[at:at + n]], off)  # (ALIGN-aligned; the end: the size's)
                if w != n:
                    raise UserError(f"short write at byte {off}")

    bufs = [_aligned(CHUNK) for _ in range(4)]
    total = 0
    try:
        with WriteBehind(bufs, write, "rewind-write", threads=2) as wb:
            i, used = -1, CHUNK
            parts: list[tuple[int, int, int]] = []
            for a, e in zip(starts.tolist(), ends.tolist()):
                off = a
                while off < e:
                    if used == CHUNK:
                        if parts:
                            wb.put(i, parts)
                        i, used, parts = wb.take(), 0, []
                    n = min(CHUNK - used, e - off)
                    with memoryview(bufs[i]) as v:
                        img_to.read_into(v[used:used + n], off)
                    parts.append((off, used, n))
                    # the next range starts ALIGN-aligned in the buffer (O_DIRECT)
                    used = min(CHUNK, -(-(used + n) // ALIGN) * ALIGN)
                    off += n
                    total += n
            if parts:
                wb.put(i, parts)
    finally:
        for b in bufs:
            b.close()
    os.fsync(fd)
    return len(starts), total


def run(store, device, r_to, r_from, target: str, *, samples: int = 64, check_only=False):
    """Plan, check, write. Returns Result."""
    if r_to.session != r_from.session:
        raise UserError(f"the two points are in different sessions ({r_from.session} and "
                        f"{r_to.session}): rewind works within one session; use restore")
    size = r_to.size_bytes
    hi = max(r_to.stamp, r_from.stamp)
    ex = rebuild.extents(store, r_to.session, r_to.dev, hi)
    img_to = Image(rebuild.plan_extents(ex.upto(r_to.stamp), size))
    # one set of mappings, row places and checked pages for both points (their pieces
    # mostly lie in the same row groups)
    img_from = Image(rebuild.plan_extents(ex.upto(r_from.stamp), size), cache=img_to.cache)
    starts, ends = changed_ranges(ex, r_to.stamp, r_from.stamp, size)
    return _apply(img_to, img_from, starts, ends, target, size, samples, check_only)


def _apply(img_to, img_from, starts, ends, target, size, samples, check_only) -> Result:
    t0 = time.monotonic()
    fd, _ = open_device(target, size)
    try:
        if not check_only:
            img_to.prefetch(starts, ends)   # read in while the check runs
        n = check_at(fd, img_from, starts, ends, size, samples=samples)
        if check_only:
            return Result(len(starts), 0, n, time.monotonic() - t0)
        k, total = rewind(fd, img_to, starts, ends)
    finally:
        os.close(fd)
        img_to.close()      # (one cache: img_from's is the same)
    return Result(k, total, n, time.monotonic() - t0)
