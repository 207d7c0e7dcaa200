"""Ingest: LOG segments -> store, idempotently, in any order, several segments at once.

For every segment of the LOG (tracer/log.py) the frames not yet ingested
(`progress.frames_done`) are read in batches of about BATCH_BYTES. A batch is
parsed into columns (vectorised: one Python step per record to walk the
framing and slice the payload, numpy for everything else), its payload is
written to one Parquet file (temp name, fsync, rename to a name made of
session/segment/frame range), and one DuckDB transaction inserts its metadata
and advances the segment's progress (replayer/store.py explains why that is
crash safe). Segments are processed by `jobs` threads: the heavy parts (lz4
decoding, numpy, Parquet encoding and writing, fsync) release the GIL; the
DuckDB commits are serialized by the store's mutex.

After the batches, `finalize` recomputes the consistent watermark of every
session that received records (internals.md, "What is restorable"),
incrementally: stamps up to `sessions.complete_to` are known complete, the
scan continues from there in stamp ranges; and it refreshes each device's
restorable range and the `devices` table.

A torn tail (an unsealed segment whose last frame is incomplete, e.g. a
tracer still writing or killed) is a note, not an error. CorruptLog stops the
segment after every good frame before the damage is stored; the other
segments are ingested; the caller exits non-zero with the message.
"""
from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import lz4.block
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from blkrewind import record
from blkrewind.errors import CorruptLog, StoreError, UserError
from replayer.store import Store
from replayer.watermark import finalize

BATCH_BYTES = 24 << 20       # frame bytes per batch (one Parquet file, one commit); its column
                             # buffers stay below glibc's mmap threshold, so they are reused
RG_BYTES = 4 << 20           # payload bytes per Parquet row group (the restore's read unit)
COMPRESSION = "lz4"          # measured: ~2.5 GB/s, file-system data ~3x smaller ...
INCOMPRESSIBLE = 0.9         # ... but a batch whose sample lz4 cannot shrink below this is
                             # stored plain: random data would gain nothing and the restore
                             # saves a copy per byte

HS = record.HEADER_SIZE
_STAMPED_BAD = record.F_READERR | record.F_TRUNC

PAYLOAD_SCHEMA = pa.schema([
    ("rtype", pa.uint16()), ("stamp", pa.uint64()), ("seq", pa.uint64()),
    ("offset", pa.uint32()), ("data", pa.binary()),
])


# ============================================================== parsing one batch
@dataclass
class Batch:
    """The columns of one frame range of one segment, ready to commit."""
    session: str
    segno: int
    first_frame: int
    end_frame: int
    host: str
    nframes: int = 0
    nrec: int = 0
    payload_bytes: int = 0
    records: pa.Table | None = None       # -> records (without pfile)
    base: pa.Table | None = None          # -> base (without pfile)
    completions: pa.Table | None = None
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


def _comm_array(comm: np.ndarray) -> pa.Array:
    """Command names as a dictionary array: decode each distinct value once."""
    if len(comm) == 0:
        return pa.array([], pa.string())
    uniq, inv = np.unique(comm, return_inverse=True)
    names = pa.array([u.split(b"\0", 1)[0].decode("utf-8", "replace") for u in uniq.tolist()])
    return pa.DictionaryArray.from_arrays(pa.array(inv.astype(np.int32).ravel()), names)


def _col(a: np.ndarray) -> pa.Array:
    return pa.array(np.ascontiguousarray(a))


