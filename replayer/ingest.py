"""Storing LOG frames: `blkrewind ingest --log DIR` (LOG segments) and FrameSink (frames received
from tracers over the network, replayer/server.py). One code path stores both.

What is stored is tracked frame by frame (replayer/store.py: `frame_ranges`, `segments`): a
*batch* is a run of consecutive frames of one segment that the store does not hold yet. Its data
frames are parsed into columns (vectorised: one Python step per record to walk the framing and
slice the payload, numpy for everything else), its payload is written to one Parquet file (temp
name, page checksums, file CRC recorded, fsync, rename to a name holding the batch id), and one
DuckDB transaction inserts its metadata rows -- every row tagged with the batch id -- and its
`frame_ranges` row. Frame 0 (the segment HEADER) and the SEAL are bookkeeping: the segment's
host and seg_id, and that it is sealed with N frames.

A frame is never stored twice, whatever path brings it and in whatever order: the `Ledger`
mirrors `frame_ranges` in memory, and a caller *reserves* the frame ranges it is about to store
(waiting while another thread stores an overlapping range), stores only the frames not held,
and releases them after the commit. The heavy parts (lz4 decoding and its checksums, numpy,
Parquet encoding, CRC, fsync) run in the callers' threads and release the GIL; only the DuckDB
commit is serialised by the store's mutex.

Afterwards `finalize` (replayer/watermark.py) recomputes the consistent watermark of every
session that received records.

LOG ingest: a torn tail (an unsealed segment whose last frame is incomplete, e.g. a tracer still
writing or killed) is a note, not an error. CorruptLog stops the segment after every good frame
before the damage is stored; the other segments are ingested; the caller exits non-zero.

Network: FrameSink.store validates everything first (frames decoded and checked, records parsed,
hosts, session binding, seg_id) and raises FrameRejected with nothing of the call stored.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import duckdb
import lz4.block
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from blkrewind.errors import CorruptLog, StoreError, UserError
from blkrewind.formats import record
from blkrewind.formats.logframe import valid_session
from blkrewind.formats.ranges import merge, subtract
from blkrewind.osutil import crc32, tune_malloc
from blkrewind.osutil import fsync_dir as _fsync_dir
from replayer import entropy
from replayer.store import Store
from replayer.watermark import devices_changed, finalize

BATCH_BYTES = 24 << 20       # frame bytes per batch (one Parquet file, one commit); its column
                             # buffers stay below glibc's mmap threshold, so they are reused
RG_BYTES = 4 << 20           # payload bytes per Parquet row group (the restore's read unit)
PAGE_BYTES = 64 << 10        # payload bytes per data page (about; at least one row): the
                             # unit of a direct read's checksum check (replayer/payload.py)
COMPRESSION = "lz4"          # file-system data ~3x smaller ...
INCOMPRESSIBLE = 0.5         # ... but a batch whose sample lz4 cannot shrink below this is
                             # stored plain: lz4 costs ~1 CPU-s per GB it compresses (the
                             # largest part of storing a batch, measured by bench_ship.py),
                             # worth it for data it at least halves (file-system metadata,
                             # text), not for a mix of random and text (~0.75) or random
                             # data; and the restore saves a copy per byte
RANDOMNESS = os.environ.get("BLKREWIND_RANDOMNESS", "1") != "0"  # per-row randomness
                             # (replayer/entropy.py); 0 only to measure its cost (bench_store)
ALL_FRAMES = 1 << 31         # "to the end of the segment" in a reservation

HS = record.HEADER_SIZE
_STAMPED_BAD = record.F_READERR | record.F_TRUNC
_U64 = (1 << 64) - 1
_BATCH_RE = re.compile(r"\.b(\d+)\.parquet")

PAYLOAD_SCHEMA = pa.schema([
    ("rtype", pa.uint16()), ("stamp", pa.uint64()), ("seq", pa.uint64()),
    ("offset", pa.uint32()), ("data", pa.binary()),
])


class FrameRejected(Exception):
    """Input from a peer that must not be stored (bad frame, bad records, wrong host).
    str(e) is a one-line reason for the server's log; nothing of the call was stored."""


class NotYourSession(FrameRejected):
    """The session is bound to another host."""


def _nat(obj: dict, key: str, default: int = 0, limit: int = _U64) -> int:
    """obj[key] as an integer in [0, limit] (ValueError otherwise)."""
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= limit:
        raise ValueError(f"{key} {v!r} is not an integer in [0, {limit}]")
    return v


# ============================================================== parsing one batch
@dataclass
class Batch:
    """The columns of one frame range [first_frame, end_frame) of one segment (its data frames;
    the HEADER and SEAL frames of the range are bookkeeping), ready to commit as one batch."""
    session: str
    segno: int
    first_frame: int
    end_frame: int
    host: str
    nframes: int = 0                      # data frames
    seg_id: int | None = None
    batch_id: int | None = None
    source: str = "log"                   # 'log' | 'net'
    header_host: str | None = None        # frame 0 is in the range: its host
    seal_nframes: int | None = None       # the SEAL is in the range: its frame_no + 1
    nrec: int = 0
    payload_bytes: int = 0
    records: pa.Table | None = None       # -> records (without pfile)
    base: pa.Table | None = None          # -> base (without pfile)
    completions: pa.Table | None = None
    dirtiers: pa.Table | None = None      # R_DIRTY
    payload: pa.Table | None = None       # rows of the Parquet file
    rg_bounds: list[int] = field(default_factory=list)
    marks: list[tuple] = field(default_factory=list)
    points: list[tuple] = field(default_factory=list)
    loss: list[tuple] = field(default_factory=list)
    session_info: tuple | None = None     # (json, time_ns)
    end_info: tuple | None = None         # (json, time_ns)
    devices: list[dict] = field(default_factory=list)
    ignored: int = 0
    pfile_rel: str | None = None          # set once the Parquet file is in place
    file_bytes: int = 0
    crc32: int = 0


def _comm_array(comm: np.ndarray) -> pa.Array:
    """Command names as a dictionary array: decode each distinct value once."""
    if len(comm) == 0:
        return pa.array([], pa.string())
    uniq, inv = np.unique(comm, return_inverse=True)
    names = pa.array([u.split(b"\0", 1)[0].decode("utf-8", "replace") for u in uniq.tolist()])
    return pa.DictionaryArray.from_arrays(pa.array(inv.astype(np.int32).ravel()), names)


def _col(a: np.ndarray) -> pa.Array:
    return pa.array(np.ascontiguousarray(a))


