"""Surviving a crash: the tracer's side of tracer/pins.py (docs/internals.md, "Tracer restart").

A new session pins its capture (pin), so that it goes on (dirty map, stamps, ring buffer) if
the tracer dies, and records each resync checkpoint in the pin record (checkpointed): every
stamp below `safe` is in the LOG or covered. A tracer starting on a LOG whose capture was left
pinned by a dead tracer adopts it (find, adopt) and releases the ring buffer's leading
records the LOG already holds (skip_logged); tracer/session.py continues the session and its
resync reads again the regions written since `safe`.
"""
from __future__ import annotations

import os
from typing import Callable

from blkrewind.formats import record
from blkrewind.formats.logframe import list_segments
from blkrewind.tracer import devices, pins
from blkrewind.tracer.capture import Capture, Regions
from blkrewind.tracer.log import kernel_seq
from blkrewind.tracer.ringbuf import RingConsumer


class Continuation:
    """The pin record of one tracer's capture, and the dead tracer it continues, if any."""

    def __init__(self, log_dir: str, devs: list[devices.BlockDevice], host: str,
                 say: Callable[[str], None]):
        self.log_dir = log_dir
        self.devs = devs
        self.host = host
        self.say = say
        self.problem: str | None = None          # why the capture cannot be pinned (bpffs)
        self.pinned: pins.Pinned | None = None   # the capture is pinned (outlives us)
        self.continued: int | None = None        # the pid of the dead tracer whose session goes on

    def find(self) -> pins.Pinned | None:
        """The capture a dead tracer left pinned for this LOG and these devices, if any."""
        self.problem = pins.bpffs_problem()
        if self.problem is not None:
            return None
        newest = max((s.session for s in list_segments(self.log_dir)), default=None)
        return pins.find_adoptable(self.log_dir, self.devs, self.host, newest, self.say)

    def pin(self, session: str, cap: Capture, regions: list[Regions], useq: int) -> None:
        """Pin the capture, so that it goes on (dirty map, stamps, ring) if this process dies
        and the next tracer on this LOG can continue the session."""
        if self.problem is not None:
            self.say(f"WARNING: {self.problem}: the capture cannot outlive this process "
                     f"(after a crash the next tracer reads the devices whole)")
            return
        p = pins.Pinned(
            session=session, log_dir=os.path.realpath(self.log_dir), host=self.host,
            boot_id=pins.boot_id(), pid=os.getpid(),
            devices=[{"path": d.path, "kdev": d.kdev, "size": d.size_bytes,
                      "part_start": d.part_start} for d in self.devs],
            regions=[[r.kdev, r.base, r.shift, r.count] for r in regions],
            ring_bytes=cap.ring_bytes, dirty_regions=cap.dirty_regions, useq=useq)
        try:
            pins.save(p)  # first: pins without a record are a tracer that died starting
            cap.pin(p.pin_dir)
        except OSError as e:
            pins.release_dir(session)
            self.say(f"WARNING: cannot pin the capture in {p.pin_dir} ({e}): it cannot outlive "
                     f"this process (after a crash the next tracer reads the devices whole)")
            return
        self.pinned = p

    def checkpointed(self, safe: int, full: bool, baseline_done: bool, useq: int) -> None:
        """A resync checkpoint: every stamp < safe is in the LOG or covered; useq: the
        tracer's record number now."""
        p = self.pinned
        if p is None:
            return
        state = (safe, full, baseline_done)
        if state == (p.safe, p.full, p.baseline_done) and useq - p.useq < 1000:
            return
        p.safe, p.full, p.baseline_done, p.useq = safe, full, baseline_done, useq
        try:
            pins.save(p)
        except OSError as e:
            self.say(f"WARNING: cannot record the checkpoint in {pins.REG_DIR}: {e}")

    def adopt(self, p: pins.Pinned) -> tuple[Capture, list[Regions]]:
        """Take over the capture of the dead tracer p (found by find)."""
        cap = Capture.adopt(p.pin_dir, p.ring_bytes, p.dirty_regions)
        self.continued = p.pid
        p.pid = os.getpid()
        self.pinned = p
        return cap, [Regions(*r) for r in p.regions]

    def save(self) -> None:
        if self.pinned is not None:
            pins.save(self.pinned)


def skip_logged(ring: RingConsumer, seqs: set[int]) -> int:
    """Release the ring buffer's leading records whose sequence numbers the LOG holds
    (records the dead collector had handed to the LOG but not yet released)."""
    skipped = 0
    while seqs:
        start = ring.consumed_pos()
        view, _, end = ring.peek()
        if view is None:
            break
        cut = None
        for off, _ in record.iter_framed(view):
            seq = kernel_seq(view, off)
            if seq is not None and seq in seqs:
                skipped += 1
                continue
            cut = off - record.FRAME_PREFIX_SIZE
            break
        view.release()
        if cut is None:
            ring.release(end)
            continue
        ring.release(start + cut)
        break
    return skipped
