"""The durable local LOG: the contract between capture and replay (docs/internals.md, "The LOG").

A record is safe once it is in the LOG. A LOG directory holds segment files
``<session>.<segno:06d>.brlog`` and ``lock`` (flock held by the tracer that owns the directory).

Preallocated and recycled segments, zero-padded tails
------------------------------------------------------
With LogWriter(direct=True) (where the file system takes O_DIRECT; off by default) a segment file is
preallocated to segment_bytes (fallocate) -- or is a spare, a retired segment kept for reuse
(retire_segment(), as PostgreSQL recycles WAL segments) -- and frames are written with O_DIRECT
from one reused aligned buffer: each append writes from the start of the 4 KiB block holding the
end of the previous frame (that partial block is kept in the buffer and written again) to a
block boundary at least 48 bytes past the new frame, zero-filled. So the 48 bytes at the frame
position after the last frame always read as zeros, even over a recycled file's old content,
and the on_frame report comes after the write returned (the frame is on the file). A clean
close writes the SEAL and cuts the file right after it, so a sealed segment looks as before.
A recycled file's old frames carry the old seg_id (the new one is drawn different from it):
they fail the seg_id check and are never read as frames of the new segment.

Writes and failures
-------------------
One frame is one ``pwritev`` of header + body at the end of the segment (direct: of the
blocks holding it). When a write fails (ENOSPC, EIO, ...) the file is cut back to the last
frame boundary (a preallocated one too: nothing is read beyond the end) and LogFull / LogIOError is
raised: the segment stays readable, the span was not written, the writer can go on (e.g. once
space is freed). If even the cut fails, or an fsync fails (the kernel may have dropped dirty
pages), the writer refuses all further writes; the partial frame is a torn tail for readers.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import re
import struct
import time
from typing import Iterator

from blkrewind import __version__
from blkrewind.errors import CorruptLog, UserError
from blkrewind.formats import record
from blkrewind.formats.logframe import (
    FORMAT_VERSION,
    FRAME_SIZE,
    K_DATA,
    K_HEADER,
    K_SEAL,
    MAX_RAW,
    SUFFIX,
    ZERO_HEAD,
    Body,
    FrameHead,
    SegmentInfo,
    SegmentReader,
    encode_span,
    list_segments,
    pack_header,
    parse_header,
    segment_name,
    valid_session,
)
from blkrewind.osutil import fsync_dir as _fsync_dir
from blkrewind.osutil import tune_malloc

# last_stamp: a record's stamp is taken microseconds before its ring-buffer reservation, so a
# record with a larger stamp than the newest stamped record sits at most a few KiB of ring
# before it. Reading this many span bytes further back is ample.
STAMP_LOOKBACK = 16 << 20
FSYNC_MODES = ("always", "interval", "never")

_monotonic = time.monotonic  # tests replace it
BLOCK = 4096                 # O_DIRECT alignment of the writer's offsets, lengths and buffers
SPARE_RE = re.compile(r"\.spare-(\d+)" + re.escape(SUFFIX))  # retire_segment(): for reuse
SPARES = 2                   # retire_segment() keeps at most this many spare segment files


class LogIOError(UserError):
    """Writing the LOG failed; the LOG keeps every frame written before the failure."""


class LogFull(LogIOError):
    """The LOG's file system is full (ENOSPC, EDQUOT)."""


def _pwrite_all(fd: int, bufs, offset: int) -> None:
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        n = os.pwritev(fd, views, offset)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        offset += n
        while views and n >= len(views[0]):
            n -= len(views.pop(0))
        if n:
            views[0] = views[0][n:]


def _io_error(e: OSError, log_dir: str, what: str) -> LogIOError:
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return LogFull(f"LOG {log_dir} is full ({why}): {what} failed; "
                       f"every frame before it is kept")
    return LogIOError(f"LOG {log_dir}: {what} failed: {why}")


def _now() -> tuple[int, int]:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC), time.time_ns()


_ZEROS = bytes(2 * BLOCK)


