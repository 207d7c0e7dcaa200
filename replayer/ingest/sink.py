"""FrameSink: LOG frames received from tracers over the network (replayer/server.py), stored by
the same code as LOG ingest. FrameSink.store validates everything first (frames decoded and
checked, records parsed, hosts, session binding, seg_id) and raises FrameRejected with nothing of
the call stored."""
from __future__ import annotations

from dataclasses import dataclass

from blkrewind.errors import CorruptLog, StoreError
from blkrewind.formats.logframe import K_HEADER, K_SEAL, decode_raw_frame, valid_session
from blkrewind.formats.ranges import merge, subtract
from blkrewind.osutil import tune_malloc
from blkrewind.replayer import integrity
from blkrewind.replayer.ingest.checks import (
    FrameRejected,
    check_before_seal,
    check_header,
    check_host,
    check_kinds,
    check_seg_id,
    segment_name,
)
from blkrewind.replayer.ingest.columns import Batch
from blkrewind.replayer.ingest.commit import BATCH_BYTES, Run, commit_batches, discard, prepare
from blkrewind.replayer.ingest.payload import remove_orphans
from blkrewind.replayer.ledger import SegState
from blkrewind.replayer.store import Store
from blkrewind.replayer.watermark import finalize


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
        self.led = store.ledger
        self.orphans = remove_orphans(store)

    # ------------------------------------------------------------------ lacks
    def lacks(self, host: str, inventory: list[dict]) -> list[dict]:
        """inventory items: {"session","segno","seg_id","frames":N,"sealed":bool} (frame numbers
        [0,N) exist in the tracer's LOG). Returns [{"session","segno","ranges":[[a,e],...]}] for
        the frames in [0,N) the store does not hold (segments held completely are omitted).
        Raises NotYourSession for a session bound to another host."""
        items = [_inventory_item(it) for it in inventory]
        out = []
        with self.st.locked():
            for session, segno, seg_id, n in items:
                check_host(self.led.hosts.get(session), session, host)
                st = self.led.segs.get((session, segno))
                check_seg_id(segment_name(session, segno), st, seg_id)
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
        with self.st.locked():   # first: whose session is it (checked again at the commit)
            for g in groups:
                check_host(led.hosts.get(g.session), g.session, host)
        decoded = [self._decode_group(host, g) for g in groups]
        # what only the store knows, before the heavy work (checked again at the commit)
        with self.st.locked():
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
            with self.st.locked():
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
        name = segment_name(g.session, g.segno)
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
                assert fr is not None, "decode_raw_frame gives no body only for a SEAL"
                meta = check_header(name, fr.data, g.session, g.segno, host)
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
    name = segment_name(g.session, g.segno)
    check_seg_id(name, st, g.seg_id)
    check_before_seal(name, st, g.first + len(frames))
    check_kinds(name, st, [h for h, *_ in frames])


def _runs(frames: list, host: str):
    """Runs (batches of about BATCH_BYTES) of consecutive decoded frames."""
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
    ints: list[int] = []
    for name, v, hi in (("segno", n, 1 << 31), ("seg_id", sid, 1 << 32), ("frames", fr, 1 << 31)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < hi:
            raise FrameRejected(f"inventory: bad {name} {v!r}")
        ints.append(v)
    if not isinstance(it.get("sealed", False), bool):
        raise FrameRejected("inventory: bad sealed")
    return s, ints[0], ints[1], ints[2]
