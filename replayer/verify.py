"""Compare a replica (a rebuild plan, streamed, never written) with a live device.

`compare(plan, path)` reads the live device on a helper thread (O_DIRECT into an
aligned buffer, or, where O_DIRECT is refused, buffered reads followed by
POSIX_FADV_DONTNEED so the page cache neither serves stale pages nor fills up)
while the main thread streams the replica's bytes from the plan (rebuild.iter_image:
the planned extents, holes zero-filled). Both sides are hashed per CHUNK (1 MiB,
BLAKE2b); a chunk whose digests differ is compared byte by byte to report the exact
differing byte ranges, merged across chunk boundaries.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from blkrewind.errors import UserError
from blkrewind.replayer.rebuild import BLKGETSIZE64, Plan, iter_image

CHUNK = 1 << 20
WINDOW = 32 << 20


@dataclass
class Result:
    size: int                 # bytes compared
    device_size: int
    ranges: list = field(default_factory=list)   # [(start, end)] differing, merged, end exclusive
    chunks: int = 0
    seconds: float = 0.0

    @property
    def differing_bytes(self) -> int:
        return sum(e - a for a, e in self.ranges)

    @property
    def equal(self) -> bool:
        return not self.ranges and self.size == self.device_size


def _device_size(fd: int) -> int:
    import fcntl
    import stat
    import struct
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return struct.unpack("<Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    return st.st_size


def _open(path: str) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
    except OSError as e:
        if e.errno not in (22, 95):  # EINVAL, EOPNOTSUPP: no O_DIRECT here
            raise UserError(f"cannot open {path}: {e.strerror}") from None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    except OSError as e:
        raise UserError(f"cannot open {path}: {e.strerror}") from None


def _reader(fd: int, direct: bool, size: int, q: queue.Queue, stop: threading.Event) -> None:
    """Put (offset, bytes, [digest per CHUNK]) per WINDOW on q; then None (or an exception)."""
    try:
        bufs = [mmap.mmap(-1, WINDOW), mmap.mmap(-1, WINDOW)]  # page aligned, for O_DIRECT
        k = 0
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for lo in range(0, size, WINDOW):
            if stop.is_set():
                return
            n = min(WINDOW, size - lo)
            buf = bufs[k]
            k ^= 1
            mv = memoryview(buf)
            got = 0
            want = (n + 511) & ~511 if direct else n
            while got < n:
                r = os.preadv(fd, [mv[got:want]], lo + got)
                if r <= 0:
                    raise UserError(f"short read at byte {lo + got} of the device")
                got += r
            if not direct:
                os.posix_fadvise(fd, lo, n, os.POSIX_FADV_DONTNEED)
            data = bytes(mv[:n])
            digests = [hashlib.blake2b(data[a:a + CHUNK], digest_size=32).digest()
                       for a in range(0, n, CHUNK)]
            q.put((lo, data, digests))
        q.put(None)
    except BaseException as e:  # handed to the main thread
        q.put(e)


def _diff_ranges(a: bytes, b, base: int) -> list[tuple[int, int]]:
    x = np.frombuffer(a, np.uint8)
    y = np.frombuffer(b, np.uint8)[:len(x)]
    ne = x != y
    edge = np.diff(np.concatenate([[False], ne, [False]]).astype(np.int8))
    starts = np.flatnonzero(edge == 1)
    ends = np.flatnonzero(edge == -1)
    return [(base + int(s), base + int(e)) for s, e in zip(starts, ends)]


def _add(ranges: list, new: list) -> None:
    for a, e in new:
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], e)
        else:
            ranges.append((a, e))


def compare(p: Plan, path: str, *, jobs: int = 2) -> Result:
    """Compare the replica described by `p` with the device (or file) at `path`."""
    t0 = time.monotonic()
    fd, direct = _open(path)
    try:
        dsize = _device_size(fd)
        size = min(dsize, p.size)
        res = Result(size, dsize)
        if dsize != p.size:
            a, e = size, max(dsize, p.size)
            res.ranges.append((a, e))  # reported after the common part (merged below)
        tail = list(res.ranges)
        res.ranges = []
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        th = threading.Thread(target=_reader, args=(fd, direct, size, q, stop),
                              name="verify-read", daemon=True)
        th.start()
        try:
            dev_lo, dev_data, dev_dig = 0, b"", []
            for lo, view in iter_image(p, window=WINDOW, jobs=jobs):
                if lo >= size:
                    break
                n = min(len(view), size - lo)
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                dev_lo, dev_data, dev_dig = item
                assert dev_lo == lo
                for k, a in enumerate(range(0, n, CHUNK)):
                    mine = view[a:min(a + CHUNK, n)]
                    res.chunks += 1
                    if hashlib.blake2b(mine, digest_size=32).digest() != dev_dig[k]:
                        _add(res.ranges, _diff_ranges(dev_data[a:a + len(mine)], mine, lo + a))
        finally:
            stop.set()
            while th.is_alive():
                try:
                    q.get(timeout=0.1)
                except queue.Empty:
                    pass
            th.join()
        _add(res.ranges, tail)
    finally:
        os.close(fd)
    res.seconds = time.monotonic() - t0
    return res