def parse_frames(frames, session: str, segno: int, host: str, *, first: int | None = None,
                 end: int | None = None) -> Batch:
    """Columns of a list of consecutive LOG data frames of one segment (frame range
    [first, end), default: that of the frames; it may also hold the HEADER/SEAL)."""
    if first is None:
        first = frames[0].frame_no
    if end is None:
        end = frames[-1].frame_no + 1
    b = Batch(session, segno, first, end, host, nframes=len(frames))
    if not frames:
        return b
    # pass 1 (Python, once per record): walk the framing, cut out the headers
    hparts: list[bytes] = []
    roff: list[int] = []
    rlen: list[int] = []
    counts = np.empty(len(frames), np.int64)
    mvs = []
    for i, fr in enumerate(frames):
        data = fr.data
        mvs.append(memoryview(data))
        n0 = len(roff)
        try:
            for off, rl in record.iter_framed(data):
                roff.append(off)
                rlen.append(rl)
                hparts.append(data[off:off + HS])
        except record.CorruptRecords as e:
            raise CorruptLog(f"{session}.{segno:06d} frame {fr.frame_no}: records do not "
                             f"parse: {e}") from None
        counts[i] = len(roff) - n0
    n = len(roff)
    b.nrec = n
    if n == 0:
        return b
    h = np.frombuffer(b"".join(hparts), dtype=record.DTYPE)
    del hparts
    fidx = np.repeat(np.arange(len(frames)), counts)
    roff_a = np.asarray(roff, np.int64)
    lens = h["len"].astype(np.int64)
    bad = np.nonzero(HS + lens > np.asarray(rlen, np.int64))[0]
    if len(bad):
        k = int(bad[0])
        raise CorruptLog(f"{session}.{segno:06d} frame {frames[fidx[k]].frame_no}: record at "
                         f"{roff[k]} claims {lens[k]} payload bytes in a {rlen[k]}-byte record")
    mono = np.array([fr.mono_ns for fr in frames], np.int64)
    real = np.array([fr.real_ns for fr in frames], np.int64)
    fr_real = real[fidx]
    kt = h["ktime_ns"].astype(np.int64)
    time_ns = np.where(kt == 0, fr_real, kt + (real - mono)[fidx])

    rtype = h["rtype"]
    is_bio = rtype == record.R_BIO
    is_base = rtype == record.R_BASE
    # payload rows: bio pieces and baseline chunks that carry bytes, in LOG order
    prow_mask = (is_bio | is_base) & (lens > 0)
    prows = np.nonzero(prow_mask)[0]
    row_of = np.full(n, -1, np.int64)
    row_of[prows] = np.arange(len(prows))
    if len(prows):
        # pass 2 (Python, once per payload record): slice, then one copy into the column
        starts = (roff_a[prows] + HS).tolist()
        plens = lens[prows]
        fl = fidx[prows].tolist()
        values = b"".join([mvs[f][s:s + ln] for f, s, ln in zip(fl, starts, plens.tolist())])
        offsets = np.zeros(len(prows) + 1, np.int64)
        np.cumsum(plens, out=offsets[1:])
        if offsets[-1] < (1 << 31) - 1:
            data = pa.Array.from_buffers(pa.binary(), len(prows),
                                         [None, pa.py_buffer(offsets.astype(np.int32)),
                                          pa.py_buffer(values)])
        else:  # not with BATCH_BYTES batches, but never silently wrong
            data = pa.Array.from_buffers(pa.large_binary(), len(prows),
                                         [None, pa.py_buffer(offsets), pa.py_buffer(values)]
                                         ).cast(pa.binary())
        b.payload = pa.Table.from_arrays(
            [_col(rtype[prows]), _col(h["stamp"][prows]), _col(h["seq"][prows]),
             _col(h["offset"][prows]), data], schema=PAYLOAD_SCHEMA)
        b.payload_bytes = int(offsets[-1])
        rnd_all = np.full(n, np.nan, np.float32)
        base_blocks = None
        if RANDOMNESS:
            kb = np.nonzero(is_base[prows])[0]   # baseline chunks: a state per 4 KiB
            kw = np.nonzero(~is_base[prows])[0]  # writes: one number
            if len(kw):
                rnd_all[prows[kw]] = entropy.randomness(values, offsets[kw], offsets[kw + 1])
            if len(kb):
                st, so = entropy.block_states(values, offsets[kb], offsets[kb + 1])
                base_blocks = (row_of, kb, st, so)
                rnd_all[prows[kb]] = entropy.fraction_random(st, so)
        # row groups of about RG_BYTES: rg of a row = how many RG_BYTES lie before it
        rg = offsets[:-1] // RG_BYTES
        bounds = np.nonzero(np.diff(rg))[0] + 1
        b.rg_bounds = [0, *bounds.tolist(), len(prows)]
        rg_id = np.zeros(len(prows), np.int32)
        rg_id[bounds] = 1
        rg_id = np.cumsum(rg_id, dtype=np.int32)
        rg_start = np.asarray(b.rg_bounds[:-1], np.int64)[rg_id]
        prg_all = np.full(n, -1, np.int32)
        pidx_all = np.full(n, -1, np.int32)
        prg_all[prows] = rg_id
        pidx_all[prows] = (np.arange(len(prows)) - rg_start).astype(np.int32)
    else:
        prg_all = pidx_all = np.full(n, -1, np.int32)
        rnd_all = np.full(n, np.nan, np.float32)
        base_blocks = None

    def ref_cols(idx):
        has = row_of[idx] >= 0
        mask = ~has
        return (pa.array(prg_all[idx], mask=mask), pa.array(pidx_all[idx], mask=mask),
                pa.array(rnd_all[idx], mask=np.isnan(rnd_all[idx])))

    def sess_col(k: int) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(k, np.int32)), pa.array([session]))

    bi = np.nonzero(is_bio)[0]
    if len(bi):
        hb = h[bi]
        prg, pidx, rnd = ref_cols(bi)
        b.records = pa.table({
            "session": sess_col(len(bi)), "dev": _col(hb["dev"]), "stamp": _col(hb["stamp"]),
            "seq": _col(hb["seq"]), "time_ns": _col(time_ns[bi]), "ktime_ns": _col(hb["ktime_ns"]),
            "sector": _col(hb["sector"]), "part_start": _col(hb["part_start"]),
            "cgroup_id": _col(hb["cgroup_id"]), "aux": _col(hb["aux"]), "opf": _col(hb["opf"]),
            "bio_size": _col(hb["bio_size"]), "offset": _col(hb["offset"]),
            "len": _col(hb["len"]), "flags": _col(hb["flags"]), "tgid": _col(hb["tgid"]),
            "tid": _col(hb["tid"]), "op": _col(hb["op"]), "comm": _comm_array(hb["comm"]),
            "prg": prg, "pidx": pidx, "randomness": rnd})
    ba = np.nonzero(is_base)[0]
    if len(ba):
        hb = h[ba]
        prg, pidx, rnd = ref_cols(ba)
        b.base = pa.table({
            "session": sess_col(len(ba)), "dev": _col(hb["dev"]), "stamp": _col(hb["stamp"]),
            "seq": _col(hb["seq"]),
            "aux": _col(hb["aux"]), "time_ns": _col(time_ns[ba]), "sector": _col(hb["sector"]),
            "bio_size": _col(hb["bio_size"]), "flags": _col(hb["flags"]),
            "prg": prg, "pidx": pidx, "randomness": rnd,
            "blocks": entropy.blocks_column(base_blocks, ba)})
    ci = np.nonzero(rtype == record.R_COMPLETE)[0]
    if len(ci):
        hc = h[ci]
        nst = (lens[ci] // 8).astype(np.int64)
        raw = b"".join([mvs[f][s:s + 8 * k] for f, s, k in
                        zip(fidx[ci].tolist(), (roff_a[ci] + HS).tolist(), nst.tolist())])
        loffs = np.zeros(len(ci) + 1, np.int32)
        np.cumsum(nst, out=loffs[1:])
        stamps = pa.ListArray.from_arrays(pa.array(loffs),
                                          pa.array(np.frombuffer(raw, "<u8")))
        b.completions = pa.table({
            "session": sess_col(len(ci)), "seq": _col(hc["seq"]), "time_ns": _col(time_ns[ci]),
            "dev": _col(hc["dev"]), "sector": _col(hc["sector"]), "bio_size": _col(hc["bio_size"]),
            "aux": _col(hc["aux"]), "error": _col(hc["error"]), "flags": _col(hc["flags"]),
            "stamps": stamps})

    is_dirty = rtype == record.R_DIRTY
    di = np.nonzero(is_dirty)[0]
    if len(di):
        hd = h[di]
        b.dirtiers = pa.table({
            "session": sess_col(len(di)), "dev": _col(hd["dev"]), "stamp": _col(hd["stamp"]),
            "seq": _col(hd["seq"]), "time_ns": _col(time_ns[di]),
            "cgroup_id": _col(hd["cgroup_id"]), "aux": _col(hd["aux"]), "tgid": _col(hd["tgid"]),
            "tid": _col(hd["tid"]), "comm": _comm_array(hd["comm"])})

    # the rare record types, one by one
    other = np.nonzero(~(is_bio | is_base | is_dirty | (rtype == record.R_COMPLETE)))[0]
    for k in other.tolist():
        hk = h[k]
        f = int(fidx[k])
        s = roff[k] + HS
        payload = bytes(mvs[f][s:s + int(lens[k])])
        rt = int(hk["rtype"])
        t = int(time_ns[k])
        comm = hk["comm"].split(b"\0", 1)[0].decode("utf-8", "replace")
        try:
            if rt == record.R_MARK:
                b.marks.append((session, int(hk["stamp"]), int(hk["seq"]), t,
                                payload.decode("utf-8", "replace"), int(hk["tgid"]),
                                int(hk["tid"]), comm))
            elif rt == record.R_POINT:
                try:
                    obj = json.loads(payload)
                except ValueError:
                    obj = {"what": "?", "raw": payload.decode("utf-8", "replace")}
                dev = obj.get("dev") if isinstance(obj, dict) else None
                what = obj.get("what") if isinstance(obj, dict) else None
                b.points.append((session, int(hk["stamp"]), int(hk["seq"]), t, what,
                                 int(dev) if isinstance(dev, int) else None,
                                 json.dumps(obj, sort_keys=True), segno,
                                 int(frames[f].frame_no)))
            elif rt == record.R_SESSION:
                obj = json.loads(payload)
                if not isinstance(obj, dict) or "stamp_base" not in obj:
                    raise ValueError("not an object with a stamp_base")
                _nat(obj, "stamp_base"), _nat(obj, "seq_base", 1)
                b.session_info = (obj, int(fr_real[k]))
            elif rt == record.R_DEVICE:
                obj = json.loads(payload)
                if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)
                        and "dev" in obj and "size_bytes" in obj):
                    raise ValueError("not an object with name, dev and size_bytes")
                _nat(obj, "dev", limit=0xFFFFFFFF), _nat(obj, "size_bytes")
                _nat(obj, "logical_block_size", 512, 0xFFFFFFFF)
                _nat(obj, "physical_block_size", 512, 0xFFFFFFFF), _nat(obj, "part_start")
                b.devices.append(obj)
            elif rt == record.R_LOSS:
                obj = json.loads(payload)
                b.loss.append((session, int(hk["seq"]), int(fr_real[k]),
                               _nat(obj, "drops"), _nat(obj, "drop_bytes"),
                               _nat(obj, "read_errs"), _nat(obj, "truncs"),
                               json.dumps(obj, sort_keys=True)))
            elif rt == record.R_END:
                obj = json.loads(payload)
                if not isinstance(obj, dict) or "end_stamp" not in obj:
                    raise ValueError("not an object with an end_stamp")
                _nat(obj, "end_stamp"), _nat(obj, "end_seq")
                b.end_info = (obj, int(fr_real[k]))
            else:
                b.ignored += 1
        except (ValueError, TypeError, AttributeError) as e:
            raise CorruptLog(f"{session}.{segno:06d} frame {frames[f].frame_no}: "
                             f"{record.RTYPE_NAMES.get(rt, rt)} record does not parse: {e}") from None
    return b