def parse_frames(frames, session: str, segno: int, host: str) -> Batch:
    """Columns of a list of consecutive LOG frames of one segment."""
    b = Batch(session, segno, frames[0].frame_no, frames[-1].frame_no + 1, host,
              nframes=len(frames))
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

    def ref_cols(idx):
        has = row_of[idx] >= 0
        mask = ~has
        return (pa.array(prg_all[idx], mask=mask), pa.array(pidx_all[idx], mask=mask))

    def sess_col(k: int) -> pa.Array:
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(k, np.int32)), pa.array([session]))

    bi = np.nonzero(is_bio)[0]
    if len(bi):
        hb = h[bi]
        prg, pidx = ref_cols(bi)
        b.records = pa.table({
            "session": sess_col(len(bi)), "dev": _col(hb["dev"]), "stamp": _col(hb["stamp"]),
            "seq": _col(hb["seq"]), "time_ns": _col(time_ns[bi]), "ktime_ns": _col(hb["ktime_ns"]),
            "sector": _col(hb["sector"]), "part_start": _col(hb["part_start"]),
            "cgroup_id": _col(hb["cgroup_id"]), "aux": _col(hb["aux"]), "opf": _col(hb["opf"]),
            "bio_size": _col(hb["bio_size"]), "offset": _col(hb["offset"]),
            "len": _col(hb["len"]), "flags": _col(hb["flags"]), "tgid": _col(hb["tgid"]),
            "tid": _col(hb["tid"]), "op": _col(hb["op"]), "comm": _comm_array(hb["comm"]),
            "prg": prg, "pidx": pidx})
    ba = np.nonzero(is_base)[0]
    if len(ba):
        hb = h[ba]
        prg, pidx = ref_cols(ba)
        b.base = pa.table({
            "session": sess_col(len(ba)), "dev": _col(hb["dev"]), "seq": _col(hb["seq"]),
            "aux": _col(hb["aux"]), "time_ns": _col(time_ns[ba]), "sector": _col(hb["sector"]),
            "bio_size": _col(hb["bio_size"]), "flags": _col(hb["flags"]),
            "prg": prg, "pidx": pidx})
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

    # the rare record types, one by one
    other = np.nonzero(~(is_bio | is_base | (rtype == record.R_COMPLETE)))[0]
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
                                 json.dumps(obj, sort_keys=True)))
            elif rt == record.R_SESSION:
                b.session_info = (json.loads(payload), int(fr_real[k]))
            elif rt == record.R_DEVICE:
                b.devices.append(json.loads(payload))
            elif rt == record.R_LOSS:
                obj = json.loads(payload)
                b.loss.append((session, int(hk["seq"]), int(fr_real[k]),
                               int(obj.get("drops", 0)), int(obj.get("drop_bytes", 0)),
                               int(obj.get("read_errs", 0)), int(obj.get("truncs", 0)),
                               json.dumps(obj, sort_keys=True)))
            elif rt == record.R_END:
                b.end_info = (json.loads(payload), int(fr_real[k]))
            else:
                b.ignored += 1
        except ValueError as e:
            raise CorruptLog(f"{session}.{segno:06d} frame {frames[f].frame_no}: "
                             f"{record.RTYPE_NAMES.get(rt, rt)} record does not parse: {e}") from None
    return b


def tune_malloc() -> None:
    """Keep freed multi-MiB buffers (frames, columns) in the heap for reuse. With
    glibc's defaults each one is returned to the kernel and faulted back in on the
    next batch, which costs a third of the ingest rate on a VM. Process-wide."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD (glibc's maximum)


# ============================================================ payload files
def payload_rel(session: str, segno: int, first: int, end: int) -> str:
    return os.path.join("payload", session, f"{segno:06d}-{first:06d}-{end:06d}.parquet")


def write_payload(store: Store, b: Batch) -> None:
    """Write the batch's payload rows to their Parquet file: temp name, fsync, rename."""
    if b.payload is None:
        return
    rel = payload_rel(b.session, b.segno, b.first_frame, b.end_frame)
    final = store.payload_path(rel)
    d = os.path.dirname(final)
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = f"{final}.tmp{os.getpid()}.{threading.get_ident()}"
    codec = COMPRESSION if _compressible(b.payload.column("data").chunk(0)) else "none"
    try:
        with pq.ParquetWriter(tmp, PAYLOAD_SCHEMA, compression=codec,
                              use_dictionary=False, write_statistics=False) as w:
            for a, e in zip(b.rg_bounds[:-1], b.rg_bounds[1:]):
                w.write_table(b.payload.slice(a, e - a), row_group_size=e - a)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise StoreError(f"writing {final} failed: {e.strerror or e}; the store keeps "
                             f"everything ingested before") from None
        raise
    _fsync_dir(d)
    b.pfile_rel = rel


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


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_orphans(store: Store) -> int:
    """Delete Parquet files no commit refers to (left by a crash before a commit)."""
    known = {p for (p,) in store.query("SELECT path FROM payload_files")}
    n = 0
    for root, _dirs, files in os.walk(store.payload_dir):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, store.path)
            if rel not in known:
                os.unlink(full)
                n += 1
    return n


# ================================================================== commit
@dataclass
class RunState:
    """What one ingest run knows without asking DuckDB (every use under store.mutex):
    the next payload file id, the sessions already marked dirty, the progress rows."""
    next_pfile: int
    progress: dict            # (session, segno) -> frames_done of an existing row
    dirty: set = field(default_factory=set)

    @classmethod
    def load(cls, store: Store) -> "RunState":
        nxt = store.query_one("SELECT coalesce(max(id), 0) + 1 FROM payload_files")[0]
        prog = {(s, n): f for s, n, f in store.query(
            "SELECT session, segno, frames_done FROM progress")}
        return cls(int(nxt), prog)