def _open_direct(path: str, flags: int) -> tuple[int, bool]:
    """(fd, True) opened with O_DIRECT, or (fd, False) where the file system refuses it."""
    try:
        return os.open(path, flags | os.O_DIRECT, 0o600), True
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return os.open(path, flags, 0o600), False


def _preallocate(fd: int, nbytes: int) -> None:
    """Allocate the segment's blocks up front (a recycled file keeps its own): no block
    allocation per write. Where that fails (no fallocate, or no room for a whole segment:
    a nearly full LOG still takes frames until it is full) the file grows as written."""
    had = os.fstat(fd).st_size
    if had >= nbytes:
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, had)  # what a failed fallocate allocated goes back


TMPFS_MAGIC = 0x01021994


def on_tmpfs(path) -> bool:
    """Is path on a tmpfs (statfs f_type)? Its O_DIRECT is page-cache I/O: no gain there."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field
    if ctypes.CDLL(None, use_errno=True).statfs(os.fsencode(os.fspath(path)), buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value == TMPFS_MAGIC


def _spares(log_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(log_dir) if SPARE_RE.fullmatch(n))


def _take_spare(log_dir: str, tmp: str) -> int | None:
    """Move a spare segment file to tmp; returns the seg_id of its old HEADER (0 if it has
    none), or None when there is no spare."""
    for name in _spares(log_dir):
        try:
            os.rename(os.path.join(log_dir, name), tmp)
        except FileNotFoundError:
            continue
        with open(tmp, "rb") as f:
            h = parse_header(f.read(FRAME_SIZE))
        return 0 if isinstance(h, str) else h.seg_id
    return None


def retire_segment(path, keep: int = SPARES) -> bool:
    """A segment that is no longer needed (shipped and acknowledged, or ingested): kept as a
    spare for the next segment of a writer of this LOG (as PostgreSQL recycles WAL
    segments: its blocks stay allocated, no page is allocated again) while fewer than keep
    spares exist, else deleted. Returns True if it was kept. A spare is invisible to
    readers (not a segment name); a writer that reuses one writes a new HEADER with a new
    seg_id over it, so none of its old frames passes as a frame of the new segment."""
    path = os.fspath(path)
    log_dir = os.path.dirname(path) or "."
    have = _spares(log_dir)
    if len(have) < keep:
        used = {int(m[1]) for n in have if (m := SPARE_RE.fullmatch(n))}  # all of them match
        n = next(i for i in range(keep + 1) if i not in used)
        os.rename(path, os.path.join(log_dir, f".spare-{n}{SUFFIX}"))
        _fsync_dir(log_dir)
        return True
    os.unlink(path)
    return False


class LogWriter:
    """Appends spans to the LOG of one session, one frame each. Single-threaded use.

    fsync: "always" after every frame; "interval" at least every fsync_interval seconds while
    there is unsynced data (checked by append and maybe_sync); "never" leaves it to the page
    cache. In every mode sync() fsyncs, and rotation and close() seal and fsync the segment
    (and fsync the directory after creating a segment). The caller holds the LogLock.
    """

    def __init__(self, log_dir: str, session: str, *, host: str, segment_bytes: int = 64 << 20,
                 fsync: str = "interval", fsync_interval: float = 1.0,
                 compression_level: int = 0, on_frame=None, direct: bool = False,
                 prealloc: bool = False):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, not {fsync!r}")
        if not valid_session(session):
            raise ValueError(f"bad session id {session!r}")
        tune_malloc(256 << 20)  # spans and bodies are reused, not faulted in again
        self.log_dir = os.fspath(log_dir)
        self.session, self.host = session, host
        self.segment_bytes = segment_bytes
        self.fsync, self.fsync_interval = fsync, fsync_interval
        self.compression_level = compression_level
        # on_frame(session, segno, frame_no, offset, size): called (in the writing thread)
        # after each frame is written -- HEADER, DATA and SEAL (the SEAL is the one frame of
        # FRAME_SIZE bytes); the shipper's feed. Not yet fsynced when it is called.
        self.on_frame = on_frame
        # direct: segments preallocated to segment_bytes (or spares reused, retire_segment())
        # and written with O_DIRECT from a reused aligned buffer, where the file system allows
        # (else as buffered writes): no page-cache page per 4 KiB of LOG. Off by default: with
        # the LOG on a tmpfs it dropped records that buffered writes kept (tmpfs's O_DIRECT is
        # buffered I/O plus invalidation; bench/bench_cpu.py, docs/costs.md); not yet
        # measured with the LOG on a second real disk, where it is meant to pay
        # prealloc: segments preallocated / recycled as with direct, written through the page
        # cache (over pages the file has: a tmpfs or the page cache allocates none)
        self.direct = direct
        self.prealloc = prealloc or direct
        self._direct = False        # the current segment's fd is O_DIRECT
        self._prealloc = False      # the current segment is preallocated: zero tail, cut at seal
        self._buf: mmap.mmap | None = None
        self._bufmv: memoryview | None = None
        self._tail = 0              # bytes of the current segment's last partial block (in _buf)
        self.frames = 0             # data frames appended by this writer
        self.bytes_written = 0      # bytes written to segment files (headers and seals too)
        self.current_path = ""
        self.last_sync_monotonic = _monotonic()
        self._fd: int | None = None
        # the current segment (set by _open_segment): its id, write position, next frame
        # number, records so far, and whether it has writes not yet fsynced
        self._seg_id = 0
        self._pos = 0
        self._frame_no = 0
        self._seg_records = 0
        self._dirty = False
        self._error: LogIOError | None = None  # sticky: the writer can no longer be trusted
        self._closed = False
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        self._dirfd = os.open(self.log_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self.segno = max((s.segno for s in list_segments(self.log_dir)
                              if s.session == session), default=-1)
            self._open_segment(self.segno + 1)
        except BaseException:
            os.close(self._dirfd)
            raise

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public
    def append(self, span, nrec: int, mono_ns: int, real_ns: int, *,
               body: Body | None = None) -> int:
        """Write span as one frame (rotating first if the segment would outgrow segment_bytes;
        a frame larger than that gets a segment of its own). Returns the frame's size.
        body: encode_span(span) if the caller made it already (in another thread)."""
        self._check()
        raw_len = memoryview(span).nbytes
        if raw_len > MAX_RAW:
            raise ValueError(f"span of {raw_len} bytes exceeds the LOG's limit of {MAX_RAW}")
        if body is None:
            body = encode_span(span, self.compression_level)
        size = FRAME_SIZE + body.stored_len
        if self._fd is None or (self._frame_no > 1 and
                                self._pos + size + FRAME_SIZE > self.segment_bytes):
            self._rotate()
        self._write((pack_header(K_DATA, self._seg_id, self._frame_no, mono_ns, real_ns, nrec,
                           raw_len, body.stored_len, body.flags), body.data, body.crc), size,
                    f"appending frame {self._frame_no}")
        self._report(self._frame_no, self._pos - size, size)
        self._frame_no += 1
        self._seg_records += nrec
        self.frames += 1
        if self.fsync == "always":
            self.sync()
        else:
            self.maybe_sync()
        return size

    def sync(self) -> None:
        """fsync now: everything appended so far is durable when this returns."""
        self._check()
        if self._fd is not None and self._dirty:
            self._fsync_file()
        self.last_sync_monotonic = _monotonic()

    def maybe_sync(self) -> None:
        if (self.fsync == "interval" and self._dirty and
                _monotonic() - self.last_sync_monotonic >= self.fsync_interval):
            self.sync()

    def close(self) -> None:
        """Seal the segment, fsync it and the directory. After a sticky failure the segment is
        left unsealed (repair() seals it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._fd is not None and self._error is None:
                self._seal()
                try:
                    os.fsync(self._dirfd)
                except OSError as e:
                    raise _io_error(e, self.log_dir, "fsync of the directory") from e
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._dirfd)
            self._release_buffer()
            self._buf = self._bufmv = None

    # -- internals
    def _release_buffer(self) -> None:
        """Unmap the write buffer, if any."""
        if self._bufmv is None or self._buf is None:
            return
        try:
            self._bufmv.release()
            self._buf.close()
        except BufferError:  # a view still held (a traceback): freed with it
            pass

    def _segment_fd(self) -> int:
        """The current segment's fd: _open_segment() sets it, _seal() closes it, and frames are
        written only in between."""
        if self._fd is None:
            raise ValueError(f"LogWriter {self.log_dir}: no open segment (internal error)")
        return self._fd

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise ValueError("LogWriter is closed")

    def _write(self, bufs, size: int, what: str) -> None:
        if self._direct:
            return self._write_direct(bufs, size, what)
        if self._prealloc:  # the next frame header position must read as zeros
            bufs = (*bufs, ZERO_HEAD)
        fd = self._segment_fd()
        try:
            _pwrite_all(fd, bufs, self._pos)
        except OSError as e:
            err = _io_error(e, self.log_dir, f"{what} to {self.current_path}")
            try:  # never leave a half frame behind (a preallocated file too: beyond its
                # end nothing is read; the blocks come back with the next segment)
                os.ftruncate(fd, self._pos)
            except OSError as e2:
                self._error = LogIOError(f"{err}; cutting the partial frame failed too "
                                         f"({e2.strerror}): the writer stops")
                raise self._error from e
            raise err from e
        self._pos += size
        self.bytes_written += size
        self._dirty = True

    def _buffer(self, need: int) -> memoryview:
        """The aligned write buffer, at least need bytes (grown, keeping the partial block)."""
        mv = self._bufmv   # set together with _buf
        if self._buf is None or mv is None or len(self._buf) < need:
            cap = max(need + (need >> 2), 8 << 20) + BLOCK - 1 & ~(BLOCK - 1)
            buf = mmap.mmap(-1, cap)  # page aligned, as O_DIRECT wants
            if mv is not None:
                buf[:self._tail] = mv[:self._tail]
                self._release_buffer()
            mv = memoryview(buf)
            self._buf, self._bufmv = buf, mv
        return mv

    def _write_direct(self, bufs, size: int, what: str) -> None:
        """One O_DIRECT write of the frame in bufs at _pos: from the start of the block holding
        _pos (its first _tail bytes, kept from the previous write, written again) to a block
        boundary at least FRAME_SIZE zero bytes past the frame -- so that the frame header
        position after the last frame always reads as zeros (a zero-padded tail, not a torn
        one, even over a recycled segment's old content)."""
        tail = self._tail
        end = tail + size
        need = (end + FRAME_SIZE + BLOCK - 1) & ~(BLOCK - 1)
        mv = self._buffer(need)
        at = tail
        for b in bufs:
            b = memoryview(b).cast("B")
            mv[at:at + b.nbytes] = b
            at += b.nbytes
        mv[end:need] = _ZEROS[:need - end]
        start = self._pos - tail
        fd = self._segment_fd()
        try:
            _pwrite_all(fd, (mv[:need],), start)
        except OSError as e:
            err = _io_error(e, self.log_dir, f"{what} to {self.current_path}")
            try:  # never leave a half frame behind (the partial block stays in the buffer)
                os.ftruncate(fd, self._pos)
            except OSError as e2:
                self._error = LogIOError(f"{err}; cutting the partial frame failed too "
                                         f"({e2.strerror}): the writer stops")
                raise self._error from e
            raise err from e
        self._pos += size
        ntail = self._pos & (BLOCK - 1)
        src = end - ntail
        if src:
            mv[:ntail] = mv[src:end]
        self._tail = ntail
        self.bytes_written += size
        self._dirty = True

    def _fsync_file(self) -> None:
        try:
            os.fsync(self._segment_fd())
        except OSError as e:
            self._error = _io_error(e, self.log_dir, f"fsync of {self.current_path}")
            raise self._error from e
        self._dirty = False
        self.last_sync_monotonic = _monotonic()

    def _seal(self) -> None:
        mono, real = _now()
        self._write((pack_header(K_SEAL, self._seg_id, self._frame_no, mono, real, self._seg_records,
                           0, 0),), FRAME_SIZE, "sealing")
        if self._prealloc:  # the preallocated rest goes: a sealed segment ends with its SEAL
            try:
                os.ftruncate(self._segment_fd(), self._pos)
            except OSError as e:
                self._error = _io_error(e, self.log_dir, f"cutting {self.current_path}")
                raise self._error from e
        self._report(self._frame_no, self._pos - FRAME_SIZE, FRAME_SIZE)
        self._fsync_file()
        os.close(self._segment_fd())
        self._fd = None

    def _rotate(self) -> None:
        if self._fd is not None:
            self._seal()
        self._open_segment(self.segno + 1)

    def _open_segment(self, segno: int) -> None:
        """Create segment segno: its HEADER frame written and fsynced in a hidden .tmp file,
        which then gets the final name. direct: the file is a spare (retire_segment()) when
        there is one, else new, preallocated to segment_bytes, and written with O_DIRECT."""
        name = segment_name(self.session, segno)
        path = os.path.join(self.log_dir, name)
        tmp = os.path.join(self.log_dir, f".{name}.tmp")
        old_id = None
        spare = _take_spare(self.log_dir, tmp) if self.prealloc else None
        if spare is not None:
            old_id = spare
        seg_id = int.from_bytes(os.urandom(4), "little")
        while seg_id == old_id:  # a recycled file's old frames must never pass as ours
            seg_id = int.from_bytes(os.urandom(4), "little")
        mono, real = _now()
        raw = json.dumps({"format": FORMAT_VERSION, "session": self.session, "segno": segno,
                          "host": self.host, "created_ns": real,
                          "tool": f"blkrewind {__version__}"}, sort_keys=True).encode()
        body = encode_span(raw)
        frame = b"".join((pack_header(K_HEADER, seg_id, 0, mono, real, 0, len(raw), body.stored_len,
                                body.flags), body.data, body.crc))
        fd = placed = None
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (0 if spare is not None
                                                               else os.O_TRUNC)
            fd, direct = _open_direct(tmp, flags) if self.direct else (
                os.open(tmp, flags, 0o600), False)
            if direct:
                _preallocate(fd, self.segment_bytes)
                need = (len(frame) + FRAME_SIZE + BLOCK - 1) & ~(BLOCK - 1)
                mv = self._buffer(need)
                mv[:len(frame)] = frame
                mv[len(frame):need] = _ZEROS[:need - len(frame)]
                _pwrite_all(fd, (mv[:need],), 0)
                self._tail = len(frame) & (BLOCK - 1)
                if len(frame) >= BLOCK:
                    mv[:self._tail] = mv[len(frame) - self._tail:len(frame)]
                self._direct = self._prealloc = True
            elif self.prealloc:
                _preallocate(fd, self.segment_bytes)
                self._direct, self._prealloc = False, True
                _pwrite_all(fd, (frame, ZERO_HEAD), 0)
            else:
                self._direct = self._prealloc = False
                _pwrite_all(fd, (frame,), 0)
            os.fsync(fd)
            if os.path.exists(path):
                raise OSError(errno.EEXIST, "a segment of that name exists", path)
            os.rename(tmp, path)
            placed = path
            os.fsync(self._dirfd)
        except OSError as e:
            if fd is not None:
                os.close(fd)
            for p in (tmp, placed):  # neither holds a record
                if p:
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
            raise _io_error(e, self.log_dir, f"creating segment {path}") from e
        self._fd, self._seg_id, self.segno, self.current_path = fd, seg_id, segno, path
        self._pos = len(frame)
        self._frame_no = 1
        self._seg_records = 0
        self._dirty = False
        self.bytes_written += len(frame)
        self.last_sync_monotonic = _monotonic()
        self._report(0, 0, len(frame))

    def _report(self, frame_no: int, offset: int, size: int) -> None:
        if self.on_frame is not None:
            self.on_frame(self.session, self.segno, frame_no, offset, size)


