"""The LOG writer thread of a tracing session (tracer/session.py) and the queue that feeds it.

The collector, the baseline, the resync and the tracer's own records hand spans of records
to the writer through a bounded queue (ByteQueue); the writer appends each span to the LOG as
one frame (tracer/log.py LogWriter) and fsyncs on the chosen policy. If the LOG cannot keep
up, the queue fills, the collector stalls, the ring buffer fills and the kernel counts drops:
loss is never silent.

Queue items are typed: a Span to append, a Barrier (fsync, then tell the waiter), a Fence
(tell the waiter once every item before it is handled: resync checkpoints) and Close (close
the LOG, end the thread).

Spans the LOG cannot take are dropped and counted (Dropped): with --log-max-mb when
retention (tracer/shipper.py room_for) says the LOG is full, and on ENOSPC. The resync
thread (tracer/resync.py) repairs the loss; once there is room again an R_LOSS record
{"cause": "log full", ...} notes what retention dropped.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

from blkrewind.formats import record
from blkrewind.formats.logframe import FRAME_SIZE, Body, encode_span
from blkrewind.tracer.log import LogFull, LogWriter

if TYPE_CHECKING:
    from blkrewind.tracer.shipper import Shipper


def mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class Span(NamedTuple):
    """A span of framed records to append as one LOG frame."""
    span: bytes | memoryview
    nrec: int
    mono: int                   # the clock pair taken when the span was queued
    real: int
    body: Future[Body]          # its encoded body (tracer/log.py encode_span)
    # set by the writer once the span is written or dropped; None: nobody waits. A span
    # whose body is stored as is (FL_RAW) may be a view of the ring buffer's mapping:
    # its ring space goes back only once this is set.
    written: Future | None


class Barrier(NamedTuple):
    """fsync the LOG, then set done."""
    done: threading.Event


class Fence(NamedTuple):
    """Set done once every item queued before it is written or dropped."""
    done: threading.Event


class Close(NamedTuple):
    """Close (seal) the LOG, set done, end the writer thread."""
    done: threading.Event


Item = Span | Barrier | Fence | Close


class ByteQueue:
    """A FIFO bounded by the bytes it holds (one item may exceed the bound)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self.items: list[tuple[Item, int]] = []
        self.cv = threading.Condition()

    def put(self, item: Item, nbytes: int) -> None:
        with self.cv:
            while self.size and self.size + nbytes > self.limit:
                self.cv.wait()
            self.items.append((item, nbytes))
            self.size += nbytes
            self.cv.notify_all()

    def get(self, timeout: float) -> Item | None:
        with self.cv:
            if not self.items and not self.cv.wait_for(lambda: self.items, timeout):
                return None
            item, nbytes = self.items.pop(0)
            self.size -= nbytes
            self.cv.notify_all()
            return item

    def wait_room(self, nbytes: int, share: int, abort: Callable[[], bool]) -> bool:
        """Wait until nbytes more keep the queue within share bytes (or it is empty).
        False: abort() said to give up."""
        with self.cv:
            while self.size and self.size + nbytes > share:
                if abort():
                    return False
                self.cv.wait(0.1)
        return True


class RecordSeq:
    """The running number (`seq`) of the records the tracer writes itself (docs/internals.md
    "Sessions and stamps"): unique per session; R_BASE chunks also take theirs as `aux`."""

    def __init__(self, value: int = 0):
        self.value = value
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self.value += 1
            return self.value


@dataclass
class Dropped:
    """Spans the LOG could not take (retention's LOG full, or ENOSPC)."""
    spans: int = 0
    records: int = 0
    bytes: int = 0

    def add(self, nrec: int, nbytes: int) -> None:
        self.spans += 1
        self.records += nrec
        self.bytes += nbytes


