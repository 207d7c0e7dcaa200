"""The shipper: streams the LOG to a replayer (`blkrewind serve`), docs/protocol.md.

The LOG writer reports every frame it writes (`frame_written`, HEADER / DATA / SEAL); the
shipper queues it and its connection threads send it in FRAMES messages. The server ACKs a
range once it is durable in its store. On every (re)connect, connection 0 sends INVENTORY
(every segment of the LOG directory, every session) and the server's LACKS answer says which
frames it does not hold: those are queued, everything else of the inventory counts as acked.
LACKS may also come unsolicited (damage found on the server): those ranges are queued again.

Three parts:
  Shipper     (here) the configuration, the threads, reconnecting with a backoff, status.
  ShipState   tracer/shipstate.py: what is acknowledged and what to send next, per segment;
              retention (`room_for`, --log-max-mb) and `LOG/shipped.json`.
  Connection  tracer/shipconn.py: one socket (one per --ship-conns): HELLO, INVENTORY,
              FRAMES in flight, ACK / LACKS / PING / PONG / STATUS.

Threads: one per connection and a housekeeper (shipped.json, at most once a second). Nothing
here blocks the LOG writer: frame_written and room_for take the state's lock briefly
(room_for may unlink segment files).
"""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time

from blkrewind.errors import UserError
from blkrewind.formats import wire
from blkrewind.tracer.shipconn import Connection, ShipperStopped
from blkrewind.tracer.shipstate import ShipState

DEAD_AFTER = 30.0              # no PONG/ACK for this long while waiting for one: drop
CONNECT_TIMEOUT = 10.0
BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0
SAVE_EVERY = 1.0


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
        self.state = ShipState(self.log_dir, addr, self.log_max_bytes, say=say, wake=self._wake,
                               connected=lambda: bool(self._conns_up))
        self._lock = threading.Lock()        # the connection counters below
        self.closing = threading.Event()     # stop sending, close connections
        self._wakers: list[int] = []         # an eventfd per connection
        self._threads: list[threading.Thread] = []
        self._conns_up = 0
        self._conn_ever = [False] * conns
        self._outage_said = False
        self.reconnects = 0
        self._started = False

    @property
    def tls(self) -> bool:
        return self._ctx is not None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Read the LOG directory (every session's segments) and shipped.json, start the
        connection threads and the housekeeper. Call before the LOG writer writes (its frames
        come through frame_written)."""
        self.state.load()
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
        while time.monotonic() < deadline and self.state.unacked()[0]:
            time.sleep(0.05)
        st = self.status()
        self.closing.set()
        self._wake()
        for t in self._threads:
            t.join(5)
        self.state.close_files()
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
        self.state.frame_written(session, segno, frame_no, offset, size)

    def room_for(self, nbytes: int, *, probe: bool = False) -> bool:
        """May the LOG grow by nbytes? (ShipState.room_for: retention, the LOG-full rule.)"""
        return self.state.room_for(nbytes, probe=probe)

    @property
    def full(self) -> bool:
        return self.state.full

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        with self._lock:
            conn = {"ship_to": self.addr, "tls": self._ctx is not None, "host": self.host,
                    "server": self.state.server, "connections": self.nconns,
                    "connections_up": self._conns_up, "reconnects": self.reconnects}
        return {**conn, **self.state.status()}

    def status_message(self) -> dict:
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


    # ------------------------------------------------------------------ connections
    def connected(self, k: int, server: str) -> tuple[bool, bool]:
        """Connection k got its WELCOME from server. Returns (again: it was connected before,
        said: an outage was said, say the reconnect)."""
        with self._lock:
            self._conns_up += 1
            again = self._conn_ever[k]
            if again:
                self.reconnects += 1
            self._conn_ever[k] = True
            said = self._outage_said
            self._outage_said = False
        self.state.server = server
        return again, said

    def _wake(self) -> None:
        for fd in self._wakers:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass

    def _conn_main(self, k: int) -> None:
        backoff = BACKOFF_MIN
        while not self.closing.is_set():
            sock = None
            conn: Connection | None = None
            t_up = None
            try:
                sock = self._connect()
                t_up = time.monotonic()
                conn = Connection(self, k, sock, self._wakers[k])
                conn.run()
            except ShipperStopped:
                pass
            except (OSError, ssl.SSLError, wire.ProtocolError, ValueError) as e:
                why = _reason(e)
                if self.closing.is_set():
                    break
                self.state.last_error = f"connection {k}: {why}"
                if t_up is not None:
                    self.say(f"shipping: connection {k} to {self.addr} lost: {why}")
                elif k == 0 and not self._outage_said:
                    self.say(f"shipping: cannot reach {self.addr}: {why}; retrying "
                             f"(the LOG keeps everything meanwhile)")
                    self._outage_said = True
            finally:
                if conn is not None and conn.up:
                    with self._lock:
                        self._conns_up -= 1
                if conn is not None and conn.inflight:
                    self.state.requeue(list(conn.inflight.values()))
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            if self.closing.is_set():
                break
            if t_up is not None and time.monotonic() - t_up > 10:
                backoff = BACKOFF_MIN
            self.closing.wait(backoff)
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


    # ------------------------------------------------------------------ shipped.json
    def _housekeeper(self) -> None:
        while not self.closing.wait(SAVE_EVERY):
            self.state.save_if_dirty()


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
