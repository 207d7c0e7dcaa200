"""`blkrewind ingest --log DIR`: the segments of a LOG directory the store does not hold yet,
in parallel (a thread per segment, the whole segment reserved meanwhile), in batches of about
BATCH_BYTES; a torn tail is a note, CorruptLog stops the segment after every good frame before
the damage is stored. And `--delete-ingested`: the LOG segments the store holds whole."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from blkrewind.errors import CorruptLog, UserError
from blkrewind.formats.logframe import SegmentReader, list_segments
from blkrewind.osutil import fsync_dir as _fsync_dir
from blkrewind.osutil import tune_malloc
from blkrewind.replayer.ingest.checks import FrameRejected, check_host, check_seg_id, segment_name
from blkrewind.replayer.ingest.columns import parse_frames
from blkrewind.replayer.ingest.commit import (
    BATCH_BYTES,
    Batch,
    Run,
    commit_batches,
    discard,
    prepare,
)
from blkrewind.replayer.ingest.payload import remove_orphans
from blkrewind.replayer.ledger import Ledger
from blkrewind.replayer.store import Store
from blkrewind.replayer.watermark import finalize

ALL_FRAMES = 1 << 31         # "to the end of the segment" in a reservation


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
    with store.locked():
        bound = led.hosts.get(session)
        st = led.segs.get(key)
        held = led.held(key)
    try:
        check_host(bound, session, host)
        check_seg_id(segment_name(session, segno), st, reader.seg_id)
    except FrameRejected as e:
        res.error = f"{reader.path}: {e}"
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
    with store.locked():
        cur = led.segs.get(key)
    if cur is None or (cur.torn_bytes, cur.error) != (res.torn_bytes, error):
        commit_batches(store, led, [], host, notes={key: (res.torn_bytes, error)})


def ingest(store: Store, log_dir: str, *, jobs: int = 2, on_batch=None) -> IngestResult:
    """Ingest every segment of `log_dir` not yet fully in `store`; then finalize."""
    if not os.path.isdir(log_dir):
        raise UserError(f"no LOG directory {log_dir}")
    tune_malloc(512 << 20)  # frames and columns are reused, not faulted in again
    t0 = time.monotonic()
    c0 = time.process_time()
    led = store.ledger
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
        with store.locked():
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
    segs = list_segments(log_dir)
    if not segs:
        return [], 0
    newest = max(segs, key=lambda s: (s.session, s.segno))
    led = store.ledger
    store.checkpoint()
    gone, freed = [], 0
    for seg in segs:
        if seg is newest:
            continue
        key = (seg.session, seg.segno)
        with store.locked():
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
