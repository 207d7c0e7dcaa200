"""Never lose a write silently: checkpoints, gap detection and resync (tracer side).

The contract is docs/internals.md, "Gaps and resync". In short:

checkpoint  every CHECKPOINT_EVERY seconds: read the stamp counter (C), wait for a grace
            period (every bio program that took a stamp < C has finished: dirty map updated,
            records reserved or counted as dropped), wait until the collector has taken
            everything committed and the writer has written or dropped everything queued
            (a "fence" through its queue), then read the loss counters. Counters that moved
            since the previous checkpoint mean lost stamps, all >= the previous checkpoint's C.
loss        kernel ring drops, payload read errors and truncated bios (kernel counters),
            spans the LOG could not take (the writer's count, tracer/writer.py), dirty-map
            updates given up (dirty_races): reported once per episode on stderr and as R_LOSS
            {"cause", "since", counters...}; the resync follows.
write error a write-type completion with an error (err_map, read through Capture.errors()):
            R_LOSS with cause "write error" and a resync that also reads the failed range.
resync      per device D: R_POINT resync_start (stamp Rs), grace, read the dirty map, read
            every region whose value is >= since (O_DIRECT, READERS threads, chunked) as
            R_BASE records with stamp = Rs, aux = read order and F_RESYNC; chunks made stale
            by completions of bios with stamp < Rs that arrived after the chunk's read began
            are read again (the collector hands completions to scan() while a resync runs);
            then R_POINT resync_end (stamp Re). A new loss during a resync restarts it with
            the older since. A resync waits for the baseline, and for room in the LOG.
"""
from __future__ import annotations

import json
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from blkrewind.formats import record
from blkrewind.tracer import devices
from blkrewind.tracer.capture import Capture, Regions

if TYPE_CHECKING:
    from blkrewind.tracer.progress import ReadProgress
    from blkrewind.tracer.shipper import Shipper
    from blkrewind.tracer.writer import RecordSeq, Writer

CHECKPOINT_EVERY = 1.0
FINISH_ROUNDS = 3            # stop(): resyncs it still runs before giving up
READERS = 4
ROOM_MARGIN = 64 << 20
# the cause of a loss no stamp shows: a write without stamp (the kernel skipped the queue
# program's run). The replayer keeps [since, resync_end) of such a resync unrestorable.
SKIPPED = "BPF run skipped"
# the kernel's loss counters (Capture.counters()) and the cause each names, in report order
_LOSS_COUNTERS = {"drops": "ring full", "read_errs": "payload read error",
                  "truncs": "truncated bio", "dirty_races": "dirty map race",
                  "write_errs": "write error", "missed": SKIPPED}


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass
class _Counters:
    drops: int = 0
    read_errs: int = 0
    truncs: int = 0
    dirty_races: int = 0
    log_drops: int = 0
    missed: int = 0

    @classmethod
    def of(cls, st: dict, log_drops: int) -> "_Counters":
        """From Capture.counters() and the LOG's own drops."""
        return cls(st["drops"], st["read_errs"], st["truncs"], st["dirty_races"], log_drops,
                   st["missed"])

    def causes_since(self, old: "_Counters") -> list[str]:
        out = []
        if self.drops != old.drops:
            out.append("ring full")
        if self.read_errs != old.read_errs:
            out.append("payload read error")
        if self.truncs != old.truncs:
            out.append("truncated bio")
        if self.dirty_races != old.dirty_races:
            out.append("dirty map race")
        if self.log_drops != old.log_drops:
            out.append("log full")
        if self.missed != old.missed:
            out.append(SKIPPED)
        return out


@dataclass
class _Pending:
    since: int
    causes: list[str] = field(default_factory=list)
    full: bool = False                     # every region of every device
    errors: list[tuple[int, int, int]] = field(default_factory=list)  # (kdev, start, end) bytes

    @property
    def reads_all(self) -> bool:
        """For a tracer continuing the session, which keeps `since` but not the failed
        ranges: read everything."""
        return self.full or bool(self.errors)


@dataclass
class _Chunk:
    off: int
    n: int
    read_at: int = 0


class Aborted(Exception):
    pass