class Writer:
    """Owns the writer thread, its queue and the encoder threads.

    shipper: retention (--log-max-mb) asks it for room before each span; None: no limit.
    seq: numbers the R_LOSS notes it writes. fail: the tracer's failure (a dead writer must
    not go unnoticed). enospc_hint: appended to the warning when the file system is full."""

    def __init__(self, log: LogWriter, *, queue_bytes: int, lz4_level: int,
                 shipper: Shipper | None, seq: RecordSeq, fail: Callable[[str], None],
                 say: Callable[[str], None], enospc_hint: str = ""):
        self.log = log
        self.queue = ByteQueue(queue_bytes)
        self.lz4_level = lz4_level
        self.shipper = shipper
        self.seq = seq
        self.fail = fail
        self.say = say
        self.enospc_hint = enospc_hint
        self.dropped = Dropped()
        # what retention dropped and no R_LOSS notes yet: [spans, records, bytes]
        self._full_note: list[int] | None = None
        self._enospc = False   # in an ENOSPC episode (said once per episode)
        # lz4 releases the GIL: spans are compressed here, in parallel, while
        # the writer writes the previous ones (in order: it waits on each future)
        self.encoders = ThreadPoolExecutor(2, thread_name_prefix="encoder")
        self.thread: threading.Thread | None = None

    # ------------------------------------------------------------------ producers
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="writer", daemon=True)
        self.thread.start()

    def put_span(self, span: bytes | memoryview, nrec: int, body: Future[Body],
                 written: Future | None = None) -> None:
        """Queue a span whose body is encoded (or being encoded) already. The writer uses
        span for its size, and writes a FL_RAW body that is a view of it before `written`
        is set."""
        self.queue.put(Span(span, nrec, mono_ns(), time.time_ns(), body, written),
                       span.nbytes if isinstance(span, memoryview) else len(span))

    def add_records(self, recs: list[bytes]) -> None:
        """Queue records the tracer made itself (encoded by the encoder threads)."""
        span = b"".join(recs)
        self.put_span(span, len(recs), self.encoders.submit(encode_span, span, self.lz4_level))

    def durable(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is fsynced in the LOG (False: timed out)."""
        ev = threading.Event()
        self.queue.put(Barrier(ev), 0)
        return ev.wait(timeout)

    def fence(self) -> threading.Event:
        """An event set once everything queued so far is written or dropped."""
        ev = threading.Event()
        self.queue.put(Fence(ev), 0)
        return ev

    def close(self, timeout: float = 60.0) -> None:
        """Close the LOG after everything queued so far."""
        ev = threading.Event()
        self.queue.put(Close(ev), 0)
        ev.wait(timeout)

    def shutdown(self) -> None:
        self.encoders.shutdown(wait=True)

    # ------------------------------------------------------------------ the thread
    def run(self) -> None:
        log = self.log
        while True:
            item = self.queue.get(timeout=0.1)
            try:
                if item is None:
                    log.maybe_sync()
                elif isinstance(item, Span):
                    self._write(item)
                elif isinstance(item, Barrier):
                    log.sync()
                    item.done.set()
                elif isinstance(item, Fence):  # resync checkpoints: everything before is handled
                    item.done.set()
                else:
                    log.close()
                    item.done.set()
                    return
            except Exception as e:
                self.fail(f"writing the LOG failed: {e}")
                if isinstance(item, (Barrier, Close)):
                    item.done.set()
                if isinstance(item, Close):
                    return

    def _write(self, item: Span) -> None:
        log = self.log
        try:
            body = item.body.result()
            if not self._room_for(item.span, item.nrec, body.stored_len):
                return
            try:
                log.append(item.span, item.nrec, item.mono, item.real, body=body)
            except LogFull as e:  # ENOSPC: drop, count, go on (resync repairs)
                self._log_enospc(item.span, item.nrec, e)
                return
        finally:
            if item.written is not None:  # its ring space may go back now
                item.written.set_result(None)
        self._enospc = False
        log.maybe_sync()

    def _log_enospc(self, span, nrec: int, e: Exception) -> None:
        """A span the LOG's file system had no space for: counted with the retention drops
        (dropped), said once per episode; the resync thread repairs the loss."""
        self.dropped.add(nrec, memoryview(span).nbytes)
        if not self._enospc:
            self._enospc = True
            self.say(f"WARNING: {e}: records are DROPPED and counted as lost until there is "
                     f"space again (then the regions written meanwhile are read again)"
                     f"{self.enospc_hint}")

    def _room_for(self, span, nrec: int, body_len: int) -> bool:
        """Retention (--log-max-mb, tracer/shipper.py): may this span be appended? When the
        LOG is full the span is dropped and counted (dropped); once there is room again an
        R_LOSS record {"cause": "log full", ...} notes what was dropped."""
        if self.shipper is None:
            return True
        note = None
        if self._full_note is not None:
            n = self._full_note
            note = record.json_record(record.R_LOSS, {
                "cause": "log full", "log_full_spans": n[0], "log_full_records": n[1],
                "log_full_bytes": n[2]}, seq=self.seq.next())
        extra = len(note) + 256 if note else 0
        if not self.shipper.room_for(body_len + FRAME_SIZE + extra):
            nbytes = memoryview(span).nbytes
            self.dropped.add(nrec, nbytes)
            n = self._full_note = self._full_note or [0, 0, 0]
            n[0] += 1
            n[1] += nrec
            n[2] += nbytes
            return False
        if note is not None:
            self.log.append(note, 1, mono_ns(), time.time_ns())
            self._full_note = None
        return True
