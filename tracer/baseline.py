"""The baseline read of a tracing session (docs/design.md, invariant 6).

Capture is enabled *before* the device is read, so every write submitted later is in the
LOG and a rebuild applies it on top of the baseline, whatever the read saw. What the LOG
cannot contain are writes queued before capture began and completed after a chunk was read:
the completion program flags requests holding such bios (F_OLD), the collector hands them
here (old_completion), and every chunk whose read started before such a completion (compared
in kernel ktime) is read again. The baseline of a device ends -- and a stamped R_POINT
"baseline_end" opens the restorable history -- when no such write can still be in flight:
the disk's write in-flight count was seen at 0, or no flagged completion arrived for
`settle` seconds.
"""
from __future__ import annotations

import json
import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from blkrewind.errors import UserError
from blkrewind.formats import record
from blkrewind.tracer import devices

if TYPE_CHECKING:
    from blkrewind.tracer.capture import Capture
    from blkrewind.tracer.progress import ReadProgress
    from blkrewind.tracer.writer import RecordSeq


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


@dataclass
class _Old:
    """A completion of a write queued before capture began (F_OLD)."""
    dev: int
    sector: int
    nbytes: int
    ktime: int


class Baseline:
    """Reads every device whole into the LOG as R_BASE records (tracer/session.py's main
    thread), chunk by chunk, and again the chunks a write queued before capture may have
    changed after they were read.

    add_records: queues records for the LOG writer; seq numbers them (aux = seq: read
    order, a re-read wins). wait_collected: returns once the collector took everything
    committed to the ring buffer. progress_tty: the terminal's status line, if any."""

    def __init__(self, devs: list[devices.BlockDevice], *, chunk_bytes: int, settle: float,
                 add_records: Callable[[list[bytes]], None], seq: RecordSeq,
                 wait_collected: Callable[[], None], say: Callable[[str], None],
                 fail: Callable[[str], None]):
        self.devs = devs
        self.chunk_bytes = chunk_bytes
        self.settle = settle
        self.add_records = add_records
        self.seq = seq
        self.wait_collected = wait_collected
        self.say = say
        self.fail = fail
        self.progress_tty: Callable[[str | None], None] | None = None
        self.watching = False   # the collector hands F_OLD completions to old_completion()
        self.enable_mono = 0    # when capture was enabled (mono ns): the settle time's start
        self.bytes = 0          # bytes read (all devices, re-reads included)
        self.rereads = 0        # chunks read again
        self.progress: ReadProgress | None = None  # while a device is read
        self._old: list[_Old] = []
        self._last_old_mono = 0
        self._lock = threading.Lock()

    def old_completion(self, h: record.Header) -> None:
        """The collector saw a completion flagged F_OLD (while watching)."""
        with self._lock:
            self._old.append(_Old(h.dev, h.sector, h.bio_size, h.ktime_ns))
            self._last_old_mono = mono_ns()

    def run(self, capture: Capture, stop: threading.Event) -> bool:
        """Read every device; after each, a stamped R_POINT baseline_end. False: stopped
        before the end."""
        for d in self.devs:
            t0 = time.monotonic()
            rereads0 = self.rereads
            nbytes = self._read_device(d, stop)
            if stop.is_set():
                return False
            stamp, ok = capture.point(record.R_POINT, json.dumps(
                {"what": "baseline_end", "dev": d.kdev}).encode())
            if not ok:
                self.fail(f"the baseline end of {d.path} was lost (ring buffer full)")
            dt = time.monotonic() - t0
            self.say(f"baseline of {d.path} done: {nbytes >> 20} MiB in {dt:.1f} s "
                     f"({nbytes / max(dt, 1e-9) / (1 << 20):.0f} MiB/s, "
                     f"{self.rereads - rereads0} chunks read again after writes "
                     f"queued before capture completed), restorable from stamp {stamp}")
        self.watching = False
        return True

    def _read_device(self, d: devices.BlockDevice, stop: threading.Event) -> int:
        from blkrewind.tracer.progress import ReadProgress

        chunk = self.chunk_bytes
        nchunks = (d.size_bytes + chunk - 1) // chunk
        prog = self.progress = ReadProgress("baseline", d.path, d.size_bytes, self.say,
                                            self.progress_tty)
        read_at = [0] * nchunks  # ktime before each chunk's latest read
        buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT wants
        total = 0
        fd = os.open(d.path, os.O_RDONLY | os.O_DIRECT)
        try:
            def read_chunk(i: int) -> None:
                nonlocal total
                off = i * chunk
                n = min(chunk, d.size_bytes - off)
                read_at[i] = mono_ns()
                view = memoryview(buf)[:n]
                got = os.preadv(fd, [view], off)
                if got != n:
                    raise UserError(f"{d.path}: short read at byte {off} ({got} of {n})")
                seq = self.seq.next()
                if devices.all_zero(view):
                    rec = record.make_record(b"", rtype=record.R_BASE, seq=seq,
                                             dev=d.kdev, sector=off // 512, bio_size=n,
                                             aux=seq, flags=record.F_ZERO,
                                             ktime_ns=read_at[i])
                else:
                    rec = record.make_record(view, rtype=record.R_BASE, seq=seq,
                                             dev=d.kdev, sector=off // 512, bio_size=n,
                                             aux=seq, ktime_ns=read_at[i])
                view.release()
                self.add_records([rec])
                total += n
                prog.add(n)

            for i in range(nchunks):
                if stop.is_set():
                    return total
                read_chunk(i)
            while not stop.is_set():
                self._wait_old_drained(d, stop)
                self.wait_collected()
                with self._lock:
                    old = [o for o in self._old if o.dev == d.kdev]
                stale = sorted({i for o in old
                                for i in range(o.sector * 512 // chunk,
                                               min(nchunks, (o.sector * 512 + max(o.nbytes, 1) - 1)
                                                   // chunk + 1))
                                if o.ktime >= read_at[i]})
                if not stale:
                    break
                self.rereads += len(stale)
                for i in stale:
                    read_chunk(i)
        finally:
            os.close(fd)
            buf.close()
            prog.finish()
            self.progress = None
        self.bytes += total
        return total

    def _wait_old_drained(self, d: devices.BlockDevice, stop: threading.Event) -> None:
        settle_ns = int(self.settle * 1e9)
        while not stop.is_set():
            if devices.write_inflight(d) == 0:
                return
            with self._lock:
                last = max(self._last_old_mono, self.enable_mono)
            if mono_ns() - last >= settle_ns:
                return
            time.sleep(0.01)
