"""A batch's payload rows into one Parquet payload file (replayer/payloadstore.py: the format
and where files live): encoded in memory into this thread's aligned scratch buffer, compressed
when a sample of it shrinks, put durably under a name holding the batch id; and the files no
commit refers to (a crash before the commit) removed."""
from __future__ import annotations

import mmap
import os
import re
import threading

import lz4.block
import pyarrow as pa

from blkrewind.replayer.ingest.columns import Batch
from blkrewind.replayer.payloadstore import ALIGN, parquet_writer
from blkrewind.replayer.store import Store

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
    """Write the batch's payload rows to their payload file: encoded in memory, put (durable,
    its CRC-32 recorded in the batch) by the store's PayloadStore. Needs b.batch_id."""
    if b.payload is None:
        return
    rel = payload_rel(b.session, b.segno, b.first_frame, b.end_frame, b.tagged_id())
    codec = COMPRESSION if _compressible(b.payload.column("data").chunk(0)) else "none"
    buf, n = _encode(b, b.payload, codec)
    b.crc32 = store.payload.put(rel, buf, n)
    b.file_bytes = n
    b.pfile_rel = rel


_tls = threading.local()


def _scratch(n: int) -> mmap.mmap:
    """This thread's page-aligned scratch buffer of at least n bytes (reused: its pages are
    faulted in once)."""
    m = getattr(_tls, "scratch", None)
    if m is None or len(m) < n:
        if m is not None:
            m.close()
        m = _tls.scratch = mmap.mmap(-1, max(n + (n >> 2), 8 << 20) + ALIGN - 1 & ~(ALIGN - 1))
    return m


def _parquet(sink, b: Batch, payload: pa.Table, codec: str) -> None:
    with parquet_writer(sink, codec, b.payload_bytes // max(1, len(payload))) as w:
        for a, e in zip(b.rg_bounds[:-1], b.rg_bounds[1:]):
            w.write_table(payload.slice(a, e - a), row_group_size=e - a)


def _encode(b: Batch, payload: pa.Table, codec: str) -> tuple:
    """(buffer, size): the Parquet file's bytes (of b's payload rows), in this thread's aligned
    scratch buffer."""
    bound = b.payload_bytes + (b.payload_bytes >> 6) + 64 * len(payload) + (1 << 20)
    m = _scratch(bound)
    try:
        out = pa.FixedSizeBufferWriter(pa.py_buffer(m))
        _parquet(out, b, payload, codec)
        return m, out.tell()
    except (pa.ArrowException, ValueError):   # larger than the bound (it is generous)
        out = pa.BufferOutputStream()
        _parquet(out, b, payload, codec)
        data = out.getvalue()
        m = _scratch(data.size)
        m[:data.size] = memoryview(data)
        return m, data.size


def unlink_payload(store: Store, b: Batch) -> None:
    """Remove the payload file of a batch that will not be committed."""
    if b.pfile_rel is not None:
        store.payload.delete([b.pfile_rel])
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
    """Delete payload files no commit refers to (left by a crash before a commit), except
    those of batches being stored right now in this process."""
    led = store.ledger
    with store.locked(), led.ids:  # no batch id is handed out meanwhile (alloc_batch)
        known = set(store.payload_file_paths())
        busy = set(led.writing)

        def keep(rel: str) -> bool:
            m = _BATCH_RE.search(os.path.basename(rel))
            return rel in known or bool(m and int(m[1]) in busy)

        return store.payload.delete(store.payload.orphans(keep))