# ------------------------------------------------------------------------- the LOG directory
def inventory(log_dir, *, offsets: bool = False) -> list[dict]:
    """What log_dir holds, per segment (sorted by session, segno): {"session", "segno",
    "seg_id", "frames": N, "sealed", "size", "path"} -- frame numbers [0, N) are complete on
    disk (HEADER and SEAL included; a torn tail is not counted). offsets: also "offsets", the
    N + 1 frame boundaries (frame i is bytes [offsets[i], offsets[i+1])). A segment with a bad
    HEADER is left out; one with a corrupt frame lists the good frames before it and names the
    damage in "corrupt"."""
    out = []
    for seg in list_segments(log_dir):
        try:
            r = SegmentReader(seg.path)
        except (CorruptLog, FileNotFoundError):
            continue
        with r:
            bounds, corrupt = [], None
            try:
                for _, off, size in r.frame_spans():
                    bounds.append(off)
                    end = off + size
            except CorruptLog as e:
                corrupt = str(e)
            bounds.append(end)
            item = {"session": r.session, "segno": r.segno, "seg_id": r.seg_id,
                    "frames": len(bounds) - 1, "sealed": r.sealed and corrupt is None,
                    "size": r.size, "path": seg.path}
            if corrupt:
                item["corrupt"] = corrupt
            if offsets:
                item["offsets"] = bounds
            out.append(item)
    return out


