"""The replayer service: receives LOG frames from tracers and stores them (docs/protocol.md).

`Server` holds the store's write lock for its lifetime and runs
- an accept thread: at most `max_conns` connections, one thread each;
- per connection: the TLS handshake (TLS 1.3, mutual; the peer's host is its certificate's CN),
  HELLO (its host must be the authenticated one), then messages: FRAMES are validated, stored
  by `FrameSink.store` and only then ACKed (consecutive FRAMES already received are merged into
  one store call of up to `batch_bytes`, reading them for at most `batch_wait`); INVENTORY is
  answered with LACKS; PING with PONG; STATUS is kept in memory for `blkrewind status`;
- a finalizer thread: `FrameSink.finalize()` (watermarks) at most every `finalize_every` s
  when something was stored;
- the start-up integrity check: quick (synchronously), then full (in the background);
  frames found damaged are announced to their connected owner with an unsolicited LACKS;
- the local query socket STORE/serve.sock (replayer/query.py) for sql/restore/status/verify.

Every protocol violation, timeout or store refusal: an ERROR message with the reason, the
connection closed, one log line naming the peer address, the host and the reason; nothing of
the bad message is stored and the other connections go on. A store failure (ENOSPC, I/O
error) stops acknowledging: FRAMES are answered with ERROR "store unavailable ... retry later"
for `store_retry` seconds, then storing is tried again; the store is never left half-written
(FrameSink's contract).

Log: stderr, one line per event, `YYYY-mm-ddTHH:MM:SS.mmmZ serve: ...`.
"""
from __future__ import annotations

import itertools
import os
import select
import socket
import ssl
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blkrewind import __version__
from blkrewind.errors import StoreError, UserError
from blkrewind.formats import wire

if TYPE_CHECKING:
    from blkrewind.replayer.detector import Watch
    from blkrewind.replayer.ingest import FrameSink
    from blkrewind.replayer.query import QueryServer
    from blkrewind.replayer.store import Store


@dataclass
class Limits:
    max_conns: int = wire.MAX_CONNS
    handshake_timeout: float = wire.HANDSHAKE_TIMEOUT
    hello_timeout: float = wire.HELLO_TIMEOUT
    message_timeout: float = wire.MESSAGE_TIMEOUT
    idle_timeout: float = wire.IDLE_TIMEOUT
    max_body: int = wire.MAX_BODY
    batch_bytes: int = 24 << 20
    batch_wait: float = 0.05
    finalize_every: float = 0.2
    store_retry: float = 5.0
    send_timeout: float = 60.0
    max_status_hosts: int = 1024
    shutdown_grace: float = 5.0
    # a file-level check underway when serve stops finishes and unmounts its points (a
    # daemon thread cut by the exit would leave them: runtime directory, mounts, nbdkit)
    detector_grace: float = 120.0
    # the full integrity check starts this long after start-up: reconnecting tracers are back
    # by then, so damage it finds reaches them at once as LACKS
    full_check_delay: float = 5.0
    # the ransomware detector (replayer/detector.py) looks at what was stored every so often
    detect_every: float = 2.0


class Violation(Exception):
    """The peer broke the rules (not the framing): ERROR + close."""


class StoreUnavailable(Exception):
    """The store failed (e.g. full): ERROR + close, nothing acknowledged."""


def _ts() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class Logger:
    """One line per event on a stream (stderr), with a UTC timestamp."""

    def __init__(self, stream=None, prefix: str = "serve"):
        self.stream = stream
        self.prefix = prefix
        self._lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        line = f"{_ts()} {self.prefix}: {' '.join(str(msg).split())}\n"
        with self._lock:
            s = self.stream or sys.stderr
            try:
                s.write(line)
                s.flush()
            except (OSError, ValueError):
                pass


