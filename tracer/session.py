"""One tracing session: capture -> ring buffer -> collector -> LOG, plus the baseline.

Threads
  collector   takes committed spans out of the ring buffer (tracer/ringbuf.py)
              and queues them for the writer; watches the kernel's loss
              counters; during the baseline, picks out completions of writes
              that were queued before capture began.
  writer      appends each span to the LOG as one frame (tracer/log.py) and
              fsyncs on the chosen policy. A bounded queue sits between the
              two: if the LOG cannot keep up, the ring buffer fills and the
              kernel counts drops -- loss is never silent.
  control     a unix socket (/run/blkrewind/trace-PID.sock) that
              `blkrewind mark` talks to.
  main        starts everything, reads the baseline, waits for the end.

The baseline (docs/design.md, invariant 6). Capture is enabled *before* the
device is read, so every write submitted later is in the LOG and a rebuild
applies it on top of the baseline, whatever the read saw. What the LOG cannot
contain are writes queued before capture began and completed after a chunk was
read: the completion program flags requests holding such bios (F_OLD), the
collector collects them, and every chunk whose read started before such a
completion (compared in kernel ktime) is read again. The baseline ends -- and a
stamped R_POINT "baseline_end" opens the restorable history -- when no such
write can still be in flight: the disk's write in-flight count was seen at 0,
or no flagged completion arrived for `settle` seconds.
"""
from __future__ import annotations

import json
import mmap
import os
import resource
import secrets
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from blkrewind import __version__
from blkrewind.errors import UserError
from blkrewind.formats import record
from blkrewind.formats.logframe import FL_RAW, FRAME_SIZE, Body, encode_span, list_segments
from tracer import calibrate, devices, pins
from tracer.capture import Capture, Regions, region_layout
from tracer.log import (
    LogFull,
    LogLock,
    LogWriter,
    kernel_seq,
    last_stamp,
    on_tmpfs,
    repair,
    tail_kernel_seqs,
)
from tracer.resync import Resync
from tracer.ringbuf import RingConsumer

if TYPE_CHECKING:
    from tracer.progress import ReadProgress

CONTROL_DIR = "/run/blkrewind"
BATCH_BYTES = 1 << 20   # a span smaller than this ...
BATCH_WAIT = 0.002      # ... makes the collector wait this long before the next one
WAKE_POLL = 0.005       # TraceOptions.wake_bytes: the collector's poll timeout while busy ...
IDLE_POLL = 0.05        # ... and when idle (the latency of the first record after a pause)
LOSS_REPORT_EVERY = 10.0


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _ring_done(entry) -> bool:
    """May the ring space of this collected span go back? (end, encode future, written
    future or None): once encoded, and once written if its body is a view of the ring."""
    _, fut, written = entry
    if not fut.done():
        return False
    if written is None or written.done() or fut.exception() is not None:
        return True
    return not fut.result().flags & FL_RAW


def new_session_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


@dataclass
class TraceOptions:
    devices: list[str]
    log_dir: str
    ring_bytes: int = 128 << 20
    segment_bytes: int = 64 << 20
    fsync: str = "interval"
    fsync_interval: float = 1.0
    baseline: bool = True
    dirtier: bool = False  # record who dirtied buffered writes' pages (dirtier_btf, R_DIRTY)
    chunk_bytes: int = 1 << 20
    settle: float = 1.0
    queue_bytes: int = 512 << 20
    lz4_level: int = -10  # tracer/log.py encode_span: spans that hardly compress go faster
    # > 0: records are submitted without waking the collector, but for the one that takes
    # the ring's unconsumed data past wake_bytes; the collector then polls every WAKE_POLL
    # seconds while writes come, IDLE_POLL when none came for a second. 0 (the default):
    # wake as libbpf does -- the collector's own switches were already ~0.03 per 4 KiB write
    # (it sleeps BATCH_WAIT between spans, so a wake-up comes once per span, not per write)
    # and BATCH_BYTES measured no better (bench/bench_cpu.py, README "Costs")
    wake_bytes: int = 0
    # tracer/log.py LogWriter: "buffered" (segments grow as written), "prealloc" (segments
    # preallocated, or recycled spares; buffered writes), "direct" (... written O_DIRECT), or
    # "auto": direct, but buffered on a tmpfs (whose O_DIRECT is page-cache I/O). Default
    # buffered: bench/bench_cpu.py measured no gain in the tracer's CPU from the others
    # (README "Costs": LOG on ext4 over zram, 5.6 vs 5.2 us per 4 KiB write, 1.97 vs 2.06
    # CPU-s per GB at 1 MiB; on a tmpfs they cost more)
    log_mode: str = "buffered"
    host: str | None = None       # in R_SESSION / R_DEVICE / segment headers (default: hostname)
    ship: str | None = None       # ADDR:PORT of a replayer (`blkrewind serve`): stream the LOG
    tls_dir: str | None = None
    insecure: bool = False
    ship_conns: int = 2
    log_max_bytes: int | None = None  # retention (tracer/shipper.py); None: 50 % of the fs
    ship_drain: float = 30.0      # stop(): wait this long for the last acks
    ship_timeout: float = 30.0    # a replayer silent this long: drop the connection, reconnect


