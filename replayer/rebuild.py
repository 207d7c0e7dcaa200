"""Rebuild a device as it was at a stamp: the painter's algorithm over the store.

What a rebuild applies (internals.md): the session's baseline chunks of the
device (a larger `aux` wins), resync chunks at their resync's start Rs (from
the resync's end on), prune layers, then every bio of the device with stamp
<= P in stamp order -- writes with their bytes (a failed write too: as
captured), discard / secure erase / write-zeroes as zeroes, flushes as
nothing. The newest position wins each byte (`extents` ranks them).
`iter_image` streams the image a plan describes without writing it (verify,
prune).

How, with a cost that follows the device size rather than the history:

1. `plan`: fetch the extents -- metadata only -- of (session, dev) with
   stamp <= P plus the baseline chunks, ranked oldest to newest; compute the
   visible pieces with an interval structure over the distinct extent
   boundaries (byte granularity: pieces can be a few hundred bytes): each
   elementary interval gets the highest-ranked extent covering it. That is a
   "range max-assign", done vectorised level by level on power-of-two blocks
   (`_range_max`), O((n + m) log m) in numpy, no Python loop per extent.
   Adjacent intervals of one extent merge into one piece; adjacent zero
   pieces merge too.
2. `execute`, when every row group it needs is stored uncompressed (random data:
   replayer/payload.py) -- the direct path (`_execute_direct`): the pieces in device order,
   window by window (1 MiB doubling to 8 MiB), each copied straight out of its payload
   file's mapping into an aligned buffer (a memcpy per piece: no Parquet decode, no intermediate copies), the
   window's data runs written with large O_DIRECT writes by a writer thread while the next
   window fills; every page a window uses has its CRC checked first, a window ahead, on a few
   threads. Otherwise (lz4 row groups):
   read each needed Parquet row group once (a few threads, they
   release the GIL; files memory-mapped), and write each piece once: with
   pwritev, runs of contiguous pieces in one call -- or, when the pieces are
   small (a history of small random writes), by scattering them into a buffer
   of a 1 GiB window, one vectorised numpy copy per row group (`scatter`), and
   writing the window's data runs with large sequential writes (`_choose`). Zero
   pieces are skipped on a freshly truncated (sparse) image file, and zeroed
   with BLKZEROOUT (fallback: written zeroes) on a block device. A helper
   thread starts writeback as the data goes out (sync_file_range), so the
   disk works while payload is still being read; the target is fsynced at
   the end.

Targets (`open_target`): a new file; an existing regular file or a block
device only with force; a block device that is mounted or held open is always
refused (opened O_EXCL -> EBUSY), and one smaller than the device too.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import mmap
import os
import stat
import struct
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from blkrewind.errors import StoreError, UserError
from blkrewind.replayer.arrays import unique
from blkrewind.replayer.store import Store, StoreReader

BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
IOV_MAX = 1024
MAX_RUN = 64 << 20          # bytes per pwritev call
PREFETCH = 6                # row groups read ahead of the writer
KICK_BYTES = 32 << 20       # start writeback after this many bytes (sync_file_range)


# ================================================================ visibility
def _range_max(m: int, lo: np.ndarray, hi: np.ndarray, val: np.ndarray) -> np.ndarray:
    """out[j] = max(val[i] for i with lo[i] <= j < hi[i]), -1 where none.

    Each range [lo, hi) is covered by two blocks of length 2^k, k = floor(log2(hi - lo)),
    one starting at lo and one ending at hi. Level by level from the largest k down,
    block maxima are scattered in, then pushed to the two halves of each block.
    """
    out = np.full(m, -1, np.int64)
    keep = hi > lo
    lo, hi, val = lo[keep], hi[keep], val[keep]
    if len(lo) == 0:
        return out
    k = np.floor(np.log2((hi - lo).astype(np.float64))).astype(np.int64)
    # guard float rounding at exact powers of two
    k -= (np.left_shift(1, k) > hi - lo)
    k += (np.left_shift(1, k + 1) <= hi - lo)
    cur = out
    order = np.argsort(k, kind="stable")
    ks = k[order]
    for lev in range(int(ks[-1]), -1, -1):
        if lev != int(ks[-1]):
            half = 1 << lev
            nxt = cur.copy()
            np.maximum(nxt[half:], cur[:-half], out=nxt[half:])
            cur = nxt
        a, b = np.searchsorted(ks, [lev, lev + 1])
        if b > a:
            sel = order[a:b]
            size = 1 << lev
            np.maximum.at(cur, lo[sel], val[sel])
            np.maximum.at(cur, hi[sel] - size, val[sel])
    return cur


@dataclass
class Plan:
    """What to write: data pieces (sorted by payload row group) and zero pieces."""
    size: int
    # data pieces
    d_off: np.ndarray      # device byte offset
    d_len: np.ndarray
    d_src: np.ndarray      # offset within the payload row
    d_file: np.ndarray     # payload_files id
    d_rg: np.ndarray
    d_idx: np.ndarray
    # zero pieces (including never-written ranges)
    z_off: np.ndarray
    z_len: np.ndarray
    files: dict            # payload_files id -> absolute path
    extents: int = 0

    @property
    def data_bytes(self) -> int:
        return int(self.d_len.sum())

    @property
    def zero_bytes(self) -> int:
        return int(self.z_len.sum())


def visible_pieces(size: int, start: np.ndarray, end: np.ndarray):
    """Extents ranked by position (later = newer wins) -> (piece_start, piece_end, winner),
    winner -1 for bytes no extent covers. Pieces tile [0, size)."""
    start = np.clip(start.astype(np.int64), 0, size)
    end = np.clip(end.astype(np.int64), 0, size)
    bounds = unique(np.concatenate([start, end, np.array([0, size], np.int64)]))
    m = len(bounds) - 1
    lo = np.searchsorted(bounds, start)
    hi = np.searchsorted(bounds, end)
    win = _range_max(m, lo, hi, np.arange(len(start), dtype=np.int64))
    # merge neighbouring elementary intervals with the same winner
    brk = np.flatnonzero(np.diff(win)) + 1
    first = np.concatenate([[0], brk])
    last_end = np.concatenate([brk, [m]])
    return bounds[first], bounds[last_end], win[first]


@dataclass
class Extents:
    """Every extent of (session, dev) that can matter at or before some stamp, ranked by
    position (later = newer): start byte, length, payload reference (file, row group,
    row; -1 when none), zero, the stamp from which it applies (`act`) and its position."""
    s: np.ndarray
    n: np.ndarray
    f: np.ndarray
    g: np.ndarray
    i: np.ndarray
    z: np.ndarray
    act: np.ndarray
    pos: np.ndarray
    files: dict

    def upto(self, stamp: int) -> "Extents":
        k = self.act <= stamp
        return Extents(self.s[k], self.n[k], self.f[k], self.g[k], self.i[k], self.z[k],
                       self.act[k], self.pos[k], self.files)


def resync_ends(store: StoreReader, session: str, dev: int) -> dict[int, int]:
    """Rs -> Re of the finished resyncs of (session, dev)."""
    out: dict[int, int] = {}
    for re_, start in store.resync_end_points(session, dev):
        if start is not None:
            out.setdefault(int(start), int(re_))
    return out


def extents(store: Store, session: str, dev: int, stamp: int) -> Extents:
    """The extents of (session, dev) that apply at some stamp <= `stamp`.

    Positions (internals.md, "Gaps and resync"): a baseline chunk (base.stamp = 0) is
    under everything; a bio is at its stamp; a chunk with base.stamp = Rs > 0 is at Rs
    (among chunks of one position a larger aux wins). A resync chunk applies from the
    resync's end Re on (until then the range holds what the bios wrote: what a failed
    write tried to write, for instance); a chunk `blkrewind prune` wrote (stamp <= the
    `pruned` stamp of (session, dev)) applies from its stamp on."""
    with store.reading():
        base = store.base_extents(session, dev, stamp)
        bios = store.bio_extents(session, dev, stamp)
        ends = resync_ends(store, session, dev)
        pruned_to = store.pruned_stamp(session, dev) or 0
        files = store.payload_file_map()

    def col(t, k, dt):
        return np.asarray(t[k], dtype=dt)

    bp = col(base, "p", np.int64)
    never = np.iinfo(np.int64).max
    if len(bp):
        act_b = bp.copy()
        rs = (bp > pruned_to)
        if rs.any():
            u, inv = np.unique(bp[rs], return_inverse=True)
            act_b[rs] = np.array([ends.get(int(x), never) for x in u], np.int64)[inv]
    else:
        act_b = bp
    pos = np.concatenate([bp, col(bios, "p", np.int64)])
    sub = np.concatenate([col(base, "a", np.int64), col(bios, "a", np.int64)])
    sub2 = np.concatenate([col(base, "q", np.int64), np.zeros(len(bios["p"]), np.int64)])
    order = np.lexsort((sub2, sub, pos))

    def cat(k, dt):
        return np.concatenate([col(base, k, dt), col(bios, k, dt)])[order]

    return Extents(cat("s", np.int64), cat("n", np.int64), cat("f", np.int64), cat("g", np.int64),
                   cat("i", np.int64), cat("z", bool),
                   np.concatenate([act_b, col(bios, "p", np.int64)])[order], pos[order],
                   {k: store.payload_path(v) for k, v in files.items()})


def plan(store: Store, session: str, dev: int, stamp: int, size: int) -> Plan:
    """The pieces of (session, dev) at `stamp`: see the module docstring."""
    return plan_extents(extents(store, session, dev, stamp).upto(stamp), size)


def plan_extents(ex: Extents, size: int, only=None) -> Plan:
    """The visible pieces of ranked extents. `only` (bool per extent): keep just the
    pieces whose winner is one of those (a layer: what changed since an older point)."""
    s, n, f, g, i, z = ex.s, ex.n, ex.f, ex.g, ex.i, ex.z
    ps, pe, w = visible_pieces(size, s, s + n)
    if only is not None:
        keep = (w >= 0) & only[np.maximum(w, 0)]
        ps, pe, w = ps[keep], pe[keep], w[keep]
    is_zero = (w < 0) | (z[np.maximum(w, 0)] if len(z) else False)
    # merge adjacent zero pieces: a zero piece continues the previous one if it is zero too
    # (a layer's pieces need not touch: a zero run also breaks where they do not)
    zero_start = is_zero & ~(np.concatenate([[False], is_zero[:-1]])
                             & np.concatenate([[False], pe[:-1] == ps[1:]]))
    zs = np.flatnonzero(zero_start)
    zero_run = np.cumsum(zero_start)[is_zero] - 1
    z_end = np.zeros(len(zs), np.int64)
    np.maximum.at(z_end, zero_run, pe[is_zero])
    dm = ~is_zero
    wd = w[dm]
    d_off = ps[dm]
    order = np.lexsort((d_off, g[wd], f[wd]))
    wd = wd[order]
    d_off = d_off[order]
    d_len = (pe[dm] - ps[dm])[order]
    plan_ = Plan(size=size, d_off=d_off, d_len=d_len, d_src=d_off - s[wd], d_file=f[wd],
                 d_rg=g[wd], d_idx=i[wd], z_off=ps[zs], z_len=z_end - ps[zs],
                 files=ex.files, extents=len(s))
    missing = set(unique(plan_.d_file).tolist()) - set(plan_.files)
    if missing:
        raise StoreError(f"the store refers to payload files it does not list ({sorted(missing)[:3]})")
    return plan_


def split_plan(p: Plan, at: int) -> tuple[Plan, Plan]:
    """(the pieces of [0, at), the pieces of [at, size)): a restore onto a block device
    writes the head last, so an interrupted one leaves its marker there."""
    def cut(off, ln, lo, hi):
        a = np.maximum(off, lo)
        e = np.minimum(off + ln, hi)
        keep = e > a
        return keep, a[keep], (e - a)[keep], (a - off)[keep]

    parts = []
    for lo, hi in ((0, at), (at, p.size)):
        k, d_off, d_len, shift = cut(p.d_off, p.d_len, lo, hi)
        zk, z_off, z_len, _ = cut(p.z_off, p.z_len, lo, hi)
        parts.append(Plan(size=p.size, d_off=d_off, d_len=d_len, d_src=p.d_src[k] + shift,
                          d_file=p.d_file[k], d_rg=p.d_rg[k], d_idx=p.d_idx[k], z_off=z_off,
                          z_len=z_len, files=p.files, extents=p.extents))
    return parts[0], parts[1]


# =================================================================== targets
@dataclass
class Target:
    path: str
    fd: int
    is_block: bool
    created: bool       # we made the file (remove it if the rebuild fails)
    sparse: bool        # freshly truncated: zero pieces need no write


def check_target(path: str, size: int, force: bool) -> None:
    """Refuse early, before any work, what open_target would refuse."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise UserError(f"{path}: directory {parent} does not exist") from None
        return
    if stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode):
        if not force:
            kind = "block device" if stat.S_ISBLK(st.st_mode) else "file"
            raise UserError(f"{path} exists ({kind}); add --force to overwrite it")
        return
    raise UserError(f"{path} is neither a regular file nor a block device")


