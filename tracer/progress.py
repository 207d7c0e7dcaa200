"""Progress of a long device read (the baseline, a resync): percent, rate and ETA, said in
the log every LOG_EVERY seconds, rewritten in place every second on a terminal, and kept
for `blkrewind status` (Tracer.status()["progress"])."""
from __future__ import annotations

import os
import threading
import time


def _every() -> float:
    """Seconds between progress lines in the log: $BLKREWIND_PROGRESS_S, else 10."""
    try:
        v = float(os.environ.get("BLKREWIND_PROGRESS_S", "10"))
    except ValueError:
        return 10.0
    return v if v > 0 else 10.0


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n < (10 << 30) else f"{n / (1 << 30):.1f} GiB"


def _eta(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class ReadProgress:
    """`what` ("baseline", "resync") of `path`: `total` bytes to read. add(n) from any
    thread; say(line) writes a log line; tty(line | None) rewrites the terminal's status
    line (None: clear it)."""

    TTY_EVERY = 1.0

    def __init__(self, what: str, path: str, total: int, say, tty=None):
        self.what, self.path, self.total = what, path, max(0, int(total))
        self.say, self.tty = say, tty
        self.done = 0
        self.t0 = time.monotonic()
        self.every = _every()
        self._next_log = self.t0 + self.every
        self._next_tty = self.t0 + self.TTY_EVERY
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            log = now >= self._next_log
            tty = self.tty is not None and now >= self._next_tty
            if log:
                self._next_log = now + self.every
            if tty:
                self._next_tty = now + self.TTY_EVERY
        if log or tty:
            line = self.line()
            if tty:
                self.tty(line)
            if log:
                self.say(line)

    def status(self) -> dict:
        dt = time.monotonic() - self.t0
        done = min(self.done, self.total) if self.total else self.done
        rate = done / dt if dt > 0 else None
        eta = (self.total - done) / rate if rate and self.total else None
        return {"what": self.what, "device": self.path, "done_bytes": done,
                "total_bytes": self.total,
                "percent": round(100.0 * done / self.total, 1) if self.total else None,
                "rate_Bps": None if rate is None else round(rate), "eta_s":
                None if eta is None else round(eta, 1), "elapsed_s": round(dt, 1)}

    def line(self) -> str:
        st = self.status()
        pct = "?" if st["percent"] is None else f"{st['percent']:.0f}%"
        rate = "?" if st["rate_Bps"] is None else f"{st['rate_Bps'] / (1 << 20):.0f} MiB/s"
        return (f"{self.what} progress {self.path}: {pct} ({_mib(st['done_bytes'])} of "
                f"{_mib(self.total)}) at {rate}, ETA {_eta(st['eta_s'])}")

    def finish(self) -> None:
        if self.tty is not None:
            self.tty(None)