class _ByteQueue:
    """A FIFO bounded by the bytes it holds (one item may exceed the bound)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self.items: list = []
        self.cv = threading.Condition()

    def put(self, item, nbytes: int) -> None:
        with self.cv:
            while self.size and self.size + nbytes > self.limit:
                self.cv.wait()
            self.items.append((item, nbytes))
            self.size += nbytes
            self.cv.notify_all()

    def get(self, timeout: float):
        with self.cv:
            if not self.items and not self.cv.wait_for(lambda: self.items, timeout):
                return None
            item, nbytes = self.items.pop(0)
            self.size -= nbytes
            self.cv.notify_all()
            return item


@dataclass
class _Old:
    dev: int
    sector: int
    nbytes: int
    ktime: int


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    cpu0: float = field(default_factory=lambda: _cpu_seconds())
    baseline_bytes: int = 0
    baseline_rereads: int = 0
    log_full_drops: int = 0       # spans dropped because the LOG was full (--log-max-mb)
    log_full_records: int = 0
    log_full_bytes: int = 0


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Tracer:
    def __init__(self, opts: TraceOptions, say=print):
        self.opts = opts
        self.say = say
        self.devs = [devices.inspect(p) for p in opts.devices]
        devices.check_no_overlap(self.devs)
        from tracer.features import partition_refusal
        for d in self.devs:
            why = partition_refusal(d.path, d.disk) if d.is_partition else None
            if why:
                raise UserError(why)
        warn = devices.check_log_location(opts.log_dir, self.devs)
        if warn:
            say(f"WARNING: {warn}")
        self.session = new_session_id()
        self.host = opts.host or self.devs[0].host
        self.stats = Stats()
        self.shipper = None
        if opts.ship:
            from tracer.shipper import Shipper
            self.shipper = Shipper(opts.log_dir, opts.ship, tls_dir=opts.tls_dir,
                                   insecure=opts.insecure, host=self.host, conns=opts.ship_conns,
                                   log_max_bytes=opts.log_max_bytes, say=say,
                                   dead_after=opts.ship_timeout,
                                   extra_status=lambda: self.status(shipper=False))
        self._full_note: list | None = None  # [spans, records, bytes] dropped, not noted yet
        self._useq = 0
        self._queue = _ByteQueue(opts.queue_bytes)
        self._stop_collect = threading.Event()
        self._collected_pos = 0
        self._watch_old = False
        self._old: list[_Old] = []
        self._last_old_mono = 0
        self._lock = threading.Lock()
        self._last_drops = 0
        self._last_loss_say = 0.0
        self.failure: str | None = None
        self.baseline_done = threading.Event()
        self.capture: Capture | None = None
        self.log: LogWriter | None = None
        self.loglock: LogLock | None = None
        self.ring: RingConsumer | None = None
        self._threads: list[threading.Thread] = []
        # lz4 releases the GIL: spans are compressed here, in parallel, while
        # the writer writes the previous ones (in order: it waits on each future)
        self._encoders = ThreadPoolExecutor(2, thread_name_prefix="encoder")
        self._control: socket.socket | None = None
        self.control_path = os.path.join(CONTROL_DIR, f"trace-{os.getpid()}.sock")
        self.end_state: dict | None = None
        self.pinned: pins.Pinned | None = None  # the capture is pinned (outlives us)
        self.continued: int | None = None  # the pid of the dead tracer whose session goes on
        self._marks_set: dict[str, int] = {}  # mark name -> its stamp (a name set again: said)
        self.progress: ReadProgress | None = None  # the baseline or resync read going on
        # set by `trace` on a terminal: rewrites its status line
        self.progress_tty: Callable[[str | None], None] | None = None
        self._pin_problem: str | None = None

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        o = self.opts
        os.makedirs(o.log_dir, mode=0o700, exist_ok=True)
        self.loglock = LogLock(o.log_dir)
        self.loglock.acquire(blocking=False)
        for msg in repair(o.log_dir):
            self.say(f"LOG: {msg}")
        if self.shipper is not None:
            self.shipper.start()
        self._pin_problem = pins.bpffs_problem()
        if self._pin_problem is None:
            newest = max((s.session for s in list_segments(o.log_dir)), default=None)
            left = pins.find_adoptable(o.log_dir, self.devs, self.host, newest, self.say)
            if left is not None:
                self._start_continued(left)
                return
        stamp_base = max(time.time_ns(), last_stamp(o.log_dir) + 1)

        regions = region_layout([(d.kdev, d.size_bytes) for d in self.devs])
        self.capture = cap = Capture(ring_bytes=o.ring_bytes,
                                     dirty_regions=sum(r.count for r in regions),
                                     dirtier=o.dirtier)
        attached = cap.attach(optional=("bio_complete", "dirtier") if o.dirtier
                              else ("bio_complete",))
        bases = calibrate.calibrate(cap, self.devs[0].path)
        cap.init_counters(stamp_base, 1)
        cap.set_wake_bytes(o.wake_bytes)
        for d, r in zip(self.devs, regions):
            cap.add_device(d.kdev, d.part_start, r)
        self._pin(regions)
        self.resync = Resync(self, regions, stamp_base)  # docs/internals.md "Gaps and resync"

        self._open_log()
        self.ring = RingConsumer(cap.fd["rb"], cap.ring_bytes)
        while self.ring.take()[1]:  # calibration leftovers
            pass
        self._collected_pos = self.ring.consumed_pos()
        self._user_records([record.json_record(record.R_SESSION, {
            "session": self.session, "host": self.host, "stamp_base": stamp_base,
            "seq_base": 1, "version": __version__, "boot_id": pins.boot_id(),
            "kernel": os.uname().release, "attach": attached,
            "direct_map": {"method": bases.method, **bases.details},
            "ring_bytes": cap.ring_bytes, "devices": [d.name for d in self.devs],
            "bpf_variant": cap.variant,
        }, seq=self._next_useq())] + [
            record.json_record(record.R_DEVICE, {**d.info(), "host": self.host},
                               seq=self._next_useq(), dev=d.kdev)
            for d in self.devs])

        self._start_threads()
        self._watch_old = o.baseline
        cap.enable(True)
        self._enable_mono = mono_ns()
        self.resync.start()
        self._start_control()
        self.say(f"capture live: session {self.session}, "
                 + ", ".join(f"{d.path} ({d.size_bytes >> 20} MiB)" for d in self.devs)
                 + f", LOG {o.log_dir} (direct map by {bases.method}, {attached['queue']}"
                 + (f"; legacy programs: {cap.variant_why}" if cap.variant == "legacy" else "")
                 + ")")
        if "dirtier" not in attached and o.dirtier:
            why = (cap.optional_error or "").splitlines()[:1]
            self.say("the dirtier of buffered writes is not recorded on this kernel (writes "
                     "show the flusher that submitted them)" + (f": {why[0]}" if why else ""))

    # ------------------------------------------------- surviving a crash (tracer/pins.py)
    def _pin(self, regions) -> None:
        """Pin the capture, so that it goes on (dirty map, stamps, ring) if this process dies
        and the next tracer on this LOG can continue the session."""
        cap = self.capture
        if self._pin_problem is not None:
            self.say(f"WARNING: {self._pin_problem}: the capture cannot outlive this process "
                     f"(after a crash the next tracer reads the devices whole)")
            return
        p = pins.Pinned(
            session=self.session, log_dir=os.path.realpath(self.opts.log_dir), host=self.host,
            boot_id=pins.boot_id(), pid=os.getpid(),
            devices=[{"path": d.path, "kdev": d.kdev, "size": d.size_bytes,
                      "part_start": d.part_start} for d in self.devs],
            regions=[[r.kdev, r.base, r.shift, r.count] for r in regions],
            ring_bytes=cap.ring_bytes, dirty_regions=cap.dirty_regions, useq=self._useq)
        try:
            pins.save(p)  # first: pins without a record are a tracer that died starting
            cap.pin(p.pin_dir)
        except OSError as e:
            pins.release_dir(self.session)
            self.say(f"WARNING: cannot pin the capture in {p.pin_dir} ({e}): it cannot outlive "
                     f"this process (after a crash the next tracer reads the devices whole)")
            return
        self.pinned = p

    def checkpointed(self, safe: int, full: bool, baseline_done: bool) -> None:
        """Called by each resync checkpoint: every stamp < safe is in the LOG or covered."""
        p = self.pinned
        if p is None:
            return
        state = (safe, full, baseline_done)
        if state == (p.safe, p.full, p.baseline_done) and self._useq - p.useq < 1000:
            return
        p.safe, p.full, p.baseline_done, p.useq = safe, full, baseline_done, self._useq
        try:
            pins.save(p)
        except OSError as e:
            self.say(f"WARNING: cannot record the checkpoint in {pins.REG_DIR}: {e}")

    def _start_continued(self, p: "pins.Pinned") -> None:
        """Continue the session of a tracer that died (its capture stayed attached): same
        session and stamps, the ring buffer's records kept, the regions written since the
        last checkpoint it recorded read again (docs/internals.md, "Tracer restart")."""
        o = self.opts
        self.session = p.session
        self.continued = p.pid
        self._useq = p.useq + 1_000_000  # past whatever it numbered after its checkpoint
        regions = [Regions(*r) for r in p.regions]
        self.capture = cap = Capture.adopt(p.pin_dir, p.ring_bytes, p.dirty_regions)
        cap.set_wake_bytes(o.wake_bytes)
        p.pid = os.getpid()
        self.pinned = p
        self.ring = RingConsumer(cap.fd["rb"], cap.ring_bytes)
        # records the dead collector had handed to the LOG but not yet released
        skipped = self._skip_logged(tail_kernel_seqs(o.log_dir, p.session, p.ring_bytes))
        self._open_log()
        self._collected_pos = self.ring.consumed_pos()
        self.resync = Resync(self, regions, p.safe)
        waiting = self.ring.pending()
        self.resync.continue_after_crash(p.safe, p.full, dead_pid=self.continued,
                                         ring_bytes_waiting=waiting, skipped=skipped)
        self._start_threads()
        self._watch_old = False
        self._enable_mono = mono_ns()
        self.baseline_done.set()
        pins.save(p)
        self.resync.start()
        self._start_control()
        st = cap.state()
        self.say(f"capture live: session {self.session} continued (its tracer, pid "
                 f"{self.continued}, died; the capture stayed attached: {waiting >> 20} MiB "
                 f"waiting in the ring buffer, {st.drops} records dropped in all), "
                 + ", ".join(f"{d.path} ({d.size_bytes >> 20} MiB)" for d in self.devs)
                 + f", LOG {o.log_dir}; the regions written since stamp {p.safe} are read "
                   f"again" + (" (all of them)" if p.full else ""))

    def _skip_logged(self, seqs: set[int]) -> int:
        """Release the ring buffer's leading records whose sequence numbers the LOG holds."""
        ring, skipped = self.ring, 0
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

    def _open_log(self) -> None:
        o = self.opts
        mode = o.log_mode
        if mode == "auto":
            mode = "buffered" if on_tmpfs(o.log_dir) else "direct"
        self.log = LogWriter(o.log_dir, self.session, host=self.host,
                             segment_bytes=o.segment_bytes, fsync=o.fsync,
                             fsync_interval=o.fsync_interval,
                             prealloc=mode == "prealloc", direct=mode == "direct",
                             on_frame=self.shipper.frame_written if self.shipper else None)

    def _start_threads(self) -> None:
        for target, name in ((self._collect, "collector"), (self._write, "writer")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _next_useq(self) -> int:
        self._useq += 1
        return self._useq

    def _user_records(self, recs: list[bytes]) -> None:
        self._queue_span(b"".join(recs), len(recs))

    def _queue_span(self, span: bytes, nrec: int) -> None:
        body = self._encoders.submit(encode_span, span, self.opts.lz4_level)
        self._queue.put(("span", span, nrec, mono_ns(), time.time_ns(), body, None), len(span))

    # -------------------------------------------------------------- collector
    def _collect(self) -> None:
        """Zero copy: spans are compressed straight out of the ring buffer's mapping, and
        their ring space is given back (in order) once encoded; a span stored as is (FL_RAW)
        is not even copied while less than half the ring is held: the writer writes it from
        the mapping and the space is given back once it is written."""
        ring, cap = self.ring, self.capture
        next_check = 0.0
        pos = ring.consumed_pos()
        last_data = 0.0
        encoding: deque = deque()  # (end position, encode future, written future) in order
        try:
            while True:
                view, n, end = ring.peek(pos)
                now = time.monotonic()
                if view is not None:
                    last_data = now
                    if self._watch_old or self.resync.watching:
                        self._scan_old(view)
                    # beyond half the ring held, copy: the writer's queue (queue_bytes)
                    # then buffers what a slow LOG disk cannot take yet, not the ring
                    copy = ring.pending() > ring.size // 2
                    written: Future | None = None if copy else Future()
                    if view.nbytes < BATCH_BYTES:
                        # a small span is encoded here: handing it to an encoder thread
                        # and back costs two wake-ups, more than lz4 on it (at 50k 4 KiB
                        # writes a second: ~500 such spans)
                        fut: Future[Body] = Future()
                        fut.set_result(encode_span(view, self.opts.lz4_level, copy=copy))
                    else:
                        fut = self._encoders.submit(encode_span, view, self.opts.lz4_level,
                                                    copy=copy)
                    # the writer uses the view for its size, and writes a FL_RAW body that
                    # is a view of it before `written` is set
                    self._queue.put(("span", view, n, mono_ns(), time.time_ns(), fut, written),
                                    view.nbytes)
                    encoding.append((end, fut, written))
                    pos = end
                while encoding and _ring_done(encoding[0]):
                    ring.release(encoding.popleft()[0])
                    self._collected_pos = ring.consumed_pos()
                if now >= next_check:
                    next_check = now + 0.5
                    self._check_loss(cap.counters())
                if view is None:
                    if encoding:
                        _, fut, written = encoding[0]
                        try:  # wait for the oldest encode, or its write
                            (written if fut.done() and written is not None else fut).exception(
                                0.005)
                        except FutureTimeout:
                            pass
                    elif self._stop_collect.is_set():
                        return
                    elif not self.opts.wake_bytes:
                        ring.wait(IDLE_POLL)
                    else:  # no wake-up comes before wake_bytes wait: poll
                        ring.wait(WAKE_POLL if now - last_data < 1.0 else IDLE_POLL)
                elif view.nbytes < BATCH_BYTES:
                    # let records accumulate: one LOG frame per record would cost
                    # far more than the records (the ring holds ~60 ms at 2 GB/s)
                    time.sleep(BATCH_WAIT)
        except Exception as e:  # a dead collector must not go unnoticed
            self._fail(f"collector stopped: {e}")

    def _scan_old(self, span: bytes | memoryview) -> None:
        for h, _ in record.iter_records(span):
            if h.rtype == record.R_COMPLETE and self.resync.watching:
                self.resync.scan(h, _)
            if h.rtype == record.R_COMPLETE and h.flags & record.F_OLD and self._watch_old:
                with self._lock:
                    self._old.append(_Old(h.dev, h.sector, h.bio_size, h.ktime_ns))
                    self._last_old_mono = mono_ns()

    def _check_loss(self, st: dict, final: bool = False) -> None:
        """Record every change of the loss counters in the LOG (R_LOSS); the resync
        thread (tracer/resync.py) reports each loss episode and repairs it."""
        self.resync.note_counters(st, final)

    def wait_collected(self, timeout: float = 10.0) -> None:
        """Return once the collector has taken everything committed before now."""
        target = self.ring.producer_pos()
        deadline = time.monotonic() + timeout
        while self._collected_pos < target:
            if time.monotonic() > deadline or self.failure:
                self._fail(f"the collector fell {target - self._collected_pos} bytes behind "
                           f"for {timeout:.0f} s")
                return
            time.sleep(0.002)

    # ----------------------------------------------------------------- writer
    def _write(self) -> None:
        log = self.log
        while True:
            item = self._queue.get(timeout=0.1)
            try:
                if item is None:
                    log.maybe_sync()
                    continue
                kind = item[0]
                if kind == "span":
                    _, span, nrec, mono, real, body, written = item
                    try:
                        body = body.result()
                        if not self._room_for(span, nrec, body.stored_len):
                            continue
                        try:
                            log.append(span, nrec, mono, real, body=body)
                        except LogFull as e:  # ENOSPC: drop, count, go on (resync repairs)
                            self._log_enospc(span, nrec, e)
                            continue
                    finally:
                        if written is not None:  # its ring space may go back now
                            written.set_result(None)
                    self._enospc = False
                    log.maybe_sync()
                elif kind == "barrier":
                    log.sync()
                    item[1].set()
                elif kind == "fence":  # resync checkpoints: everything before is handled
                    item[1].set()
                elif kind == "close":
                    log.close()
                    item[1].set()
                    return
            except Exception as e:
                self._fail(f"writing the LOG failed: {e}")
                if item and item[0] in ("barrier", "close"):
                    item[1].set()
                if item and item[0] == "close":
                    return

    def _log_enospc(self, span, nrec: int, e: Exception) -> None:
        """A span the LOG's file system had no space for: counted with the retention drops
        (stats.log_full_*), said once per episode; the resync thread repairs the loss."""
        st = self.stats
        st.log_full_drops += 1
        st.log_full_records += nrec
        st.log_full_bytes += memoryview(span).nbytes
        if not getattr(self, "_enospc", False):
            self._enospc = True
            hint = ("" if self.opts.ship else
                    f"; without --ship nothing deletes the LOG: `blkrewind ingest --log "
                    f"{self.opts.log_dir} --store DIR --delete-ingested` deletes what a store "
                    f"holds")
            self.say(f"WARNING: {e}: records are DROPPED and counted as lost until there is "
                     f"space again (then the regions written meanwhile are read again){hint}")

    def _room_for(self, span, nrec: int, body_len: int) -> bool:
        """Retention (--log-max-mb, tracer/shipper.py): may this span be appended? When the
        LOG is full the span is dropped and counted (stats.log_full_*); once there is room
        again an R_LOSS record {"cause": "log full", ...} notes what was dropped."""
        if self.shipper is None:
            return True
        note = None
        if self._full_note is not None:
            n = self._full_note
            note = record.json_record(record.R_LOSS, {
                "cause": "log full", "log_full_spans": n[0], "log_full_records": n[1],
                "log_full_bytes": n[2]}, seq=self._next_useq())
        extra = len(note) + 256 if note else 0
        if not self.shipper.room_for(body_len + FRAME_SIZE + extra):
            st = self.stats
            st.log_full_drops += 1
            st.log_full_records += nrec
            st.log_full_bytes += memoryview(span).nbytes
            n = self._full_note = self._full_note or [0, 0, 0]
            n[0] += 1
            n[1] += nrec
            n[2] += memoryview(span).nbytes
            return False
        if note is not None:
            self.log.append(note, 1, mono_ns(), time.time_ns())
            self._full_note = None
        return True

    def durable(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is fsynced in the LOG."""
        ev = threading.Event()
        self._queue.put(("barrier", ev), 0)
        return ev.wait(timeout) and self.failure is None

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            self.say(f"ERROR: {why}")

    # --------------------------------------------------------------- baseline
    def run_baseline(self, stop: threading.Event) -> None:
        if self.baseline_done.is_set():  # a continued session (_start_continued)
            return
        if not self.opts.baseline:
            self.baseline_done.set()
            return
        for d in self.devs:
            t0 = time.monotonic()
            rereads0 = self.stats.baseline_rereads
            nbytes = self._baseline_device(d, stop)
            if stop.is_set():
                return
            stamp, ok = self.capture.point(record.R_POINT, json.dumps(
                {"what": "baseline_end", "dev": d.kdev}).encode())
            if not ok:
                self._fail(f"the baseline end of {d.path} was lost (ring buffer full)")
            dt = time.monotonic() - t0
            self.say(f"baseline of {d.path} done: {nbytes >> 20} MiB in {dt:.1f} s "
                     f"({nbytes / max(dt, 1e-9) / (1 << 20):.0f} MiB/s, "
                     f"{self.stats.baseline_rereads - rereads0} chunks read again after writes "
                     f"queued before capture completed), restorable from stamp {stamp}")
        self._watch_old = False
        self.baseline_done.set()
        self.resync.checkpoint_soon()  # records baseline_done for a tracer continuing after us

    def _baseline_device(self, d: devices.BlockDevice, stop: threading.Event) -> int:
        from tracer.progress import ReadProgress

        chunk = self.opts.chunk_bytes
        nchunks = (d.size_bytes + chunk - 1) // chunk
        prog = self.progress = ReadProgress("baseline", d.path, d.size_bytes, self.say,
                                            self.progress_tty)
        read_at = [0] * nchunks  # ktime before each chunk's latest read
        buf = mmap.mmap(-1, chunk)  # page aligned, as O_DIRECT wants
        zero = bytes(chunk)
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
                if view == zero[:n]:
                    rec = record.make_record(b"", rtype=record.R_BASE, seq=self._next_useq(),
                                             dev=d.kdev, sector=off // 512, bio_size=n,
                                             aux=self._useq, flags=record.F_ZERO,
                                             ktime_ns=read_at[i])
                else:
                    rec = record.make_record(view, rtype=record.R_BASE, seq=self._next_useq(),
                                             dev=d.kdev, sector=off // 512, bio_size=n,
                                             aux=self._useq, ktime_ns=read_at[i])
                view.release()
                self._user_records([rec])
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
                self.stats.baseline_rereads += len(stale)
                for i in stale:
                    read_chunk(i)
        finally:
            os.close(fd)
            buf.close()
            prog.finish()
            self.progress = None
        self.stats.baseline_bytes += total
        return total

    def _wait_old_drained(self, d: devices.BlockDevice, stop: threading.Event) -> None:
        settle_ns = int(self.opts.settle * 1e9)
        while not stop.is_set():
            if devices.write_inflight(d) == 0:
                return
            with self._lock:
                last = max(self._last_old_mono, self._enable_mono)
            if mono_ns() - last >= settle_ns:
                return
            time.sleep(0.01)

    # ------------------------------------------------------------------ marks
    def mark(self, name: str, pid: int = 0, comm: str = "") -> dict:
        full0 = self.stats.log_full_drops
        stamp, ok = self.capture.point(record.R_MARK, name.encode(), tgid=pid, tid=pid,
                                       comm=comm.encode()[:15])
        if not ok:
            raise UserError(f"mark {name!r} was lost: the ring buffer is full")
        self.wait_collected()
        if not self.durable():
            raise UserError(f"mark {name!r} could not be made durable: {self.failure}")
        if self.stats.log_full_drops != full0:
            raise UserError(f"mark {name!r} may have been lost: the LOG is full "
                            f"(--log-max-mb; the replayer has not acknowledged enough)")
        again = self._marks_set.get(name)
        self._marks_set[name] = stamp
        return {"ok": True, "stamp": stamp, "session": self.session, "log": self.opts.log_dir,
                "baseline_done": self.baseline_done.is_set(), "again": again}

    def _start_control(self) -> None:
        os.makedirs(CONTROL_DIR, mode=0o700, exist_ok=True)
        try:
            os.unlink(self.control_path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.control_path)
        os.chmod(self.control_path, 0o600)
        s.listen(16)
        self._control = s
        t = threading.Thread(target=self._serve_control, name="control", daemon=True)
        t.start()

    def _serve_control(self) -> None:
        while True:
            try:
                conn, _ = self._control.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(30)
                    req = json.loads(conn.makefile("rb").readline(4096) or b"{}")
                    if req.get("op") == "mark":
                        resp = self.mark(str(req["name"]), int(req.get("pid", 0)),
                                         str(req.get("comm", "")))
                    elif req.get("op") == "status":
                        resp = {"ok": True, **self.status()}
                    else:
                        resp = {"ok": False, "error": f"unknown request {req.get('op')!r}"}
                except UserError as e:
                    resp = {"ok": False, "error": str(e)}
                except Exception as e:
                    resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                try:
                    conn.sendall(json.dumps(resp).encode() + b"\n")
                except OSError:
                    pass

    # ------------------------------------------------------------------- stop
    def status(self, shipper: bool = True) -> dict:
        st = self.capture.counters() if self.capture else {}
        out = {"session": self.session, "log": self.opts.log_dir, "pid": os.getpid(),
               "host": self.host, "pinned": self.pinned is not None,
               "continued_from_pid": self.continued,
               "devices": [d.path for d in self.devs], "baseline_done": self.baseline_done.is_set(),
               "kernel": st, "log_bytes": self.log.bytes_written if self.log else 0,
               "log_full_drops": self.stats.log_full_drops,
               "log_full_records": self.stats.log_full_records,
               "log_full_bytes": self.stats.log_full_bytes,
               "failure": self.failure}
        resync = getattr(self, "resync", None)
        prog = self.progress or (resync.progress if resync is not None else None)
        out["progress"] = prog.status() if prog is not None else None
        if shipper and self.shipper is not None:
            out["shipper"] = self.shipper.status()
        return out

    def stop(self) -> dict:
        """Disable capture, drain, write R_END, seal the LOG; returns the stats."""
        cap = self.capture
        if getattr(self, "resync", None) is not None:
            self.resync.stop()
        if self._control is not None:
            self._control.close()
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
        stats: dict = {}
        if cap is not None:
            cap.enable(False)
            # bios already past the enabled check may still be writing records
            prev = None
            while True:
                time.sleep(0.02)
                st = cap.counters()
                if st == prev:
                    break
                prev = st
            if self._threads:
                self.wait_collected()
                self._stop_collect.set()
                self._threads[0].join()
                self._check_loss(st, final=True)
                self._user_records([
                    record.json_record(record.R_END, {"end_stamp": st["stamp"], "end_seq": st["seq"],
                                                      "clean": self.failure is None},
                                       seq=self._next_useq())])
                ev = threading.Event()
                self._queue.put(("close", ev), 0)
                ev.wait(60)
            elif self.log is not None:  # failed before the threads started
                self.log.close()
            self.end_state = st
            wall = time.monotonic() - self.stats.started
            stats = {"session": self.session, "records": self.ring.records if self.ring else 0,
                     "bytes": st["bytes"], "bios": st["bios"], "drops": st["drops"],
                     "drop_bytes": st["drop_bytes"], "read_errs": st["read_errs"],
                     "missed_runs": st["missed"],
                     "consumer_cpu_s": round(_cpu_seconds() - self.stats.cpu0, 3),
                     "wall_s": round(wall, 3),
                     "log_bytes": self.log.bytes_written if self.log else 0,
                     "baseline_bytes": self.stats.baseline_bytes,
                     "baseline_rereads": self.stats.baseline_rereads,
                     "log_full_drops": self.stats.log_full_drops,
                     "log_full_records": self.stats.log_full_records,
                     "log_full_bytes": self.stats.log_full_bytes,
                     "failure": self.failure}
        if self.shipper is not None:  # the LOG is sealed: wait (bounded) for the last acks
            stats["shipper"] = self.shipper.stop(self.opts.ship_drain)
            self.shipper = None
        self.close()
        return stats

    def close(self) -> None:
        self._encoders.shutdown(wait=True)
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        if self.loglock is not None:
            self.loglock.release()
            self.loglock = None


def find_tracers() -> list[str]:
    try:
        names = sorted(os.listdir(CONTROL_DIR))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if not (n.startswith("trace-") and n.endswith(".sock")):
            continue
        path = os.path.join(CONTROL_DIR, n)
        pid = n[len("trace-"):-len(".sock")]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:  # left behind by a tracer that was killed
                os.unlink(path)
            except OSError:
                pass
            continue
        out.append(path)
    return out


def ask(path: str, req: dict, timeout: float = 60.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        line = s.makefile("rb").readline(1 << 20)
    finally:
        s.close()
    if not line:
        raise OSError("no answer")
    return json.loads(line)