def open_target(path: str, size: int, force: bool) -> Target:
    check_target(path, size, force)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
        return Target(path, fd, False, True, True)
    except FileExistsError:
        pass
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(path, os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC)
            os.ftruncate(fd, size)
        except OSError as e:
            raise UserError(f"{path}: {e.strerror}") from None
        return Target(path, fd, False, False, True)
    if not stat.S_ISBLK(st.st_mode):
        raise UserError(f"{path} is neither a regular file nor a block device")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UserError(f"{path} is in use (mounted, or held open by another program); "
                            f"refusing to overwrite it") from None
        raise UserError(f"{path}: {e.strerror}") from None
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        have = struct.unpack("<Q", buf)[0]
        if have < size:
            raise UserError(f"{path} has {have} bytes, smaller than the device's {size}; refusing")
    except BaseException:
        os.close(fd)
        raise
    return Target(path, fd, True, False, False)


# ================================================================== writing
class _Progress:
    """A rich progress bar on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, total: int, label: str, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.p = None
        if self.enabled and total > 0:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                ProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.text import Text

            class MiBps(ProgressColumn):  # MiB and MiB/s: the units of restore's summary
                def render(self, task):
                    v = task.finished_speed or task.speed
                    return Text("" if v is None else f"{v / (1 << 20):.1f} MiB/s")

            speed = MiBps()
            self.p = Progress(TextColumn("{task.description}"), BarColumn(),
                              DownloadColumn(binary_units=True), speed, TimeRemainingColumn(),
                              console=Console(stderr=True), transient=True)
            self.task = self.p.add_task(label, total=total)
            self.p.start()

    def advance(self, n: int) -> None:
        if self.p is not None:
            self.p.advance(self.task, n)

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
            self.p = None


def _pwritev_all(fd: int, bufs: list, off: int) -> None:
    while bufs:
        n = os.pwritev(fd, bufs, off)
        off += n
        total = sum(len(b) for b in bufs)
        if n == total:
            return
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        out = []  # drop what was written, keep the rest
        for b in bufs:
            if n >= len(b):
                n -= len(b)
                continue
            out.append(memoryview(b)[n:])
            n = 0
        bufs = out


def _zero_range(t: Target, off: int, n: int, zeros: memoryview) -> None:
    if t.sparse or n <= 0:
        return
    if t.is_block:
        a = (off + 511) & ~511
        e = (off + n) & ~511
        if e > a:
            try:
                fcntl.ioctl(t.fd, BLKZEROOUT, struct.pack("<QQ", a, e - a))
                _zero_write(t.fd, off, a - off, zeros)
                _zero_write(t.fd, e, off + n - e, zeros)
                return
            except OSError:
                pass
    _zero_write(t.fd, off, n, zeros)


def _zero_write(fd: int, off: int, n: int, zeros: memoryview) -> None:
    while n > 0:
        k = min(n, len(zeros))
        _pwritev_all(fd, [zeros[:k]], off)
        off += k
        n -= k


class _Writeback:
    """Starts the kernel's writeback of what was written so far every KICK_BYTES
    (sync_file_range SYNC_FILE_RANGE_WRITE on the whole target, from a helper
    thread so the writer never waits for it): the disk works while payload is still
    being read and written, and the final fsync has little left to do. Errors
    surface at that fsync."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pending = 0
        self.fn = None
        try:
            self.fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            self.fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        except (OSError, AttributeError):
            return
        self.kick = threading.Event()
        self.range = (0, 0)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="restore-writeback", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fn = self.fn
        assert fn is not None  # the thread is started only once sync_file_range was found
        while True:
            self.kick.wait()
            self.kick.clear()
            if self.stopping:
                return
            off, n = self.range
            fn(self.fd, off, n, 2)  # SYNC_FILE_RANGE_WRITE

    def wrote(self, n: int) -> None:
        """n more bytes written somewhere: every KICK_BYTES, write back the whole target."""
        self.pending += n
        if self.pending >= KICK_BYTES and self.fn is not None:
            self.pending = 0
            self.range = (0, 0)
            self.kick.set()

    def done_with(self, off: int, n: int) -> None:
        """Nothing more will be written to [off, off + n): write it back."""
        if self.fn is not None:
            self.range = (off, n)
            self.kick.set()

    def stop(self) -> None:
        if self.fn is not None and not self.stopping:
            self.stopping = True
            self.kick.set()
            self.thread.join()


