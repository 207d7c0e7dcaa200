"""Parsing one batch: the data frames of a run of one segment into columns (vectorised: one
Python step per record to walk the framing and slice the payload, numpy for everything else).
The rare record types (marks, points, session, device, loss, end) are decoded one by one
through RARE, a table from record type to decoder."""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from blkrewind.errors import CorruptLog
from blkrewind.formats import record
from blkrewind.replayer import entropy

RG_BYTES = 4 << 20           # payload bytes per Parquet row group (the restore's read unit)
RANDOMNESS = os.environ.get("BLKREWIND_RANDOMNESS", "1") != "0"  # per-row randomness
                             # (replayer/entropy.py); 0 only to measure its cost (bench_store)

HS = record.HEADER_SIZE


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt


def _blocks(base_blocks, idx):
    t0 = time.thread_time()
    try:
        return entropy.blocks_column(base_blocks, idx)
    finally:
        entropy.CPU_S[0] += time.thread_time() - t0
_U64 = (1 << 64) - 1

PAYLOAD_SCHEMA = pa.schema([
    ("rtype", pa.uint16()), ("stamp", pa.uint64()), ("seq", pa.uint64()),
    ("offset", pa.uint32()), ("data", pa.binary()),
])


def nat(obj: dict, key: str, default: int = 0, limit: int = _U64) -> int:
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

    def tagged_id(self) -> int:
        """batch_id, which tag_batch() sets before the batch is written or committed."""
        if self.batch_id is None:
            raise RuntimeError(f"{self.session}/{self.segno}: batch has no id (internal error)")
        return self.batch_id

    def payload_rows(self) -> pa.Table:
        """payload, for a batch whose payload file is being (or was) written."""
        if self.payload is None:
            raise RuntimeError(f"{self.session}/{self.segno}: batch has no payload "
                               f"(internal error)")
        return self.payload


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
            t0, f0 = time.thread_time(), _faults()
            kb = np.nonzero(is_base[prows])[0]   # baseline chunks: a state per 4 KiB
            kw = np.nonzero(~is_base[prows])[0]  # writes: one number
            if len(kw):
                rnd_all[prows[kw]] = entropy.randomness(values, offsets[kw], offsets[kw + 1])
            if len(kb):
                st, so = entropy.block_states(values, offsets[kb], offsets[kb + 1])
                base_blocks = (row_of, kb, st, so)
                rnd_all[prows[kb]] = entropy.fraction_random(st, so)
            entropy.CPU_S[0] += time.thread_time() - t0
            entropy.CPU_S[1] += _faults() - f0
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
            "blocks": _blocks(base_blocks, ba)})
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

    # the rare record types, one by one, through RARE
    other = np.nonzero(~(is_bio | is_base | is_dirty | (rtype == record.R_COMPLETE)))[0]
    for k in other.tolist():
        hk = h[k]
        f = int(fidx[k])
        s = roff[k] + HS
        rt = int(hk["rtype"])
        decode = RARE.get(rt)
        if decode is None:
            b.ignored += 1
            continue
        rec = Rare(hk, bytes(mvs[f][s:s + int(lens[k])]), int(time_ns[k]), int(fr_real[k]),
                   int(frames[f].frame_no))
        try:
            decode(b, rec)
        except (ValueError, TypeError, AttributeError) as e:
            raise CorruptLog(f"{session}.{segno:06d} frame {frames[f].frame_no}: "
                             f"{record.RTYPE_NAMES.get(rt, rt)} record does not parse: {e}") from None
    return b


@dataclass
class Rare:
    """One record of a rare type: its header, payload, wall time (record time; frame time)."""
    h: np.void
    payload: bytes
    time_ns: int
    frame_real_ns: int
    frame_no: int

    def json(self):
        return json.loads(self.payload)


def _mark(b: Batch, r: Rare) -> None:
    comm = r.h["comm"].split(b"\0", 1)[0].decode("utf-8", "replace")
    b.marks.append((b.session, int(r.h["stamp"]), int(r.h["seq"]), r.time_ns,
                    r.payload.decode("utf-8", "replace"), int(r.h["tgid"]), int(r.h["tid"]),
                    comm))


def _point(b: Batch, r: Rare) -> None:
    try:
        obj = r.json()
    except ValueError:
        obj = {"what": "?", "raw": r.payload.decode("utf-8", "replace")}
    dev = obj.get("dev") if isinstance(obj, dict) else None
    what = obj.get("what") if isinstance(obj, dict) else None
    b.points.append((b.session, int(r.h["stamp"]), int(r.h["seq"]), r.time_ns, what,
                     int(dev) if isinstance(dev, int) else None,
                     json.dumps(obj, sort_keys=True), b.segno, r.frame_no))


def _session(b: Batch, r: Rare) -> None:
    obj = r.json()
    if not isinstance(obj, dict) or "stamp_base" not in obj:
        raise ValueError("not an object with a stamp_base")
    nat(obj, "stamp_base"), nat(obj, "seq_base", 1)
    b.session_info = (obj, r.frame_real_ns)


def _device(b: Batch, r: Rare) -> None:
    obj = r.json()
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)
            and "dev" in obj and "size_bytes" in obj):
        raise ValueError("not an object with name, dev and size_bytes")
    nat(obj, "dev", limit=0xFFFFFFFF), nat(obj, "size_bytes")
    nat(obj, "logical_block_size", 512, 0xFFFFFFFF)
    nat(obj, "physical_block_size", 512, 0xFFFFFFFF), nat(obj, "part_start")
    b.devices.append(obj)


def _loss(b: Batch, r: Rare) -> None:
    obj = r.json()
    b.loss.append((b.session, int(r.h["seq"]), r.frame_real_ns,
                   nat(obj, "drops"), nat(obj, "drop_bytes"),
                   nat(obj, "read_errs"), nat(obj, "truncs"),
                   json.dumps(obj, sort_keys=True)))


def _end(b: Batch, r: Rare) -> None:
    obj = r.json()
    if not isinstance(obj, dict) or "end_stamp" not in obj:
        raise ValueError("not an object with an end_stamp")
    nat(obj, "end_stamp"), nat(obj, "end_seq")
    b.end_info = (obj, r.frame_real_ns)


# record type -> decoder of one record into the batch (ValueError/TypeError: does not parse);
# a type not here (nor a bulk one) is counted in Batch.ignored
RARE = {
    record.R_MARK: _mark,
    record.R_POINT: _point,
    record.R_SESSION: _session,
    record.R_DEVICE: _device,
    record.R_LOSS: _loss,
    record.R_END: _end,
}