def _mark_session(con, st: RunState, session: str, host: str) -> None:
    if session not in st.dirty:
        con.execute("INSERT INTO sessions (session, host, dirty) VALUES (?, ?, TRUE) "
                    "ON CONFLICT (session) DO UPDATE SET dirty = TRUE, "
                    "host = coalesce(sessions.host, excluded.host)", [session, host])


def _set_progress(con, st: RunState, session: str, segno: int, frames_done: int, sealed: bool,
                  done: bool, torn_bytes: int, error: str | None) -> None:
    vals = [frames_done, bool(sealed), bool(done), int(torn_bytes), error]
    if (session, segno) in st.progress:
        con.execute("UPDATE progress SET frames_done = ?, sealed = ?, done = ?, torn_bytes = ?, "
                    "error = ? WHERE session = ? AND segno = ?", [*vals, session, segno])
    else:
        con.execute("INSERT INTO progress VALUES (?, ?, ?, ?, ?, ?, ?)", [session, segno, *vals])


def commit(store: Store, st: RunState, b: Batch, *, sealed: bool = False, done: bool = False,
           torn_bytes: int = 0, error: str | None = None) -> None:
    """One transaction: the batch's rows and the segment's new progress."""
    with store.mutex:
        con = store.con
        key = (b.session, b.segno)
        if st.progress.get(key, 0) > b.first_frame:
            raise UserError(f"{b.session}.{b.segno:06d}: frames from {b.first_frame} are "
                            f"in the store already (is the LOG holding two copies?)")
        con.execute("BEGIN")
        try:
            pfile = None
            if b.pfile_rel is not None:
                pfile = st.next_pfile
                con.execute("INSERT INTO payload_files VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [pfile, b.pfile_rel, b.session, b.segno, b.first_frame, b.end_frame,
                             len(b.payload), b.payload_bytes,
                             os.path.getsize(store.payload_path(b.pfile_rel))])
            for table, tbl in (("records", b.records), ("base", b.base),
                               ("completions", b.completions)):
                if tbl is None:
                    continue
                con.register("_batch", tbl)
                try:
                    if table == "completions":
                        con.execute("INSERT INTO completions BY NAME SELECT * FROM _batch")
                    else:
                        con.execute(f"INSERT INTO {table} BY NAME SELECT *, "
                                    f"CASE WHEN prg IS NULL THEN NULL ELSE ?::INTEGER END AS pfile "
                                    f"FROM _batch", [pfile])
                finally:
                    con.unregister("_batch")
            if b.marks:
                con.executemany("INSERT INTO marks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", b.marks)
            if b.points:
                con.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?)", b.points)
            if b.loss:
                con.executemany("INSERT INTO loss VALUES (?, ?, ?, ?, ?, ?, ?, ?)", b.loss)
            _mark_session(con, st, b.session, b.host)
            if b.session_info:
                obj, t = b.session_info
                con.execute("UPDATE sessions SET host = ?, stamp_base = ?, seq_base = ?, version = ?, "
                            "boot_id = ?, kernel = ?, start_ns = ?, info = ? WHERE session = ?",
                            [obj.get("host") or b.host, int(obj["stamp_base"]),
                             int(obj.get("seq_base", 1)), obj.get("version"), obj.get("boot_id"),
                             obj.get("kernel"), t, json.dumps(obj, sort_keys=True), b.session])
            if b.end_info:
                obj, t = b.end_info
                con.execute("UPDATE sessions SET end_stamp = ?, end_seq = ?, clean = ?, end_ns = ? "
                            "WHERE session = ?",
                            [int(obj["end_stamp"]), int(obj.get("end_seq", 0)),
                             bool(obj.get("clean", False)), t, b.session])
            for d in b.devices:
                host = d.get("host") or b.host
                con.execute(
                    "INSERT INTO session_devices (session, dev, device, host, name, path, size_bytes, "
                    "logical_block_size, physical_block_size, part_start, info) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    [b.session, int(d["dev"]), f"{host}:{d['name']}", host, d["name"], d.get("path"),
                     int(d["size_bytes"]), int(d.get("logical_block_size", 512)),
                     int(d.get("physical_block_size", 512)), int(d.get("part_start", 0)),
                     json.dumps(d, sort_keys=True)])
            _set_progress(con, st, b.session, b.segno, b.end_frame, sealed, done, torn_bytes, error)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        if pfile is not None:
            st.next_pfile += 1
        st.dirty.add(b.session)
        st.progress[key] = b.end_frame