_tls = threading.local()


def _read_row_group(path: str, rg: int):
    """(offsets int array, values memoryview) of one payload row group."""
    cache = getattr(_tls, "files", None)
    if cache is None:
        cache = _tls.files = {}
    pf = cache.get(path)
    if pf is None:
        if len(cache) > 16:
            cache.clear()
        try:
            # read, not memory-mapped: a column chunk comes in with one pread instead of a
            # page fault per 4 KiB (0.39 s instead of 0.55 s of CPU for 768 MiB)
            import pyarrow.parquet as pq  # (here: the direct path does without pyarrow)
            pf = cache[path] = pq.ParquetFile(path, memory_map=False,
                                              page_checksum_verification=True)
        except (OSError, ValueError) as e:  # ArrowIOError, ArrowInvalid
            raise StoreError(f"cannot read payload file {path}: {e}") from None
    try:  # a damaged page fails its checksum: an error, never wrong bytes
        tbl = pf.read_row_group(rg, columns=["data"], use_threads=False)
    except (OSError, ValueError) as e:  # ArrowIOError, ArrowInvalid
        raise StoreError(f"payload file {path}, row group {rg}: {e} (damaged? "
                         f"'blkrewind verify --store' checks the store)") from None
    col = tbl.column("data")
    # combine_chunks copies even a single chunk (~6 ms per 4 MiB row group: fresh pages)
    arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], np.int32)[arr.offset:arr.offset + len(arr) + 1]
    vals = memoryview(bufs[2]) if bufs[2] is not None else memoryview(b"")
    return offs, vals, arr


