"""Committing batches: ONE DuckDB transaction stores the rows of a list of batches (their
Parquet files in place), their frame ranges and the segments' and sessions' bookkeeping, after
checking under the store's mutex what only the store knows; the ledger follows the commit (its
entries are put back when it fails). A run of frames becomes a batch with prepare()."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from blkrewind.errors import StoreError
from blkrewind.formats.ranges import merge, subtract
from blkrewind.replayer.ingest.checks import (
    FrameRejected,
    check_before_seal,
    check_host,
    check_seal,
    check_seg_id,
    host_error,
    segment_name,
)
from blkrewind.replayer.ingest.columns import Batch, nat, parse_frames
from blkrewind.replayer.ingest.payload import unlink_payload, write_payload
from blkrewind.replayer.ledger import Ledger, SegState
from blkrewind.replayer.store import Store
from blkrewind.replayer.watermark import devices_changed

BATCH_BYTES = 24 << 20       # frame bytes per batch (one Parquet file, one commit); its column
                             # buffers stay below glibc's mmap threshold, so they are reused


def commit_batches(store: Store, led: Ledger, batches: list[Batch], host: str,
                   notes: dict | None = None) -> None:
    """ONE transaction: the rows of `batches` (their Parquet files are in place), their
    frame_ranges, the segments' and sessions' bookkeeping; `notes` {key: (torn_bytes, error)}
    (LOG ingest) too. Checks, under the mutex, what only the store knows: the session is bound
    to `host` or new, each segment's seg_id and SEAL agree, no frame is held already (the
    caller reserved them). Raises NotYourSession / FrameRejected / StoreError; on any error
    nothing is stored and the ledger is unchanged."""
    notes = notes or {}
    with store.locked():
        # ---- checks
        keys = list(dict.fromkeys([(b.session, b.segno) for b in batches] + list(notes)))
        sessions = list(dict.fromkeys(k[0] for k in keys))
        for s in sessions:
            check_host(led.hosts.get(s), s, host)
        new_segs = {k: SegState(**vars(led.segs[k])) if k in led.segs else SegState()
                    for k in keys}
        new_ranges = {k: list(led.ranges.get(k, ())) for k in keys}
        for b in batches:
            k = (b.session, b.segno)
            st = new_segs[k]
            name = segment_name(b.session, b.segno)
            if b.seg_id is not None:
                check_seg_id(name, st, b.seg_id)
                st.seg_id = b.seg_id
            if b.header_host is not None:
                st.host = b.header_host
            if b.seal_nframes is not None:
                check_seal(name, st, b.seal_nframes)
                st.sealed, st.nframes = True, b.seal_nframes
            if subtract(b.first_frame, b.end_frame, merge(new_ranges[k])) != \
                    [[b.first_frame, b.end_frame]]:
                raise StoreError(f"{name}: frames {b.first_frame}..{b.end_frame - 1} are partly "
                                 f"in the store already (internal error: not reserved)")
            new_ranges[k].append((b.first_frame, b.end_frame, b.tagged_id()))
        for k in keys:
            st = new_segs[k]
            check_before_seal(segment_name(*k), st, max((e for _, e, _ in new_ranges[k]),
                                                        default=0))
            if k in notes:
                st.torn_bytes, st.error = notes[k]
        # ---- the ledger's new state (undone if the commit fails)
        old = led.saved(keys, sessions)
        known_segs = {k for k in keys if k in led.segs}
        known_sessions = {s for s in sessions if s in led.hosts}
        for k in keys:
            led.ranges[k] = sorted(new_ranges[k])
            led.segs[k] = new_segs[k]
        for s in sessions:
            led.hosts[s] = host
            led.prefix[s] = led.compute_prefix(s, led.prefix.get(s, (0, 0)))
        now = time.time_ns()
        with store.transaction(undo=lambda: led.restore(old),
                               failed="storing in the store's database failed: {}; nothing of "
                                      "the batch was stored"):
            for s in sessions:
                store.put_session(s, host, led.prefix[s], new=s not in known_sessions)
            for k in keys:
                store.put_segment(k, led.segs[k], new=k not in known_segs)
            _insert_batches(store, batches, now)
        if any(b.devices for b in batches):
            devices_changed(store)
        for b in batches:
            led.forget_batch(b.batch_id)


def _insert_batches(store: Store, batches: list[Batch], now: int) -> None:
    """The rows of the batches (inside the caller's transaction): one statement per table
    for the bulk tables (their batch/pfile columns were added by tag_batch)."""
    store.add_payload_files([
        (b.batch_id, b.pfile_rel, b.session, b.segno, b.first_frame, b.end_frame,
         len(b.payload_rows()), b.payload_bytes, b.file_bytes, b.crc32, b.batch_id)
        for b in batches if b.pfile_rel is not None])
    for table in store.BULK_TABLES:
        tbls = [getattr(b, table) for b in batches if getattr(b, table) is not None]
        if tbls:
            store.append_rows(table, tbls[0] if len(tbls) == 1 else pa.concat_tables(tbls))
    for b in batches:
        _insert_small(store, b)
    store.add_frame_ranges([(b.batch_id, b.session, b.segno, b.first_frame, b.end_frame,
                             b.source, now) for b in batches])


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


def _insert_small(store: Store, b: Batch) -> None:
    """The rare rows of one batch."""
    bid = b.batch_id
    store.add_marks([(*m, bid) for m in b.marks])
    store.add_points([(*p, bid) for p in b.points])
    store.add_loss([(*x, bid) for x in b.loss])
    if b.session_info:
        obj, t = b.session_info
        store.set_session_start(b.session, obj, nat(obj, "stamp_base"), nat(obj, "seq_base", 1), t)
    if b.end_info:
        obj, t = b.end_info
        store.set_session_end(b.session, nat(obj, "end_stamp"), nat(obj, "end_seq"),
                              obj.get("clean") is True, t)
    for d in b.devices:
        path = d.get("path")
        store.add_session_device(
            b.session, nat(d, "dev"), d.get("host") or b.host, d["name"],
            None if path is None else str(path), nat(d, "size_bytes"),
            nat(d, "logical_block_size", 512), nat(d, "physical_block_size", 512),
            nat(d, "part_start"), d)


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
    why = host_error(segment_name(session, segno), session, b.session_info, b.devices, host)
    if why:
        raise FrameRejected(why)
    b.seg_id, b.source = seg_id, source
    b.header_host, b.seal_nframes = run.header_host, run.seal_nframes
    b.batch_id = led.alloc_batch()
    try:
        write_payload(store, b)
        tag_batch(b)
    except BaseException:
        unlink_payload(store, b)
        led.forget_batch(b.batch_id)
        raise
    return b


def discard(store: Store, led: Ledger, batches: list[Batch]) -> None:
    """Batches that will not be committed: remove their files, forget their ids."""
    for b in batches:
        unlink_payload(store, b)
        led.forget_batch(b.batch_id)