def commit_progress(store: Store, st: RunState, session: str, segno: int, host: str,
                    frames_done: int, *, sealed: bool, done: bool, torn_bytes: int,
                    error: str | None) -> None:
    """Progress-only update (no new frames): seal seen, torn tail, error."""
    with store.mutex:
        con = store.con
        con.execute("BEGIN")
        try:
            _mark_session(con, st, session, host)
            _set_progress(con, st, session, segno, frames_done, sealed, done, torn_bytes, error)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        st.dirty.add(session)
        st.progress[(session, segno)] = frames_done


# ================================================================ the run
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


def ingest_segment(store: Store, st: RunState, seg, start: int, prev: tuple | None = None,
                   on_batch=None) -> SegmentResult:
    """Ingest the frames of one segment from frame `start` on.

    `prev` is the segment's stored progress (sealed, done, torn_bytes, error) or None;
    the final status rides with the last batch's commit, or, when there is no new
    frame, is committed alone if it changed."""
    from tracer.log import SegmentReader

    res = SegmentResult(seg.path, seg.session, seg.segno)
    reader = None
    pending: list = []
    size = 0
    error = None
    frames_done = start
    host = ""

    def flush(final: dict | None) -> None:
        nonlocal pending, size, frames_done
        b = parse_frames(pending, seg.session, seg.segno, host)
        write_payload(store, b)
        commit(store, st, b, **(final or {}))
        frames_done = b.end_frame
        res.frames += b.nframes
        res.records += b.nrec
        res.payload_bytes += b.payload_bytes
        pending, size = [], 0
        if on_batch:
            on_batch(b)

    try:
        reader = SegmentReader(seg.path)
        host = reader.host
        for fr in reader.frames(start_frame=start):
            if size >= BATCH_BYTES:
                flush(None)
            pending.append(fr)
            size += len(fr.data)
    except CorruptLog as e:
        error = str(e)
    finally:
        if reader is not None:
            reader.close()
    sealed = bool(reader.sealed) if reader is not None else False
    res.torn_bytes = int(reader.torn_bytes or 0) if reader is not None else 0

    def final() -> dict:
        return {"sealed": sealed, "done": sealed and error is None,
                "torn_bytes": res.torn_bytes, "error": error}

    if pending:
        try:
            flush(final())
        except CorruptLog as e:
            # a frame that passed its checks holds records that do not parse:
            # store the frames before it, stop the segment there
            error = error or str(e)
            good = []
            for fr in pending:
                try:
                    parse_frames([fr], seg.session, seg.segno, host)
                except CorruptLog:
                    break
                good.append(fr)
            pending = good
            if pending:
                flush(final())
            else:
                commit_progress(store, st, seg.session, seg.segno, host, frames_done, **final())
    elif prev != (final()["sealed"], final()["done"], res.torn_bytes, error):
        commit_progress(store, st, seg.session, seg.segno, host, frames_done, **final())
    res.error = error
    return res


def ingest(store: Store, log_dir: str, *, jobs: int = 2, on_batch=None) -> IngestResult:
    """Ingest every segment of `log_dir` not yet fully in `store`; then finalize."""
    from tracer.log import list_segments

    if not os.path.isdir(log_dir):
        raise UserError(f"no LOG directory {log_dir}")
    tune_malloc()
    t0 = time.monotonic()
    c0 = time.process_time()
    orphans = remove_orphans(store)
    segs = list_segments(log_dir)
    if not segs:
        raise UserError(f"{log_dir} holds no LOG segments (*.brlog)")
    progress = {(r[0], r[1]): r[2:] for r in store.query(
        "SELECT session, segno, frames_done, sealed, done, torn_bytes, error FROM progress")}
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
        p = progress.get(key)
        if p is not None and p[2]:  # done: read up to its seal
            results.append(SegmentResult(seg.path, seg.session, seg.segno, skipped=True))
        else:
            todo.append((seg, p[0] if p else 0, tuple(p[1:]) if p else None))
    # big segments first: the threads finish together
    todo.sort(key=lambda x: -x[0].size)
    if todo:
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="ingest") as ex:
            st = RunState.load(store)
            futs = [ex.submit(ingest_segment, store, st, seg, start, prev, on_batch)
                    for seg, start, prev in todo]
            for f in futs:
                results.append(f.result())
    sessions = finalize(store)
    results.sort(key=lambda r: (r.session, r.segno))
    return IngestResult(results, time.monotonic() - t0, time.process_time() - c0, sessions,
                        orphans)