class LogLock:
    """flock on <log_dir>/lock: one tracer per LOG directory. The holder's pid is in the file.
    As a context manager it acquires without blocking."""

    def __init__(self, log_dir):
        self.log_dir = os.fspath(log_dir)
        self.path = os.path.join(self.log_dir, "lock")
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> LogLock:
        if self._fd is not None:
            return self
        os.makedirs(self.log_dir, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            # a few retries: log_in_use() probes with a shared lock for a few microseconds
            for _ in range(1 if blocking else 20):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                    break
                except BlockingIOError:
                    time.sleep(0.01)
            else:
                raise UserError(f"LOG {self.log_dir} is in use by another tracer "
                                f"(pid {_holder_pid(fd)})")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # drops the flock
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> LogLock:
        return self.acquire(blocking=False)

    def __exit__(self, *exc) -> None:
        self.release()


def _holder_pid(fd: int) -> int:
    """The pid in a lock file whose flock is held (-1 if the holder has not written it)."""
    for _ in range(50):  # the holder writes its pid right after taking the lock
        try:
            return int(os.pread(fd, 32, 0))
        except ValueError:
            time.sleep(0.01)
    return -1


def log_in_use(log_dir) -> int | None:
    """The pid of the live tracer holding log_dir's lock, else None."""
    try:
        fd = os.open(os.path.join(os.fspath(log_dir), "lock"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_pid(fd)
    finally:
        os.close(fd)  # drops the probe's lock
    return None


def repair(log_dir) -> list[str]:
    """Make a LOG no tracer holds (or the caller holds) whole again: remove unfinished segment
    files (never renamed into place, so no records), cut the torn tail of every unsealed
    segment and seal it. Corruption is not cut: CorruptLog. One message per action."""
    log_dir = os.fspath(log_dir)
    pid = log_in_use(log_dir)
    if pid is not None and pid != os.getpid():
        raise UserError(f"LOG {log_dir} is in use by another tracer (pid {pid})")
    segs = list_segments(log_dir)
    msgs = []
    for name in sorted(os.listdir(log_dir)):
        if name.startswith(".") and name.endswith(SUFFIX + ".tmp"):
            os.unlink(os.path.join(log_dir, name))
            msgs.append(f"removed unfinished segment file {name} (it held no records)")
    if msgs:
        _fsync_dir(log_dir)
    for seg in segs:
        with SegmentReader(seg.path) as r:
            if r.sealed:
                continue
            for _ in r.frames():
                pass
        try:
            fd = os.open(seg.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                if r.size != r.good_end:  # a torn tail, or a zero-padded one
                    os.ftruncate(fd, r.good_end)
                mono, real = _now()
                _pwrite_all(fd, (pack_header(K_SEAL, r.seg_id, r.last_frame + 1, mono, real,
                                       r.records, 0, 0),), r.good_end)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise _io_error(e, log_dir, f"repairing {seg.path}") from e
        if r.torn_bytes:
            msgs.append(f"cut torn tail of {seg.path}: {r.torn_bytes} bytes after frame "
                        f"{r.last_frame}")
        msgs.append(f"sealed {seg.path} ({r.last_frame} frames, {r.records} records)")
    return msgs


# ------------------------------------------------------------------------------------ stamps
_U64 = struct.Struct("<Q")
_U16 = struct.Struct("<H")
_RTYPE_AT = record.OFFSETS["rtype"]
_SEQ_AT = record.OFFSETS["seq"]


def _span_max_stamp(span) -> int:
    """The highest stamp a span shows: record stamps, R_SESSION stamp_base - 1, R_END
    end_stamp - 1."""
    mv = memoryview(span)
    best = 0
    for off, rl in record.iter_framed(mv):
        stamp = _U64.unpack_from(mv, off)[0]
        rtype = _U16.unpack_from(mv, off + _RTYPE_AT)[0]
        if rtype in (record.R_SESSION, record.R_END):
            h = record.unpack_header(mv, off)
            try:
                obj = json.loads(bytes(mv[off + record.HEADER_SIZE: off + record.HEADER_SIZE
                                          + min(h.len, rl - record.HEADER_SIZE)]))
                stamp = int(obj["stamp_base" if rtype == record.R_SESSION else "end_stamp"]) - 1
            except (ValueError, KeyError, TypeError):
                continue
        best = max(best, stamp)
    return best


def last_stamp(log_dir) -> int:
    """The highest stamp of any record in the LOG (0 if none). Reads the newest session's
    frames from the newest back to STAMP_LOOKBACK span bytes before its newest stamped record
    (older sessions only if it holds no stamps)."""
    sessions: dict[str, list[SegmentInfo]] = {}
    for s in list_segments(log_dir):
        sessions.setdefault(s.session, []).append(s)
    for name in sorted(sessions, reverse=True):
        best, lookback = 0, None
        for reader, off, h in _newest_first(sessions[name]):
            if lookback is not None and lookback <= 0:
                break
            f = reader.read(off, h)
            if f is None:
                continue
            if lookback is not None:
                lookback -= h.raw_len
            try:
                stamp = _span_max_stamp(f.data)
            except record.CorruptRecords as e:
                raise CorruptLog(f"{reader.path}: frame {f.frame_no} holds bad records: {e}")
            if stamp > best:
                best = stamp
                if lookback is None:
                    lookback = STAMP_LOOKBACK
        if best:
            return best
    return 0


def tail_kernel_seqs(log_dir, session: str, span_bytes: int) -> set[int]:
    """The sequence numbers of the kernel records (rtype < R_SESSION) in the newest frames of
    session, reading back at least span_bytes of spans (or all of them): a tracer continuing
    a session skips the records of its ring buffer that these already hold."""
    segs = [s for s in list_segments(log_dir) if s.session == session]
    seqs: set[int] = set()
    seen = 0
    for reader, off, h in _newest_first(segs):
        if seen >= span_bytes:
            break
        f = reader.read(off, h)
        if f is None:
            continue
        mv = memoryview(f.data)
        seen += len(mv)
        for roff, _ in record.iter_framed(mv):
            seq = kernel_seq(mv, roff)
            if seq is not None:
                seqs.add(seq)
    return seqs


def kernel_seq(buf, off: int) -> int | None:
    """The sequence number of the record whose header is at off if the kernel wrote it
    (rtype < R_SESSION: the ring buffer's records), else None."""
    if _U16.unpack_from(buf, off + _RTYPE_AT)[0] >= record.R_SESSION:
        return None
    return _U64.unpack_from(buf, off + _SEQ_AT)[0]


def _newest_first(segs: list[SegmentInfo]) -> Iterator[tuple[SegmentReader, int, FrameHead]]:
    for seg in reversed(segs):
        with SegmentReader(seg.path) as r:
            for off, h in reversed(list(r.index())):
                yield r, off, h
