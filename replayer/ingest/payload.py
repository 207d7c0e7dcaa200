"""Payload files: a batch's payload rows into one Parquet file (page checksums on), written
durably under a temporary name and renamed to a name holding the batch id; the files no commit
refers to (a crash before the commit) removed."""
from __future__ import annotations

import errno
import mmap
import os
import re
import threading

import lz4.block
import pyarrow as pa
import pyarrow.parquet as pq

from blkrewind.errors import StoreError
from blkrewind.osutil import crc32
from blkrewind.osutil import fsync_dir as _fsync_dir
from replayer.ingest.columns import PAYLOAD_SCHEMA, Batch
from replayer.store import Store

COMPRESSION = "lz4"          # file-system data ~3x smaller ...
INCOMPRESSIBLE = 0.5         # ... but a batch whose sample lz4 cannot shrink below this is
                             # stored plain: lz4 costs ~1 CPU-s per GB it compresses (the
                             # largest part of storing a batch, measured by bench_ship.py),
                             # worth it for data it at least halves (file-system metadata,
                             # text), not for a mix of random and text (~0.75) or random
                             # data; and the restore saves a copy per byte

_BATCH_RE = re.compile(r"\.b(\d+)\.parquet")


def payload_rel(session: str, segno: int, first: int, end: int, batch: int) -> str:
    return os.path.join("payload", session, f"{segno:06d}-{first:06d}-{end:06d}.b{batch}.parquet")


def write_payload(store: Store, b: Batch) -> None:
    """Write the batch's payload rows to their Parquet file (page checksums on): encoded in
    memory, CRC of the file's bytes, written to a temp name (O_DIRECT where the file system
    takes it: on this kind of VM the page cache takes new file data at a third of the disk's
    rate), fdatasync, rename, fsync of the directory. Needs b.batch_id."""
    if b.payload is None:
        return
    rel = payload_rel(b.session, b.segno, b.first_frame, b.end_frame, b.batch_id)
    final = store.payload_path(rel)
    d = os.path.dirname(final)
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = f"{final}.tmp"   # the batch id makes it unique
    codec = COMPRESSION if _compressible(b.payload.column("data").chunk(0)) else "none"
    try:
        buf, n = _encode(b, codec)
        view = memoryview(buf)[:n]
        b.crc32, b.file_bytes = crc32(view), n
        _write_file(tmp, buf, n)
        del view
        os.rename(tmp, final)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise StoreError(f"writing {final} failed: {e.strerror or e}; the store keeps "
                             f"everything stored before") from None
        raise
    b.pfile_rel = rel
    try:
        _fsync_dir(d)
    except OSError as e:
        unlink_payload(store, b)
        raise StoreError(f"fsync of {d} failed: {e.strerror or e}") from None


_tls = threading.local()
_ALIGN = 4096


def _scratch(n: int) -> mmap.mmap:
    """This thread's page-aligned scratch buffer of at least n bytes (reused: its pages are
    faulted in once)."""
    m = getattr(_tls, "scratch", None)
    if m is None or len(m) < n:
        if m is not None:
            m.close()
        m = _tls.scratch = mmap.mmap(-1, max(n + (n >> 2), 8 << 20) + _ALIGN - 1 & ~(_ALIGN - 1))
    return m


def _parquet(sink, b: Batch, codec: str) -> None:
    with pq.ParquetWriter(sink, PAYLOAD_SCHEMA, compression=codec, use_dictionary=False,
                          write_statistics=False, write_page_checksum=True) as w:
        for a, e in zip(b.rg_bounds[:-1], b.rg_bounds[1:]):
            w.write_table(b.payload.slice(a, e - a), row_group_size=e - a)


def _encode(b: Batch, codec: str) -> tuple:
    """(buffer, size): the Parquet file's bytes, in this thread's aligned scratch buffer."""
    bound = b.payload_bytes + (b.payload_bytes >> 6) + 64 * len(b.payload) + (1 << 20)
    m = _scratch(bound)
    try:
        out = pa.FixedSizeBufferWriter(pa.py_buffer(m))
        _parquet(out, b, codec)
        return m, out.tell()
    except (pa.ArrowException, ValueError):   # larger than the bound (it is generous)
        out = pa.BufferOutputStream()
        _parquet(out, b, codec)
        data = out.getvalue()
        m = _scratch(data.size)
        m[:data.size] = memoryview(data)
        return m, data.size


def _write_file(path: str, buf, n: int) -> None:
    """buf[:n] (an aligned buffer) to a new file, durable (fdatasync) when this returns."""
    padded = (n + _ALIGN - 1) & ~(_ALIGN - 1)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    fd = None
    if getattr(os, "O_DIRECT", 0):
        try:
            fd = os.open(path, flags | os.O_DIRECT, 0o600)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
    try:
        mv = memoryview(buf)
        if fd is not None:
            try:
                _write_all(fd, mv[:padded])
                os.ftruncate(fd, n)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(fd)
                fd = None
                os.unlink(path)
        if fd is None:   # no O_DIRECT here (tmpfs, ...): through the page cache
            fd = os.open(path, flags, 0o600)
            _write_all(fd, mv[:n])
        os.fdatasync(fd)
    finally:
        if fd is not None:
            os.close(fd)


def _write_all(fd: int, mv: memoryview) -> None:
    pos = 0
    while pos < len(mv):
        k = os.write(fd, mv[pos:])
        if k <= 0:
            raise OSError(errno.EIO, "write made no progress")
        pos += k


def unlink_payload(store: Store, b: Batch) -> None:
    """Remove the Parquet file of a batch that will not be committed."""
    if b.pfile_rel is not None:
        try:
            os.unlink(store.payload_path(b.pfile_rel))
        except FileNotFoundError:
            pass
        b.pfile_rel = None


def _compressible(data: pa.Array, samples: int = 16, size: int = 16 << 10) -> bool:
    """Does lz4 shrink a sample of the payload (up to `samples` slices of `size` bytes
    spread over the rows) below INCOMPRESSIBLE? Deterministic for given data."""
    n = len(data)
    if n == 0:
        return False
    parts = []
    for i in sorted({k * n // samples for k in range(samples)}):
        v = data[i].as_buffer()
        parts.append(memoryview(v)[:size])
    raw = b"".join(parts)
    return len(lz4.block.compress(raw, store_size=False)) < INCOMPRESSIBLE * len(raw)


def remove_orphans(store: Store) -> int:
    """Delete Parquet files no commit refers to (left by a crash before a commit), except
    those of batches being stored right now in this process."""
    led = store.ledger
    with store.mutex, led.ids:  # no batch id is handed out meanwhile (alloc_batch)
        known = {p for (p,) in store.con.execute("SELECT path FROM payload_files").fetchall()}
        busy = set(led.writing)
        n = 0
        for root, _dirs, files in os.walk(store.payload_dir):
            for name in files:
                full = os.path.join(root, name)
                rel = os.path.relpath(full, store.path)
                m = _BATCH_RE.search(name)
                if rel in known or (m and int(m[1]) in busy):
                    continue
                os.unlink(full)
                n += 1
    return n
