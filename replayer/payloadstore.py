"""Where payload files live: the `PayloadStore` protocol and its first backend, the store
directory on a local file system (`LocalPayloadStore`).

A payload file is a Parquet file of PAYLOAD_SCHEMA rows (page checksums on, so a damaged page
is an error when read, never wrong bytes), named by a path relative to the store
(`payload/<session>/...b<batch>.parquet`, replayer/store.py) that holds the id of the batch
that wrote it. A file is written whole under a temporary name, made durable, then renamed to
its name: a name only ever holds a complete, durable file. Its CRC-32 and size are recorded
in `payload_files` by the commit that refers to it; a file no commit refers to is an orphan
(a crash before the commit) and is removed.

Every Parquet payload file is written through `parquet_writer` (one definition of the format:
schema, options), by ingest (replayer/ingest/payload.py: a batch encoded in memory, `put`) and
by prune (replayer/prune.py: base layers streamed, `create`).
"""
from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Protocol

from blkrewind.errors import StoreError
from blkrewind.osutil import crc32, file_crc32, fsync_dir

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq
    PAYLOAD_SCHEMA: pa.Schema


def payload_schema() -> pa.Schema:
    """PAYLOAD_SCHEMA, made on first use: the readers of a store that only open it
    (mount, rewind, restore through the direct path) do not import pyarrow (~0.1 s)."""
    s = globals().get("PAYLOAD_SCHEMA")
    if s is None:
        import pyarrow as pa
        s = globals()["PAYLOAD_SCHEMA"] = pa.schema([
            ("rtype", pa.uint16()), ("stamp", pa.uint64()), ("seq", pa.uint64()),
            ("offset", pa.uint32()), ("data", pa.binary()),
        ])
    return s


def __getattr__(name: str):
    if name == "PAYLOAD_SCHEMA":     # (from outside: `from ... import PAYLOAD_SCHEMA`)
        return payload_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ALIGN = 4096                 # O_DIRECT buffers and sizes


PAGE_BYTES = 64 << 10   # payload bytes per data page (at least one row): the unit of a direct
                        # read's checksum check (replayer/payload.py)


