"""The shipper: streams the LOG to a replayer (`blkrewind serve`), docs/protocol.md.

The LOG writer reports every frame it writes (`frame_written`, HEADER / DATA / SEAL); the
shipper queues it and its connection threads send it in FRAMES messages. The server ACKs a
range once it is durable in its store. On every (re)connect, connection 0 sends INVENTORY
(every segment of the LOG directory, every session) and the server's LACKS answer says which
frames it does not hold: those are queued, everything else of the inventory counts as acked.
LACKS may also come unsolicited (damage found on the server): those ranges are queued again.

State, per segment: the frame boundaries (frame i is bytes [bounds[i], bounds[i+1]) of the
segment file; frames are contiguous), sealed, and three disjoint frame-range sets: acked,
queued (to send), in flight (sent on a connection, not acked yet). A connection that fails
puts its in-flight ranges back in the queue.

Retention (`room_for`): the LOG directory may hold log_max_bytes of segments. To make room
the oldest segments that are sealed and fully acked are deleted (never the segment being
written, never an unacked frame). When that is not enough the LOG is FULL: room_for() returns
False, the caller drops the span (and counts it as lost); said loudly once per episode.

`LOG/shipped.json` (atomically replaced, at most once a second): per segment its acked ranges.
A cache for retention after a restart (before the server answered); LACKS is the truth.

Threads: one per connection (sends, reads ACK / LACKS / PONG / ERROR, PINGs every 15 s,
STATUS every second on connection 0) and a housekeeper (shipped.json). Nothing here blocks
the LOG writer: frame_written and room_for take one lock for microseconds (room_for may
unlink segment files).
"""
from __future__ import annotations

import json
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from blkrewind import __version__
from blkrewind.errors import UserError
from blkrewind.formats import logframe, wire
from blkrewind.formats.ranges import Ranges
from tracer import log as _log

SHIPPED_JSON = "shipped.json"
RESERVE_BYTES = 1 << 20        # small spans (control records) may use this much past the limit
SMALL_SPAN = 64 << 10
DEAD_AFTER = 30.0              # no PONG/ACK for this long while waiting for one: drop
CONNECT_TIMEOUT = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0
STATUS_EVERY = 1.0
SAVE_EVERY = 1.0
INVENTORY_PAGE = 5000          # segments per INVENTORY message (well under MAX_JSON_LIST)
LAG_SAMPLES = 4096             # per-frame shipping lags kept for status() percentiles
_REAL_NS = struct.Struct("<Q")
_SEG_ID = struct.Struct("<I")
_U32 = struct.Struct("<I")


# ------------------------------------------------------------------------------ state

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
class _Seg:
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
class _Msg:
    id: int
    seg: _Seg
    first: int
    end: int
    nbytes: int
    real_ns: list
    sent_mono: float = 0.0


class ShipperStopped(Exception):
    pass


@dataclass
class _InventoryRound:
    pages: list = field(default_factory=list)     # {key: frames} per INVENTORY page sent
    answers: list = field(default_factory=list)   # LACKS sequences received since
    ping: int | None = None                       # the fencing PING's t, until its PONG
    attempts: int = 0


