"""The shipper's state (tracer/shipper.py): what the replayer acknowledged, what to send next,
and the LOG's retention. Connections (tracer/shipconn.py) take work from it and report back.

Per segment: the frame boundaries (frame i is bytes [bounds[i], bounds[i+1]) of the segment
file; frames are contiguous), sealed, and three disjoint frame-range sets: acked, queued (to
send), in flight (sent on a connection, not acked yet). A connection that fails puts its
in-flight ranges back in the queue (requeue).

Retention (room_for): the LOG directory may hold log_max_bytes of segments. To make room the
oldest segments that are sealed and fully acked are deleted (never the segment being written,
never an unacked frame). When that is not enough the LOG is FULL: room_for() returns False,
the caller drops the span (and counts it as lost); said loudly once per episode.

`LOG/shipped.json` (atomically replaced by save_cache_locked): per segment its acked ranges.
A cache for retention after a restart (before the server answered); LACKS is the truth.

One lock guards everything here; frame_written and room_for hold it briefly (room_for may
unlink segment files, or retire them as spares when `recycle` is set).
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from blkrewind.formats import logframe
from blkrewind.formats.ranges import Ranges
from blkrewind.tracer import log as _log

SHIPPED_JSON = "shipped.json"
RESERVE_BYTES = 1 << 20        # small spans (control records) may use this much past the limit
SMALL_SPAN = 64 << 10
LAG_SAMPLES = 4096             # per-frame shipping lags kept for status() percentiles
REAL_NS = struct.Struct("<Q")
SEG_ID = struct.Struct("<I")


class FullGate:
    """The LOG-full rule of room_for, as pure arithmetic. Not full: a span fits when the LOG
    stays within the limit. Full (an episode began at LOG size full_level): appending resumes
    only when the span fits below a low-water mark AND retention freed a low-water gap since
    the episode began, so a refused big span followed by small ones that would fit is one
    episode, not a flapping series. Small spans (control records: R_END, marks, loss notes)
    may always use RESERVE_BYTES past the limit."""

    def __init__(self, limit: int, full_level: int | None = None):
        gap = max(limit // 8, 4 * SMALL_SPAN)
        self.limit = limit
        self.target = limit if full_level is None else min(limit, full_level) - gap

    def need(self, level: int, nbytes: int) -> int:
        """Bytes retention should free for this span to fit."""
        return level + nbytes - self.target

    def admit(self, level: int, nbytes: int) -> tuple[bool, bool]:
        """(fits, ok): fits below the target; ok: may be appended (fits, or a small span
        within the reserve)."""
        fits = level + nbytes <= self.target
        return fits, fits or (nbytes <= SMALL_SPAN and level + nbytes <= self.limit + RESERVE_BYTES)

@dataclass
class Seg:
    session: str
    segno: int
    path: str
    bounds: list = field(default_factory=list)   # frame i: [bounds[i], bounds[i+1])
    sealed: bool = False
    seg_id: int | None = None
    live: bool = False                              # written by this tracer, not sealed yet
    acked: Ranges = field(default_factory=Ranges)
    queued: Ranges = field(default_factory=Ranges)
    inflight: Ranges = field(default_factory=Ranges)
    fd: int | None = None
    gone: bool = False                              # deleted by retention

    @property
    def key(self) -> tuple[str, int]:
        return self.session, self.segno

    @property
    def n(self) -> int:
        return max(0, len(self.bounds) - 1)

    @property
    def size(self) -> int:
        return self.bounds[-1] if self.bounds else 0

    def nbytes(self, a: int, e: int) -> int:
        return self.bounds[e] - self.bounds[a] if e > a else 0

    def range_bytes(self, rs: Ranges) -> int:
        n = self.n
        return sum(self.bounds[min(e, n)] - self.bounds[min(a, n)] for a, e in rs.r)

    def fully_acked(self) -> bool:
        return self.sealed and self.n > 0 and self.acked.covers(0, self.n)

    def name(self) -> str:
        return f"{self.session}.{self.segno:06d}"


@dataclass
class Msg:
    id: int
    seg: Seg
    first: int
    end: int
    nbytes: int
    real_ns: list
    sent_mono: float = 0.0


class ShipState:
    """The shipping state of one LOG directory. say: one-line messages for the user; wake:
    tells the connections there is work; connected: is a connection to addr up (for the
    LOG-full message)."""

    def __init__(self, log_dir: str, addr: str, log_max_bytes: int, *,
                 say: Callable[[str], None], wake: Callable[[], None],
                 connected: Callable[[], bool]):
        self.log_dir = log_dir
        self.addr = addr
        self.log_max_bytes = log_max_bytes
        self.say = say
        self.wake = wake
        self.connected = connected
        self.lock = threading.Lock()
        self.segs: dict[tuple[str, int], Seg] = {}
        self.ready: set[tuple[str, int]] = set()       # segments with queued frames
        self.log_bytes = 0
        self.next_id = 1                                # of the next FRAMES message
        self.bytes_sent = 0
        self.frames_sent = 0
        self.messages_acked = 0
        self.segments_deleted = 0
        # retention retires segments as spares (tracer/log.py retire_segment) instead of
        # deleting them: set by the tracer when its LogWriter reuses spares (log_mode prealloc
        # or direct). At most log.SPARES spares exist, outside log_bytes.
        self.recycle = False
        self.last_error: str | None = None
        self.server: str | None = None                  # the replayer's name (WELCOME)
        self.full = False
        self.full_level = 0            # LOG bytes when the current LOG-full episode began
        self.full_episodes = 0
        self.full_refusals = 0
        self.lags: deque = deque(maxlen=LAG_SAMPLES)
        self.dirty_cache = False       # shipped.json is behind

    def load(self) -> None:
        """Read the LOG directory (every session's segments) and shipped.json."""
        cache = self.load_cache()
        inv = _log.inventory(self.log_dir, offsets=True)
        with self.lock:
            for it in inv:
                key = (it["session"], it["segno"])
                if key in self.segs:
                    continue
                seg = Seg(it["session"], it["segno"], it["path"], bounds=it["offsets"],
                          sealed=it["sealed"], seg_id=it["seg_id"])
                if it.get("corrupt"):
                    self.say(f"shipping: {it['corrupt']}: only the {seg.n} frames before it "
                             f"can be shipped")
                c = cache.get(f"{seg.session}.{seg.segno}")
                if c and c.get("seg_id") == seg.seg_id:
                    for a, e in c.get("acked", ()):
                        seg.acked.add(max(0, int(a)), min(int(e), seg.n))
                self.segs[key] = seg
                self.log_bytes += it["size"]

    def error(self, msg: str) -> None:
        self.last_error = msg
        self.say(msg)

    def sent(self, msg: Msg) -> None:
        """A FRAMES message went out."""
        with self.lock:
            self.bytes_sent += msg.nbytes
            self.frames_sent += msg.end - msg.first

    def close_files(self) -> None:
        """Save shipped.json and close every segment's fd (the shipper stops)."""
        with self.lock:
            self.save_cache_locked()
            for seg in self.segs.values():
                close_fd(seg)

    def save_if_dirty(self) -> None:
        with self.lock:
            if self.dirty_cache:
                self.save_cache_locked()

    def frame_written(self, session: str, segno: int, frame_no: int, offset: int,
                      size: int) -> None:
        """LogWriter's on_frame: a frame was appended (HEADER, DATA or SEAL)."""
        try:
            with self.lock:
                key = (session, segno)
                seg = self.segs.get(key)
                if seg is None or frame_no == 0:
                    if seg is not None:  # a new segment under an old name: forget the old
                        self.forget_locked(seg)
                    seg = Seg(session, segno,
                               os.path.join(self.log_dir, logframe.segment_name(session, segno)),
                               live=True)
                    self.segs[key] = seg
                if frame_no != seg.n or (seg.bounds and offset != seg.bounds[-1]):
                    raise ValueError(f"frame {frame_no} at {offset} does not follow "
                                     f"frame {seg.n - 1} ending at {seg.size}")
                if frame_no == 0:
                    seg.bounds = [0, size]
                else:
                    seg.bounds.append(offset + size)
                if frame_no > 0 and size == logframe.FRAME_SIZE:
                    seg.sealed, seg.live = True, False
                seg.queued.add(frame_no, frame_no + 1)
                self.ready.add(key)
                self.log_bytes += size
            self.wake()
        except Exception as e:  # never break the LOG writer
            self.error(f"shipping: cannot queue frame {frame_no} of {session}.{segno}: {e}")

    def room_for(self, nbytes: int, *, probe: bool = False) -> bool:
        """May the LOG grow by nbytes? Deletes the oldest sealed, fully acked segments as
        needed. False: the LOG is full (the caller drops the span and counts it lost).
        probe: only asking (e.g. before starting a resync of nbytes): makes room the same
        way, but does not start or end a LOG-full episode."""
        limit = self.log_max_bytes
        with self.lock:
            was_full = self.full
            gate = FullGate(limit, self.full_level if was_full and not probe else None)
            need = gate.need(self.log_bytes, nbytes)
            if need > 0:
                self.retain_locked(need)
            fits, ok = gate.admit(self.log_bytes, nbytes)
            if probe:
                return ok
            if not ok:
                self.full_refusals += 1
            self.full = not fits and (was_full or not ok)
            log_bytes, unacked = self.log_bytes, None
            if not ok and not was_full:
                self.full_episodes += 1
                self.full_level = self.log_bytes
                unacked = sum(s.n - s.acked.intersection(0, s.n).count()
                              for s in self.segs.values())
        if not ok and not was_full:
            self.say(f"LOG FULL: {self.log_dir} holds {log_bytes / 1e6:.0f} MB of "
                     f"--log-max-mb {limit / 1e6:.0f} MB and nothing can be deleted "
                     f"({unacked} frames not yet acknowledged by {self.addr}, which is "
                     f"{'connected' if self.connected() else 'not reachable'}): new records are "
                     f"DROPPED and counted as lost until the replayer catches up")
        elif was_full and not self.full:
            self.say(f"LOG has room again ({log_bytes / 1e6:.0f} MB of "
                     f"{limit / 1e6:.0f} MB): recording resumes")
        return ok

    def retain_locked(self, need: int) -> None:
        """Delete the oldest sealed, fully acked segments until need bytes are freed."""
        for key in sorted(self.segs):
            if need <= 0:
                return
            seg = self.segs[key]
            if seg.live or not seg.fully_acked() or key in self.ready or seg.inflight:
                continue
            try:
                size = os.stat(seg.path).st_size
                if self.recycle:  # kept as a spare the writer reuses: pages it has already
                    _log.retire_segment(seg.path)
                else:
                    os.unlink(seg.path)
            except FileNotFoundError:
                size = seg.size
            except OSError as e:
                self.error(f"retention: cannot delete {seg.path}: {e.strerror}")
                continue
            self.forget_locked(seg)
            self.log_bytes -= size
            need -= size
            self.segments_deleted += 1
            self.dirty_cache = True

    def forget_locked(self, seg: Seg) -> None:
        seg.gone = True
        close_fd(seg)
        self.segs.pop(seg.key, None)
        self.ready.discard(seg.key)

    def unacked(self) -> tuple[int, int]:
        with self.lock:
            frames = nbytes = 0
            for s in self.segs.values():
                un = Ranges([(0, s.n)]).difference(s.acked)
                frames += un.count()
                nbytes += s.range_bytes(un)
            return frames, nbytes

    def status(self) -> dict:
        """The state's part of Shipper.status()."""
        now_real = time.time_ns()
        oldest = None
        with self.lock:
            fa = fu = ba = bu = 0
            first_unacked = None
            for key in sorted(self.segs):
                s = self.segs[key]
                acked = s.acked.intersection(0, s.n)
                un = Ranges([(0, s.n)]).difference(acked)
                fa += acked.count()
                ba += s.range_bytes(acked)
                fu += un.count()
                bu += s.range_bytes(un)
                f0 = un.first()   # None: un is empty
                if first_unacked is None and f0 is not None:
                    first_unacked = (s, f0)
            if first_unacked is not None:
                s, no = first_unacked
                oldest = self.frame_real_ns(s, no)
            lags = sorted(self.lags)
            st = {
                "bytes_sent": self.bytes_sent, "frames_sent": self.frames_sent,
                "frames_acked": fa, "bytes_acked": ba, "frames_unacked": fu,
                "bytes_unacked": bu,
                "oldest_unacked_age_s": (round(max(0, now_real - oldest) / 1e9, 3)
                                         if oldest else 0.0),
                "lag_p50_s": _pct(lags, 0.5), "lag_p99_s": _pct(lags, 0.99),
                "lag_max_s": lags[-1] if lags else None, "lag_samples": len(lags),
                "log_bytes": self.log_bytes, "log_max_bytes": self.log_max_bytes,
                "log_full": self.full, "log_full_episodes": self.full_episodes,
                "log_full_refusals": self.full_refusals,
                "segments": len(self.segs), "segments_deleted": self.segments_deleted,
                "last_error": self.last_error,
            }
        return st

    def frame_real_ns(self, seg: Seg, no: int) -> int | None:
        """real_ns of a frame (from its LOG header); for the oldest unacked frame."""
        try:
            fd = self.fd_locked(seg)
            h = os.pread(fd, logframe.FRAME_SIZE, seg.bounds[no])
        except (OSError, IndexError):
            return None
        return REAL_NS.unpack_from(h, logframe.REAL_NS_AT)[0] if len(h) == logframe.FRAME_SIZE else None

    def fd_locked(self, seg: Seg) -> int:
        if seg.fd is None:
            seg.fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        return seg.fd

    def take(self, max_bytes: int):
        """The next range to send: (msg, fd) or None. Oldest segments first; frames
        contiguous, <= max_bytes (a larger frame goes alone)."""
        with self.lock:
            while self.ready:
                key = min(self.ready)
                seg = self.segs.get(key)
                if seg is None or not seg.queued:
                    self.ready.discard(key)
                    continue
                a, e = seg.queued.r[0]
                e = min(e, seg.n)
                if a >= e:  # queued past what exists (cannot happen): drop it
                    seg.queued.remove(a, seg.queued.r[0][1])
                    continue
                b = a + 1
                while b < e and seg.bounds[b + 1] - seg.bounds[a] <= max_bytes:
                    b += 1
                try:
                    # a copy: the segment's own fd may be closed (acked, deleted) meanwhile
                    fd = os.dup(self.fd_locked(seg))
                except OSError as ex:
                    self.error(f"shipping: cannot open {seg.path}: {ex.strerror}")
                    seg.queued.remove(a, seg.queued.r[0][1])
                    continue
                seg.queued.remove(a, b)
                if not seg.queued:
                    self.ready.discard(key)
                seg.inflight.add(a, b)
                msg = Msg(self.next_id, seg, a, b, seg.nbytes(a, b), [])
                self.next_id += 1
                return msg, fd, seg.bounds[a]
        return None

    def requeue(self, msgs) -> None:
        with self.lock:
            for m in msgs:
                seg = m.seg
                seg.inflight.remove(m.first, m.end)
                if seg.gone:
                    continue
                todo = Ranges([(m.first, m.end)]).difference(seg.acked)
                if todo:
                    seg.queued.update(todo)
                    self.ready.add(seg.key)
        self.wake()

    def acked(self, m: Msg | None, d: dict) -> None:
        now = time.time_ns()
        with self.lock:
            if m is not None:
                seg, a, e = m.seg, m.first, m.end
                seg.inflight.remove(a, e)
                self.messages_acked += 1
                for r in m.real_ns:
                    self.lags.append(round((now - r) / 1e9, 4))
            else:
                got = self.segs.get((d["session"], d["segno"]))
                if got is None:
                    return
                seg = got
                a, e = d["first"], min(d["end"], seg.n)
            seg.acked.add(a, e)
            seg.queued.remove(a, e)
            self.dirty_cache = True
            if seg.fully_acked():
                close_fd(seg)

    @staticmethod
    def lacked(segments: list[dict]) -> dict[tuple[str, int], Ranges]:
        lacked: dict[tuple[str, int], Ranges] = {}
        for s in segments:
            rs = lacked.setdefault((s["session"], s["segno"]), Ranges())
            for a, e in s["ranges"]:
                rs.add(a, e)
        return lacked

    def held(self, inventory: dict, segments: list[dict]) -> None:
        """inventory: {key: n} of an INVENTORY page, segments: its LACKS answer. Every
        inventoried frame not lacked is held by the server: acked."""
        lacked = self.lacked(segments)
        with self.lock:
            for key, n in inventory.items():
                seg = self.segs.get(key)
                if seg is None:
                    continue
                held = Ranges([(0, min(n, seg.n))]).difference(lacked.get(key, Ranges()))
                seg.acked.update(held)
                for a, e in held.r:
                    seg.queued.remove(a, e)
                if seg.fully_acked():
                    close_fd(seg)
                self.dirty_cache = True

    def lacks(self, segments: list[dict]) -> None:
        """Apply a LACKS message (an INVENTORY answer or unsolicited): queue the ranges
        (those not in flight), they are not acked."""
        lost = []
        with self.lock:
            lacked = self.lacked(segments)
            for key, rs in lacked.items():
                seg = self.segs.get(key)
                if seg is None:
                    lost.append(f"{key[0]}.{key[1]:06d} (not in the LOG)")
                    continue
                n = seg.n
                beyond = rs.difference(Ranges([(0, n)]))
                if beyond:
                    lost.append(f"{seg.name()} frames {beyond.as_list()} (not in the LOG)")
                rs = rs.intersection(0, n)
                for a, e in rs.r:
                    seg.acked.remove(a, e)
                todo = rs.difference(seg.inflight)
                if todo:
                    seg.queued.update(todo)
                    self.ready.add(key)
                self.dirty_cache = True
        if lost:
            self.error(f"shipping: the replayer lacks frames this LOG no longer holds: "
                        f"{', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}")
        self.wake()

    def inventory_snapshot(self) -> tuple[list[dict], dict]:
        with self.lock:
            items, snap = [], {}
            for key in sorted(self.segs):
                s = self.segs[key]
                if s.n == 0:
                    continue
                if s.seg_id is None:
                    try:
                        s.seg_id = SEG_ID.unpack_from(
                            os.pread(self.fd_locked(s), logframe.FRAME_SIZE, 0), logframe.SEG_ID_AT)[0]
                    except (OSError, struct.error):
                        continue
                items.append({"session": s.session, "segno": s.segno, "seg_id": s.seg_id,
                              "frames": s.n, "sealed": s.sealed})
                snap[key] = s.n
            return items, snap

    def load_cache(self) -> dict:
        p = os.path.join(self.log_dir, SHIPPED_JSON)
        try:
            with open(p) as f:
                obj = json.load(f)
            return {f"{s['session']}.{int(s['segno'])}": s for s in obj["segments"]
                    if isinstance(s, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.say(f"shipping: ignoring {p} ({e}); the replayer's answer decides")
            return {}

    def save_cache_locked(self) -> None:
        self.dirty_cache = False
        segs = [{"session": s.session, "segno": s.segno, "seg_id": s.seg_id,
                 "frames": s.n, "sealed": s.sealed, "acked": s.acked.as_list()}
                for _, s in sorted(self.segs.items()) if s.seg_id is not None]
        p = os.path.join(self.log_dir, SHIPPED_JSON)
        tmp = p + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"version": 1, "server": self.server, "addr": self.addr,
                           "saved_ns": time.time_ns(), "segments": segs}, f,
                          separators=(",", ":"))
            os.replace(tmp, p)
        except OSError as e:
            self.dirty_cache = True
            self.last_error = f"cannot write {p}: {e.strerror}"


def close_fd(seg: Seg) -> None:
    if seg.fd is not None:
        try:
            os.close(seg.fd)
        except OSError:
            pass
        seg.fd = None


def _pct(sorted_vals: list, q: float):
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]