BUFFER_BELOW = 32 << 10    # mean pwritev call size under which the buffer path wins
PAGE = mmap.PAGESIZE


SCATTER_MIN_BLOCK = 256    # vectorised scatter only when pieces align to this many bytes


def scatter(dst: np.ndarray, d_off: np.ndarray, src: np.ndarray, s_off: np.ndarray,
            n: np.ndarray) -> None:
    """dst[d_off[k]:d_off[k] + n[k]] = src[s_off[k]:s_off[k] + n[k]] for every k, in one
    vectorised copy (uint8 arrays; the pieces must not overlap in dst).

    B, the largest power of two dividing every offset and length, makes both arrays rows of B
    bytes (one void item each); each piece becomes n/B row indices, and one take into a reused
    scratch buffer plus one fancy-indexed assignment copy them all (no Python work per piece: a
    history of 4 KiB writes has a million pieces per 4 GiB).
    Pieces aligned to less than SCATTER_MIN_BLOCK bytes are copied one by one."""
    k = len(n)
    if k == 0:
        return
    if k < 4:
        for a, b, m in zip(d_off.tolist(), s_off.tolist(), n.tolist()):
            dst[a:a + m] = src[b:b + m]
        return
    g = int(np.bitwise_or.reduce(d_off | s_off | n))
    blk = (g & -g) if g else 1 << 20
    blk = min(blk, 1 << 16)
    if blk < SCATTER_MIN_BLOCK:
        for a, b, m in zip(d_off.tolist(), s_off.tolist(), n.tolist()):
            dst[a:a + m] = src[b:b + m]
        return
    rows = n // blk
    total = int(rows.sum())
    # rows as one void item each: numpy copies an item with one memcpy (a 2-D uint8 view
    # goes byte-loop by byte-loop: half the speed)
    d2 = dst[:len(dst) // blk * blk].view(f"V{blk}")
    s2 = src[:len(src) // blk * blk].view(f"V{blk}")
    if total == k:  # one row per piece (all pieces blk long)
        di, si = d_off // blk, s_off // blk
    else:
        first = np.cumsum(rows) - rows
        j = np.arange(total, dtype=np.int64) - np.repeat(first, rows)
        di, si = np.repeat(d_off // blk, rows) + j, np.repeat(s_off // blk, rows) + j
    # gathered into a reused scratch buffer, not a fresh temporary: a fresh 4 MiB per row
    # group is 4 MiB of pages the kernel zeroes first (clear_page was ~1/4 of restore's CPU).
    # take's mode="clip" does not buffer; the bounds are checked here instead.
    if int(si.min()) < 0 or int(si.max()) >= len(s2) or int(di.min()) < 0 \
            or int(di.max()) >= len(d2):
        raise ValueError("scatter: a piece lies outside its buffer")
    tmp = _scratch(total * blk).view(f"V{blk}")
    np.take(s2, si, out=tmp, mode="clip")
    d2[di] = tmp


_scr = threading.local()


def _scratch(n: int) -> np.ndarray:
    """This thread's reused scratch buffer, n bytes of it."""
    b = getattr(_scr, "buf", None)
    if b is None or len(b) < n:
        b = _scr.buf = np.empty(max(n, 8 << 20), np.uint8)
    return b[:n]


def _bounds(*keys: np.ndarray) -> tuple[list, list]:
    """[a, e) index ranges over which all `keys` (parallel arrays) stay the same."""
    if len(keys[0]) == 0:
        return [], []
    change = np.zeros(len(keys[0]) - 1, bool)
    for k in keys:
        change |= k[1:] != k[:-1]
    brk = np.flatnonzero(change) + 1
    return [0, *brk.tolist()], [*brk.tolist(), len(keys[0])]


def _window_bytes() -> int:
    """Device bytes the buffer path holds at once: 1 GiB, less on a small machine."""
    avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    w = min(1 << 30, max(64 << 20, avail // 4)) if avail else 256 << 20
    return w - w % PAGE


def _choose(p: Plan, t: Target, window: int) -> tuple[str, np.ndarray]:
    """("buffer" | "pwritev", the order in which to take the data pieces).

    pwritev writes each row group's pieces as they come, contiguous ones in one call: right
    whenever the calls are big. A history of many small writes turns that into one syscall
    per piece (~10 us each on a VM); the buffer path instead takes the pieces window by window
    (row groups in order within a window), scatters each row group's pieces into an anonymous
    buffer of the window with one vectorised copy (`scatter`), and writes the window's data
    runs with large sequential writes (holes up to BRIDGE as zeroes). Chosen when pwritev
    calls would average under BUFFER_BELOW bytes. A row group whose pieces span several
    windows is read once per window: only when that costs little."""
    plain = np.arange(len(p.d_off))
    if len(p.d_off) == 0 or p.size == 0:
        return "pwritev", plain
    key = p.d_file * (1 << 32) + p.d_rg
    cont = (key[1:] == key[:-1]) & (p.d_off[1:] == (p.d_off + p.d_len)[:-1])
    calls = len(p.d_off) - int(cont.sum())
    if p.data_bytes >= BUFFER_BELOW * calls:
        return "pwritev", plain
    win = p.d_off // window
    order = np.lexsort((p.d_off, p.d_rg, p.d_file, win))
    if len(_bounds(win[order], key[order])[0]) > 1.25 * len(_bounds(key)[0]) + 8:
        return "pwritev", plain
    return "buffer", order


def _read_ahead(p: Plan, order: np.ndarray, starts: list, ends: list, jobs: int):
    """Yield (a, e, offsets, values) per group of pieces sharing a row group, in order,
    reading up to PREFETCH row groups ahead on `jobs` threads."""
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="restore-read") as ex:
        pending: deque = deque()
        gi, ng = 0, len(starts)
        while gi < ng or pending:
            while gi < ng and len(pending) < PREFETCH:
                k = int(order[starts[gi]])
                pending.append((starts[gi], ends[gi], ex.submit(
                    _read_row_group, p.files[int(p.d_file[k])], int(p.d_rg[k]))))
                gi += 1
            a, e, fut = pending.popleft()
            offs, vals, keep = fut.result()
            yield a, e, offs, vals
            del offs, vals, keep


def execute(p: Plan, t: Target, *, jobs: int = 2, progress: bool | None = None,
            label: str = "restore", method: str | None = None) -> dict:
    """Write the plan onto the target, fsync it; returns counters."""
    window = _window_bytes()
    src = None
    if method in (None, "direct") and len(p.d_off):
        src = _DirectSources.build(p, jobs)   # None: some row group must be decoded (lz4)
    if src is not None:
        return _execute_with(p, t, src, jobs, progress, label)
    if method == "direct":
        method = None
    how, order = _choose(p, t, window)
    if method is not None and method != how:
        how, order = method, (np.arange(len(p.d_off)) if method == "pwritev" else
                              np.lexsort((p.d_off, p.d_rg, p.d_file, p.d_off // window)))
        how = "buffer" if how == "mmap" else how  # (the buffer path's name before it)
    # (plain pages: MADV_HUGEPAGE cut the first-touch faults of a warm process but cost up to
    # 1.5 s of direct compaction in a fresh one with a full page cache: restore/dd 0.30 -> 0.16)
    buf = np.empty(min(window, p.size) if how == "buffer" else 0, np.uint8)  # (empty: unused)
    written = calls = 0
    with _writing(p, t, label, progress) as (bar, wb):
        d_off = p.d_off[order]
        d_len = p.d_len[order]
        d_src, d_idx = p.d_src[order].tolist(), p.d_idx[order].tolist()
        key = (p.d_file * (1 << 32) + p.d_rg)[order]
        if how == "buffer":
            win = d_off // window
            starts, ends = _bounds(win, key)
        else:
            starts, ends = _bounds(key)
        offs_l, lens_l = d_off.tolist(), d_len.tolist()
        cur_win = -1
        d_src_a, d_idx_a = p.d_src[order], p.d_idx[order]
        win_a = 0  # first piece (in `order`) of the current window
        for a, e, offs, vals in _read_ahead(p, order, starts, ends, jobs):
            if how == "buffer":
                w = offs_l[a] // window
                if w != cur_win:
                    if cur_win >= 0:
                        calls += _flush_window(t.fd, buf, cur_win * window, d_off[win_a:a],
                                               d_len[win_a:a], wb)
                    cur_win, win_a = w, a
                    _clear_window(buf, w * window, d_off, d_len, win, w)
                idx = d_idx_a[a:e]
                src = offs[idx].astype(np.int64) + d_src_a[a:e]
                ln = d_len[a:e]
                bad = np.flatnonzero(src + ln > offs[idx + 1])
                if len(bad):
                    raise _short(p, int(order[a]), int(idx[bad[0]]))
                scatter(buf, d_off[a:e] - w * window, np.frombuffer(vals, np.uint8), src, ln)
                n = int(ln.sum())
                written += n
                bar.advance(n)
                continue
            rows = offs.tolist() if e - a > 64 else offs
            run: list = []
            run_off = run_end = -1
            run_bytes = 0
            for k in range(a, e):
                row = d_idx[k]
                src = int(rows[row]) + d_src[k]
                n = lens_l[k]
                if src + n > int(rows[row + 1]):
                    raise _short(p, order[a], row)
                off = offs_l[k]
                if run and (off != run_end or len(run) >= IOV_MAX or run_bytes >= MAX_RUN):
                    _pwritev_all(t.fd, run, run_off)
                    wb.wrote(run_bytes)
                    calls += 1
                    run = []
                if not run:
                    run_off = run_end = off
                    run_bytes = 0
                run.append(vals[src:src + n])
                run_end += n
                run_bytes += n
                written += n
                bar.advance(n)
            if run:
                _pwritev_all(t.fd, run, run_off)
                wb.wrote(run_bytes)
                calls += 1
            del run
        if how == "buffer" and cur_win >= 0:
            calls += _flush_window(t.fd, buf, cur_win * window, d_off[win_a:], d_len[win_a:], wb)
    return {"data_bytes": written, "zero_bytes": p.zero_bytes, "writes": calls, "method": how}


@contextmanager
def _writing(p: Plan, t: Target, label: str, progress):
    """The frame of every write path: (progress bar, writeback pacing), the collector off (a
    view per piece, no cycles: it would only scan them), the plan's zero ranges written first;
    on success the writeback drained and the target fsynced."""
    bar = _Progress(p.data_bytes + (0 if t.sparse else p.zero_bytes), label, progress)
    wb = _Writeback(t.fd)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        zeros = memoryview(bytes(1 << 20))
        for off, n in zip(p.z_off.tolist(), p.z_len.tolist()):
            _zero_range(t, off, n, zeros)
            if not t.sparse:
                bar.advance(n)
                wb.wrote(n)
        yield bar, wb
        wb.stop()
        os.fsync(t.fd)
    finally:
        if gc_was:
            gc.enable()
        wb.stop()
        bar.close()


def _execute_with(p: Plan, t: Target, src: "_DirectSources", jobs: int, progress, label) -> dict:
    """execute() by the direct path (see _execute_direct)."""
    unmapping: list[threading.Thread] = []
    try:
        with _writing(p, t, label, progress) as (bar, wb):
            written, calls = _execute_direct(p, t, src, bar, wb, jobs, unmapping)
    finally:
        src.close()
        # the unmapping overlapped the last writes and the fsync; it ends here, not after
        # the command said it is done (a signal then would kill a finished restore)
        for th in unmapping:
            th.join()
    return {"data_bytes": written, "zero_bytes": p.zero_bytes, "writes": calls,
            "method": "direct"}


def iter_image(p: Plan, *, window: int = 64 << 20, jobs: int = 2, cache_rgs: int = 8):
    """The image the plan describes, without writing it anywhere: yields (offset, buffer)
    for consecutive windows of `window` bytes (the last one shorter) covering [0, size).
    Holes and zero pieces read as zeroes. Each window's row groups are read on `jobs`
    threads; the last `cache_rgs` decoded row groups are kept (pieces of one row group
    often span neighbouring windows). The buffer is reused: copy what you keep."""
    order = np.argsort(p.d_off, kind="stable")
    d_off = p.d_off[order]
    d_end = d_off + p.d_len[order]
    d_src = p.d_src[order]
    d_file = p.d_file[order]
    d_rg = p.d_rg[order]
    d_idx = p.d_idx[order]
    cache: dict = {}
    buf = bytearray(min(window, p.size))
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="image-read") as ex:
        for lo in range(0, p.size, window):
            hi = min(p.size, lo + window)
            view = memoryview(buf)[:hi - lo]
            view[:] = bytes(hi - lo) if hi - lo != len(buf) else _zeros(len(buf))
            a = int(np.searchsorted(d_end, lo, side="right"))
            e = int(np.searchsorted(d_off, hi, side="left"))
            if e > a:
                keys = sorted({(int(x), int(y)) for x, y in zip(d_file[a:e], d_rg[a:e])})
                need = [k for k in keys if k not in cache]
                for k, (offs, vals, arr) in zip(need, ex.map(
                        lambda k: _read_row_group(p.files[k[0]], k[1]), need)):
                    cache[k] = (offs, vals if vals.format == "B" else vals.cast("B"), arr)
                for j in range(a, e):
                    offs, vals, _arr = cache[(int(d_file[j]), int(d_rg[j]))]
                    row = int(d_idx[j])
                    src0 = int(offs[row]) + int(d_src[j])
                    o, oe = int(d_off[j]), int(d_end[j])
                    if src0 + (oe - o) > int(offs[row + 1]):
                        raise _short(p, int(order[j]), row)
                    ca, ce = max(o, lo), min(oe, hi)
                    view[ca - lo:ce - lo] = vals[src0 + ca - o:src0 + ce - o]
                if len(cache) > max(cache_rgs, len(keys)):
                    for k in list(cache)[:len(cache) - max(cache_rgs, len(keys))]:
                        if k not in keys:
                            del cache[k]
            yield lo, view


_ZEROS: dict = {}


def _zeros(n: int) -> bytes:
    z = _ZEROS.get(n)
    if z is None:
        _ZEROS.clear()
        z = _ZEROS[n] = bytes(n)
    return z


def _short(p: Plan, k: int, row: int) -> StoreError:
    return StoreError(f"payload row {row} of {p.files[int(p.d_file[k])]} is shorter than its "
                      f"record says")


BRIDGE = 64 << 10   # holes up to this long inside a window are written as zeroes


def _window_runs(lo: int, d_off: np.ndarray, d_len: np.ndarray):
    """Runs [a, e) (device offsets) covering a window's data pieces, bridging holes up to
    BRIDGE bytes (written as zeroes: the target holds zeroes there anyway)."""
    o = np.sort(d_off)
    if len(o) == 0:
        return o, o
    en = np.sort(d_off + d_len)   # pieces do not overlap: sorted starts and ends pair up
    brk = np.flatnonzero(o[1:] - en[:-1] > BRIDGE) + 1
    return o[np.concatenate([[0], brk])], en[np.concatenate([brk - 1, [len(o) - 1]])]


def _clear_window(buf: np.ndarray, lo: int, d_off, d_len, win, w: int) -> None:
    """Zero the part of the buffer window w's runs will write, unless its pieces tile it."""
    sel = win == w
    o, ln = d_off[sel], d_len[sel]
    if len(o) == 0:
        return
    a, e = int(o.min()), int((o + ln).max())
    if int(ln.sum()) != e - a:  # holes inside: bridged ones must read as zeroes
        buf[a - lo:e - lo] = 0


def _flush_window(fd: int, buf: np.ndarray, lo: int, d_off, d_len, wb) -> int:
    """Write the runs of one window from the buffer: large sequential writes."""
    calls = 0
    for a, e in zip(*(x.tolist() for x in _window_runs(lo, d_off, d_len))):
        while a < e:
            n = min(e - a, MAX_RUN)
            _pwritev_all(fd, [buf[a - lo:a - lo + n].data], a)
            wb.wrote(n)
            calls += 1
            a += n
    return calls


def write_plan(pl: Plan, path: str, size: int, *, force: bool = False, jobs: int = 2,
               progress: bool | None = None, label: str = "restore") -> dict:
    """Open the target, write the planned pieces, fsync. A file we created is
    removed on failure. (The store may be closed: the plan holds what it needs.)"""
    t = open_target(path, size, force)
    ok = False
    try:
        stats = execute(pl, t, jobs=jobs, progress=progress, label=label)
        ok = True
    finally:
        os.close(t.fd)
        if not ok and t.created:
            try:
                os.unlink(path)
            except OSError:
                pass
    stats["extents"] = pl.extents
    stats["size"] = size
    return stats


# ============================================================ direct path
DIRECT_WINDOW = 8 << 20     # device bytes per window of the direct path
DIRECT_FIRST = 1 << 20      # the first window's: they double up to DIRECT_WINDOW
DIRECT_ALIGN = 4096         # O_DIRECT: offsets, lengths and buffer addresses aligned to this


def _direct_edges(size: int) -> np.ndarray:
    """Window bounds of the direct path over [0, size]: small first windows (the first write
    starts after a 1 MiB window's pages are checked and copied, not a whole window's, which
    on a history of small writes touch most of the payload), doubling to DIRECT_WINDOW.
    All but the last are multiples of DIRECT_ALIGN."""
    out = [0]
    step = max(DIRECT_ALIGN, min(DIRECT_FIRST, DIRECT_WINDOW))
    while out[-1] < size and step < DIRECT_WINDOW:
        out.append(min(size, out[-1] + step))
        step *= 2
    rest = np.arange(out[-1] + DIRECT_WINDOW, size, DIRECT_WINDOW, dtype=np.int64)
    tail = [size] if out[-1] < size else []
    return np.concatenate([np.asarray(out, np.int64), rest, np.asarray(tail, np.int64)])


class _DirectSources:
    """Per data piece of a plan, the file offset of its first byte in its payload file's
    mapping (replayer/payload.py) and the global number of the page it lies in; None from
    `build` when some row group must be decoded (compressed): the other paths do that."""

    def __init__(self, files: list, slot, pos, gpage, groups: list, gbase: list):
        self.files = files      # PayloadFile per slot
        self.views = [f.view for f in files]
        self.slot, self.pos, self.gpage = slot, pos, gpage
        # global page g: page g - gbase[j] of groups[j] = (PayloadFile, Rows), j the last
        # with gbase[j] <= g
        self.groups, self.gbase = groups, np.asarray(gbase, np.int64)
        self._closing = threading.Lock()
        self._closed = False

    @classmethod
    def build(cls, p: Plan, jobs: int = 2) -> "_DirectSources | None":
        from blkrewind.replayer.payload import PayloadFile
        n = len(p.d_off)
        ufid = unique(p.d_file)
        files: list = []
        try:
            for fid in ufid.tolist():
                files.append(PayloadFile(p.files[int(fid)]))
            slot = np.searchsorted(ufid, p.d_file)
            pos = np.empty(n, np.int64)
            gpage = np.empty(n, np.int64)
            pgroups: list = []  # (PayloadFile, Rows) of each row group, in global page order
            gbase: list = []    # the global number of its first page
            npages = 0
            key = p.d_file * (1 << 32) + p.d_rg
            order = np.argsort(key, kind="stable")
            starts, ends = _bounds(key[order])
            groups = [(files[int(slot[order[a]])], int(p.d_rg[order[a]]), a, e)
                      for a, e in zip(starts, ends)]
            # the row places, walking the pages here (threads would only take turns holding
            # the GIL), after asking for the read-ahead of every row group needed (a payload
            # file written with O_DIRECT is not in the page cache yet)
            per_file: dict = {}
            for pf, rg, _a, _e in groups:
                per_file.setdefault(id(pf), (pf, []))[1].append(rg)
            for pf, rgs in per_file.values():
                pf.willneed_all(rgs)
            found = [g[0].rows(g[1]) for g in groups]
            if any(r is None for r in found):
                for f in files:
                    f.close()
                return None
            for (pf, rg, a, e), r in zip(groups, found):
                mem = order[a:e]
                idx = p.d_idx[mem]
                if int(idx.min()) < 0 or int(idx.max()) >= len(r.pos) or \
                        bool((p.d_src[mem] + p.d_len[mem] > r.ln[idx]).any()):
                    raise _short(p, int(mem[0]), int(idx[0]))
                pos[mem] = r.pos[idx] + p.d_src[mem]
                gpage[mem] = npages + r.page[idx]
                pgroups.append((pf, r))
                gbase.append(npages)
                npages += len(r.spans)
        except BaseException:
            for f in files:
                f.close()
            raise
        return cls(files, slot, pos, gpage, pgroups, gbase)

    def verify(self, gpages) -> None:
        g = np.asarray(gpages, np.int64)
        j = np.searchsorted(self.gbase, g, "right") - 1
        for jj, k in zip(j.tolist(), (g - self.gbase[j]).tolist()):
            pf, r = self.groups[jj]
            if not r.ok[k]:
                pf.verify(r, [k])

    def close(self) -> None:
        """Unmap the payload files (once: also from a thread while the caller goes on)."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
        self.views = []
        for f in self.files:
            f.close()


def _set_direct(fd: int, on: bool) -> bool:
    try:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (fl | os.O_DIRECT) if on else (fl & ~os.O_DIRECT))
        return True
    except OSError:
        return False


def _close_all(objs) -> None:
    for o in objs:
        o.close()


def _execute_direct(p: Plan, t: Target, src: _DirectSources, bar, wb, jobs: int,
                    unmapping: list) -> tuple:
    """The direct path: pieces in device order, window by window copied straight from the
    payload files' mappings into an aligned buffer (one memcpy per piece, no decode), the
    window's data runs written with large O_DIRECT writes by a writer thread while the next
    window is filled; the pages a window needs are checked (CRC) one window ahead on `jobs`
    threads. (written, calls)."""
    from blkrewind.replayer.payload import copy_pieces
    from blkrewind.replayer.writebehind import WriteBehind
    order = np.argsort(p.d_off, kind="stable")
    d_off, d_len = p.d_off[order], p.d_len[order]
    slot, pos, gpage = src.slot[order], src.pos[order], src.gpage[order]
    # pieces that cross a window's bound are cut there
    edges = _direct_edges(p.size)
    first = np.searchsorted(edges, d_off, "right") - 1
    cuts = np.searchsorted(edges, d_off + d_len - 1, "right") - first
    if len(cuts) and int(cuts.max()) > 1:
        k = np.repeat(np.arange(len(d_off)), cuts)
        j = np.arange(len(k)) - np.repeat(np.cumsum(cuts) - cuts, cuts)
        w = first[k] + j
        a = np.maximum(d_off[k], edges[w])
        e = np.minimum(d_off[k] + d_len[k], edges[w + 1])
        pos = pos[k] + (a - d_off[k])
        slot, gpage = slot[k], gpage[k]
        d_off, d_len, first = a, e - a, w
    win = first
    starts, ends = _bounds(win)
    direct = _set_direct(t.fd, True)
    nbuf = 4
    bufs = [mmap.mmap(-1, DIRECT_WINDOW) for _ in range(nbuf)]
    state: dict[str, Any] = {"calls": 0, "direct": direct}
    lock = threading.Lock()     # state and wb, between the two writers

    def write_runs(b: mmap.mmap, lo: int, runs) -> None:
        mv = memoryview(b)
        try:
            for a, e in runs:
                while a < e:
                    n = min(e - a, MAX_RUN)
                    with lock:
                        if state["direct"] and (a % DIRECT_ALIGN or n % DIRECT_ALIGN):
                            _set_direct(t.fd, False)
                            state["direct"] = False
                        was_direct = state["direct"]
                    try:
                        _pwritev_all(t.fd, [mv[a - lo:a - lo + n]], a)
                    except OSError as ex:
                        if not was_direct or ex.errno != errno.EINVAL:
                            raise
                        with lock:    # a file system without O_DIRECT (the other writer
                            if state["direct"]:     # may have found it first)
                                _set_direct(t.fd, False)
                                state["direct"] = False
                        continue
                    with lock:
                        if not was_direct:
                            wb.wrote(n)
                        state["calls"] += 1
                    a += n
        finally:
            mv.release()

    def pages_of(wi: int):
        return unique(gpage[starts[wi]:ends[wi]]).tolist()

    written = 0
    try:
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="restore-verify") as ex, \
                WriteBehind(bufs, write_runs, "restore-direct-write", threads=2) as wbh:
            def check(wi: int):
                pg = pages_of(wi)
                k = max(1, len(pg) // max(1, jobs))
                return [ex.submit(src.verify, pg[c:c + k]) for c in range(0, len(pg), k)]
            pending = check(0) if starts else []
            for wi, (a, e) in enumerate(zip(starts, ends)):
                nxt = check(wi + 1) if wi + 1 < len(starts) else []
                for f in pending:
                    f.result()
                pending = nxt
                i = wbh.take()
                lo, hi = int(edges[win[a]]), int(edges[win[a] + 1])
                o, ln = d_off[a:e], d_len[a:e]
                ro, re_ = _window_runs(lo, o, ln)
                # aligned out: the bytes added are the image's too (the buffer holds zeroes
                # wherever no piece lies), within the window (its bounds are aligned)
                ro = ro // DIRECT_ALIGN * DIRECT_ALIGN
                re_ = np.minimum(-(-re_ // DIRECT_ALIGN) * DIRECT_ALIGN, hi)
                bv = np.frombuffer(bufs[i], np.uint8)
                if int(ln.sum()) != int((re_ - ro).sum()):
                    for x, y in zip(ro.tolist(), re_.tolist()):
                        bv[x - lo:y - lo] = 0
                del bv
                copy_pieces(bufs[i], o - lo, src.views, slot[a:e], pos[a:e], ln)
                n = int(ln.sum())
                written += n
                bar.advance(n)
                wbh.put(i, lo, list(zip(ro.tolist(), re_.tolist())))
            for f in pending:
                f.result()
            # unmapping the payload (~0.1 s per GB mapped) overlaps the last writes
            unmapping.append(threading.Thread(target=src.close, name="restore-unmap",
                                              daemon=True))
            unmapping[-1].start()
    finally:
        if state["direct"]:
            _set_direct(t.fd, False)
        # and the buffers' after them, while the caller syncs (unmapping: to join)
        unmapping.append(threading.Thread(target=_close_all, args=(bufs,),
                                          name="restore-unmap", daemon=True))
        unmapping[-1].start()
    return written, state["calls"]