# ============================================================ payload files
def payload_rel(session: str, segno: int, first: int, end: int, batch: int) -> str:
    return os.path.join("payload", session, f"{segno:06d}-{first:06d}-{end:06d}.b{batch}.parquet")


def file_crc32(path: str, bufsize: int = 8 << 20) -> tuple[int, int]:
    """(zlib.crc32, size) of a file's bytes."""
    crc = n = 0
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            crc = crc32(mv[:k], crc)
            n += k
    return crc, n


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
        _unlink_payload(store, b)
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
                          write_statistics=False, write_page_checksum=True,
                          data_page_size=PAGE_BYTES,
                          # Arrow checks the page size after each write batch: one batch per
                          # page's worth of the mean row (1 for each row costs ~10 us a row)
                          write_batch_size=max(1, min(1024, PAGE_BYTES * len(b.payload)
                                                      // max(1, b.payload_bytes)))) as w:
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


def _unlink_payload(store: Store, b: Batch) -> None:
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
    led = ledger(store)
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


# ================================================================ the ledger
@dataclass
class SegState:
    seg_id: int | None = None
    host: str | None = None
    sealed: bool = False
    nframes: int | None = None
    torn_bytes: int = 0
    error: str | None = None


class Ledger:
    """What the store holds, frame by frame, mirrored in memory; one per open Store (ledger()).
    Every use is under store.mutex (`cond` waits on it): sessions' hosts, segments, the frame
    ranges of every batch, the frame ranges being stored right now (reservations), the next
    batch id."""

    def __init__(self, store: Store):
        self.store = store
        self.cond = threading.Condition(store.mutex)
        self.inflight: dict[tuple, list[tuple[int, int]]] = {}
        self.writing: set[int] = set()      # batch ids allocated, not committed or dropped yet
        self.ids = threading.Lock()         # next_batch and writing (not the store mutex: a
                                            # commit holding it must not stall the others)
        with store.mutex:
            self.reload()

    def reload(self) -> None:
        con = self.store.con
        self.ranges: dict[tuple, list[tuple[int, int, int]]] = {}
        for bt, s, n, a, e in con.execute(
                "SELECT batch, session, segno, first_frame, end_frame FROM frame_ranges "
                "ORDER BY session, segno, first_frame").fetchall():
            self.ranges.setdefault((s, n), []).append((a, e, bt))
        self.segs = {(s, n): SegState(sid, h, bool(se), nf, int(tb or 0), err)
                     for s, n, sid, h, se, nf, tb, err in con.execute(
                         "SELECT session, segno, seg_id, host, sealed, nframes, torn_bytes, error "
                         "FROM segments").fetchall()}
        self.hosts = {}
        self.prefix = {}
        for s, h, ps, pf in con.execute(
                "SELECT session, host, held_segno, held_frame FROM sessions").fetchall():
            self.hosts[s] = h
            self.prefix[s] = (int(ps or 0), int(pf or 0))
        hwm = con.execute("SELECT value FROM store_info WHERE key = 'batch_hwm'").fetchone()
        top = con.execute("SELECT greatest((SELECT coalesce(max(batch), 0) FROM frame_ranges), "
                          "(SELECT coalesce(max(id), 0) FROM payload_files))").fetchone()[0]
        self.next_batch = max(int(top), int(hwm[0]) if hwm else 0) + 1

    # -- queries
    def held(self, key) -> list[list[int]]:
        return merge(self.ranges.get(key, ()))

    def missing(self, key, a: int, e: int) -> list[list[int]]:
        return subtract(a, e, self.held(key))

    def complete(self, key) -> bool:
        st = self.segs.get(key)
        return bool(st and st.sealed and st.nframes is not None
                    and self.held(key) == [[0, st.nframes]])

    def compute_prefix(self, session: str, start: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """(segno, frame): every frame of the session before it is stored."""
        n, f = start
        while True:
            for a, e in self.held((session, n)):
                if a <= f <= e:
                    f = max(f, e)
                    break
            st = self.segs.get((session, n))
            if st and st.sealed and st.nframes is not None and f >= st.nframes:
                n, f = n + 1, 0
                continue
            return n, f

    # -- reservations
    def _busy(self, key, a: int, e: int) -> bool:
        return any(a < ie and ia < e for ia, ie in self.inflight.get(key, ()))

    def reserve(self, wants: list[tuple[tuple, int, int]]) -> None:
        """Wait until no other caller stores frames overlapping any of `wants`
        ((key, first, end) items), then claim them all at once (no hold-and-wait)."""
        with self.cond:
            while any(self._busy(k, a, e) for k, a, e in wants):
                self.cond.wait()
            for k, a, e in wants:
                self.inflight.setdefault(k, []).append((a, e))

    def release(self, wants: list[tuple[tuple, int, int]]) -> None:
        with self.cond:
            for k, a, e in wants:
                lst = self.inflight.get(k)
                if lst is not None:
                    lst.remove((a, e))
                    if not lst:
                        del self.inflight[k]
            self.cond.notify_all()

    def alloc_batch(self) -> int:
        with self.ids:
            n = self.next_batch
            self.next_batch += 1
            self.writing.add(n)
            return n

    def forget_batch(self, n: int | None) -> None:
        if n is not None:
            with self.ids:
                self.writing.discard(n)


def put_back(d: dict, key, value) -> None:
    """Restore a ledger entry saved before a failed transaction (None: there was none)."""
    if value is None:
        d.pop(key, None)
    else:
        d[key] = value


def ledger(store: Store) -> Ledger:
    """The store's ledger (made on first use)."""
    with store.mutex:
        led = getattr(store, "_ledger", None)
        if led is None:
            led = store._ledger = Ledger(store)
        return led


# ================================================================== commit
def _db_error(e: Exception) -> StoreError:
    return StoreError(f"storing in the store's database failed: {str(e).splitlines()[0]}; "
                      f"nothing of the batch was stored")


def commit_batches(store: Store, led: Ledger, batches: list[Batch], host: str,
                   notes: dict | None = None) -> None:
    """ONE transaction: the rows of `batches` (their Parquet files are in place), their
    frame_ranges, the segments' and sessions' bookkeeping; `notes` {key: (torn_bytes, error)}
    (LOG ingest) too. Checks, under the mutex, what only the store knows: the session is bound
    to `host` or new, each segment's seg_id and SEAL agree, no frame is held already (the
    caller reserved them). Raises NotYourSession / FrameRejected / StoreError; on any error
    nothing is stored and the ledger is unchanged."""
    notes = notes or {}
    with store.mutex:
        # ---- checks
        keys = list(dict.fromkeys([(b.session, b.segno) for b in batches] + list(notes)))
        sessions = list(dict.fromkeys(k[0] for k in keys))
        for s in sessions:
            bound = led.hosts.get(s)
            if bound is not None and bound != host:
                raise NotYourSession(f"session {s} belongs to host {bound}, not {host}")
        new_segs = {k: SegState(**vars(led.segs[k])) if k in led.segs else SegState()
                    for k in keys}
        new_ranges = {k: list(led.ranges.get(k, ())) for k in keys}
        for b in batches:
            k = (b.session, b.segno)
            st = new_segs[k]
            name = f"{b.session}.{b.segno:06d}"
            if b.seg_id is not None:
                if st.seg_id is not None and st.seg_id != b.seg_id:
                    raise FrameRejected(f"{name}: seg_id {b.seg_id:#x} is not the stored "
                                        f"segment's ({st.seg_id:#x}): another segment of that name")
                st.seg_id = b.seg_id
            if b.header_host is not None:
                st.host = b.header_host
            if b.seal_nframes is not None:
                if st.nframes is not None and st.nframes != b.seal_nframes:
                    raise FrameRejected(f"{name}: SEAL at frame {b.seal_nframes - 1}, the store "
                                        f"knows it at frame {st.nframes - 1}")
                st.sealed, st.nframes = True, b.seal_nframes
            if subtract(b.first_frame, b.end_frame, merge(new_ranges[k])) != \
                    [[b.first_frame, b.end_frame]]:
                raise StoreError(f"{name}: frames {b.first_frame}..{b.end_frame - 1} are partly "
                                 f"in the store already (internal error: not reserved)")
            new_ranges[k].append((b.first_frame, b.end_frame, b.batch_id))
        for k in keys:
            st = new_segs[k]
            if st.nframes is not None and any(e > st.nframes for _, e, _ in new_ranges[k]):
                raise FrameRejected(f"{k[0]}.{k[1]:06d}: frames past its SEAL "
                                    f"(frame {st.nframes - 1})")
            if k in notes:
                st.torn_bytes, st.error = notes[k]
        # ---- the ledger's new state (undone if the commit fails)
        old = ({k: led.ranges.get(k) for k in keys}, {k: led.segs.get(k) for k in keys},
               {s: led.hosts.get(s) for s in sessions}, {s: led.prefix.get(s) for s in sessions})
        known_segs = {k for k in keys if k in led.segs}
        known_sessions = {s for s in sessions if s in led.hosts}
        for k in keys:
            led.ranges[k] = sorted(new_ranges[k])
            led.segs[k] = new_segs[k]
        for s in sessions:
            led.hosts[s] = host
            led.prefix[s] = led.compute_prefix(s, led.prefix.get(s, (0, 0)))
        con = store.con
        now = time.time_ns()
        try:
            con.execute("BEGIN")
            try:
                for s in sessions:
                    ps, pf = led.prefix[s]
                    if s in known_sessions:
                        con.execute("UPDATE sessions SET dirty = TRUE, held_segno = ?, "
                                    "held_frame = ? WHERE session = ?", [ps, pf, s])
                    else:
                        con.execute("INSERT INTO sessions (session, host, dirty, held_segno, "
                                    "held_frame) VALUES (?, ?, TRUE, ?, ?)", [s, host, ps, pf])
                for k in keys:
                    st = led.segs[k]
                    vals = [st.seg_id, st.host, st.sealed, st.nframes, st.torn_bytes, st.error]
                    if k in known_segs:
                        con.execute("UPDATE segments SET seg_id = ?, host = ?, sealed = ?, "
                                    "nframes = ?, torn_bytes = ?, error = ? "
                                    "WHERE session = ? AND segno = ?", [*vals, *k])
                    else:
                        con.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    [*k, *vals])
                _insert_batches(con, batches, now)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            if any(b.devices for b in batches):
                devices_changed(store)
        except BaseException as e:
            for k in keys:
                put_back(led.ranges, k, old[0][k])
                put_back(led.segs, k, old[1][k])
            for s in sessions:
                put_back(led.hosts, s, old[2][s])
                put_back(led.prefix, s, old[3][s])
            if isinstance(e, duckdb.Error):
                raise _db_error(e) from None
            raise
        for b in batches:
            led.forget_batch(b.batch_id)


def _insert_batches(con, batches: list[Batch], now: int) -> None:
    """The rows of the batches (inside the caller's transaction): one statement per table
    for the bulk tables (their batch/pfile columns were added by tag_batch)."""
    files = [b for b in batches if b.pfile_rel is not None]
    if files:
        con.execute("INSERT INTO payload_files VALUES " + ", ".join(
            ["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(files)),
            [v for b in files for v in (b.batch_id, b.pfile_rel, b.session, b.segno,
                                        b.first_frame, b.end_frame, len(b.payload),
                                        b.payload_bytes, b.file_bytes, b.crc32, b.batch_id)])
    for table in ("records", "base", "completions", "dirtiers"):
        tbls = [getattr(b, table) for b in batches if getattr(b, table) is not None]
        if not tbls:
            continue
        con.register("_batch", tbls[0] if len(tbls) == 1 else pa.concat_tables(tbls))
        try:
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _batch")
        finally:
            con.unregister("_batch")
    for b in batches:
        _insert_small(con, b)
    if batches:
        con.execute("INSERT INTO frame_ranges VALUES " + ", ".join(
            ["(?, ?, ?, ?, ?, ?, ?)"] * len(batches)),
            [v for b in batches for v in (b.batch_id, b.session, b.segno, b.first_frame,
                                          b.end_frame, b.source, now)])


def tag_batch(b: Batch) -> None:
    """Give the bulk tables of a batch their batch and pfile columns (payload written)."""
    bid = b.batch_id
    for name in ("records", "base", "completions", "dirtiers"):
        t = getattr(b, name)
        if t is None:
            continue
        n = len(t)
        t = t.append_column("batch", pa.array(np.full(n, bid, np.int32)))
        if name in ("records", "base"):
            has = t.column("prg").is_valid()
            pf = pa.array(np.full(n, bid if b.pfile_rel is not None else 0, np.int32))
            t = t.append_column("pfile", pc.if_else(has, pf, pa.scalar(None, pa.int32())))
        setattr(b, name, t)


def _insert_small(con, b: Batch) -> None:
    """The rare rows of one batch."""
    bid = b.batch_id
    if b.marks:
        con.executemany("INSERT INTO marks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(*m, bid) for m in b.marks])
    if b.points:
        con.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(*p, bid) for p in b.points])
    if b.loss:
        con.executemany("INSERT INTO loss VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [(*x, bid) for x in b.loss])
    if b.session_info:
        obj, t = b.session_info
        con.execute("UPDATE sessions SET stamp_base = ?, seq_base = ?, version = ?, "
                    "boot_id = ?, kernel = ?, start_ns = ?, info = ? WHERE session = ?",
                    [_nat(obj, "stamp_base"), _nat(obj, "seq_base", 1),
                     _text(obj.get("version")), _text(obj.get("boot_id")),
                     _text(obj.get("kernel")), t, json.dumps(obj, sort_keys=True), b.session])
    if b.end_info:
        obj, t = b.end_info
        con.execute("UPDATE sessions SET end_stamp = ?, end_seq = ?, clean = ?, end_ns = ? "
                    "WHERE session = ?",
                    [_nat(obj, "end_stamp"), _nat(obj, "end_seq"),
                     obj.get("clean") is True, t, b.session])
    for d in b.devices:
        host = d.get("host") or b.host
        con.execute(
            "INSERT INTO session_devices (session, dev, device, host, name, path, size_bytes, "
            "logical_block_size, physical_block_size, part_start, info) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [b.session, _nat(d, "dev"), f"{host}:{d['name']}", host, d["name"],
             _text(d.get("path")), _nat(d, "size_bytes"), _nat(d, "logical_block_size", 512),
             _nat(d, "physical_block_size", 512), _nat(d, "part_start"),
             json.dumps(d, sort_keys=True)])


def _text(v) -> str | None:
    return None if v is None else str(v)


def host_error(b: Batch, host: str) -> str | None:
    """Why the batch's R_SESSION / R_DEVICE records do not belong to `host` (None: they do)."""
    name = f"{b.session}.{b.segno:06d}"
    if b.session_info:
        obj = b.session_info[0]
        if obj.get("host") not in (None, host):
            return f"{name}: its R_SESSION record names host {obj.get('host')!r}, not {host!r}"
        if obj.get("session") not in (None, b.session):
            return f"{name}: its R_SESSION record names session {obj.get('session')!r}"
    for d in b.devices:
        if d.get("host") not in (None, host):
            return f"{name}: its R_DEVICE record names host {d.get('host')!r}, not {host!r}"
    return None


# ================================================================ runs of frames
@dataclass
class Run:
    """Consecutive frames [first, end) of one segment not stored yet: one batch."""
    first: int
    end: int
    frames: list = field(default_factory=list)     # its data frames (tracer.log.Frame)
    header_host: str | None = None                 # frame 0 is in it
    seal_nframes: int | None = None                # the SEAL is in it
    size: int = 0


def prepare(store: Store, led: Ledger, run: Run, session: str, segno: int, seg_id: int,
            host: str, source: str) -> Batch:
    """Parse a run and write its Parquet file (CPU and I/O; no mutex held but for a moment).
    Raises CorruptLog (records do not parse), FrameRejected (records of another host),
    StoreError."""
    b = parse_frames(run.frames, session, segno, host, first=run.first, end=run.end)
    why = host_error(b, host)
    if why:
        raise FrameRejected(why)
    b.seg_id, b.source = seg_id, source
    b.header_host, b.seal_nframes = run.header_host, run.seal_nframes
    b.batch_id = led.alloc_batch()
    try:
        write_payload(store, b)
        tag_batch(b)
    except BaseException:
        _unlink_payload(store, b)
        led.forget_batch(b.batch_id)
        raise
    return b


def discard(store: Store, led: Ledger, batches: list[Batch]) -> None:
    """Batches that will not be committed: remove their files, forget their ids."""
    for b in batches:
        _unlink_payload(store, b)
        led.forget_batch(b.batch_id)


# ================================================================ LOG ingest
@dataclass
class SegmentResult:
    path: str
    session: str
    segno: int
    frames: int = 0
    records: int = 0
    payload_bytes: int = 0
    skipped: bool = False
    torn_bytes: int = 0
    error: str | None = None


@dataclass
class IngestResult:
    segments: list[SegmentResult]
    seconds: float
    cpu_seconds: float
    sessions: list[str]
    orphans: int = 0

    @property
    def frames(self) -> int:
        return sum(s.frames for s in self.segments)

    @property
    def records(self) -> int:
        return sum(s.records for s in self.segments)

    @property
    def payload_bytes(self) -> int:
        return sum(s.payload_bytes for s in self.segments)

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.segments if s.error]


def ingest_segment(store: Store, led: Ledger, seg, on_batch=None,
                   newer: str | None = None) -> SegmentResult:
    """Store the frames of one LOG segment the store does not hold yet (the whole segment is
    reserved meanwhile), in batches of about BATCH_BYTES; then the segment's notes (torn tail,
    error) if they changed. `newer`: a later segment of the LOG (its file name) when this is
    not the LOG's newest: an incomplete last frame is then damage, not a torn tail (a tracer
    seals a segment before it starts the next, and seals what a dead one left, at start)."""
    from blkrewind.formats.logframe import SegmentReader

    res = SegmentResult(seg.path, seg.session, seg.segno)
    key = (seg.session, seg.segno)
    want = [(key, 0, ALL_FRAMES)]
    try:
        reader = SegmentReader(seg.path)
    except CorruptLog as e:
        res.error = str(e)
        return res
    led.reserve(want)
    try:
        with reader:
            _ingest_reader(store, led, reader, res, on_batch, newer)
    finally:
        led.release(want)
    return res


def _ingest_reader(store: Store, led: Ledger, reader, res: SegmentResult, on_batch,
                   newer: str | None = None) -> None:
    session, segno, host = reader.session, reader.segno, reader.host
    key = (session, segno)
    with store.mutex:
        bound = led.hosts.get(session)
        st = led.segs.get(key)
        held = led.held(key)
    if bound is not None and bound != host:
        res.error = (f"{reader.path}: session {session} belongs to host {bound} in the store, "
                     f"this segment names host {host}")
        return
    if st is not None and st.seg_id is not None and st.seg_id != reader.seg_id:
        res.error = (f"{reader.path}: the store holds another segment {segno} of session "
                     f"{session} (seg_id {st.seg_id:#x}, this file {reader.seg_id:#x}): "
                     f"is the LOG holding two copies?")
        return

    def is_held(n: int) -> bool:
        return any(a <= n < e for a, e in held)

    run: Run | None = None
    error = None

    def flush() -> None:
        nonlocal run
        r, run = run, None
        if r is None:
            return
        try:
            b = prepare(store, led, r, session, segno, reader.seg_id, host, "log")
        except CorruptLog:
            # a frame that passed its checks holds records that do not parse: store the
            # frames before it, then stop the segment (the error propagates)
            good = Run(r.first, r.first, header_host=r.header_host)
            for fr in r.frames:
                try:
                    parse_frames([fr], session, segno, host)
                except CorruptLog:
                    good.end = fr.frame_no
                    break
                good.frames.append(fr)
            if good.end > good.first:
                _commit_one(prepare(store, led, good, session, segno, reader.seg_id, host,
                                    "log"))
            raise
        _commit_one(b)

    def _commit_one(b: Batch) -> None:
        try:
            commit_batches(store, led, [b], host)
        except BaseException:
            discard(store, led, [b])
            raise
        res.frames += b.nframes
        res.records += b.nrec
        res.payload_bytes += b.payload_bytes
        if on_batch:
            on_batch(b)

    def add(n: int, fr=None, header: bool = False, seal: bool = False, size: int = 0) -> None:
        nonlocal run
        if is_held(n):
            flush()
            return
        if run is None:
            run = Run(n, n)
        run.end = n + 1
        if fr is not None:
            run.frames.append(fr)
        if header:
            run.header_host = host
        if seal:
            run.seal_nframes = n + 1
        run.size += size
        if run.size >= BATCH_BYTES:
            flush()

    last = 0
    complete = False
    try:
        try:
            add(0, header=True)
            for off, h in reader.index():
                last = h.frame_no
                if is_held(h.frame_no):
                    flush()
                    continue
                fr = reader.read(off, h)
                if fr is None:   # torn tail
                    break
                add(h.frame_no, fr, size=h.raw_len)
            else:
                complete = True
            if complete and reader.sealed:
                add(last + 1, seal=True)
        except CorruptLog as e:   # the frames before it are good: stored by the flush below
            error = str(e)
        flush()
    except (CorruptLog, FrameRejected) as e:
        error = error or (str(e) if isinstance(e, CorruptLog) else f"{reader.path}: {e}")
    res.torn_bytes = int(reader.torn_bytes or 0)
    # An unsealed end (a torn frame, or zeros where the next frame would be: a zero-padded
    # tail, tracer/log.py) is only the tail still being written of the LOG's newest segment: a
    # tracer seals a segment before it starts the next one.
    cut = res.torn_bytes or (0 if reader.sealed else int(reader.pad_bytes or 0))
    if cut and newer is not None and error is None:
        error = (f"{reader.path}: ends in {cut} bytes of an incomplete frame or zeros, "
                 f"but it is not the LOG's newest segment ({newer} follows): the segment was "
                 f"cut or damaged, not torn; the history after it is not restorable")
    elif complete and not reader.sealed and newer is not None and error is None:
        # whole frames and then nothing: cut at a frame boundary (no torn bytes to see)
        error = (f"{reader.path}: ends after frame {last} without its SEAL, but it is not the "
                 f"LOG's newest segment ({newer} follows): the segment was cut or damaged; "
                 f"the history after it is not restorable")
    res.error = error
    with store.mutex:
        cur = led.segs.get(key)
    if cur is None or (cur.torn_bytes, cur.error) != (res.torn_bytes, error):
        commit_batches(store, led, [], host, notes={key: (res.torn_bytes, error)})


def ingest(store: Store, log_dir: str, *, jobs: int = 2, on_batch=None) -> IngestResult:
    """Ingest every segment of `log_dir` not yet fully in `store`; then finalize."""
    from blkrewind.formats.logframe import list_segments

    if not os.path.isdir(log_dir):
        raise UserError(f"no LOG directory {log_dir}")
    tune_malloc(512 << 20)  # frames and columns are reused, not faulted in again
    t0 = time.monotonic()
    c0 = time.process_time()
    led = ledger(store)
    orphans = remove_orphans(store)
    segs = list_segments(log_dir)
    if not segs:
        raise UserError(f"{log_dir} holds no LOG segments (*.brlog)")
    todo = []
    results: list[SegmentResult] = []
    seen = set()
    for seg in segs:
        key = (seg.session, seg.segno)
        if key in seen:
            results.append(SegmentResult(seg.path, seg.session, seg.segno,
                                         error=f"{seg.path}: a second file for segment "
                                               f"{seg.segno} of session {seg.session}"))
            continue
        seen.add(key)
        with store.mutex:
            done = led.complete(key)
        if done:  # sealed and every frame stored
            results.append(SegmentResult(seg.path, seg.session, seg.segno, skipped=True))
        else:
            todo.append(seg)
    # only the LOG's newest segment (session ids sort by time) may end in a torn frame;
    # segs are sorted by (session, segno): each one's follower is the next
    follower = {id(a): os.path.basename(b.path) for a, b in zip(segs, segs[1:])}
    # big segments first: the threads finish together
    todo.sort(key=lambda s: -s.size)
    if todo:
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="ingest") as ex:
            futs = [ex.submit(ingest_segment, store, led, seg, on_batch, follower.get(id(seg)))
                    for seg in todo]
            for f in futs:
                results.append(f.result())
    sessions = finalize(store)
    results.sort(key=lambda r: (r.session, r.segno))
    return IngestResult(results, time.monotonic() - t0, time.process_time() - c0, sessions,
                        orphans)


def delete_ingested(store: Store, log_dir: str) -> tuple[list[str], int]:
    """LOG retention without shipping (`ingest --delete-ingested`): delete the LOG segments
    the store holds whole -- sealed, every frame stored, same seg_id -- after a CHECKPOINT has
    made the store's metadata durable (payload files are fsynced before their commit). The
    LOG's newest segment always stays (a tracer continuing its session reads it), and so does
    anything unsealed, torn, damaged or not fully stored. Returns (names deleted, bytes)."""
    from blkrewind.formats.logframe import SegmentReader, list_segments

    segs = list_segments(log_dir)
    if not segs:
        return [], 0
    newest = max(segs, key=lambda s: (s.session, s.segno))
    led = ledger(store)
    with store.mutex:
        store.con.execute("CHECKPOINT")
    gone, freed = [], 0
    for seg in segs:
        if seg is newest:
            continue
        key = (seg.session, seg.segno)
        with store.mutex:
            done = led.complete(key)
            st = led.segs.get(key)
        if not done or st is None:
            continue
        try:
            with SegmentReader(seg.path) as r:
                same = r.sealed and r.seg_id == st.seg_id and r.size == seg.size
        except (UserError, OSError):
            continue
        if not same:
            continue
        try:
            os.unlink(seg.path)
        except FileNotFoundError:
            continue
        gone.append(os.path.basename(seg.path))
        freed += seg.size
    if gone:
        _fsync_dir(log_dir)
    return gone, freed


# ================================================================ FrameSink
@dataclass
class FrameGroup:
    session: str
    segno: int
    seg_id: int
    first: int                    # frame number of raw_frames[0]
    raw_frames: list              # bytes/memoryview: each a whole raw LOG frame (48-byte header + body)


class FrameSink:
    """Stores LOG frames received from the network. Thread-safe; one per server process.
    Shares the store code with `blkrewind ingest` (LOG directory ingest): same tables, same
    Parquet files, same crash safety; a frame stored by either path is never stored twice."""

    def __init__(self, store: Store, on_lost=None):
        # on_lost(host, [{"session","segno","ranges":[[a,e],...]}]) is called when stored
        # frames are found damaged/missing and dropped (integrity check), so the server can
        # send LACKS to that host's connections.
        if not store.writable:
            raise StoreError(f"{store.path}: a FrameSink needs the store open for writing")
        self.st = store   # (not self.store: that is the method)
        self.on_lost = on_lost
        tune_malloc(512 << 20)  # frames and columns are reused, not faulted in again
        self.led = ledger(store)
        self.orphans = remove_orphans(store)

    # ------------------------------------------------------------------ lacks
    def lacks(self, host: str, inventory: list[dict]) -> list[dict]:
        """inventory items: {"session","segno","seg_id","frames":N,"sealed":bool} (frame numbers
        [0,N) exist in the tracer's LOG). Returns [{"session","segno","ranges":[[a,e],...]}] for
        the frames in [0,N) the store does not hold (segments held completely are omitted).
        Raises NotYourSession for a session bound to another host."""
        items = [_inventory_item(it) for it in inventory]
        out = []
        with self.st.mutex:
            for session, segno, seg_id, n in items:
                bound = self.led.hosts.get(session)
                if bound is not None and bound != host:
                    raise NotYourSession(f"session {session} belongs to host {bound}, "
                                         f"not {host}")
                st = self.led.segs.get((session, segno))
                if st is not None and st.seg_id is not None and st.seg_id != seg_id:
                    raise FrameRejected(f"{session}.{segno:06d}: seg_id {seg_id:#x} is not the "
                                        f"stored segment's ({st.seg_id:#x})")
                if st is not None and st.nframes is not None:
                    n = min(n, st.nframes)   # never ask for frames past the SEAL
                ranges = self.led.missing((session, segno), 0, n)
                if ranges:
                    out.append({"session": session, "segno": segno, "ranges": ranges})
        return out

    # ------------------------------------------------------------------ store
    def store(self, host: str, groups: list[FrameGroup]) -> list[tuple[int, int, int]]:
        """Validate everything first (each raw frame decoded with tracer.log.decode_raw_frame:
        header CRC, seg_id, frame number, lz4 content checksum; records parse; every R_SESSION /
        R_DEVICE record names `host`; the session is bound to `host` or new -> bound to it; the
        seg_id matches what the store knows for that segment), then store the frames not stored
        yet (Parquet written+fsynced+renamed, then ONE DuckDB commit), return per group
        (first, end, newly_stored). Durable when it returns. Idempotent: frames already stored
        are skipped (so a replayed message stores nothing). Raises FrameRejected (nothing
        stored) or StoreError (store failure such as ENOSPC: nothing half-stored)."""
        if not isinstance(host, str) or not host:
            raise FrameRejected("no host")
        for g in groups:
            _check_shape(g)
        led = self.led
        with self.st.mutex:   # first: whose session is it (checked again at the commit)
            for g in groups:
                bound = led.hosts.get(g.session)
                if bound is not None and bound != host:
                    raise NotYourSession(f"session {g.session} belongs to host {bound}, "
                                         f"not {host}")
        decoded = [self._decode_group(host, g) for g in groups]
        # what only the store knows, before the heavy work (checked again at the commit)
        with self.st.mutex:
            for g, frames in decoded:
                st = led.segs.get((g.session, g.segno))
                if st is not None:
                    _check_against(g, frames, st)
        wants = [((g.session, g.segno), g.first, g.first + len(g.raw_frames))
                 for g, _ in decoded if g.raw_frames]
        batches: list[Batch] = []
        result = []
        led.reserve(wants)
        try:
            with self.st.mutex:
                todo = []
                claimed: dict[tuple, list] = {}
                for g, frames in decoded:
                    key = (g.session, g.segno)
                    end = g.first + len(frames)
                    held = merge(led.ranges.get(key, []) + claimed.get(key, []))
                    miss = subtract(g.first, end, held) if frames else []
                    claimed.setdefault(key, []).extend((a, e) for a, e in miss)
                    st = led.segs.get(key)
                    if st is not None:
                        _check_against(g, frames, st)
                    todo.append((g, frames, miss))
            for g, frames, miss in todo:
                new = 0
                for a, e in miss:
                    for run in _runs(frames[a - g.first:e - g.first], host):
                        try:
                            batches.append(prepare(self.st, led, run, g.session, g.segno,
                                                   g.seg_id, host, "net"))
                        except CorruptLog as ex:
                            raise FrameRejected(str(ex)) from None
                        new += run.end - run.first
                result.append((g.first, g.first + len(frames), new))
            if batches:
                commit_batches(self.st, led, batches, host)
        except BaseException:
            discard(self.st, led, batches)
            raise
        finally:
            led.release(wants)
        return result

    def _decode_group(self, host: str, g) -> tuple:
        """Check the shape of a group and decode its frames: (group, [(FrameHead, Frame|None,
        header JSON|None, raw size)])."""
        from blkrewind.formats.logframe import K_HEADER, K_SEAL, decode_raw_frame

        name = f"{g.session}.{g.segno:06d}"
        out = []
        seal_at = None
        for i, raw in enumerate(g.raw_frames):
            n = g.first + i
            if seal_at is not None:
                raise FrameRejected(f"{name}: frame {n} after its SEAL (frame {seal_at})")
            try:
                h, fr = decode_raw_frame(raw, seg_id=g.seg_id, frame_no=n)
            except CorruptLog as e:
                raise FrameRejected(f"{name}: {e}") from None
            except TypeError:
                raise FrameRejected(f"{name}: frame {n} is not bytes") from None
            meta = None
            if h.kind == K_HEADER:
                try:
                    meta = json.loads(fr.data)
                    ok = (isinstance(meta, dict) and meta.get("session") == g.session
                          and meta.get("segno") == g.segno)
                except ValueError:
                    ok = False
                if not ok:
                    raise FrameRejected(f"{name}: its HEADER does not name this segment")
                if meta.get("host") != host:
                    raise FrameRejected(f"{name}: its HEADER names host "
                                        f"{str(meta.get('host'))[:80]!r}, not {host!r}")
            elif h.kind == K_SEAL:
                seal_at = n
            out.append((h, fr, meta, len(memoryview(raw))))
        return g, out

    # ------------------------------------------------------------ the rest
    def finalize(self) -> list[str]:
        """Recompute watermarks of sessions that changed (replayer.watermark.finalize)."""
        return finalize(self.st)

    def check(self, full: bool, upto: int | None = None) -> list[str]:
        """Integrity check of stored payload (replayer/integrity.py): quick = every payload
        file exists with its recorded size; full = also its checksum. Damaged/missing files:
        their frame ranges' metadata is dropped in one transaction (so they read as missing,
        never served), on_lost is called; returns one line per damage found. upto: only the
        files with an id <= upto (those written before a restart)."""
        from replayer import integrity

        return integrity.check(self.st, full, on_lost=self.on_lost, upto=upto)


def _check_shape(g) -> None:
    if not isinstance(g, FrameGroup):
        raise FrameRejected("not a FrameGroup")
    if not valid_session(g.session):
        raise FrameRejected(f"bad session id {str(g.session)[:80]!r}")
    for name, v, hi in (("segno", g.segno, 1 << 31), ("seg_id", g.seg_id, 1 << 32),
                        ("first", g.first, 1 << 31)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < hi:
            raise FrameRejected(f"bad {name} {v!r}")
    if not isinstance(g.raw_frames, (list, tuple)) or g.first + len(g.raw_frames) >= 1 << 31:
        raise FrameRejected("bad raw_frames")


def _check_against(g: FrameGroup, frames: list, st: SegState) -> None:
    """A group's decoded frames against what the store knows of their segment."""
    from blkrewind.formats.logframe import K_SEAL

    name = f"{g.session}.{g.segno:06d}"
    if st.seg_id is not None and st.seg_id != g.seg_id:
        raise FrameRejected(f"{name}: seg_id {g.seg_id:#x} is not the stored segment's "
                            f"({st.seg_id:#x})")
    if st.nframes is not None:
        if g.first + len(frames) > st.nframes:
            raise FrameRejected(f"{name}: frames past its SEAL (frame {st.nframes - 1})")
        for h, *_ in frames:
            if (h.kind == K_SEAL) != (h.frame_no == st.nframes - 1):
                raise FrameRejected(f"{name}: kind {h.kind} at frame {h.frame_no}, its SEAL "
                                    f"is frame {st.nframes - 1}")


def _runs(frames: list, host: str):
    """Runs (batches of about BATCH_BYTES) of consecutive decoded frames."""
    from blkrewind.formats.logframe import K_HEADER, K_SEAL

    run = None
    for h, fr, meta, _size in frames:
        if run is None:
            run = Run(h.frame_no, h.frame_no)
        run.end = h.frame_no + 1
        if h.kind == K_HEADER:
            run.header_host = host
        elif h.kind == K_SEAL:
            run.seal_nframes = h.frame_no + 1
        else:
            run.frames.append(fr)
            run.size += h.raw_len
        if run.size >= BATCH_BYTES:
            yield run
            run = None
    if run is not None:
        yield run


def _inventory_item(it) -> tuple[str, int, int, int]:
    if not isinstance(it, dict):
        raise FrameRejected("an inventory item is not an object")
    s, n, sid, fr = it.get("session"), it.get("segno"), it.get("seg_id"), it.get("frames")
    if not valid_session(s):
        raise FrameRejected(f"inventory: bad session id {str(s)[:80]!r}")
    for name, v, hi in (("segno", n, 1 << 31), ("seg_id", sid, 1 << 32), ("frames", fr, 1 << 31)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < hi:
            raise FrameRejected(f"inventory: bad {name} {v!r}")
    if not isinstance(it.get("sealed", False), bool):
        raise FrameRejected("inventory: bad sealed")
    return s, n, sid, fr
