"""One connection of the shipper (tracer/shipper.py) to the replayer: one socket, docs/protocol.md.

HELLO / WELCOME, then (connection 0) an INVENTORY round; then it keeps up to MAX_IN_FLIGHT
FRAMES messages in flight, taken from the shipper's state (tracer/shipstate.py), reads ACK /
LACKS / PONG / PING / ERROR and reports them to the state, PINGs every ping_every seconds and
(connection 0) sends STATUS every STATUS_EVERY seconds. A replayer silent for dead_after
seconds while an answer is due is a dead connection. The frames in flight when it ends go back
to the state's queue (Shipper._conn_main).
"""
from __future__ import annotations

import os
import select
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from blkrewind import __version__
from blkrewind.formats import logframe, wire
from blkrewind.tracer.shipstate import REAL_NS, SEG_ID, Msg, ShipState

STATUS_EVERY = 1.0
INVENTORY_PAGE = 5000          # segments per INVENTORY message (well under MAX_JSON_LIST)
_U32 = struct.Struct("<I")


class ShipperStopped(Exception):
    pass


@dataclass
class _InventoryRound:
    pages: list = field(default_factory=list)     # {key: frames} per INVENTORY page sent
    answers: list = field(default_factory=list)   # LACKS sequences received since
    ping: int | None = None                       # the fencing PING's t, until its PONG
    attempts: int = 0


class ConnOwner(Protocol):
    """What a Connection needs of its shipper (tracer/shipper.py Shipper)."""
    state: ShipState
    addr: str
    host: str                  # this tracer's host name (HELLO)
    nconns: int
    dead_after: float
    ping_every: float
    closing: threading.Event   # set: send the last STATUS, end
    say: Callable[[str], None]

    @property
    def tls(self) -> bool: ...

    def connected(self, k: int, server: str) -> tuple[bool, bool]:
        """Connection k got its WELCOME: (again, an outage was said)."""
        ...

    def status_message(self) -> dict: ...