@dataclass(eq=False)
class Conn:
    id: int
    sock: socket.socket
    peer: str
    since_ns: int = field(default_factory=time.time_ns)
    auth_host: str | None = None     # CN of the client certificate (TLS)
    host: str | None = None          # after HELLO
    conn_index: int = 0              # HELLO "conn"
    tool: str = ""
    outq: deque = field(default_factory=deque)
    wake_r: int = -1
    wake_w: int = -1
    messages: int = 0
    frames: int = 0
    bytes_in: int = 0
    acked_frames: int = 0
    stored_frames: int = 0
    last_ack_ns: int = 0
    thread: threading.Thread | None = None
    wake_lock: threading.Lock = field(default_factory=threading.Lock)   # wake() vs close_wake()

    def who(self) -> str:
        h = self.host or self.auth_host or "?"
        return f"conn {self.id} peer {self.peer} host {h}"

    def hello_host(self) -> str:
        """The host HELLO named; _hello() sets it before any other message is read."""
        if self.host is None:
            raise Violation("message before HELLO")
        return self.host

    def wake(self) -> None:
        """Wake the connection's thread; a no-op once close_wake() ran (its fd number may
        belong to another file by then)."""
        with self.wake_lock:
            if self.wake_w < 0:
                return
            try:
                os.write(self.wake_w, b"x")
            except OSError:
                pass

    def close_wake(self) -> None:
        with self.wake_lock:
            fds, self.wake_r, self.wake_w = (self.wake_r, self.wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _fmt_addr(a) -> str:
    if isinstance(a, tuple) and len(a) >= 2:
        h, p = a[0], a[1]
        return f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
    return str(a)


class Server:
    def __init__(self, store_dir, listen: tuple[str, int], *, tls_dir=None,
                 limits: Limits | None = None, log=None, server_id: str | None = None,
                 views=None):
        self.views = views   # (cursor) -> ...: SQL views for the query socket (QueryServer)
        self.store_dir = os.path.abspath(os.fspath(store_dir))
        self.listen_addr = listen
        self.tls_dir = tls_dir
        self.limits = limits or Limits()
        self.log = log or Logger()
        self.server_id = server_id or f"{socket.gethostname()}:{os.getpid()}"
        self.ctx: ssl.SSLContext | None = None
        self.store: Store | None = None
        self.sink: FrameSink | None = None
        self.query: QueryServer | None = None
        self._lsock: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self._conns: dict[int, Conn] = {}
        self._conns_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._changed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._store_down_until = 0.0
        self._store_error: str | None = None
        self._totals_lock = threading.Lock()
        self.statuses: dict[str, dict] = {}
        self._status_lock = threading.Lock()
        self.started_ns = time.time_ns()
        self.totals = {"connections": 0, "rejected": 0, "frames": 0, "bytes": 0,
                       "stored_frames": 0, "acks": 0}
        # for the metrics (blkrewind/metrics.py), counted per event or per stored batch
        self.refused: dict[str, int] = {}          # connections refused or cut, by reason
        self.ingested: dict[str, list[int]] = {}   # host -> [frames, bytes] stored
        self.integrity_problems = 0                # damage found by the store's checks
        self.store_errors = 0
        self.restores: dict[str, list] = {}         # device -> [restores, bytes, seconds]
        self._check_state = "not started"
        self.watch: Watch | None = None   # made by the detector thread

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        from blkrewind.replayer.ingest import FrameSink
        from blkrewind.replayer.query import QueryServer
        from blkrewind.replayer.store import Store

        if self.tls_dir is not None:
            from blkrewind import tlsconf
            self.ctx = tlsconf.server_context(self.tls_dir)
        if not os.path.exists(self.store_dir):
            try:
                os.makedirs(self.store_dir, mode=0o700)
                os.chmod(self.store_dir, 0o700)
            except OSError as e:
                raise StoreError(f"cannot create the store {self.store_dir}: {e.strerror}") from None
        self.store = Store.open(self.store_dir, write=True, create=True, wait=1.0)
        try:
            self._reap_points()
            self.sink = FrameSink(self.store, on_lost=self._on_lost)
            t0 = time.monotonic()
            self._check_state = "quick check"
            damage = self.sink.check(full=False)
            for line in damage:
                self.log(f"DAMAGE (quick check): {line}")
            self.integrity_problems += len(damage)
            self._check_state = f"quick check: {len(damage)} problem(s); full check pending"
            self.log(f"store {self.store_dir}: quick integrity check done in "
                     f"{time.monotonic() - t0:.2f} s, {len(damage)} problem(s)")
            # the full check reads what was stored before this start (later files were
            # checksummed as they were written)
            self._check_upto = self.store.last_payload_file()
            # sessions a crash left with new frames but an old watermark (`dirty` in the store)
            self.sink.finalize()
            self.query = QueryServer(self.store, status=self.status, log=self.log,
                                     on_restored=self._restored, views=self.views)
            self.query.start()
            self._lsock = self._bind()
        except BaseException:
            self._close_store()
            raise
        a = self._lsock.getsockname()
        self.address = (a[0], a[1])
        mode = "TLS 1.3, mutual authentication" if self.ctx else "INSECURE (no TLS)"
        self.log(f"listening on {_fmt_addr(a)} ({mode}), store {self.store_dir}, "
                 f"query socket {self.query.path}, max {self.limits.max_conns} connections")
        for name, target in (("accept", self._accept), ("finalizer", self._finalizer),
                             ("full-check", self._full_check), ("detector", self._detector)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _reap_points(self) -> None:
        """What a killed server (or another process reading this store's points) left: the
        point its detector kept mounted (mounts, loop devices, nbdkit, nbdfuse, run dir)."""
        from blkrewind.replayer import mounts
        try:
            reaped = mounts.reap_stale(self.store_dir)
        except OSError as e:
            self.log(f"cannot look for points left by killed processes: {e}")
            return
        for pt, done in reaped:
            self.log(f"removed a point left by a process that is gone: "
                     f"{mounts.describe_point(pt)}: {'; '.join(done)}")

    def _bind(self) -> socket.socket:
        host, port = self.listen_addr
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise UserError(f"--listen {host}:{port}: {e.strerror}") from None
        fam, _, _, _, addr = infos[0]
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            s.close()
            raise UserError(f"--listen {host}:{port}: {e.strerror}") from None
        s.listen(128)
        return s

    def request_stop(self) -> None:
        self._stopping.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopping.wait(timeout)

    def close(self) -> None:
        """Stop accepting, let connections finish what they are storing, final finalize,
        close the query socket and the store."""
        if self._stopped.is_set():
            return
        self._stopping.set()
        if self.address is not None:
            self.log("shutting down: no new connections; finishing in-flight stores")
        if self._lsock is not None:
            try:
                self._lsock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._lsock.close()
        with self._conns_lock:
            conns = list(self._conns.values())
        for c in conns:
            c.wake()
        deadline = time.monotonic() + self.limits.shutdown_grace
        for c in conns:
            if c.thread is not None:
                c.thread.join(max(0.0, deadline - time.monotonic()))
        for c in conns:   # stuck in the middle of a message: cut
            if c.thread is not None and c.thread.is_alive():
                try:
                    c.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.thread.join(self.limits.shutdown_grace)
        for t in self._threads:
            if t.name == "detector":
                t.join(self.limits.detector_grace)
                if t.is_alive():
                    self.log("the detector's file-level check did not end in time: the point "
                             "it reads is removed at the next start (or `blkrewind umount "
                             "--stale`)")
            elif t.name != "full-check":
                t.join(self.limits.shutdown_grace)
        if self._changed.is_set() and self.sink is not None:
            self._changed.clear()
            self._finalize_once()
        if self.query is not None:
            self.query.close()
        self._close_store()
        self._stopped.set()
        if self.address is not None:
            self.log("stopped")

    def _close_store(self) -> None:
        st, self.store = self.store, None
        if st is not None:
            with st.locked():
                st.close()

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        with self._conns_lock:
            conns = [{"id": c.id, "peer": c.peer, "host": c.host, "conn": c.conn_index,
                      "tool": c.tool, "since_ns": c.since_ns, "messages": c.messages,
                      "frames": c.frames, "bytes_in": c.bytes_in, "acked_frames": c.acked_frames,
                      "stored_frames": c.stored_frames, "last_ack_ns": c.last_ack_ns}
                     for c in self._conns.values()]
        with self._status_lock:
            hosts = {h: dict(v) for h, v in self.statuses.items()}
        return {"server": self.server_id, "pid": os.getpid(), "version": __version__,
                "started_ns": self.started_ns, "now_ns": time.time_ns(),
                "listen": _fmt_addr(self.address) if self.address else None,
                "tls": self.ctx is not None, "store": self.store_dir,
                "store_error": self._store_error if time.monotonic() < self._store_down_until
                else None, "integrity_check": self._check_state,
                "connections": conns, "hosts": hosts, "totals": dict(self.totals),
                "suspects": self.watch.summary() if self.watch is not None else []}

    def _started_sink(self) -> FrameSink:
        """The sink start() made; the threads and connections that use it run only after."""
        if self.sink is None:
            raise RuntimeError("server not started (no frame sink)")
        return self.sink

    # ------------------------------------------------------------------ threads
    def _accept(self) -> None:
        lsock = self._lsock
        assert lsock is not None, "start() binds the socket before this thread runs"
        while not self._stopping.is_set():
            try:
                raw, addr = lsock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: do not spin
                continue
            peer = _fmt_addr(addr)
            wire.tune_socket(raw)
            with self._conns_lock:
                full = len(self._conns) >= self.limits.max_conns
                if not full:
                    c = Conn(next(self._ids), raw, peer)
                    c.wake_r, c.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                    self._conns[c.id] = c
            if full:
                self.totals["rejected"] += 1
                self._refused("too_many_connections")
                self.log(f"peer {peer}: refused: already {self.limits.max_conns} connections")
                try:
                    raw.close()
                except OSError:
                    pass
                continue
            self.totals["connections"] += 1
            c.thread = threading.Thread(target=self._conn_main, args=(c,),
                                        name=f"conn-{c.id}", daemon=True)
            c.thread.start()

    def _finalizer(self) -> None:
        last = took = 0.0
        while not self._stopping.is_set():
            if not self._changed.wait(0.5):
                continue
            # at most every finalize_every s, and at most ~20 % of the time: it holds the
            # store's mutex, which every commit needs
            wait = last + max(self.limits.finalize_every, 4 * took) - time.monotonic()
            if wait > 0 and self._stopping.wait(wait):
                return  # close() runs the last one
            self._changed.clear()
            last = time.monotonic()
            self._finalize_once()
            took = time.monotonic() - last

    def _finalize_once(self) -> None:
        try:
            self._started_sink().finalize()   # the sessions it updated: visible in `status`, not logged
        except Exception as e:
            self.log(f"STORE ERROR while computing watermarks: {type(e).__name__}: "
                     f"{' '.join(str(e).split())}")

    def _detector(self) -> None:
        """Every detect_every s: the detector over what was stored since, one query at a time
        under the store's mutex (between commits; at most detector.CHUNK_ROWS rows each). A
        new episode is an ALERT line in the log and in status."""
        from blkrewind.replayer import detector

        self.watch = detector.Watch(self.store, stopping=self._stopping,
                                    on_episode=lambda ep, device: self.log(
                                        f"ALERT: possible ransomware: "
                                        f"{detector.describe(ep, device)}"))
        passes = 0
        try:
            while not self._stopping.wait(self.limits.detect_every):
                try:
                    self.watch.step()
                    passes += 1
                except Exception as e:   # never the end of the server
                    self.log(f"detector failed: {type(e).__name__}: {' '.join(str(e).split())}")
        finally:   # the point a file-level check keeps mounted (nbdkit, FUSE, loop, mount)
            self.watch.close()
            if os.environ.get("BLKREWIND_DEBUG_DETECTOR"):
                import resource

                from blkrewind.replayer import entropy
                flt = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
                self.log(f"detector: {time.thread_time():.2f} CPU-s, {flt} minor faults in "
                         f"{passes} passes; ingest's randomness: {entropy.CPU_S[0]:.2f} CPU-s, "
                         f"{entropy.CPU_S[1]} minor faults")

    def _full_check(self) -> None:
        if self._stopping.wait(self.limits.full_check_delay):
            return
        self._check_state = "full check running"
        t0 = time.monotonic()
        try:
            damage = self._started_sink().check(full=True, upto=self._check_upto)
        except Exception as e:
            self._check_state = f"full check failed: {e}"
            if not self._stopping.is_set():
                self.log(f"full integrity check failed: {type(e).__name__}: {e}")
            return
        for line in damage:
            self.log(f"DAMAGE (full check): {line}")
        self.integrity_problems += len(damage)
        self._check_state = f"full check done, {len(damage)} problem(s)"
        self.log(f"full integrity check done in {time.monotonic() - t0:.1f} s, "
                 f"{len(damage)} problem(s)")
        if damage:
            self._changed.set()

    def _on_lost(self, host: str, segments: list[dict]) -> None:
        """Frames of host were found damaged/missing and dropped: tell one of its connections
        (its lowest HELLO conn index) with an unsolicited LACKS."""
        with self._conns_lock:
            owners = sorted((c for c in self._conns.values() if c.host == host),
                            key=lambda c: (c.conn_index, c.id))
        self.log(f"host {host}: {len(segments)} segment(s) lost frames; "
                 f"{'sending LACKS to conn ' + str(owners[0].id) if owners else 'not connected'}")
        if owners:
            c = owners[0]
            for msg in self._lacks_messages(segments):
                c.outq.append(msg)
            c.wake()

    # ------------------------------------------------------------------ connections
    def _restored(self, device: str, nbytes: int, seconds: float) -> None:
        with self._totals_lock:
            n = self.restores.setdefault(device, [0, 0, 0.0])
            n[0] += 1
            n[1] += nbytes
            n[2] += seconds

    def _refused(self, why: str) -> None:
        with self._totals_lock:
            self.refused[why] = self.refused.get(why, 0) + 1

    def _conn_main(self, c: Conn) -> None:
        reason = None
        kind = None   # the metrics' reason label: a small fixed set
        try:
            self._handshake(c)
            self._hello(c)
            self._loop(c)
        except wire.ConnectionClosed as e:
            self.log(f"{c.who()}: closed ({e.reason})" if not e.clean else
                     f"{c.who()}: closed by the peer")
        except wire.ProtocolTimeout as e:
            reason, kind = e.reason, "timeout"
        except wire.ProtocolError as e:
            reason, kind = f"protocol violation: {e.reason}", "protocol_violation"
        except Violation as e:
            reason, kind = f"protocol violation: {e}", "protocol_violation"
        except StoreUnavailable as e:
            reason, kind = str(e), "store_unavailable"
        except _Handshake as e:
            self._refused("tls_handshake")
            self.log(f"peer {c.peer}: TLS handshake failed: {e}")
        except _Stopping:
            self.log(f"{c.who()}: closed: the server is shutting down")
            self._send_error(c, "the server is shutting down")
        except Exception as e:   # a bug: this connection ends, the service goes on
            reason = f"internal error: {type(e).__name__}: {' '.join(str(e).split())}"
            kind = "internal_error"
        finally:
            if kind is not None:
                self._refused(kind)
            if reason is not None:
                self.log(f"{c.who()}: {reason}; closing")
                self._send_error(c, reason)
            # the slot is given back before the peer can see the close: a client reconnecting
            # at once must not be refused for its own closed connection
            with self._conns_lock:
                self._conns.pop(c.id, None)
            try:
                c.sock.close()
            except OSError:
                pass
            c.close_wake()

    def _send_error(self, c: Conn, reason: str) -> None:
        try:
            c.sock.settimeout(2.0)
            wire.send_buffers(c.sock, wire.encode_json(wire.T_ERROR, {"reason": reason[:1024]}))
        except (OSError, ValueError):
            pass

    def _send(self, c: Conn, buffers) -> None:
        try:
            c.sock.settimeout(self.limits.send_timeout)
            wire.send_buffers(c.sock, buffers)
        except (socket.timeout, TimeoutError):
            raise wire.ProtocolTimeout("the peer does not read (send timed out)") from None
        except ssl.SSLError as e:
            raise wire.ConnectionClosed(f"TLS error while sending: {e.reason or e}") from None
        except OSError as e:
            raise wire.ConnectionClosed(f"send failed: {e.strerror or e}") from None

    def _handshake(self, c: Conn) -> None:
        if self.ctx is None:
            return
        c.sock.settimeout(self.limits.handshake_timeout)
        try:
            ss = self.ctx.wrap_socket(c.sock, server_side=True, do_handshake_on_connect=False)
        except (OSError, ssl.SSLError) as e:
            raise _Handshake(str(e)) from None
        c.sock = ss
        try:
            ss.do_handshake()
        except (socket.timeout, TimeoutError):
            raise _Handshake(f"not completed within {self.limits.handshake_timeout:g} s") from None
        except ssl.SSLError as e:
            raise _Handshake(e.reason or str(e)) from None
        except OSError as e:
            raise _Handshake(e.strerror or str(e)) from None
        from blkrewind import tlsconf
        try:
            c.auth_host = tlsconf.peer_host(ss)
        except UserError as e:
            raise _Handshake(str(e)) from None
        if not wire.HOST_RE.fullmatch(c.auth_host):
            raise _Handshake(f"certificate CN {c.auth_host[:64]!r} is not a valid host name")

    def _read(self, c: Conn, idle: float | None) -> wire.Message | None:
        m = wire.read_message(c.sock, max_body=self.limits.max_body,
                              accept=wire.CLIENT_TO_SERVER, idle_timeout=idle,
                              msg_timeout=self.limits.message_timeout)
        if m is not None:
            c.messages += 1
            c.bytes_in += wire.HEADER_SIZE + len(m.body)
        return m

    def _hello(self, c: Conn) -> None:
        try:
            m = self._read(c, self.limits.hello_timeout)
        except wire.ProtocolTimeout as e:
            if "idle" in e.reason:
                raise wire.ProtocolTimeout(f"no HELLO within "
                                           f"{self.limits.hello_timeout:g} s") from None
            raise
        if m is None:
            raise wire.ConnectionClosed("closed before HELLO")
        if m.mtype != wire.T_HELLO:
            raise Violation(f"expected HELLO first, got {m.name}")
        h = wire.parse_json(m)
        if c.auth_host is not None and h["host"] != c.auth_host:
            raise Violation(f"HELLO names host {h['host']!r} but the certificate is for "
                            f"{c.auth_host!r}")
        c.host = c.auth_host or h["host"]
        c.conn_index, c.tool = h["conn"], h["tool"]
        self._send(c, wire.encode_json(wire.T_WELCOME, {
            "proto": wire.PROTO_VERSION, "host": c.host, "server": self.server_id[:128],
            "max_body": self.limits.max_body}))
        self.log(f"{c.who()}: connected (tool {c.tool}, conn {h['conn']} of {h['conns']}"
                 f"{', authenticated' if c.auth_host else ', NOT authenticated (insecure)'})")

    def _wait_readable(self, c: Conn, timeout: float) -> str:
        """'data' when the socket has something, 'wake' when woken, 'timeout'."""
        if isinstance(c.sock, ssl.SSLSocket) and c.sock.pending():
            return "data"
        p = select.poll()
        p.register(c.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        p.register(c.wake_r, select.POLLIN)
        ev = dict(p.poll(max(0, int(timeout * 1000))))
        if c.sock.fileno() in ev:
            return "data"
        if c.wake_r in ev:
            try:
                while os.read(c.wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            return "wake"
        return "timeout"

    def _loop(self, c: Conn) -> None:
        lim = self.limits
        last = time.monotonic()
        pending: wire.Message | None = None
        while True:
            while c.outq:
                self._send(c, c.outq.popleft())
            if self._stopping.is_set():
                raise _Stopping()
            if pending is None:
                left = last + lim.idle_timeout - time.monotonic()
                if left <= 0:
                    raise wire.ProtocolTimeout(f"idle for {lim.idle_timeout:g} s (no message)")
                got = self._wait_readable(c, left)
                if got != "data":
                    continue
                m = self._read(c, max(0.001, last + lim.idle_timeout - time.monotonic()))
                if m is None:
                    raise wire.ConnectionClosed("closed by the peer", clean=True)
            else:
                m, pending = pending, None
            last = time.monotonic()
            if m.mtype == wire.T_FRAMES:
                pending = self._frames(c, m)
            elif m.mtype == wire.T_PING:
                d = wire.parse_json(m)
                self._send(c, wire.encode_json(wire.T_PONG, {"t": d["t"]}))
            elif m.mtype == wire.T_PONG:
                wire.parse_json(m)
            elif m.mtype == wire.T_INVENTORY:
                self._inventory(c, m)
            elif m.mtype == wire.T_STATUS:
                self._status_msg(c, m)
            elif m.mtype == wire.T_HELLO:
                raise Violation("HELLO sent twice")
            else:
                raise Violation(f"unexpected message {m.name}")

    # ------------------------------------------------------------------ messages
    def _status_msg(self, c: Conn, m: wire.Message) -> None:
        obj = wire.parse_json(m)
        host = c.hello_host()
        with self._status_lock:
            if host not in self.statuses and len(self.statuses) >= self.limits.max_status_hosts:
                oldest = min(self.statuses, key=lambda h: self.statuses[h]["received_ns"])
                del self.statuses[oldest]
            prev = self.statuses.get(host)
            self.statuses[host] = {
                "status": obj, "received_ns": time.time_ns(), "peer": c.peer, "conn": c.id,
                # the previous one's capture counters: rates for `blkrewind status`
                "prev": None if prev is None else {
                    "received_ns": prev["received_ns"],
                    "kernel": _kernel_counters(prev["status"])}}

    def _inventory(self, c: Conn, m: wire.Message) -> None:
        from blkrewind.replayer.ingest import FrameRejected

        d = wire.parse_json(m)
        self._check_store()
        sink, host = self._started_sink(), c.hello_host()
        try:
            lacks = sink.lacks(host, d["segments"])
        except FrameRejected as e:
            raise Violation(f"INVENTORY: {e}") from None
        except Exception as e:
            self._store_failed("answering INVENTORY", e)
        for msg in self._lacks_messages(lacks):
            self._send(c, msg)
        n = sum(e - a for s in lacks for a, e in s["ranges"])
        self.log(f"{c.who()}: INVENTORY of {len(d['segments'])} segment(s): the store lacks "
                 f"{n} frame(s) in {len(lacks)} segment(s)")

    @staticmethod
    def _lacks_messages(lacks: list[dict]) -> list[list]:
        """LACKS messages (paged with "more") for a list of {"session","segno","ranges"}."""
        limit = wire.MAX_JSON_LIST - 1024
        pages: list[list[bytes]] = [[]]
        size = 0
        for s in lacks:
            ranges = [list(r) for r in s["ranges"]]
            step = max(1, min(len(ranges), wire.MAX_RANGES))
            for k in range(0, max(1, len(ranges)), step):
                item = wire.dump_json({"session": s["session"], "segno": s["segno"],
                                       "ranges": ranges[k:k + step]})
                if pages[-1] and (size + len(item) + 1 > limit
                                  or len(pages[-1]) >= wire.MAX_SEGMENTS):
                    pages.append([])
                    size = 0
                pages[-1].append(item)
                size += len(item) + 1
        out = []
        for i, items in enumerate(pages):
            more = b"true" if i < len(pages) - 1 else b"false"
            body = b'{"segments":[' + b",".join(items) + b'],"more":' + more + b"}"
            out.append(wire.encode(wire.T_LACKS, [body]))
        return out

    def _frames(self, c: Conn, first: wire.Message) -> wire.Message | None:
        """Store FRAMES messages: first, plus the FRAMES that follow it without waiting more
        than batch_wait (up to batch_bytes). Returns a non-FRAMES message read meanwhile."""
        from blkrewind.replayer.ingest import FrameGroup

        lim = self.limits
        t0 = time.monotonic()
        groups, metas, total = [], [], 0
        nxt: wire.Message | None = None
        err: BaseException | None = None
        m = first
        while True:
            try:
                meta, raws = wire.unpack_frames(m.body)
            except wire.ProtocolError as e:
                err = e
                break
            groups.append(FrameGroup(meta["session"], meta["segno"], meta["seg_id"],
                                     meta["first"], raws))
            metas.append(meta)
            total += len(m.body)
            c.frames += len(raws)
            if total >= lim.batch_bytes:
                break
            # merge only what has already arrived, for at most batch_wait: an ACK is never
            # held back waiting for a peer that is waiting for it
            if time.monotonic() - t0 >= lim.batch_wait or not wire.data_waiting(c.sock, 0):
                break
            try:
                got = self._read(c, lim.message_timeout)
            except wire.ProtocolError as e:
                err = e
                break
            if got is None:
                err = wire.ConnectionClosed("closed by the peer", clean=True)
                break
            m = got
            if m.mtype != wire.T_FRAMES:
                nxt = m
                break
        if groups:
            self._store(c, groups, metas)
            with self._totals_lock:   # per stored batch, for the metrics
                n = self.ingested.setdefault(c.hello_host(), [0, 0])
                n[0] += sum(len(g.raw_frames) for g in groups)
                n[1] += total
        if err is not None:
            raise err
        return nxt

    def _check_store(self) -> None:
        if time.monotonic() < self._store_down_until:
            raise StoreUnavailable(f"store unavailable ({self._store_error}); retry later")

    def _store_failed(self, what: str, e: BaseException):
        why = " ".join(str(e).split()) or type(e).__name__
        if not isinstance(e, StoreError):
            why = f"{type(e).__name__}: {why}"
        self._store_error = why
        self.store_errors += 1
        self._store_down_until = time.monotonic() + self.limits.store_retry
        self.log(f"STORE ERROR {what}: {why}; nothing acknowledged, frames refused for "
                 f"{self.limits.store_retry:g} s, then storing is tried again")
        raise StoreUnavailable(f"store unavailable ({why}); retry later") from None

    def _store(self, c: Conn, groups: list, metas: list[dict]) -> None:
        from blkrewind.replayer.ingest import FrameRejected

        self._check_store()
        sink, host = self._started_sink(), c.hello_host()
        try:
            res = sink.store(host, groups)
        except FrameRejected as e:
            if len(groups) == 1:
                raise Violation(f"FRAMES {_desc(metas[0])}: {e}") from None
            # a merged batch: store and acknowledge the good messages before the bad one
            for g, meta in zip(groups, metas):
                try:
                    r = sink.store(host, [g])
                except FrameRejected as e1:
                    raise Violation(f"FRAMES {_desc(meta)}: {e1}") from None
                except Exception as e1:
                    self._store_failed("storing frames", e1)
                self._ack(c, [meta], r)
                self._changed.set()
            return
        except Exception as e:
            self._store_failed("storing frames", e)
        if self._store_error is not None and time.monotonic() >= self._store_down_until:
            self.log(f"store works again (after: {self._store_error})")
            self._store_error = None
        self._ack(c, metas, res)
        self._changed.set()

    def _ack(self, c: Conn, metas: list[dict], res) -> None:
        bufs = []
        for meta, (first, end, new) in zip(metas, res):
            bufs += wire.encode_json(wire.T_ACK, {"id": meta["id"], "session": meta["session"],
                                                  "segno": meta["segno"], "first": first,
                                                  "end": end})
            c.acked_frames += end - first
            c.stored_frames += new
            with self._totals_lock:
                self.totals["frames"] += end - first
                self.totals["stored_frames"] += new
                self.totals["acks"] += 1
        c.last_ack_ns = time.time_ns()
        self._send(c, bufs)


def _kernel_counters(st: dict) -> dict | None:
    """The tracer's kernel counters in a STATUS body ({"tracer": Tracer.status(), ...})."""
    t = st.get("tracer") if isinstance(st.get("tracer"), dict) else st
    k = t.get("kernel") if isinstance(t, dict) else None
    return k if isinstance(k, dict) else None


def _desc(meta: dict) -> str:
    return (f"id {meta['id']} {meta['session']}.{meta['segno']} "
            f"[{meta['first']}, {meta['first'] + meta['n']})")


class _Handshake(Exception):
    pass


class _Stopping(Exception):
    pass
