"""One tracing session: capture -> ring buffer -> collector -> LOG, plus the baseline.

Tracer starts and stops a session and runs its collector; the other parts are its own modules:

  collector   (here) takes committed spans out of the ring buffer (tracer/ringbuf.py) and
              queues them for the writer; watches the kernel's loss counters; hands
              completions to the baseline (writes queued before capture began) and to the
              resync while they watch.
  writer      tracer/writer.py: appends each span to the LOG as one frame (tracer/log.py)
              and fsyncs on the chosen policy. A bounded queue sits between the two: if the
              LOG cannot keep up, the ring buffer fills and the kernel counts drops -- loss
              is never silent.
  baseline    tracer/baseline.py: reads the devices whole (main thread, run_baseline).
  resync      tracer/resync.py: checkpoints, loss reports, regions read again after a loss.
  control     tracer/control.py: a unix socket (/run/blkrewind/trace-PID.sock) that
              `blkrewind mark` and `blkrewind status` talk to.
  continuation tracer/continuation.py: the capture pinned so that it outlives a crash, and
              a dead tracer's session continued (_start_continued).
  main        starts everything, reads the baseline, waits for the end.
"""
from __future__ import annotations

import os
import resource
import secrets
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from blkrewind import __version__
from blkrewind.errors import UserError
from blkrewind.formats import record
from blkrewind.formats.logframe import FL_RAW, Body, encode_span
from blkrewind.tracer import calibrate, devices, pins
from blkrewind.tracer.baseline import Baseline
from blkrewind.tracer.capture import Capture, Regions, region_layout
from blkrewind.tracer.continuation import Continuation, skip_logged
from blkrewind.tracer.control import ControlSocket
from blkrewind.tracer.log import (
    LogLock,
    LogWriter,
    last_stamp,
    on_tmpfs,
    repair,
    tail_kernel_seqs,
)
from blkrewind.tracer.resync import Resync
from blkrewind.tracer.ringbuf import RingConsumer
from blkrewind.tracer.writer import RecordSeq, Writer

# A span smaller than BATCH_BYTES is encoded in the collector (larger ones by the encoder
# threads) and, while less than BATCH_BYTES wait in the ring, makes the collector wait
# BATCH_WAIT before taking the next span: each span costs the collector and the writer a
# fixed amount of Python and a wake-up, paid per write at high rates of small writes unless
# spans are large (bench/bench_cpu.py; docs/costs.md). The wait adds at most BATCH_WAIT to
# the time a record takes to reach the LOG.
# 4 MiB / 20 ms spans cost less CPU (fifth pass, docs/costs.md: side by side at load 4-5,
# 4.40 instead of 6.40 us of tracer CPU per 4 KiB write, 0.94 instead of 1.31 CPU-s per GB at
# 1 MiB writes) and were the default for a day, but on a quiet machine they made the RPO
# worse: at 100 MB/s shipped over TLS the oldest unacked frame's age p50 0.51-1.22 s and p99
# 0.95-1.85 s in four runs, against 0.23-0.28 s and 0.67-1.06 s with these values in three
# runs alternating with them (bench/bench_ship.py --mode rpo; docs/costs.md, "on a quiet
# machine"). An RPO is what the tool promises first: the small spans stay the default, the
# large ones an option (TraceOptions.batch_bytes / batch_wait) for CPU-bound hosts.
BATCH_BYTES = 1 << 20   # TraceOptions.batch_bytes / batch_wait: the defaults
BATCH_WAIT = 0.002
BUSY_WAIT = 0.002       # ... or this long when BATCH_BYTES wait already
WAKE_POLL = 0.005       # TraceOptions.wake_bytes: the collector's poll timeout while busy ...
IDLE_POLL = 0.05        # ... and when idle (the latency of the first record after a pause)
LOSS_REPORT_EVERY = 10.0
# Once the writer's queue holds this much, spans are copied out of the ring (as they are
# beyond half the ring held): a span stored as is keeps its ring space until written, and
# the ring's space goes back in order, so without copying a writer stalled for 128 MiB of
# spans (~0.2 s at 600 MB/s: a busy machine's scheduler) filled the ring and records were
# dropped while the 512 MiB queue stood empty (measured: docs/costs.md, fourth pass)
COPY_BACKLOG = 16 << 20


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
    batch_bytes: int = BATCH_BYTES  # the collector's spans: see BATCH_BYTES above
    batch_wait: float = BATCH_WAIT
    # > 0: records are submitted without waking the collector, but for the one that takes
    # the ring's unconsumed data past wake_bytes; the collector then polls every WAKE_POLL
    # seconds while writes come, IDLE_POLL when none came for a second. 0 (the default):
    # wake as libbpf does -- the collector sleeps BATCH_WAIT between spans, so a wake-up
    # comes once per span, not per write, and a wake_bytes of BATCH_BYTES did not lower the
    # tracer's CPU (bench/bench_cpu.py; the figures are in docs/costs.md)
    wake_bytes: int = 0
    # tracer/log.py LogWriter: "buffered" (segments grow as written), "prealloc" (segments
    # preallocated, or recycled spares; buffered writes), "direct" (... written O_DIRECT), or
    # "auto": direct, but on a tmpfs (whose O_DIRECT is page-cache I/O) prealloc with ship,
    # else buffered. prealloc and
    # direct pay only with recycling (retention retires shipped segments as spares, and a new
    # segment reuses one: no page allocated per 4 KiB of LOG; on a tmpfs the writer's CPU per
    # 4 KiB write 2.45 -> 1.45 us, docs/costs.md). Default buffered: over a real disk a
    # recycled file's last partial page is read before a buffered write, and direct is not
    # measured on a second real disk
    log_mode: str = "buffered"
    host: str | None = None       # in R_SESSION / R_DEVICE / segment headers (default: hostname)
    ship: str | None = None       # ADDR:PORT of a replayer (`blkrewind serve`): stream the LOG
    tls_dir: str | None = None
    insecure: bool = False
    ship_conns: int = 2
    log_max_bytes: int | None = None  # retention (tracer/shipper.py); None: 50 % of the fs
    ship_drain: float = 30.0      # stop(): wait this long for the last acks
    ship_timeout: float = 30.0    # a replayer silent this long: drop the connection, reconnect


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    cpu0: float = field(default_factory=lambda: _cpu_seconds())


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