class Shipper:
    """Ships the LOG in log_dir to addr ("host:port"). See the module docstring.

    tls_dir: a host TLS directory (tlsconf) or None with insecure=True (plain TCP; the
    address must be loopback/private -- checked here). host: this tracer's host name (sent in
    HELLO; the server checks it against the certificate). say: one-line messages for the user.
    extra_status: a callable returning the tracer's own stats, sent in STATUS."""

    def __init__(self, log_dir, addr: str, *, tls_dir=None, insecure: bool = False, host: str,
                 conns: int = 2, log_max_bytes: int | None = None, say=print,
                 extra_status=None, dead_after: float = DEAD_AFTER):
        from blkrewind import tlsconf
        self.dead_after = dead_after
        self.ping_every = min(wire.PING_EVERY, dead_after / 2)   # a silent peer is seen in time
        self.log_dir = os.fspath(log_dir)
        self.addr = addr
        self.host_addr, self.port = tlsconf.parse_addr(addr)
        if tls_dir is None:
            if not insecure:
                raise UserError("--ship needs --tls DIR (or --insecure for a loopback/private "
                                "address)")
            tlsconf.check_insecure_addr(self.host_addr)
            self._ctx = None
        else:
            self._ctx = tlsconf.client_context(tls_dir)
        if not 1 <= conns <= 64:
            raise UserError(f"--ship-conns must be 1..64, not {conns}")
        self.host, self.nconns, self.say = host, conns, say
        self.log_max_bytes = log_max_bytes if log_max_bytes is not None \
            else default_log_max(self.log_dir)
        self.extra_status = extra_status
        self._lock = threading.Lock()
        self._segs: dict[tuple[str, int], _Seg] = {}
        self._ready: set[tuple[str, int]] = set()       # segments with queued frames
        self._log_bytes = 0
        self._next_id = 1
        self._closing = threading.Event()    # stop sending, close connections
        self._wakers: list[int] = []         # an eventfd per connection
        self._threads: list[threading.Thread] = []
        self._conns_up = 0
        self._conn_ever = [False] * conns
        self._outage_said = False
        self.reconnects = 0
        self.bytes_sent = 0
        self.frames_sent = 0
        self.messages_acked = 0
        self.segments_deleted = 0
        self.last_error: str | None = None
        self.server: str | None = None
        self._full = False
        self._full_level = 0           # LOG bytes when the current LOG-full episode began
        self.full_episodes = 0
        self.full_refusals = 0
        self._lags: deque = deque(maxlen=LAG_SAMPLES)
        self._last_ack_real = 0
        self._dirty_cache = False
        self._cache: dict = {}
        self._started = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Read the LOG directory (every session's segments) and shipped.json, start the
        connection threads and the housekeeper. Call before the LOG writer writes (its frames
        come through frame_written)."""
        cache = self._load_cache()
        inv = _log.inventory(self.log_dir, offsets=True)
        with self._lock:
            for it in inv:
                key = (it["session"], it["segno"])
                if key in self._segs:
                    continue
                seg = _Seg(it["session"], it["segno"], it["path"], bounds=it["offsets"],
                           sealed=it["sealed"], seg_id=it["seg_id"])
                if it.get("corrupt"):
                    self.say(f"shipping: {it['corrupt']}: only the {seg.n} frames before it "
                             f"can be shipped")
                c = cache.get(f"{seg.session}.{seg.segno}")
                if c and c.get("seg_id") == seg.seg_id:
                    for a, e in c.get("acked", ()):
                        seg.acked.add(max(0, int(a)), min(int(e), seg.n))
                self._segs[key] = seg
                self._log_bytes += it["size"]
        for k in range(self.nconns):
            self._wakers.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        for k in range(self.nconns):
            t = threading.Thread(target=self._conn_main, args=(k,), name=f"ship-{k}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._housekeeper, name="ship-house", daemon=True)
        t.start()
        self._threads.append(t)
        self._started = True

    def stop(self, timeout: float = 30.0) -> dict:
        """Wait up to timeout seconds for every frame to be acked (call after the LOG writer
        closed: the SEAL is the last frame), then close the connections. Returns status()."""
        deadline = time.monotonic() + max(0.0, timeout)
        if not self._started:
            return self.status()
        while time.monotonic() < deadline and self._unacked()[0]:
            time.sleep(0.05)
        st = self.status()
        self._closing.set()
        self._wake()
        for t in self._threads:
            t.join(5)
        with self._lock:
            self._save_cache_locked()
            for seg in self._segs.values():
                _close_fd(seg)
        for fd in self._wakers:
            os.close(fd)
        self._wakers = []
        if st["frames_unacked"]:
            self.say(f"shipping stopped with {st['frames_unacked']} frames "
                     f"({st['bytes_unacked'] / 1e6:.1f} MB) not acknowledged by {self.addr}: "
                     f"they stay in the LOG and are shipped by the next `trace --ship` on it")
        else:
            self.say(f"shipping: everything acknowledged by {self.addr} "
                     f"({st['bytes_acked'] / 1e6:.1f} MB in the LOG)")
        return st

    # ------------------------------------------------------------------ the LOG writer's side
    def frame_written(self, session: str, segno: int, frame_no: int, offset: int,
                      size: int) -> None:
        """LogWriter's on_frame: a frame was appended (HEADER, DATA or SEAL)."""
        try:
            with self._lock:
                key = (session, segno)
                seg = self._segs.get(key)
                if seg is None or frame_no == 0:
                    if seg is not None:  # a new segment under an old name: forget the old
                        self._forget_locked(seg)
                    seg = _Seg(session, segno,
                               os.path.join(self.log_dir, logframe.segment_name(session, segno)),
                               live=True)
                    self._segs[key] = seg
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
                self._ready.add(key)
                self._log_bytes += size
            self._wake()
        except Exception as e:  # never break the LOG writer
            self._error(f"shipping: cannot queue frame {frame_no} of {session}.{segno}: {e}")

    def room_for(self, nbytes: int, *, probe: bool = False) -> bool:
        """May the LOG grow by nbytes? Deletes the oldest sealed, fully acked segments as
        needed. False: the LOG is full (the caller drops the span and counts it lost).
        probe: only asking (e.g. before starting a resync of nbytes): makes room the same
        way, but does not start or end a LOG-full episode."""
        limit = self.log_max_bytes
        with self._lock:
            was_full = self._full
            gate = FullGate(limit, self._full_level if was_full and not probe else None)
            need = gate.need(self._log_bytes, nbytes)
            if need > 0:
                self._retain_locked(need)
            fits, ok = gate.admit(self._log_bytes, nbytes)
            if probe:
                return ok
            if not ok:
                self.full_refusals += 1
            self._full = not fits and (was_full or not ok)
            log_bytes, unacked = self._log_bytes, None
            if not ok and not was_full:
                self.full_episodes += 1
                self._full_level = self._log_bytes
                unacked = sum(s.n - s.acked.intersection(0, s.n).count()
                              for s in self._segs.values())
        if not ok and not was_full:
            self.say(f"LOG FULL: {self.log_dir} holds {log_bytes / 1e6:.0f} MB of "
                     f"--log-max-mb {limit / 1e6:.0f} MB and nothing can be deleted "
                     f"({unacked} frames not yet acknowledged by {self.addr}, which is "
                     f"{'connected' if self._conns_up else 'not reachable'}): new records are "
                     f"DROPPED and counted as lost until the replayer catches up")
        elif was_full and not self._full:
            self.say(f"LOG has room again ({log_bytes / 1e6:.0f} MB of "
                     f"{limit / 1e6:.0f} MB): recording resumes")
        return ok

    @property
    def full(self) -> bool:
        return self._full

    def _retain_locked(self, need: int) -> None:
        """Delete the oldest sealed, fully acked segments until need bytes are freed."""
        for key in sorted(self._segs):
            if need <= 0:
                return
            seg = self._segs[key]
            if seg.live or not seg.fully_acked() or key in self._ready or seg.inflight:
                continue
            try:
                size = os.stat(seg.path).st_size
                os.unlink(seg.path)
            except FileNotFoundError:
                size = seg.size
            except OSError as e:
                self._error(f"retention: cannot delete {seg.path}: {e.strerror}")
                continue
            self._forget_locked(seg)
            self._log_bytes -= size
            need -= size
            self.segments_deleted += 1
            self._dirty_cache = True

    def _forget_locked(self, seg: _Seg) -> None:
        seg.gone = True
        _close_fd(seg)
        self._segs.pop(seg.key, None)
        self._ready.discard(seg.key)

    # ------------------------------------------------------------------ status
    def _unacked(self) -> tuple[int, int]:
        with self._lock:
            frames = nbytes = 0
            for s in self._segs.values():
                un = Ranges([(0, s.n)]).difference(s.acked)
                frames += un.count()
                nbytes += s.range_bytes(un)
            return frames, nbytes

    def status(self) -> dict:
        now_real = time.time_ns()
        oldest = None
        with self._lock:
            fa = fu = ba = bu = 0
            first_unacked = None
            for key in sorted(self._segs):
                s = self._segs[key]
                acked = s.acked.intersection(0, s.n)
                un = Ranges([(0, s.n)]).difference(acked)
                fa += acked.count()
                ba += s.range_bytes(acked)
                fu += un.count()
                bu += s.range_bytes(un)
                if first_unacked is None and un:
                    first_unacked = (s, un.first())
            if first_unacked is not None:
                s, no = first_unacked
                oldest = self._frame_real_ns(s, no)
            lags = sorted(self._lags)
            st = {
                "ship_to": self.addr, "tls": self._ctx is not None, "host": self.host,
                "server": self.server, "connections": self.nconns,
                "connections_up": self._conns_up, "reconnects": self.reconnects,
                "bytes_sent": self.bytes_sent, "frames_sent": self.frames_sent,
                "frames_acked": fa, "bytes_acked": ba, "frames_unacked": fu,
                "bytes_unacked": bu,
                "oldest_unacked_age_s": (round(max(0, now_real - oldest) / 1e9, 3)
                                         if oldest else 0.0),
                "lag_p50_s": _pct(lags, 0.5), "lag_p99_s": _pct(lags, 0.99),
                "lag_max_s": lags[-1] if lags else None, "lag_samples": len(lags),
                "log_bytes": self._log_bytes, "log_max_bytes": self.log_max_bytes,
                "log_full": self._full, "log_full_episodes": self.full_episodes,
                "log_full_refusals": self.full_refusals,
                "segments": len(self._segs), "segments_deleted": self.segments_deleted,
                "last_error": self.last_error,
            }
        return st

    def _frame_real_ns(self, seg: _Seg, no: int) -> int | None:
        """real_ns of a frame (from its LOG header); for the oldest unacked frame."""
        try:
            fd = self._fd_locked(seg)
            h = os.pread(fd, logframe.FRAME_SIZE, seg.bounds[no])
        except (OSError, IndexError):
            return None
        return _REAL_NS.unpack_from(h, logframe.REAL_NS_AT)[0] if len(h) == logframe.FRAME_SIZE else None

    def _fd_locked(self, seg: _Seg) -> int:
        if seg.fd is None:
            seg.fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        return seg.fd

    # ------------------------------------------------------------------ work queue
    def _take(self, max_bytes: int):
        """The next range to send: (msg, fd) or None. Oldest segments first; frames
        contiguous, <= max_bytes (a larger frame goes alone)."""
        with self._lock:
            while self._ready:
                key = min(self._ready)
                seg = self._segs.get(key)
                if seg is None or not seg.queued:
                    self._ready.discard(key)
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
                    fd = os.dup(self._fd_locked(seg))
                except OSError as ex:
                    self._error(f"shipping: cannot open {seg.path}: {ex.strerror}")
                    seg.queued.remove(a, seg.queued.r[0][1])
                    continue
                seg.queued.remove(a, b)
                if not seg.queued:
                    self._ready.discard(key)
                seg.inflight.add(a, b)
                msg = _Msg(self._next_id, seg, a, b, seg.nbytes(a, b), [])
                self._next_id += 1
                return msg, fd, seg.bounds[a]
        return None

    def _requeue(self, msgs) -> None:
        with self._lock:
            for m in msgs:
                seg = m.seg
                seg.inflight.remove(m.first, m.end)
                if seg.gone:
                    continue
                todo = Ranges([(m.first, m.end)]).difference(seg.acked)
                if todo:
                    seg.queued.update(todo)
                    self._ready.add(seg.key)
        self._wake()

    def _acked(self, m: _Msg | None, d: dict) -> None:
        now = time.time_ns()
        with self._lock:
            if m is not None:
                seg, a, e = m.seg, m.first, m.end
                seg.inflight.remove(a, e)
                self.messages_acked += 1
                for r in m.real_ns:
                    self._lags.append(round((now - r) / 1e9, 4))
            else:
                seg = self._segs.get((d["session"], d["segno"]))
                if seg is None:
                    return
                a, e = d["first"], min(d["end"], seg.n)
            seg.acked.add(a, e)
            seg.queued.remove(a, e)
            self._dirty_cache = True
            if seg.fully_acked():
                _close_fd(seg)

    @staticmethod
    def _lacked(segments: list[dict]) -> dict[tuple[str, int], Ranges]:
        lacked: dict[tuple[str, int], Ranges] = {}
        for s in segments:
            rs = lacked.setdefault((s["session"], s["segno"]), Ranges())
            for a, e in s["ranges"]:
                rs.add(a, e)
        return lacked

    def _held(self, inventory: dict, segments: list[dict]) -> None:
        """inventory: {key: n} of an INVENTORY page, segments: its LACKS answer. Every
        inventoried frame not lacked is held by the server: acked."""
        lacked = self._lacked(segments)
        with self._lock:
            for key, n in inventory.items():
                seg = self._segs.get(key)
                if seg is None:
                    continue
                held = Ranges([(0, min(n, seg.n))]).difference(lacked.get(key, Ranges()))
                seg.acked.update(held)
                for a, e in held.r:
                    seg.queued.remove(a, e)
                if seg.fully_acked():
                    _close_fd(seg)
                self._dirty_cache = True

    def _lacks(self, segments: list[dict]) -> None:
        """Apply a LACKS message (an INVENTORY answer or unsolicited): queue the ranges
        (those not in flight), they are not acked."""
        lost = []
        with self._lock:
            lacked = self._lacked(segments)
            for key, rs in lacked.items():
                seg = self._segs.get(key)
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
                    self._ready.add(key)
                self._dirty_cache = True
        if lost:
            self._error(f"shipping: the replayer lacks frames this LOG no longer holds: "
                        f"{', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''}")
        self._wake()

    def _inventory_snapshot(self) -> tuple[list[dict], dict]:
        with self._lock:
            items, snap = [], {}
            for key in sorted(self._segs):
                s = self._segs[key]
                if s.n == 0:
                    continue
                if s.seg_id is None:
                    try:
                        s.seg_id = _SEG_ID.unpack_from(
                            os.pread(self._fd_locked(s), logframe.FRAME_SIZE, 0), logframe.SEG_ID_AT)[0]
                    except (OSError, struct.error):
                        continue
                items.append({"session": s.session, "segno": s.segno, "seg_id": s.seg_id,
                              "frames": s.n, "sealed": s.sealed})
                snap[key] = s.n
            return items, snap

    # ------------------------------------------------------------------ connections
    def _wake(self) -> None:
        for fd in self._wakers:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    def _error(self, msg: str) -> None:
        self.last_error = msg
        self.say(msg)

    def _conn_main(self, k: int) -> None:
        backoff = BACKOFF_MIN
        while not self._closing.is_set():
            sock = None
            inflight: dict[int, _Msg] = {}
            t_up = None
            try:
                sock = self._connect()
                t_up = time.monotonic()
                self._session(k, sock, inflight)
            except ShipperStopped:
                pass
            except (OSError, ssl.SSLError, wire.ProtocolError, ValueError) as e:
                why = _reason(e)
                if self._closing.is_set():
                    break
                self.last_error = f"connection {k}: {why}"
                if t_up is not None:
                    self.say(f"shipping: connection {k} to {self.addr} lost: {why}")
                elif k == 0 and not self._outage_said:
                    self.say(f"shipping: cannot reach {self.addr}: {why}; retrying "
                             f"(the LOG keeps everything meanwhile)")
                    self._outage_said = True
            finally:
                if t_up is not None:
                    with self._lock:
                        self._conns_up -= 1
                if inflight:
                    self._requeue(list(inflight.values()))
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            if self._closing.is_set():
                break
            if t_up is not None and time.monotonic() - t_up > 10:
                backoff = BACKOFF_MIN
            self._closing.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _connect(self):
        raw = socket.create_connection((self.host_addr, self.port), timeout=CONNECT_TIMEOUT)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._ctx is None:
                return raw
            return self._ctx.wrap_socket(raw, server_hostname=self.host_addr)
        except BaseException:
            raw.close()
            raise

    def _send(self, sock, bufs) -> None:
        sock.settimeout(self.dead_after)
        try:
            wire.send_buffers(sock, bufs)
        except (socket.timeout, TimeoutError):
            raise wire.ProtocolTimeout(f"sending stalled for {self.dead_after:.0f} s") from None

    def _read(self, sock, timeout: float | None = None) -> wire.Message:
        timeout = self.dead_after if timeout is None else timeout
        m = wire.read_message(sock, accept=wire.SERVER_TO_CLIENT, idle_timeout=timeout,
                              msg_timeout=self.dead_after)
        if m is None:
            raise wire.ConnectionClosed("the replayer closed the connection", clean=True)
        if m.mtype == wire.T_ERROR:
            raise wire.ProtocolError(
                f"the replayer refused: {wire.parse_json(m).get('reason', '?')}")
        return m

    def _session(self, k: int, sock, inflight: dict) -> None:
        self._send(sock, wire.encode_json(wire.T_HELLO, {
            "proto": wire.PROTO_VERSION, "host": self.host, "tool": f"blkrewind {__version__}"[:64],
            "conn": k, "conns": self.nconns}))
        while True:
            m = self._read(sock)
            if m.mtype == wire.T_WELCOME:
                break
            if m.mtype == wire.T_PING:
                self._send(sock, wire.encode(wire.T_PONG, [bytes(m.body)]))
            else:
                raise wire.ProtocolError(f"expected WELCOME, got {m.name}")
        w = wire.parse_json(m)
        if w["host"] != self.host:
            raise wire.ProtocolError(f"the replayer knows this tracer as {w['host']!r}, but its "
                                     f"records name {self.host!r} (use the CN of the "
                                     f"certificate as the host name)")
        max_body = min(w["max_body"], wire.MAX_BODY)
        frames_max = max(64 << 10, min(wire.MAX_FRAMES_MSG, max_body - wire.MAX_META - 64))
        with self._lock:
            self._conns_up += 1
            again = self._conn_ever[k]
            if again:
                self.reconnects += 1
            self._conn_ever[k] = True
            self.server = w["server"]
            said = self._outage_said
            self._outage_said = False
        if k == 0 or said:
            self.say(f"shipping: connected to {self.addr} (server {w['server']}, "
                     f"{'TLS' if self._ctx else 'plain TCP'}, connection {k})"
                     + (" again" if again else ""))
        # INVENTORY: the server answers each page with one LACKS sequence (ending with
        # more=false), in order; unsolicited LACKS may come before or between them. A PING
        # right after the pages fences the answers: when its PONG comes and exactly one
        # sequence per page arrived meanwhile, they are the answers, and every inventoried
        # frame they do not list is held by the server (acked). Otherwise (ambiguous) the
        # lacked ranges are still queued and the inventory is sent again later.
        inv = _InventoryRound()
        if k == 0:
            self._send_inventory(sock, inv)
        lacks_acc: list = []

        waker = self._wakers[k]
        buf = bytearray(frames_max)
        now = time.monotonic()
        last_ping = now
        last_status = 0.0
        expect_since: float | None = None   # waiting for a reply since
        ping_out = inv.ping is not None
        if ping_out:
            expect_since = now
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(waker, select.POLLIN)
        while True:
            if self._closing.is_set():
                if k == 0:  # the replayer's `status` shows the final state, not the last tick's
                    try:
                        self._send(sock, wire.encode_json(wire.T_STATUS, self._status_message()))
                    except (OSError, wire.ProtocolError):
                        pass
                raise ShipperStopped()
            # fill the pipeline
            while len(inflight) < wire.MAX_IN_FLIGHT:
                got = self._take(frames_max)
                if got is None:
                    break
                msg, fd, off = got
                inflight[msg.id] = msg
                if len(buf) < msg.nbytes:
                    buf = bytearray(msg.nbytes)
                view = memoryview(buf)[:msg.nbytes]
                try:
                    n = os.preadv(fd, [view], off)
                finally:
                    os.close(fd)
                if n != msg.nbytes:
                    raise OSError(f"{msg.seg.path}: short read at {off}")
                rel = msg.seg.bounds
                msg.real_ns = [_REAL_NS.unpack_from(view, rel[i] - off + logframe.REAL_NS_AT)[0]
                               for i in range(msg.first, msg.end)]
                seg_id = _SEG_ID.unpack_from(view, logframe.SEG_ID_AT)[0]
                if msg.seg.seg_id is None:
                    msg.seg.seg_id = seg_id
                meta = wire.dump_json({"session": msg.seg.session, "segno": msg.seg.segno,
                                       "seg_id": seg_id, "first": msg.first,
                                       "n": msg.end - msg.first, "id": msg.id})
                self._send(sock, wire.encode(wire.T_FRAMES, [_U32.pack(len(meta)) + meta, view]))
                msg.sent_mono = time.monotonic()
                with self._lock:
                    self.bytes_sent += msg.nbytes
                    self.frames_sent += msg.end - msg.first
                if expect_since is None:
                    expect_since = msg.sent_mono
            now = time.monotonic()
            if now - last_ping >= self.ping_every:
                self._send(sock, wire.encode_json(wire.T_PING, {"t": time.time_ns()}))
                last_ping, ping_out = now, True
                if expect_since is None:
                    expect_since = now
            if k == 0 and now - last_status >= STATUS_EVERY:
                last_status = now
                self._send(sock, wire.encode_json(wire.T_STATUS, self._status_message()))
            if expect_since is not None and now - expect_since > self.dead_after:
                raise wire.ProtocolTimeout(f"no answer from the replayer for "
                                           f"{now - expect_since:.0f} s")
            # wait for the server, new frames, or the next periodic message
            wait = min(self.ping_every - (now - last_ping),
                       STATUS_EVERY - (now - last_status) if k == 0 else self.ping_every,
                       self.dead_after)
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                events = poller.poll(max(1, int(wait * 1000)))
                if any(fd == waker for fd, _ in events):
                    try:
                        os.eventfd_read(waker)
                    except BlockingIOError:
                        pass
                if not any(fd != waker for fd, _ in events):
                    continue
            # one or more messages from the server
            while True:
                try:
                    # readable may mean TLS-only data (a session ticket): a short wait
                    m = self._read(sock, timeout=0.05)
                except wire.ProtocolTimeout as e:
                    if e.reason.startswith("idle timeout"):
                        break
                    raise
                if m.mtype == wire.T_ACK:
                    d = wire.parse_json(m)
                    self._acked(inflight.pop(d["id"], None), d)
                elif m.mtype == wire.T_LACKS:
                    d = wire.parse_json(m)
                    lacks_acc.extend(d["segments"])
                    if not d["more"]:
                        self._lacks(lacks_acc)
                        if inv.ping is not None:
                            inv.answers.append(lacks_acc)
                        lacks_acc = []
                elif m.mtype == wire.T_PONG:
                    t = wire.parse_json(m)["t"]
                    if t == inv.ping:
                        if len(inv.answers) == len(inv.pages):
                            for snap, answer in zip(inv.pages, inv.answers):
                                self._held(snap, answer)
                            inv.ping = None
                        elif inv.attempts < 3:
                            self._send_inventory(sock, inv)
                        else:
                            inv.ping = None
                    ping_out = inv.ping is not None or (ping_out and t != inv.ping)
                elif m.mtype == wire.T_PING:
                    self._send(sock, wire.encode(wire.T_PONG, [bytes(m.body)]))
                else:
                    raise wire.ProtocolError(f"unexpected {m.name} from the replayer")
                if not (isinstance(sock, ssl.SSLSocket) and sock.pending()) and \
                        not wire.data_waiting(sock, 0):
                    break
            expect_since = time.monotonic() if (inflight or ping_out) else None

    def _send_inventory(self, sock, inv: _InventoryRound) -> None:
        items, snaps = self._inventory_snapshot()
        pages = [items[i:i + INVENTORY_PAGE] for i in range(0, len(items), INVENTORY_PAGE)] \
            or [[]]
        inv.pages, inv.answers = [], []
        for i, page in enumerate(pages):
            self._send(sock, wire.encode_json(wire.T_INVENTORY, {
                "segments": page, "more": i + 1 < len(pages)}))
            inv.pages.append({(x["session"], x["segno"]): snaps[(x["session"], x["segno"])]
                              for x in page})
        inv.ping = time.time_ns()
        inv.attempts += 1
        self._send(sock, wire.encode_json(wire.T_PING, {"t": inv.ping}))

    def _status_message(self) -> dict:
        st = {"shipper": self.status(), "time_ns": time.time_ns()}
        if self.extra_status is not None:
            try:
                st["tracer"] = self.extra_status()
            except Exception as e:  # status must never break shipping
                st["tracer"] = {"error": f"{type(e).__name__}: {e}"}
        b = wire.dump_json(st)
        if len(b) > wire.MAX_STATUS:
            st = {"shipper": st["shipper"], "time_ns": st["time_ns"], "truncated": True}
        return st

    # ------------------------------------------------------------------ shipped.json
    def _housekeeper(self) -> None:
        while not self._closing.wait(SAVE_EVERY):
            with self._lock:
                if self._dirty_cache:
                    self._save_cache_locked()

    def _load_cache(self) -> dict:
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

    def _save_cache_locked(self) -> None:
        self._dirty_cache = False
        segs = [{"session": s.session, "segno": s.segno, "seg_id": s.seg_id,
                 "frames": s.n, "sealed": s.sealed, "acked": s.acked.as_list()}
                for _, s in sorted(self._segs.items()) if s.seg_id is not None]
        p = os.path.join(self.log_dir, SHIPPED_JSON)
        tmp = p + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"version": 1, "server": self.server, "addr": self.addr,
                           "saved_ns": time.time_ns(), "segments": segs}, f,
                          separators=(",", ":"))
            os.replace(tmp, p)
        except OSError as e:
            self._dirty_cache = True
            self.last_error = f"cannot write {p}: {e.strerror}"


def _close_fd(seg: _Seg) -> None:
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


def _reason(e: BaseException) -> str:
    if isinstance(e, wire.ProtocolError):
        return e.reason
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message or e.reason}"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return str(e)


def default_log_max(log_dir: str) -> int:
    """50 % of the LOG's file system, at most 64 GiB."""
    try:
        st = os.statvfs(log_dir)
        return min(64 << 30, st.f_blocks * st.f_frsize // 2)
    except OSError:
        return 64 << 30