class ResyncHost(Protocol):
    """What Resync needs of its tracer (tracer/session.py Tracer), and nothing else."""
    baseline_done: threading.Event   # set once every device's baseline is in the LOG
    failure: str | None              # the tracer failed (it stops)
    progress_tty: Callable[[str | None], None] | None  # the terminal's status line, if any

    def say(self, msg: str) -> None: ...

    def fail(self, why: str) -> None: ...

    def caught_up(self, abort: Callable[[], bool]) -> bool:
        """Return once the collector took everything committed to the ring buffer so far;
        False: abort() said to stop first."""
        ...

    def checkpointed(self, safe: int, full: bool, baseline_done: bool) -> None:
        """A checkpoint: every stamp < safe is in the LOG or covered (tracer/continuation.py)."""
        ...


class Resync:
    """Owns the checkpoint/resync thread of one Tracer (tracer/session.py).

    host: the tracer (ResyncHost). cap: its capture (counters, stamps, dirty map, grace
    periods, points). writer: the LOG writer (records, fences, its queue's room, its drops);
    seq: numbers the records. shipper: retention (--log-max-mb), None without; then the room
    in the LOG is the free space of log_dir's file system."""

    def __init__(self, host: ResyncHost, cap: Capture, writer: Writer, seq: RecordSeq,
                 devs: list[devices.BlockDevice], regions: list[Regions], stamp_base: int, *,
                 chunk_bytes: int, settle: float, log_dir: str, shipper: Shipper | None,
                 interval: float = CHECKPOINT_EVERY, readers: int = READERS):
        self.host = host
        self.cap = cap
        self.writer = writer
        self.seq = seq
        self.shipper = shipper
        self.log_dir = log_dir
        self.regions = {r.kdev: r for r in regions}
        self.devs = {d.kdev: d for d in devs}
        self.interval = interval
        self.readers = readers
        self._admit = threading.Lock()   # read(): one reader at a time waits for LOG room
        self.chunk_bytes = chunk_bytes
        self.settle = settle
        self.watching = False          # the collector hands completions to scan()
        self.resyncs = 0               # resyncs completed (all devices)
        self.last: dict | None = None  # the last device resync: bytes, seconds, ranges...
        self.resync_bytes = 0
        self.progress: ReadProgress | None = None  # while a device is read
        self.running: dict | None = None
        self._lock = threading.Lock()
        self._seq_lock = threading.Lock()   # the tracer's running record number
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._finish = threading.Event()
        self._thread: threading.Thread | None = None
        # checkpoints: counters at the previous checkpoint and its stamp
        self._prev = _Counters()
        self._prev_c = stamp_base
        # the checkpoints' C, in order: the legacy programs' dirty map (dirty_floor)
        self._cs: list[int] = []
        self._legacy = getattr(self.cap, "variant", "modern") == "legacy"
        self.checkpoints = 0
        self.last_checkpoint = stamp_base
        self._errs_seen = 0
        self._pending: _Pending | None = None
        self._episode = False
        self._said_restart = False
        self.restarts = 0
        self._baseline_at_prev = False
        self._reported: dict[str, int] = {}
        # completions seen while watching: (dev, start byte, end byte, ktime, min stamp)
        self._done: list[tuple[int, int, int, int, int]] = []
        self._rs = 1 << 64
        self._rs_mono = 0
        self._last_pre_mono = 0

    # ------------------------------------------------------------------ hooks
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="resync", daemon=True)
        self._thread.start()

    def stop(self, finish: bool = True) -> None:
        """Stop checkpoints. finish: first a last checkpoint, and the resync it calls for (at
        most FINISH_ROUNDS, once the baseline is done), so that a clean stop after a loss
        still ends restorable. Otherwise a resync in progress is abandoned (its resync_start
        without a resync_end covers nothing). Says so when the session ends inside a gap."""
        if finish and self._thread is not None and not self.host.failure:
            self._finish.set()
            self._wake.set()
            self._thread.join()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(60)
            self._thread = None
        with self._lock:
            p = self._pending
        if p is not None or self.running:
            since = min(x for x in (p.since if p else None,
                                    self.running["since"] if self.running else None)
                        if x is not None)
            self.host.say(f"WARNING: the session ends before the resync after a loss could finish: "
                          f"nothing after stamp {since - 1} of this session is restorable")

    def checkpoint_soon(self) -> None:
        """Take the next checkpoint now rather than at the next interval."""
        self._wake.set()

    def note_counters(self, st: dict, final: bool = False) -> None:
        """The collector's periodic look at the kernel counters: record each change of the
        loss counters in the LOG (R_LOSS) and wake the checkpoint thread."""
        with self._lock:
            cause = [c for k, c in _LOSS_COUNTERS.items()
                     if st.get(k, 0) != self._reported.get(k, 0)]
            if not cause:
                return
            self._reported.update({k: st.get(k, 0) for k in _LOSS_COUNTERS})
        self._loss_record(", ".join(cause), st)
        self._wake.set()
        if final and self._thread is None:
            with self._lock:
                prev, pending = self._prev, self._pending
            now = _Counters.of(st, self.writer.dropped.spans)
            lost = now.causes_since(prev)
            if lost and pending is None and not self.running:
                self.host.say(f"WARNING: records lost at the end of the session ({', '.join(lost)}: "
                              f"{st['drops']} records lost in all): nothing after stamp "
                              f"{self._prev_c - 1} of this session is restorable")

    def scan(self, h: record.Header, payload) -> None:
        """A completion seen by the collector while a resync runs (watching)."""
        n = min(h.len // 8, record.MAX_COMPLETE_BIOS)
        if n == 0:
            return
        stamps = np.frombuffer(payload, dtype="<u8", count=n)
        low = 0 if (h.flags & record.F_OLD or n == record.MAX_COMPLETE_BIOS) else int(stamps.min())
        if low >= self._rs:
            return
        start = h.sector * record.SECTOR
        with self._lock:
            self._done.append((h.dev, start, start + max(h.bio_size, 1), h.ktime_ns, low))
            self._last_pre_mono = mono_ns()

    def request(self, since: int | None = None, cause: str = "requested",
                full: bool = False) -> None:
        """Resync now (benches, tests): every region written since `since` (default: the
        last checkpoint), or every region with full."""
        with self._lock:
            p = _Pending(since=self._prev_c if since is None else since, causes=[cause],
                         full=full)
            self._merge_pending(p)
        self._wake.set()

    def status(self) -> dict:
        with self._lock:
            p = self._pending
            return {"checkpoint": self.last_checkpoint, "checkpoints": self.checkpoints,
                    "resyncs": self.resyncs, "restarts": self.restarts,
                    "resync_bytes": self.resync_bytes,
                    "log_drops": self.writer.dropped.spans, "pending": None if p is None else
                    {"since": p.since, "causes": p.causes}, "running": self.running}

    # ---------------------------------------------------------------- internals
    def _loss_record(self, cause: str, st: dict, **extra) -> None:
        """R_LOSS in the LOG. Never called with self._lock held: the queue may block on the
        writer."""
        dropped = self.writer.dropped
        body = {**st, "cause": cause, "log_drops": dropped.spans,
                "log_drop_bytes": dropped.bytes, **extra}
        with self._seq_lock:
            seq = self.seq.next()
        self.writer.add_records([record.json_record(record.R_LOSS, body, seq=seq)])

    def _run(self) -> None:
        rounds = 0
        try:
            while not self._stop.is_set():
                if not self._finish.is_set():
                    self._wake.wait(self.interval)
                    self._wake.clear()
                if self._stop.is_set():
                    return
                self._checkpoint()
                with self._lock:
                    ready = self._pending is not None and self.host.baseline_done.is_set()
                if ready and (not self._finish.is_set() or rounds < FINISH_ROUNDS):
                    if self._finish.is_set():
                        rounds += 1
                        if rounds == 1:
                            self.host.say("stopping: the resync after the loss runs first")
                    self._resync()
                elif self._finish.is_set():
                    return
        except Aborted:
            return
        except Exception as e:  # a dead resync thread must not go unnoticed
            self.host.fail(f"resync stopped: {type(e).__name__}: {e}")

    def _counters(self) -> tuple[_Counters, dict]:
        st = self.cap.counters()
        return _Counters.of(st, self.writer.dropped.spans), st

    def _wait_written(self) -> None:
        """Everything committed to the ring so far is collected, and everything queued for
        the writer so far is written or dropped."""
        if not self.host.caught_up(self._aborting):
            raise Aborted()
        ev = self.writer.fence()
        while not ev.wait(0.1):
            if self._aborting():
                raise Aborted()

    def _aborting(self) -> bool:
        return self._stop.is_set() or bool(self.host.failure)

    def continue_after_crash(self, since: int, full: bool, dead_pid: int,
                             ring_bytes_waiting: int, skipped: int) -> None:
        """A continued session (tracer/pins.py): the dead tracer recorded that every stamp
        < since is in the LOG; what it took from the ring buffer after that and lost, and
        what the ring dropped while nobody read it, is resynced from the dirty map."""
        c = self.cap.state().stamp
        if not self.cap.grace():
            raise RuntimeError("no grace period within 10 s (a BPF program did not finish)")
        now, st = self._counters()
        with self._lock:
            self._prev, self._prev_c = now, c
            self._reported = {k: st.get(k, 0) for k in _LOSS_COUNTERS}
            self._errs_seen = st.get("write_errs", 0)
            self._pending = _Pending(since=since, causes=["tracer restart"], full=full)
            self._episode = True
            self.last_checkpoint = since
        self._loss_record("tracer restart", st, since=since, dead_pid=dead_pid,
                          ring_bytes_waiting=ring_bytes_waiting, skipped_logged=skipped)
        self.host.say(f"WARNING: the tracer (pid {dead_pid}) died: records it had taken from the "
                      f"ring buffer may be lost, and {st['drops']} records were dropped in all; "
                      f"every region written since stamp {since} is read again from the device "
                      f"(resync); until it ends nothing after stamp {since - 1} is restorable")

    def _checkpoint(self) -> int:
        """One checkpoint; queues a resync when something was lost. Returns its C."""
        baseline_done = self.host.baseline_done.is_set()  # before C: baseline_end is then < C
        c = self.cap.state().stamp
        if not self.cap.grace():
            raise RuntimeError("no grace period within 10 s (a BPF program did not finish)")
        self._cs.append(c)
        del self._cs[:-100_000]
        self._wait_written()
        now, st = self._counters()
        errs, total, complete = self.cap.errors(self._errs_seen)
        self.checkpoints += 1
        say: list[str] = []
        with self._lock:
            causes = now.causes_since(self._prev)
            if causes or errs or not complete:
                p = self._pending
                if p is None:
                    # errors alone: nothing is missing below c, the resync covers [c, Rs)
                    p = self._pending = _Pending(since=c if not causes else self._prev_c)
                if causes:
                    p.since = min(p.since, self._prev_c)
                for x in causes:
                    if x not in p.causes:
                        p.causes.append(x)
                if causes and not self.host.baseline_done.is_set():
                    # the baseline's own stale-read care may have lost completions of
                    # writes queued before capture (not in the dirty map): read it all
                    p.full = True
                if now.dirty_races != self._prev.dirty_races or (
                        "log full" in causes and not self._baseline_at_prev):
                    # baseline chunks may be among the spans lost: read everything
                    p.full = True
                if now.missed != self._prev.missed:
                    # a skipped queue program left no dirty-map mark: read everything
                    p.full = True
                if errs or not complete:
                    if "write error" not in p.causes:
                        p.causes.append("write error")
                    if not complete:
                        p.full = True
                        say.append(f"WARNING: {total - self._errs_seen} writes failed: every "
                                   f"traced device is read back whole")
                    for i, e in enumerate(errs):
                        msg = self._error_range(p, e)
                        if i < 3:
                            say.append(msg)
                    if len(errs) > 3:
                        say.append(f"WARNING: {len(errs) - 3} more writes failed")
                if causes and not self._episode:
                    self._episode = True
                    say.append(
                        f"WARNING: records lost ({', '.join(causes)}: {st['drops']} records, "
                        f"{st['drop_bytes']} bytes of payload dropped by the kernel, "
                        f"{now.log_drops} spans refused by the LOG so far): every region "
                        f"written since stamp {p.since} is read again from the device (resync); "
                        f"until it ends nothing after stamp {p.since - 1} is restorable")
                since = p.since
            else:
                self.last_checkpoint = c
            self._prev, self._prev_c = now, c
            self._errs_seen = total
            self._baseline_at_prev = self.host.baseline_done.is_set()
            # what a tracer continuing this session after our death must read again
            safe, full = c, False
            if self._pending is not None:
                safe, full = min(safe, self._pending.since), self._pending.reads_all
            if self.running is not None:
                safe, full = min(safe, self.running["since"]), full or self.running["full"]
        if causes:
            self._loss_record(", ".join(causes), st, since=since)
        for e in errs:
            self._loss_record("write error", st, dev=e.dev, sector=e.sector, bytes=e.bytes,
                              error=e.error)
        for m in say:
            self.host.say(m)
        self.host.checkpointed(safe, full, baseline_done)
        return c

    def _error_range(self, p: _Pending, e) -> str:
        d = self.devs.get(e.dev)
        where = d.path if d else f"device {e.dev >> 20}:{e.dev & 0xFFFFF}"
        if e.bytes == 0 or d is None:
            for k in ([d.kdev] if d else list(self.devs)):
                p.errors.append((k, 0, self.devs[k].size_bytes))
            rng = "its range is unknown: the whole device is read back" if d else \
                "the whole of every traced device is read back"
        else:
            start = e.sector * record.SECTOR
            p.errors.append((d.kdev, start, min(start + e.bytes, d.size_bytes)))
            rng = f"bytes {start}..{start + e.bytes} are read back from the device"
        return f"WARNING: a write to {where} failed (error {e.error}): {rng}"

    # ------------------------------------------------------------------ resync
    def _room(self, nbytes: int) -> bool:
        if self.shipper is not None:
            return self.shipper.room_for(nbytes, probe=True)
        st = os.statvfs(self.log_dir)
        # room for the resync plus a margin for the records that keep coming meanwhile
        # (smaller on a small file system, or a small LOG disk would never resync)
        margin = min(ROOM_MARGIN, max(4 << 20, st.f_blocks * st.f_frsize // 16))
        return st.f_bavail * st.f_frsize >= nbytes + margin

    def dirty_floor(self, since: int) -> int:
        """The dirty-map value from which a region may hold a write with a stamp >= since.
        The modern programs keep an exact maximum: since itself. The legacy ones (no
        cmpxchg, bpf/legacy.h) can see a program that took an older stamp overwrite a newer
        one with its own; that program was running when the newer stamp was stored, after
        the checkpoint C_j = since was read, so it had not finished before the grace period
        of the checkpoint before: its stamp is >= that checkpoint's C. A since no checkpoint
        of this tracer precedes (a continued session's): every region written (>= 1)."""
        if not self._legacy:
            return since
        below = [c for c in self._cs if c < since]
        return max(below) if below else 1

    def _plan(self, p: _Pending, kdev: int, dirty: np.ndarray | None) -> list[_Chunk]:
        """The chunks to read: every region with a stamp >= since (dirty_floor), every
        failed range."""
        reg, d = self.regions[kdev], self.devs[kdev]
        sel = np.zeros(reg.count, bool)
        if p.full:
            sel[:] = True
        elif dirty is not None:
            sel |= dirty >= self.dirty_floor(p.since)
        for k, start, end in p.errors:
            if k == kdev and end > start:
                sel[start >> reg.shift: ((end - 1) >> reg.shift) + 1] = True
        idx = np.flatnonzero(sel)
        chunks: list[_Chunk] = []
        if len(idx) == 0:
            return chunks
        # runs of consecutive regions, then chunks of at most chunk_bytes
        breaks = np.flatnonzero(np.diff(idx) != 1)
        starts = np.concatenate(([idx[0]], idx[breaks + 1]))
        ends = np.concatenate((idx[breaks], [idx[-1]])) + 1
        step = max(self.chunk_bytes, 4096)
        for a, b in zip(starts.tolist(), ends.tolist()):
            off, end = a << reg.shift, min(b << reg.shift, d.size_bytes)
            while off < end:
                n = min(step, end - off)
                chunks.append(_Chunk(off, n))
                off += n
        return chunks

    def _resync(self) -> None:
        with self._lock:
            p = self._pending
            # only this (the worker) thread clears it, after seeing it set under the lock
            assert p is not None, "_resync() runs only with a gap pending"
            self._pending = None
            self.running = {"since": p.since, "causes": list(p.causes), "full": p.reads_all}
        before = self._prev
        est = sum(len(self._plan(p, k, self.cap.dirty()[r.base:r.base + r.count])) * self.chunk_bytes
                  for k, r in self.regions.items())
        shipper = self.shipper
        if shipper is not None:  # retention frees acked segments as the resync goes (read())
            est = min(est, shipper.log_max_bytes // 4)
        said = False
        while not self._room(est):
            if not said:
                said = True
                self.host.say(f"the LOG has no room for the resync ({est / 1e6:.0f} MB): waiting "
                              f"for space before reading the regions again")
            if self._finish.is_set() or self._stop.wait(1.0):
                # stopping with no room: give up, the gap stays reported (stop() says so)
                with self._lock:
                    self._merge_pending(p)
                    self.running = None
                raise Aborted()
        if said:
            self.host.say("the LOG has room for the resync: it starts")
        try:
            for kdev in self.regions:
                self._resync_device(p, kdev)
        except Aborted:
            with self._lock:  # keep it pending: stop() says the session ends in a gap
                self._merge_pending(p)
                self.running = None
            raise
        finally:
            self.watching = False
            self._rs = 1 << 64
            with self._lock:
                self._done.clear()
        # a loss while it ran: the next checkpoint finds it; restart with the older since
        self._checkpoint()
        with self._lock:
            self.running = None
            lost_again = self._prev.causes_since(before)
            if self._pending is not None and lost_again:
                self._merge_pending(p)
                self.restarts += 1
                if not self._said_restart:  # once per episode
                    self._said_restart = True
                    self.host.say(f"more records were lost during the resync "
                                  f"({', '.join(lost_again)}): it starts again from stamp "
                                  f"{self._pending.since} (and again as long as records are lost)")
            else:
                self.resyncs += 1
                if self._pending is None:
                    self._episode = self._said_restart = False

    def _merge_pending(self, p: _Pending) -> None:
        q = self._pending
        if q is None:
            self._pending = p
            return
        q.since = min(q.since, p.since)
        q.full = q.full or p.full
        q.causes += [c for c in p.causes if c not in q.causes]
        q.errors += p.errors

    def _point(self, payload: dict) -> int:
        """A stamped R_POINT; retried while the ring buffer is full (each failure is a
        counted loss, so the resync restarts anyway)."""
        data = json.dumps(payload, sort_keys=True).encode()
        while True:
            stamp, ok = self.cap.point(record.R_POINT, data)
            if ok:
                return stamp
            if self._stop.wait(0.05):
                raise Aborted()

    def _resync_device(self, p: _Pending, kdev: int) -> None:
        reg, d = self.regions[kdev], self.devs[kdev]
        t0 = time.monotonic()
        with self._lock:
            self._done.clear()
            self._rs = 1 << 64
        self.watching = True
        self._rs_mono = mono_ns()
        rs = self._point({"what": "resync_start", "dev": kdev, "since": p.since,
                          "cause": ", ".join(p.causes) or "loss", "region_bytes": reg.region_bytes,
                          "full": p.full, "unseen": SKIPPED in p.causes})
        self._rs = rs
        if not self.cap.grace():
            raise RuntimeError("no grace period within 10 s (a BPF program did not finish)")
        dirty = np.array(self.cap.dirty()[reg.base:reg.base + reg.count])
        chunks = self._plan(p, kdev, dirty)
        regions = (int(np.count_nonzero(dirty >= self.dirty_floor(p.since))) if not p.full
                   else reg.count)
        assert self.running is not None, "_resync() sets it before each device"
        self.running.update(dev=d.path, chunks=len(chunks), rs=rs)
        nbytes, rereads = self._read_chunks(d, rs, chunks)
        re_ = self._point({"what": "resync_end", "dev": kdev, "start": rs, "since": p.since,
                           "regions": regions, "bytes": nbytes, "rereads": rereads})
        dt = time.monotonic() - t0
        self.resync_bytes += nbytes
        self.last = {"dev": d.path, "rs": rs, "re": re_, "bytes": nbytes, "chunks": len(chunks),
                     "regions": regions, "rereads": rereads, "seconds": dt,
                     "ranges": [(c.off, c.n) for c in chunks]}
        what = ("every region" if p.full else
                f"{regions} regions of {reg.region_bytes >> 10} KiB written since stamp {p.since}")
        nerr = sum(1 for k, _, _ in p.errors if k == kdev)
        if nerr:
            what += f", {nerr} failed write ranges"
        self.host.say(f"resync of {d.path} done: {nbytes / 1e6:.1f} MB in {len(chunks)} chunks "
                      f"({what}) in {dt:.1f} s ({nbytes / max(dt, 1e-9) / 1e6:.0f} MB/s, "
                      f"{rereads} chunks read again), restorable again from stamp {re_}")

    def _read_chunks(self, d: devices.BlockDevice, rs: int, chunks: list[_Chunk]) -> tuple[int, int]:
        from blkrewind.tracer.progress import ReadProgress

        total = 0
        rereads = 0
        if not chunks:
            return 0, 0
        prog = self.progress = ReadProgress("resync", d.path, sum(c.n for c in chunks),
                                            self.host.say, self.host.progress_tty)
        local = threading.local()
        fd = os.open(d.path, os.O_RDONLY | os.O_DIRECT)

        def read(c: _Chunk) -> int:
            if self._aborting():
                raise Aborted()
            buf = getattr(local, "buf", None)
            if buf is None:
                buf = local.buf = mmap.mmap(-1, self.chunk_bytes)
            with self._seq_lock:  # aux = read order: a re-read gets a larger one
                aux = self.seq.next()
                c.read_at = mono_ns()
            view = memoryview(buf)[:c.n]
            try:
                got = os.preadv(fd, [view], c.off)
                if got != c.n:
                    raise OSError(f"{d.path}: short read at byte {c.off} ({got} of {c.n})")
                flags = record.F_RESYNC
                payload: bytes | memoryview
                if devices.all_zero(view):
                    flags |= record.F_ZERO
                    payload = b""
                else:
                    payload = view
                rec = record.make_record(payload, rtype=record.R_BASE, stamp=rs, seq=aux,
                                         dev=d.kdev, sector=c.off // record.SECTOR,
                                         bio_size=c.n, aux=aux, flags=flags, ktime_ns=c.read_at)
            finally:
                view.release()
            with self._admit:
                self._log_room(len(rec))
                self._queue_room(len(rec))
                self.writer.add_records([rec])
            prog.add(c.n)
            return c.n

        pool = ThreadPoolExecutor(self.readers, thread_name_prefix="resync-read")
        try:
            for n in pool.map(read, chunks):
                total += n
            while True:
                self._wait_drained(d)
                self._wait_written()
                with self._lock:
                    done = [x for x in self._done if x[0] == d.kdev and x[4] < rs]
                if not done:
                    break
                a = np.array([x[1] for x in done], np.int64)
                b = np.array([x[2] for x in done], np.int64)
                kt = np.array([x[3] for x in done], np.int64)
                stale = [c for c in chunks
                         if np.any((a < c.off + c.n) & (b > c.off) & (kt >= c.read_at))]
                if not stale:
                    break
                rereads += len(stale)
                for n in pool.map(read, stale):
                    total += n
        finally:
            # an abort leaves the chunks not yet started unread (not read, then refused)
            pool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)
            prog.finish()
            self.progress = None
        return total, rereads

    def _log_room(self, nbytes: int) -> None:
        """With --log-max-mb (a shipper): wait until the LOG has room for what the writer's
        queue holds, this chunk and one in the writer's hands (at most a quarter of the limit, so
        that it can fit), and half of the limit left to the writes going on, so that a resync
        larger than the LOG's limit goes at the pace of the replayer's acks instead of waiting
        for room for all of it (forever) or filling the LOG and losing records again. The
        readers are admitted one at a time (call with self._admit held until the record is
        queued). A stopping tracer (stop(finish=True)) does not wait for room: the same rule as
        the room check before a resync starts (_resync), the resync is given up and its gap
        stays reported -- with the replayer down the room would never come, and stop() would
        wait for this thread forever."""
        shipper = self.shipper
        if shipper is None:
            return
        limit = shipper.log_max_bytes
        while not shipper.room_for(min(2 * nbytes, limit // 4) + self.writer.queue.size + limit // 2,
                                   probe=True):
            if self._finish.is_set() or self._stop.wait(0.05) or self.host.failure:
                raise Aborted()

    def _queue_room(self, nbytes: int) -> None:
        """Leave most of the writer's queue to the collector: a resync that filled it would
        stall the collector, overflow the ring buffer and so restart itself."""
        q = self.writer.queue
        if not q.wait_room(nbytes, max(q.limit // 4, nbytes), self._aborting):
            raise Aborted()

    def _wait_drained(self, d: devices.BlockDevice) -> None:
        """No write with a stamp < Rs can still land: the disk's write in-flight count was
        seen at 0, or no completion of such a write arrived for `settle` seconds."""
        settle_ns = int(self.settle * 1e9)
        while True:
            if self._aborting():
                raise Aborted()
            if devices.write_inflight(d) == 0:
                return
            with self._lock:
                last = max(self._last_pre_mono, self._rs_mono)
            if mono_ns() - last >= settle_ns:
                return
            time.sleep(0.01)