_T = TypeVar("_T")


def _made(part: _T | None, what: str) -> _T:
    if part is None:
        raise RuntimeError(f"{what} is used before Tracer.start() made it")
    return part


class Tracer:
    def __init__(self, opts: TraceOptions, say=print):
        self.opts = opts
        self.say = say
        self.devs = [devices.inspect(p) for p in opts.devices]
        devices.check_no_overlap(self.devs)
        from blkrewind.tracer.features import partition_refusal
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
            from blkrewind.tracer.shipper import Shipper
            self.shipper = Shipper(opts.log_dir, opts.ship, tls_dir=opts.tls_dir,
                                   insecure=opts.insecure, host=self.host, conns=opts.ship_conns,
                                   log_max_bytes=opts.log_max_bytes, say=say,
                                   dead_after=opts.ship_timeout,
                                   extra_status=lambda: self.status(shipper=False))
        self.seq = RecordSeq()   # the records the tracer writes itself
        self.writer: Writer | None = None  # the LOG writer thread and its queue (_open_log)
        self._stop_collect = threading.Event()
        self._collected_pos = 0
        self.baseline = Baseline(self.devs, chunk_bytes=opts.chunk_bytes, settle=opts.settle,
                                 add_records=self._user_records, seq=self.seq,
                                 wait_collected=self.wait_collected, say=say, fail=self.fail)
        self.failure: str | None = None
        self.baseline_done = threading.Event()
        self.capture: Capture | None = None
        self.log: LogWriter | None = None
        self.loglock: LogLock | None = None
        self.ring: RingConsumer | None = None
        self._threads: list[threading.Thread] = []
        self.control = ControlSocket(self.mark, self.status)
        self.end_state: dict | None = None
        self.continuation = Continuation(opts.log_dir, self.devs, self.host, say)
        self._marks_set: dict[str, int] = {}  # mark name -> its stamp (a name set again: said)
        self.resync: Resync | None = None  # checkpoints and resyncs (start)
        # set by `trace` on a terminal: rewrites its status line
        self.progress_tty: Callable[[str | None], None] | None = None

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
        left = self.continuation.find()
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
        self.continuation.pin(self.session, cap, regions, self.seq.value)
        self._open_log()
        self.resync = self._new_resync(regions, stamp_base)
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
        self.baseline.watching = o.baseline
        cap.enable(True)
        self.baseline.enable_mono = mono_ns()
        self.resync.start()
        self.control.start()
        self.say(f"capture live: session {self.session}, "
                 + ", ".join(f"{d.path} ({d.size_bytes >> 20} MiB)" for d in self.devs)
                 + f", LOG {o.log_dir} (direct map by {bases.method}, {attached['queue']}"
                 + (f"; legacy programs: {cap.variant_why}" if cap.variant == "legacy" else "")
                 + ")")
        if "dirtier" not in attached and o.dirtier:
            why = (cap.optional_error or "").splitlines()[:1]
            self.say("the dirtier of buffered writes is not recorded on this kernel (writes "
                     "show the flusher that submitted them)" + (f": {why[0]}" if why else ""))

    # ------------------------------------------------- surviving a crash (tracer/continuation.py)
    def checkpointed(self, safe: int, full: bool, baseline_done: bool) -> None:
        """Called by each resync checkpoint: every stamp < safe is in the LOG or covered."""
        self.continuation.checkpointed(safe, full, baseline_done, self.seq.value)

    def _start_continued(self, p: "pins.Pinned") -> None:
        """Continue the session of a tracer that died (its capture stayed attached): same
        session and stamps, the ring buffer's records kept, the regions written since the
        last checkpoint it recorded read again (docs/internals.md, "Tracer restart")."""
        o = self.opts
        self.session = p.session
        self.seq.value = p.useq + 1_000_000  # past whatever it numbered after its checkpoint
        cap, regions = self.continuation.adopt(p)
        self.capture = cap
        cap.set_wake_bytes(o.wake_bytes)
        dead_pid = self.continuation.continued  # adopt() set it (and p.pid to ours)
        if dead_pid is None:
            raise RuntimeError("continuing a session without the dead tracer's pid")
        self.ring = RingConsumer(cap.fd["rb"], cap.ring_bytes)
        # records the dead collector had handed to the LOG but not yet released
        skipped = skip_logged(self.ring, tail_kernel_seqs(o.log_dir, p.session, p.ring_bytes))
        self._open_log()
        self._collected_pos = self.ring.consumed_pos()
        self.resync = self._new_resync(regions, p.safe)
        waiting = self.ring.pending()
        self.resync.continue_after_crash(p.safe, p.full, dead_pid=dead_pid,
                                         ring_bytes_waiting=waiting, skipped=skipped)
        self._start_threads()
        self.baseline.enable_mono = mono_ns()
        self.baseline_done.set()
        self.continuation.save()
        self.resync.start()
        self.control.start()
        st = cap.state()
        self.say(f"capture live: session {self.session} continued (its tracer, pid "
                 f"{dead_pid}, died; the capture stayed attached: {waiting >> 20} MiB "
                 f"waiting in the ring buffer, {st.drops} records dropped in all), "
                 + ", ".join(f"{d.path} ({d.size_bytes >> 20} MiB)" for d in self.devs)
                 + f", LOG {o.log_dir}; the regions written since stamp {p.safe} are read "
                   f"again" + (" (all of them)" if p.full else ""))

    def _open_log(self) -> None:
        o = self.opts
        mode = o.log_mode
        if mode == "auto":
            # on a tmpfs O_DIRECT is page-cache I/O; preallocation pays only when retention
            # recycles segments (with --ship), else it costs an fallocate per segment more
            mode = ("direct" if not on_tmpfs(o.log_dir) else
                    "prealloc" if self.shipper is not None else "buffered")
        self.log = LogWriter(o.log_dir, self.session, host=self.host,
                             segment_bytes=o.segment_bytes, fsync=o.fsync,
                             fsync_interval=o.fsync_interval,
                             prealloc=mode == "prealloc", direct=mode == "direct",
                             on_frame=self.shipper.frame_written if self.shipper else None)
        if self.shipper is not None:  # retention recycles what the writer can reuse
            self.shipper.state.recycle = mode in ("prealloc", "direct")
        hint = ("" if o.ship else
                f"; without --ship nothing deletes the LOG: `blkrewind ingest --log "
                f"{o.log_dir} --store DIR --delete-ingested` deletes what a store holds")
        self.writer = Writer(self.log, queue_bytes=o.queue_bytes, lz4_level=o.lz4_level,
                             shipper=self.shipper, seq=self.seq, fail=self.fail, say=self.say,
                             enospc_hint=hint)

    def _new_resync(self, regions: list[Regions], stamp_base: int) -> Resync:
        """The checkpoint/resync thread (docs/internals.md "Gaps and resync")."""
        assert self.capture is not None and self.writer is not None
        o = self.opts
        return Resync(self, self.capture, self.writer, self.seq, self.devs, regions, stamp_base,
                      chunk_bytes=o.chunk_bytes, settle=o.settle, log_dir=o.log_dir,
                      shipper=self.shipper)

    # the parts start() makes: used only once it made them (a use before is a bug, said so)
    def _writer(self) -> Writer:
        return _made(self.writer, "the LOG writer")

    def _capture(self) -> Capture:
        return _made(self.capture, "the capture")

    def _resync(self) -> Resync:
        return _made(self.resync, "the resync")

    def _ring(self) -> RingConsumer:
        return _made(self.ring, "the ring buffer")

    def _start_threads(self) -> None:
        t = threading.Thread(target=self._collect, name="collector", daemon=True)
        t.start()
        self._threads.append(t)
        self._writer().start()

    def _next_useq(self) -> int:
        return self.seq.next()

    def _user_records(self, recs: list[bytes]) -> None:
        self._writer().add_records(recs)

    # -------------------------------------------------------------- collector
    def _collect(self) -> None:
        """Zero copy: spans are compressed straight out of the ring buffer's mapping, and
        their ring space is given back (in order) once encoded; a span stored as is (FL_RAW)
        is not even copied while less than half the ring is held: the writer writes it from
        the mapping and the space is given back once it is written."""
        ring, cap, writer, resync = self.ring, self.capture, self.writer, self.resync
        baseline = self.baseline
        batch_bytes, batch_wait = self.opts.batch_bytes, self.opts.batch_wait
        assert ring is not None and cap is not None and writer is not None and resync is not None
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
                    if baseline.watching or resync.watching:
                        self._scan_completions(view)
                    # copy once the writer is behind: the writer's queue (queue_bytes) then
                    # buffers what the LOG cannot take yet, not the ring
                    copy = (writer.queue.size > COPY_BACKLOG or
                            ring.pending() > ring.size // 2)
                    written: Future | None = None if copy else Future()
                    if view.nbytes < batch_bytes:
                        # a small span is encoded here: handing it to an encoder thread
                        # and back costs two wake-ups, more than lz4 on it
                        fut: Future[Body] = Future()
                        fut.set_result(encode_span(view, self.opts.lz4_level, copy=copy))
                    else:
                        fut = writer.encoders.submit(encode_span, view, self.opts.lz4_level,
                                                     copy=copy)
                    writer.put_span(view, n, fut, written)
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
                elif view.nbytes < batch_bytes:
                    # let records accumulate: one LOG frame per record would cost
                    # far more than the records. Briefly when BATCH_BYTES wait already:
                    # the span then ended at a record still being written (fast writes),
                    # and a long wait would leave the ring filling up
                    time.sleep(batch_wait if ring.producer_pos() - pos < batch_bytes
                               else BUSY_WAIT)
        except Exception as e:  # a dead collector must not go unnoticed
            self.fail(f"collector stopped: {e}")

    def _scan_completions(self, span: bytes | memoryview) -> None:
        """Completions go to the resync while it watches, and those of writes queued before
        capture (F_OLD) to the baseline while it watches."""
        resync, baseline = self.resync, self.baseline
        assert resync is not None
        for h, payload in record.iter_records(span):
            if h.rtype != record.R_COMPLETE:
                continue
            if resync.watching:
                resync.scan(h, payload)
            if h.flags & record.F_OLD and baseline.watching:
                baseline.old_completion(h)

    def _check_loss(self, st: dict, final: bool = False) -> None:
        """Record every change of the loss counters in the LOG (R_LOSS); the resync
        thread (tracer/resync.py) reports each loss episode and repairs it."""
        self._resync().note_counters(st, final)

    def caught_up(self, abort: Callable[[], bool]) -> bool:
        """Return once the collector has taken everything committed before now; False:
        abort() said to stop first (for the resync's checkpoints)."""
        target = self._ring().producer_pos()
        while self._collected_pos < target:
            if abort():
                return False
            time.sleep(0.002)
        return True

    def wait_collected(self, timeout: float = 10.0) -> None:
        """Return once the collector has taken everything committed before now."""
        target = self._ring().producer_pos()
        deadline = time.monotonic() + timeout
        while self._collected_pos < target:
            if time.monotonic() > deadline or self.failure:
                self.fail(f"the collector fell {target - self._collected_pos} bytes behind "
                           f"for {timeout:.0f} s")
                return
            time.sleep(0.002)

    def durable(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is fsynced in the LOG."""
        return self._writer().durable(timeout) and self.failure is None

    def fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            self.say(f"ERROR: {why}")

    # --------------------------------------------------------------- baseline
    def run_baseline(self, stop: threading.Event) -> None:
        """Read the baseline of every device (tracer/baseline.py), unless the session is
        continued or runs without one; then baseline_done."""
        if self.baseline_done.is_set():  # a continued session (_start_continued)
            return
        if not self.opts.baseline:
            self.baseline_done.set()
            return
        self.baseline.progress_tty = self.progress_tty
        if not self.baseline.run(self._capture(), stop):
            return
        self.baseline_done.set()
        self._resync().checkpoint_soon()  # records baseline_done for a tracer continuing after us

    # ------------------------------------------------------------------ marks
    def mark(self, name: str, pid: int = 0, comm: str = "") -> dict:
        full0 = self._writer().dropped.spans
        stamp, ok = self._capture().point(record.R_MARK, name.encode(), tgid=pid, tid=pid,
                                       comm=comm.encode()[:15])
        if not ok:
            raise UserError(f"mark {name!r} was lost: the ring buffer is full")
        self.wait_collected()
        if not self.durable():
            raise UserError(f"mark {name!r} could not be made durable: {self.failure}")
        if self._writer().dropped.spans != full0:
            raise UserError(f"mark {name!r} may have been lost: the LOG is full "
                            f"(--log-max-mb; the replayer has not acknowledged enough)")
        again = self._marks_set.get(name)
        self._marks_set[name] = stamp
        return {"ok": True, "stamp": stamp, "session": self.session, "log": self.opts.log_dir,
                "baseline_done": self.baseline_done.is_set(), "again": again}

    # ------------------------------------------------------------------- stop
    def status(self, shipper: bool = True) -> dict:
        st = self.capture.counters() if self.capture else {}
        out = {"session": self.session, "log": self.opts.log_dir, "pid": os.getpid(),
               "host": self.host, "pinned": self.continuation.pinned is not None,
               "continued_from_pid": self.continuation.continued,
               "devices": [d.path for d in self.devs], "baseline_done": self.baseline_done.is_set(),
               "kernel": st, "log_bytes": self.log.bytes_written if self.log else 0,
               **self._dropped(), "failure": self.failure}
        resync = self.resync
        prog = self.baseline.progress or (resync.progress if resync is not None else None)
        out["progress"] = prog.status() if prog is not None else None
        if shipper and self.shipper is not None:
            out["shipper"] = self.shipper.status()
        return out

    def stop(self) -> dict:
        """Disable capture, drain, write R_END, seal the LOG; returns the stats."""
        cap = self.capture
        if self.resync is not None:
            self.resync.stop()
        self.control.close()
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
                self._writer().close(60)
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
                     "baseline_bytes": self.baseline.bytes,
                     "baseline_rereads": self.baseline.rereads,
                     **self._dropped(), "failure": self.failure}
        if self.shipper is not None:  # the LOG is sealed: wait (bounded) for the last acks
            stats["shipper"] = self.shipper.stop(self.opts.ship_drain)
            self.shipper = None
        self.close()
        return stats

    def _dropped(self) -> dict:
        d = self.writer.dropped if self.writer is not None else None
        return {"log_full_drops": d.spans if d else 0, "log_full_records": d.records if d else 0,
                "log_full_bytes": d.bytes if d else 0}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.shutdown()
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        if self.loglock is not None:
            self.loglock.release()
            self.loglock = None