def parquet_writer(sink, compression: str, mean_row_bytes: int = 0) -> pq.ParquetWriter:
    """A writer of payload rows to `sink` (a path or an Arrow output stream): PAYLOAD_SCHEMA,
    data pages of about PAGE_BYTES, page checksums on (a damaged page is an error, never wrong
    bytes), no dictionaries or statistics (payload bytes have none worth keeping).
    mean_row_bytes (when known): Arrow checks the page size after each write batch, so one
    batch per page's worth of rows (a batch of 1 row costs ~10 us a row)."""
    import pyarrow.parquet as pq
    batch = max(1, min(1024, PAGE_BYTES // mean_row_bytes)) if mean_row_bytes > 0 else 64
    return pq.ParquetWriter(sink, payload_schema(), compression=compression, use_dictionary=False,
                            write_statistics=False, write_page_checksum=True,
                            data_page_size=PAGE_BYTES, write_batch_size=batch)


class PayloadSink(Protocol):
    """A payload file being written by `PayloadStore.create`: row groups of PAYLOAD_SCHEMA
    rows (lz4); once the context exits cleanly, what was written."""
    crc32: int
    size: int
    rows: int

    def write_table(self, t: pa.Table, row_group_size: int) -> None:
        ...


class PayloadStore(Protocol):
    """What the store needs of the place its payload files live."""

    def put(self, rel: str, buf, n: int) -> int:
        """buf[:n] (a page-aligned buffer holding a whole file) durable under the name `rel`;
        returns the CRC-32 of the bytes. StoreError (nothing left under either name)."""
        ...

    def create(self, rel: str) -> AbstractContextManager[PayloadSink]:
        """A context whose sink writes a new file; on a clean exit it is closed, made durable
        and named `rel` (sink.crc32, sink.size, sink.rows set; sink.rows == 0: nothing was
        written, no file); on an error nothing is left."""
        ...

    def open(self, rel: str) -> pq.ParquetFile:
        """The file for reading its row groups (OSError when missing or unreadable)."""
        ...

    def stat(self, rel: str) -> int | None:
        """Its size in bytes; None when there is no such file (OSError: cannot tell)."""
        ...

    def checksum(self, rel: str) -> tuple[int, int]:
        """(CRC-32, size) of its bytes, read whole (OSError when unreadable)."""
        ...

    def quarantine(self, rel: str, session: str) -> str | None:
        """Move a damaged file aside (kept as evidence, never over another); its new path, or
        None when it is not there. StoreError when it cannot be moved."""
        ...

    def delete(self, rels: list[str]) -> int:
        """Remove files (missing ones are no error), durably; how many were removed."""
        ...

    def orphans(self, keep: Callable[[str], bool]) -> list[str]:
        """The files for which keep(rel) is False."""
        ...


class _LocalSink:
    """A parquet_writer (lz4) on a temporary path, opened at its first table: no rows, no
    file."""

    def __init__(self, path: str):
        self.path = path
        self.w: pq.ParquetWriter | None = None
        self.crc32 = 0
        self.size = 0
        self.rows = 0

    def write_table(self, t: pa.Table, row_group_size: int) -> None:
        if self.w is None:
            self.w = parquet_writer(self.path, "lz4")
        self.w.write_table(t, row_group_size=row_group_size)
        self.rows += len(t)


class LocalPayloadStore:
    """Payload files in the store directory: written with O_DIRECT where the file system takes
    it (on this kind of VM the page cache takes new file data at a third of the disk's rate),
    fdatasync, rename, fsync of the directory."""

    def __init__(self, root: str):
        self.root = root                              # the store directory
        self.damaged = os.path.join(root, "damaged")  # quarantine: damaged/<session>/

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    # ---------------------------------------------------------------- writing
    def put(self, rel: str, buf, n: int) -> int:
        final = self.path(rel)
        d = os.path.dirname(final)
        os.makedirs(d, mode=0o700, exist_ok=True)
        tmp = f"{final}.tmp"   # the batch id in the name makes it unique
        try:
            view = memoryview(buf)[:n]
            crc = crc32(view)
            del view
            _write_file(tmp, buf, n)
            os.rename(tmp, final)
        except BaseException as e:
            _unlink(tmp)
            if isinstance(e, OSError):
                raise StoreError(f"writing {final} failed: {e.strerror or e}; the store keeps "
                                 f"everything stored before") from None
            raise
        try:
            fsync_dir(d)
        except OSError as e:
            _unlink(final)
            raise StoreError(f"fsync of {d} failed: {e.strerror or e}") from None
        return crc

    @contextmanager
    def create(self, rel: str) -> Iterator[_LocalSink]:
        final = self.path(rel)
        d = os.path.dirname(final)
        os.makedirs(d, mode=0o700, exist_ok=True)
        sink = _LocalSink(f"{final}.tmp{os.getpid()}")
        try:
            yield sink
            if sink.w is not None:
                sink.w.close()
                fd = os.open(sink.path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                sink.crc32, sink.size = file_crc32(sink.path)
                os.rename(sink.path, final)
                fsync_dir(d)
        except BaseException:
            if sink.w is not None:
                try:
                    sink.w.close()
                except Exception:
                    pass
            _unlink(sink.path)
            raise

    # ---------------------------------------------------------------- reading
    def open(self, rel: str) -> pq.ParquetFile:
        import pyarrow.parquet as pq
        return pq.ParquetFile(self.path(rel))

    def stat(self, rel: str) -> int | None:
        try:
            return os.stat(self.path(rel)).st_size
        except FileNotFoundError:
            return None

    def checksum(self, rel: str) -> tuple[int, int]:
        return file_crc32(self.path(rel))

    # ------------------------------------------------------------- removing
    def quarantine(self, rel: str, session: str) -> str | None:
        src = self.path(rel)
        if not os.path.exists(src):
            return None
        dst_dir = os.path.join(self.damaged, session)
        os.makedirs(dst_dir, mode=0o700, exist_ok=True)
        base = os.path.join(dst_dir, os.path.basename(src))
        dst, k = base, 1
        while os.path.exists(dst):
            dst, k = f"{base}.{k}", k + 1
        try:
            os.rename(src, dst)
            fsync_dir(dst_dir)
        except OSError as e:
            raise StoreError(f"cannot move the damaged payload file {src} aside: "
                             f"{e.strerror}") from None
        return dst

    def delete(self, rels: list[str]) -> int:
        n = 0
        dirs = set()
        for rel in rels:
            p = self.path(rel)
            if _unlink(p):
                n += 1
                dirs.add(os.path.dirname(p))
        for d in dirs:
            fsync_dir(d)
        return n

    def orphans(self, keep: Callable[[str], bool]) -> list[str]:
        out = []
        for root, _dirs, files in os.walk(os.path.join(self.root, "payload")):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), self.root)
                if not keep(rel):
                    out.append(rel)
        return out


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _write_file(path: str, buf, n: int) -> None:
    """buf[:n] (an aligned buffer) to a new file, durable (fdatasync) when this returns."""
    padded = (n + ALIGN - 1) & ~(ALIGN - 1)
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