class Connection:
    """Connection k of a shipper over sock; waker: the eventfd that says there is work.
    run() returns only by an exception (ShipperStopped when the shipper closes)."""

    def __init__(self, shipper: ConnOwner, k: int, sock, waker: int):
        self.sh = shipper
        self.state = shipper.state
        self.k = k
        self.sock = sock
        self.waker = waker
        self.inflight: dict[int, Msg] = {}   # FRAMES sent, not acked yet, by message id
        self.up = False                      # WELCOMEd: counted in the shipper's connections_up
        self.inv = _InventoryRound()
        self.lacks_acc: list = []            # the LACKS sequence being received
        self.frames_max = 0                  # bytes of frames per FRAMES message
        self.buf = bytearray()
        self.last_ping = 0.0
        self.last_status = 0.0
        self.expect_since: float | None = None   # waiting for a reply since
        self.ping_out = False

    # ------------------------------------------------------------------ messages
    def send(self, bufs) -> None:
        dead_after = self.sh.dead_after
        self.sock.settimeout(dead_after)
        try:
            wire.send_buffers(self.sock, bufs)
        except TimeoutError:  # socket.timeout
            raise wire.ProtocolTimeout(f"sending stalled for {dead_after:.0f} s") from None

    def read(self, timeout: float | None = None) -> wire.Message:
        dead_after = self.sh.dead_after
        timeout = dead_after if timeout is None else timeout
        m = wire.read_message(self.sock, accept=wire.SERVER_TO_CLIENT, idle_timeout=timeout,
                              msg_timeout=dead_after)
        if m is None:
            raise wire.ConnectionClosed("the replayer closed the connection", clean=True)
        if m.mtype == wire.T_ERROR:
            raise wire.ProtocolError(
                f"the replayer refused: {wire.parse_json(m).get('reason', '?')}")
        return m

    # ------------------------------------------------------------------ the connection
    def run(self) -> None:
        self._handshake()
        # INVENTORY: the server answers each page with one LACKS sequence (ending with
        # more=false), in order; unsolicited LACKS may come before or between them. A PING
        # right after the pages fences the answers: when its PONG comes and exactly one
        # sequence per page arrived meanwhile, they are the answers, and every inventoried
        # frame they do not list is held by the server (acked). Otherwise (ambiguous) the
        # lacked ranges are still queued and the inventory is sent again later.
        if self.k == 0:
            self._send_inventory()
        self.buf = bytearray(self.frames_max)
        now = time.monotonic()
        self.last_ping = now
        self.last_status = 0.0
        self.ping_out = self.inv.ping is not None
        if self.ping_out:
            self.expect_since = now
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self.waker, select.POLLIN)
        sh = self.sh
        while True:
            if sh.closing.is_set():
                if self.k == 0:  # the replayer's `status` shows the final state, not the last tick's
                    try:
                        self.send(wire.encode_json(wire.T_STATUS, sh.status_message()))
                    except (OSError, wire.ProtocolError):
                        pass
                raise ShipperStopped()
            self._fill()
            now = time.monotonic()
            self._periodic(now)
            # wait for the server, new frames, or the next periodic message
            wait = min(sh.ping_every - (now - self.last_ping),
                       STATUS_EVERY - (now - self.last_status) if self.k == 0 else sh.ping_every,
                       sh.dead_after)
            if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
                events = poller.poll(max(1, int(wait * 1000)))
                if any(fd == self.waker for fd, _ in events):
                    try:
                        os.eventfd_read(self.waker)
                    except BlockingIOError:
                        pass
                if not any(fd != self.waker for fd, _ in events):
                    continue
            self._replies()
            self.expect_since = time.monotonic() if (self.inflight or self.ping_out) else None

    def _handshake(self) -> None:
        sh, k = self.sh, self.k
        self.send(wire.encode_json(wire.T_HELLO, {
            "proto": wire.PROTO_VERSION, "host": sh.host, "tool": f"blkrewind {__version__}"[:64],
            "conn": k, "conns": sh.nconns}))
        while True:
            m = self.read()
            if m.mtype == wire.T_WELCOME:
                break
            if m.mtype == wire.T_PING:
                self.send(wire.encode(wire.T_PONG, [bytes(m.body)]))
            else:
                raise wire.ProtocolError(f"expected WELCOME, got {m.name}")
        w = wire.parse_json(m)
        if w["host"] != sh.host:
            raise wire.ProtocolError(f"the replayer knows this tracer as {w['host']!r}, but its "
                                     f"records name {sh.host!r} (use the CN of the "
                                     f"certificate as the host name)")
        max_body = min(w["max_body"], wire.MAX_BODY)
        self.frames_max = max(64 << 10, min(wire.MAX_FRAMES_MSG, max_body - wire.MAX_META - 64))
        again, said = sh.connected(k, w["server"])
        self.up = True
        if k == 0 or said:
            sh.say(f"shipping: connected to {sh.addr} (server {w['server']}, "
                   f"{'TLS' if sh.tls else 'plain TCP'}, connection {k})"
                   + (" again" if again else ""))

    def _fill(self) -> None:
        """Fill the pipeline: FRAMES messages until MAX_IN_FLIGHT are unacked."""
        while len(self.inflight) < wire.MAX_IN_FLIGHT:
            got = self.state.take(self.frames_max)
            if got is None:
                break
            msg, fd, off = got
            self.inflight[msg.id] = msg
            if len(self.buf) < msg.nbytes:
                self.buf = bytearray(msg.nbytes)
            view = memoryview(self.buf)[:msg.nbytes]
            try:
                n = os.preadv(fd, [view], off)
            finally:
                os.close(fd)
            if n != msg.nbytes:
                raise OSError(f"{msg.seg.path}: short read at {off}")
            rel = msg.seg.bounds
            msg.real_ns = [REAL_NS.unpack_from(view, rel[i] - off + logframe.REAL_NS_AT)[0]
                           for i in range(msg.first, msg.end)]
            seg_id = SEG_ID.unpack_from(view, logframe.SEG_ID_AT)[0]
            if msg.seg.seg_id is None:
                msg.seg.seg_id = seg_id
            meta = wire.dump_json({"session": msg.seg.session, "segno": msg.seg.segno,
                                   "seg_id": seg_id, "first": msg.first,
                                   "n": msg.end - msg.first, "id": msg.id})
            self.send(wire.encode(wire.T_FRAMES, [_U32.pack(len(meta)) + meta, view]))
            msg.sent_mono = time.monotonic()
            self.state.sent(msg)
            if self.expect_since is None:
                self.expect_since = msg.sent_mono

    def _periodic(self, now: float) -> None:
        """PING every ping_every, STATUS every STATUS_EVERY (connection 0); a replayer silent
        for dead_after while an answer is due: the connection is dead."""
        sh = self.sh
        if now - self.last_ping >= sh.ping_every:
            self.send(wire.encode_json(wire.T_PING, {"t": time.time_ns()}))
            self.last_ping, self.ping_out = now, True
            if self.expect_since is None:
                self.expect_since = now
        if self.k == 0 and now - self.last_status >= STATUS_EVERY:
            self.last_status = now
            self.send(wire.encode_json(wire.T_STATUS, sh.status_message()))
        if self.expect_since is not None and now - self.expect_since > sh.dead_after:
            raise wire.ProtocolTimeout(f"no answer from the replayer for "
                                       f"{now - self.expect_since:.0f} s")

    def _replies(self) -> None:
        """One or more messages from the server."""
        inv, state = self.inv, self.state
        while True:
            try:
                # readable may mean TLS-only data (a session ticket): a short wait
                m = self.read(timeout=0.05)
            except wire.ProtocolTimeout as e:
                if e.reason.startswith("idle timeout"):
                    break
                raise
            if m.mtype == wire.T_ACK:
                d = wire.parse_json(m)
                state.acked(self.inflight.pop(d["id"], None), d)
            elif m.mtype == wire.T_LACKS:
                d = wire.parse_json(m)
                self.lacks_acc.extend(d["segments"])
                if not d["more"]:
                    state.lacks(self.lacks_acc)
                    if inv.ping is not None:
                        inv.answers.append(self.lacks_acc)
                    self.lacks_acc = []
            elif m.mtype == wire.T_PONG:
                t = wire.parse_json(m)["t"]
                if t == inv.ping:
                    if len(inv.answers) == len(inv.pages):
                        for snap, answer in zip(inv.pages, inv.answers):
                            state.held(snap, answer)
                        inv.ping = None
                    elif inv.attempts < 3:
                        self._send_inventory()
                    else:
                        inv.ping = None
                self.ping_out = inv.ping is not None or (self.ping_out and t != inv.ping)
            elif m.mtype == wire.T_PING:
                self.send(wire.encode(wire.T_PONG, [bytes(m.body)]))
            else:
                raise wire.ProtocolError(f"unexpected {m.name} from the replayer")
            if not (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()) and \
                    not wire.data_waiting(self.sock, 0):
                break

    def _send_inventory(self) -> None:
        inv = self.inv
        items, snaps = self.state.inventory_snapshot()
        pages = [items[i:i + INVENTORY_PAGE] for i in range(0, len(items), INVENTORY_PAGE)] \
            or [[]]
        inv.pages, inv.answers = [], []
        for i, page in enumerate(pages):
            self.send(wire.encode_json(wire.T_INVENTORY, {
                "segments": page, "more": i + 1 < len(pages)}))
            inv.pages.append({(x["session"], x["segno"]): snaps[(x["session"], x["segno"])]
                              for x in page})
        inv.ping = time.time_ns()
        inv.attempts += 1
        self.send(wire.encode_json(wire.T_PING, {"t": inv.ping}))
