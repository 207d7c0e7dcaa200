"""`blkrewind prune`: fold the old history of one device into its base.

Choice of the prune point. cutoff = now - keep. K = the newest restorable stamp of the
device (`restorable` intervals, replayer/watermark.py) whose time is <= cutoff, moved
before any resync of the device that is not finished at K (K in [Rs, Re): the resync's
chunks lie under the bios between Rs and K, which the fold would put under them).
Nothing restorable before the cutoff: nothing to do.

What is kept (the layers). Without --keep-marks: one layer, the device image at K.
With it: the restorable marks of the device older than K (M1 < ... < Mn) stay
restorable: layer 0 is the image at M1, layer i the bytes whose newest version appeared
in (M(i-1), Mi] -- exactly what changed between them, as a snapshot chain stores it --
and the last layer what changed in (Mn, K]. Writes between marks are folded away: a
kept mark is a single restorable stamp, not an interval. Layer 0 is stored as base
chunks with stamp 0 (under everything); layer i as base chunks with stamp Mi (K for
the last), which apply from that stamp on (rebuild.extents: chunks at or below the
`pruned` stamp are prune layers). A layer's all-zero chunks are F_ZERO rows without
payload (layer 0 has none: what no chunk covers reads as zeroes).

Sessions. The device's sessions before K's session have their whole history of the
device dropped (with --keep-marks, a session holding restorable marks is folded at its
newest one instead); K's session is folded at K; later sessions are untouched.

Crash safety (kill -9 at any moment). 1. The layers' payload goes to one new Parquet
file: temp name, fsync, rename, fsync of the directory; a kill before the commit leaves
an unreferenced file, removed by the next prune or ingest (replayer.ingest.payload.remove_orphans).
2. ONE DuckDB transaction: drop the device's base chunks with stamp <= K, insert the
new ones (their payload file in `payload_files`, checksummed like ingest's), delete the
device's records, points and completions up to K, the marks nobody can restore any
more, and the `payload_files` rows no row refers to; upsert `pruned`; recompute the
session's intervals (they now start at K). 3. After the commit: delete the payload files
of the rows deleted. Rows of frames that were pruned stay recorded in `frame_ranges`, so
a LOG ingested again does not bring them back.

Marks: a mark is deleted when no device of its session can restore it any more (the
other devices of a multi-device session keep their history); --keep-marks keeps the
restorable ones (see above). Loss reports and `gap_runs` stay (small; gaps <= K no
longer count for the device).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from blkrewind.errors import StoreError
from blkrewind.formats import record
from blkrewind.replayer import rebuild, watermark
from blkrewind.replayer.payloadstore import PAYLOAD_SCHEMA
from blkrewind.replayer.store import Store, StoreDevice, StoreReader

CHUNK = 1 << 20              # bytes per new base chunk (at most)
RG_BYTES = 4 << 20           # payload bytes per row group
WINDOW = 64 << 20


@dataclass
class Result:
    point: int | None = None          # K
    point_ns: int | None = None
    session: str | None = None
    kept_marks: list = field(default_factory=list)
    records: int = 0
    chunks_dropped: int = 0
    chunks_written: int = 0
    sessions_dropped: int = 0
    files_deleted: int = 0
    freed_bytes: int = 0
    written_bytes: int = 0
    note: str = ""


@dataclass
class _Fold:
    session: str
    dev: int
    point: int                        # K of this session
    kept: list                        # kept marks < point
    time_ns: int | None
    size: int


# ---------------------------------------------------------------- choosing K
def _open_resyncs(store: StoreReader, session: str, dev: int) -> list[tuple[int, int | None]]:
    ends = rebuild.resync_ends(store, session, dev)
    return [(rs, ends.get(rs)) for rs in store.resync_starts(session, dev)]


def choose_point(store: StoreReader, device: str, cutoff_ns: int):
    """(session, dev, size, K) or None."""
    ivs = [iv for iv in store.device_restorable(device)
           if iv[5] is not None and iv[5] <= cutoff_ns]
    for sess, dev, size, a, b, fn, tn in reversed(ivs):
        a, b = int(a), int(b)
        if tn is not None and tn <= cutoff_ns:
            k = b
        else:
            last = store.last_stamp_at(sess, a, b, cutoff_ns)
            k = a if last is None else max(a, last)
        for rs, re_ in sorted(_open_resyncs(store, sess, dev), reverse=True):
            if rs <= k and (re_ is None or k < re_):
                k = rs - 1
        if k >= a:
            return sess, int(dev), int(size), k
    return None


# ------------------------------------------------------------ materializing
class _PayloadWriter:
    """Rows of R_BASE payload into one payload file (a PayloadStore sink: the one Parquet
    payload format, replayer/payloadstore.py), row groups of about RG_BYTES."""

    def __init__(self, sink):
        self.sink = sink
        self.rows: list = []
        self.bytes = 0
        self.rg = 0
        self.total = 0
        self.nrows = 0

    def add(self, stamp: int, seq: int, data: bytes) -> tuple[int, int]:
        ref = (self.rg, len(self.rows))
        self.rows.append((stamp, seq, data))
        self.bytes += len(data)
        self.total += len(data)
        self.nrows += 1
        if self.bytes >= RG_BYTES:
            self.flush()
        return ref

    def flush(self) -> None:
        if not self.rows:
            return
        n = len(self.rows)
        t = pa.table({
            "rtype": pa.array([record.R_BASE] * n, pa.uint16()),
            "stamp": pa.array([r[0] for r in self.rows], pa.uint64()),
            "seq": pa.array([r[1] for r in self.rows], pa.uint64()),
            "offset": pa.array([0] * n, pa.uint32()),
            "data": pa.array([r[2] for r in self.rows], pa.binary())},
            schema=PAYLOAD_SCHEMA)
        self.sink.write_table(t, row_group_size=n)
        self.rows = []
        self.bytes = 0
        self.rg += 1


def _chunks(a: np.ndarray, e: np.ndarray) -> list[tuple[int, int]]:
    """Runs [a, e) (sorted, disjoint) merged where they touch, cut on the CHUNK grid."""
    out: list[tuple[int, int]] = []
    runs: list[list[int]] = []
    for x, y in zip(a.tolist(), e.tolist()):
        if runs and runs[-1][1] == x:
            runs[-1][1] = y
        else:
            runs.append([x, y])
    for x, y in runs:
        while x < y:
            nxt = min(y, (x // CHUNK + 1) * CHUNK)
            out.append((x, nxt))
            x = nxt
    return out


def _layer(pw: _PayloadWriter, pl: rebuild.Plan, stamp: int, zeros_too: bool, seq0: int,
           jobs: int) -> list[tuple]:
    """Cut one layer's pieces into chunks; payload to pw. Returns base rows
    (stamp, seq, sector, bio_size, flags, prg, pidx)."""
    if zeros_too:
        a = np.concatenate([pl.d_off, pl.z_off])
        e = np.concatenate([pl.d_off + pl.d_len, pl.z_off + pl.z_len])
    else:
        a, e = pl.d_off, pl.d_off + pl.d_len
    o = np.argsort(a, kind="stable")
    chunks = _chunks(a[o], e[o])
    for x, y in chunks:
        if x % 512 or (y % 512 and y != pl.size):
            raise StoreError(f"prune: a piece at byte {x}..{y} is not sector aligned; refusing")
    rows: list[tuple[int, int, int, int, int, int | None, int | None]] = []
    k = 0
    seq = seq0
    if not chunks:
        return rows
    for lo, view in rebuild.iter_image(pl, window=WINDOW, jobs=jobs):
        hi = lo + len(view)
        while k < len(chunks) and chunks[k][0] < hi:
            x, y = chunks[k]
            data = bytes(view[x - lo:y - lo])
            seq += 1
            if data.count(0) == len(data):
                if zeros_too:
                    rows.append((stamp, seq, x // 512, y - x, record.F_ZERO, None, None))
            else:
                rg, idx = pw.add(stamp, seq, data)
                rows.append((stamp, seq, x // 512, y - x, 0, rg, idx))
            k += 1
        if k >= len(chunks):
            break
    return rows


def _materialize(store: Store, f: _Fold, pw: _PayloadWriter, seq0: int, jobs: int) -> list:
    pts = sorted(set(f.kept)) + [f.point]
    ex = rebuild.extents(store, f.session, f.dev, f.point)
    rows: list = []
    prev = None
    for p in pts:
        sub = ex.upto(p)
        if prev is None:
            pl = rebuild.plan_extents(sub, f.size)
            rows += _layer(pw, pl, 0, False, seq0 + len(rows), jobs)
        else:
            pl = rebuild.plan_extents(sub, f.size, only=sub.act > prev)
            rows += _layer(pw, pl, p, True, seq0 + len(rows), jobs)
        prev = p
    return rows


# ------------------------------------------------------------------ the prune

def dry_run(store: StoreReader, device: StoreDevice, *, keep_ns: int, keep_marks: bool = False,
            now_ns: int | None = None) -> Result:
    """What prune would do, read only (SELECTs: works through a server's query socket too):
    the prune point, the records and base chunks it would fold away, the older sessions it
    would drop, and the marks it would keep; nothing is changed."""
    res = Result()
    now_ns = time.time_ns() if now_ns is None else now_ns
    got = choose_point(store, device.device, now_ns - keep_ns)
    if got is None:
        res.note = f"{device.device} has no restorable point older than the cutoff"
        return res
    sess_k, dev_k, _size, k = got
    prev = store.pruned_stamp(sess_k, dev_k)
    if prev is not None and prev >= k:
        res.note = (f"{device.device} is pruned up to stamp {prev} already (the "
                    f"cutoff gives stamp {k})")
        return res
    res.point, res.session = k, sess_k
    res.point_ns = _point_time(store, sess_k, dev_k, k)
    for sess, dev, *_ in store.device_sessions(device.device):
        upto = k if sess == sess_k else (1 << 63)
        res.records += store.record_count(sess, dev, upto)
        res.chunks_dropped += store.base_chunk_count(sess, dev)
        if keep_marks:
            res.kept_marks += store.restorable_mark_stamps(sess, dev, upto)
        if sess == sess_k:
            break
        res.sessions_dropped += 1
    return res


def prune(store: Store, device: StoreDevice, *, keep_ns: int, keep_marks: bool = False,
          jobs: int = 2, now_ns: int | None = None, hook=None) -> Result:
    """Fold the history of `device` older than now - keep_ns (see the module docstring).
    `store` is open for writing. `hook(stage)` is called between stages (tests)."""
    from blkrewind.replayer.ingest.payload import remove_orphans

    hook = hook or (lambda stage: None)
    res = Result()
    remove_orphans(store)
    now_ns = time.time_ns() if now_ns is None else now_ns
    cutoff = now_ns - keep_ns
    with store.locked():
        got = choose_point(store, device.device, cutoff)
        if got is None:
            res.note = (f"{device.device} has no restorable point older than the cutoff")
            return res
        sess_k, dev_k, size_k, k = got
        sessions = [tuple(r[:3]) for r in store.device_sessions(device.device)]
        prev = store.pruned_state(sess_k, dev_k)
        if prev is not None and prev[0] is not None and prev[0] >= k:
            res.note = (f"{device.device} is pruned up to stamp {prev[0]} already (the "
                        f"cutoff gives stamp {k})")
            return res
        folds: list[_Fold] = []
        drops: list[tuple[str, int]] = []
        for sess, dev, size in sessions:
            if sess == sess_k:
                kept = store.restorable_mark_stamps(sess, dev, k) if keep_marks else []
                folds.append(_Fold(sess, int(dev), k, kept,
                                   _point_time(store, sess, dev, k), int(size)))
                break
            pr = store.pruned_state(sess, dev)
            if pr is not None and pr[1]:
                continue
            marks = store.restorable_mark_stamps(sess, dev, 1 << 63) if keep_marks else []
            if marks:
                pk = marks[-1]
                folds.append(_Fold(sess, int(dev), pk, marks[:-1],
                                   _point_time(store, sess, dev, pk), int(size)))
            else:
                drops.append((sess, int(dev)))
        # from the ledger: a server storing frames in this process allocates from it too
        led = store.ledger
        batch = led.alloc_batch()
    try:
        return _prune_rest(store, res, hook, folds, drops, batch, sess_k, dev_k, k, jobs)
    finally:
        led.forget_batch(batch)


def _prune_rest(store: Store, res: Result, hook, folds, drops, batch: int, sess_k: str,
                dev_k: int, k: int, jobs: int) -> Result:
    hook("planned")
    # 1. the new base layers: payload written, fsynced, renamed before anything else
    rel = os.path.join("payload", sess_k, f"prune-{dev_k}-{k}.b{batch}.parquet")
    base_rows: dict[tuple[str, int], list] = {}
    with store.payload.create(rel) as sink:
        pw = _PayloadWriter(sink)
        seq = 0
        for f in folds:
            rows = _materialize(store, f, pw, seq, jobs)
            seq += len(rows) + 1
            base_rows[(f.session, f.dev)] = rows
        pw.flush()
    has_file = sink.rows > 0
    res.written_bytes = pw.total
    hook("written")
    # 2. one transaction
    doomed: list[str] = []
    with store.transaction():
        if has_file:
            store.add_payload_files([(batch, rel, sess_k, -1, 0, 0, pw.nrows, pw.total,
                                      sink.size, sink.crc32, batch)])
        store.raise_batch_hwm(batch)
        touched = set()
        for f in folds:
            _fold_rows(store, f, base_rows[(f.session, f.dev)], batch if has_file else None,
                       res)
            touched.add(f.session)
        for sess, dev in drops:
            _drop_rows(store, sess, dev, res)
            touched.add(sess)
            res.sessions_dropped += 1
        _forget_marks(store, touched)
        # payload files no row refers to any more
        gone = store.unreferenced_payload_files(sorted(touched))
        for _pid, path, fb in gone:
            doomed.append(path)
            res.freed_bytes += int(fb or 0)
        store.delete_payload_files([pid for pid, _, _ in gone])
        for s in sorted(touched):
            watermark.update_watermark(store, s)
        hook("commit")
    hook("committed")
    with store.transaction():
        store.refresh_devices()
    # 3. the payload nobody refers to
    res.files_deleted += store.payload.delete(doomed)
    res.point, res.session = k, sess_k
    res.point_ns = folds[-1].time_ns
    res.kept_marks = list(folds[-1].kept)
    return res


def _point_time(store: StoreReader, session: str, dev: int, stamp: int) -> int | None:
    t = store.stamp_time(stamp, [session])
    if t is None:  # a point a previous prune kept: its time is in `restorable`
        t = store.restorable_from_ns(session, dev, stamp)
    return t


def _fold_rows(store: Store, f: _Fold, rows: list, batch: int | None, res: Result) -> None:
    k = f.point
    res.chunks_dropped += store.base_chunk_count(f.session, f.dev, k)
    store.delete_base_chunks(f.session, f.dev, k)
    t = f.time_ns or 0
    store.add_base_chunks([(f.session, f.dev, st, seq, seq, t, sector, n, fl,
                            batch if rg is not None else None, rg, idx, batch)
                           for st, seq, sector, n, fl, rg, idx in rows])
    res.chunks_written += len(rows)
    res.records += store.record_count(f.session, f.dev, k)
    store.delete_history(f.session, f.dev, k)
    store.set_pruned(f.session, f.dev, k, f.time_ns, sorted(f.kept), batch)


def _drop_rows(store: Store, session: str, dev: int, res: Result) -> None:
    res.chunks_dropped += store.base_chunk_count(session, dev)
    res.records += store.record_count(session, dev)
    store.delete_base_chunks(session, dev)
    store.delete_history(session, dev)
    store.set_pruned_whole(session, dev)


def _forget_marks(store: Store, sessions) -> None:
    """Delete the marks of `sessions` no device of the session can restore any more: below
    the pruned stamp of every device (all of them for a whole prune) and not kept."""
    for s in sessions:
        devs = store.session_device_pruning(s)
        if any(st is None and not whole for _, st, whole, _ in devs):
            continue  # a device of the session is not pruned: every mark may matter to it
        below = min((1 << 63) if whole else int(st) for _, st, whole, _ in devs)
        kept = sorted({int(x) for _, _, _, k in devs for x in (k or [])})
        store.prune_marks(s, below, kept)
