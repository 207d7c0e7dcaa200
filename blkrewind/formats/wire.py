"""The wire protocol between a tracer's shipper and the replayer's server: the one definition.

docs/protocol.md describes the design. Every message is a 20-byte header and a body.
Little-endian::

    off size field
      0    4 magic     b"BRW1"
      4    1 version   PROTO_VERSION
      5    1 type      T_*
      6    2 flags     0 (reserved)
      8    4 length    body bytes, <= MAX_BODY (and the type's own limit, TYPE_MAX_BODY)
     12    4 bcrc      crc32(body)
     16    4 hcrc      crc32(bytes 0..15)

JSON bodies are UTF-8 objects, validated field by field (`parse_json`, `expect`). A FRAMES body
is ``u32 meta length, JSON meta, K raw LOG frames`` exactly as they are in the segment file
(`pack_frames` / `unpack_frames`).

Everything a peer can send is checked before it is trusted: `read_message` checks the header
(magic, CRC, version, type, flags, length within the type's limit) before allocating the body,
then the body CRC; any failure, truncation or timeout raises `ProtocolError` (and nothing else)
with a one-line reason for the log.

Sending never copies a large body: `encode` returns a list of buffers (header + the caller's
parts) for `send_buffers`, which uses ``sendmsg`` on a plain socket and one ``sendall`` per
buffer on a TLS socket (small buffers are joined so a message is not split into tiny records).
"""
from __future__ import annotations

import json
import math
import re
import select
import socket
import ssl
import struct
import time
from typing import Any, NamedTuple

# The LOG frame header (48 bytes: magic, CRC, lengths) and the session-id rule have one
# definition: blkrewind/formats/logframe.py.
from blkrewind.formats import logframe
from blkrewind.osutil import crc32

PROTO_VERSION = 1
MAGIC = b"BRW1"
HEADER = struct.Struct("<4sBBHII")   # what hcrc covers (16 bytes)
_U32 = struct.Struct("<I")
HEADER_SIZE = HEADER.size + _U32.size  # 20

T_HELLO = 1
T_WELCOME = 2
T_INVENTORY = 3
T_LACKS = 4
T_FRAMES = 5
T_ACK = 6
T_ERROR = 7
T_PING = 8
T_PONG = 9
T_STATUS = 10
TYPE_NAMES = {T_HELLO: "HELLO", T_WELCOME: "WELCOME", T_INVENTORY: "INVENTORY",
              T_LACKS: "LACKS", T_FRAMES: "FRAMES", T_ACK: "ACK", T_ERROR: "ERROR",
              T_PING: "PING", T_PONG: "PONG", T_STATUS: "STATUS"}
# what each side may receive
CLIENT_TO_SERVER = frozenset({T_HELLO, T_INVENTORY, T_FRAMES, T_PING, T_PONG, T_STATUS})
SERVER_TO_CLIENT = frozenset({T_WELCOME, T_LACKS, T_ACK, T_ERROR, T_PING, T_PONG})

MAX_BODY = 32 << 20            # any message
MAX_FRAMES_MSG = 8 << 20       # what a shipper puts in one FRAMES message (raw frames)
MAX_META = 4096                # the JSON meta of a FRAMES message
MAX_JSON_SMALL = 64 << 10      # HELLO, WELCOME, ACK, ERROR, PING, PONG
MAX_JSON_LIST = 4 << 20        # INVENTORY, LACKS (paged with "more")
MAX_STATUS = 1 << 20
TYPE_MAX_BODY = {T_HELLO: MAX_JSON_SMALL, T_WELCOME: MAX_JSON_SMALL,
                 T_INVENTORY: MAX_JSON_LIST, T_LACKS: MAX_JSON_LIST, T_FRAMES: MAX_BODY,
                 T_ACK: MAX_JSON_SMALL, T_ERROR: MAX_JSON_SMALL, T_PING: MAX_JSON_SMALL,
                 T_PONG: MAX_JSON_SMALL, T_STATUS: MAX_STATUS}
MAX_SEGMENTS = 100_000         # items in one INVENTORY / LACKS message
MAX_RANGES = 1 << 20           # ranges of one segment in a LACKS message
MAX_FRAME_NO = (1 << 32) - 1   # LOG frame numbers are u32
MAX_SEGNO = (1 << 31) - 1      # the store keeps segno as an INTEGER (segments, frame_ranges)
U32 = (1 << 32) - 1
I63 = (1 << 63) - 1
HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")   # no ':' (device keys are host:name)
SESSION_RE = logframe.SESSION_RE
MAX_SESSION = logframe.MAX_SESSION

# limits and timeouts of the server (docs/protocol.md); the shipper pings every PING_EVERY
MAX_CONNS = 64
HANDSHAKE_TIMEOUT = 10.0
HELLO_TIMEOUT = 10.0
MESSAGE_TIMEOUT = 60.0
IDLE_TIMEOUT = 120.0
PING_EVERY = 15.0
MAX_IN_FLIGHT = 4


class ProtocolError(Exception):
    """The peer broke the protocol, or the connection ended / timed out. str(e) == e.reason,
    one line for the log (and for the ERROR message the server sends before closing)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ConnectionClosed(ProtocolError):
    """The connection ended: EOF between two messages (`clean`), or a socket/TLS error."""

    def __init__(self, reason: str, clean: bool = False):
        super().__init__(reason)
        self.clean = clean


class ProtocolTimeout(ProtocolError):
    """Nothing arrived within the idle timeout, or a started message was not completed in time."""


class Message(NamedTuple):
    mtype: int
    body: memoryview        # a view of a bytearray owned by the message

    @property
    def name(self) -> str:
        return type_name(self.mtype)


def type_name(mtype: int) -> str:
    return TYPE_NAMES.get(mtype, f"type {mtype}")


# ------------------------------------------------------------------------------ encoding
def _blen(b) -> int:
    return b.nbytes if isinstance(b, memoryview) else len(b)


def header(mtype: int, body_len: int, bcrc: int, flags: int = 0,
           version: int = PROTO_VERSION) -> bytes:
    h = HEADER.pack(MAGIC, version, mtype, flags, body_len, bcrc)
    return h + _U32.pack(crc32(h))


def encode(mtype: int, body_parts=()) -> list:
    """[header, *body_parts]: one message whose body is the concatenation of body_parts
    (bytes / bytearray / memoryview; not copied). ValueError when the body is too large."""
    parts = [p for p in body_parts if _blen(p)]
    n = sum(_blen(p) for p in parts)
    limit = TYPE_MAX_BODY.get(mtype, MAX_BODY)
    if n > limit:
        raise ValueError(f"{type_name(mtype)} body of {n} bytes exceeds {limit}")
    crc = 0
    for p in parts:
        crc = crc32(p, crc)
    return [header(mtype, n, crc), *parts]


def dump_json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_json(mtype: int, obj: dict) -> list:
    return encode(mtype, [dump_json(obj)])


def pack_frames(meta: dict, raw_frames) -> list:
    """The body parts of a FRAMES message: u32 meta length, JSON meta (with "n" set to the
    number of frames), then the raw LOG frames (not copied)."""
    meta = dict(meta, n=len(raw_frames))
    m = dump_json(meta)
    if len(m) > MAX_META:
        raise ValueError(f"FRAMES meta of {len(m)} bytes exceeds {MAX_META}")
    return [_U32.pack(len(m)) + m, *raw_frames]


def encode_frames(meta: dict, raw_frames) -> list:
    return encode(T_FRAMES, pack_frames(meta, raw_frames))


def send_buffers(sock, buffers, *, join_below: int = 64 << 10) -> None:
    """Send a message (or several) given as a list of buffers, without copying large ones.
    Plain sockets: sendmsg until everything is out; TLS sockets (no sendmsg): consecutive
    buffers smaller than join_below are joined, large ones go out with their own sendall."""
    if isinstance(sock, ssl.SSLSocket):
        small: list = []
        for b in buffers:
            if _blen(b) < join_below:
                small.append(b)
                continue
            if small:
                sock.sendall(b"".join(small))
                small = []
            sock.sendall(b)
        if small:
            sock.sendall(b"".join(small))
        return
    views = [memoryview(b).cast("B") for b in buffers if _blen(b)]
    while views:
        n = sock.sendmsg(views[:512])   # IOV_MAX is 1024
        while views and n >= views[0].nbytes:
            n -= views.pop(0).nbytes
        if n:
            views[0] = views[0][n:]


def tune_socket(sock) -> None:
    """TCP_NODELAY (messages are written whole; a small ACK or HELLO must not wait for the
    peer's delayed ACK, ~40 ms) and keepalive, on a TCP socket (before wrapping it in TLS)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError:
        pass


# ------------------------------------------------------------------------------ reading
class _Reader:
    """recv_into with deadlines on a socket (plain or TLS), or readinto on a file object."""

    def __init__(self, src):
        self.src = src
        self.is_sock = hasattr(src, "recv_into")

    def fill(self, view: memoryview, deadline: float | None, what: str,
             started: bool) -> int:
        """Fill view; returns bytes read (< len(view) only when EOF came before any byte and
        started is False)."""
        got, n_want = 0, len(view)
        while got < n_want:
            if self.is_sock:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._timeout(what, started or got > 0)
                    self.src.settimeout(left)
                try:
                    n = self.src.recv_into(view[got:])
                except (socket.timeout, TimeoutError):
                    raise self._timeout(what, started or got > 0) from None
                except ssl.SSLError as e:
                    raise ConnectionClosed(f"TLS error: {e.reason or e}") from None
                except OSError as e:
                    raise ConnectionClosed(f"connection error: {e.strerror or e}") from None
            else:
                try:
                    n = self.src.readinto(view[got:])
                except (ValueError, OSError) as e:
                    raise ConnectionClosed(f"read error: {e}") from None
                if n is None:  # non-blocking file without data
                    raise ProtocolTimeout(f"no data for {what}")
            if not n:
                if got == 0 and not started:
                    return 0
                raise ProtocolError(f"truncated message: connection closed after {got} of "
                                    f"{n_want} bytes of the {what}")
            got += n
        return got

    def _timeout(self, what: str, started: bool) -> ProtocolTimeout:
        if started:
            return ProtocolTimeout(f"message not completed in time (stalled in the {what})")
        return ProtocolTimeout("idle timeout: no message")


def check_header(buf, *, max_body: int = MAX_BODY, accept=None) -> tuple[int, int, int]:
    """(type, length, bcrc) of a 20-byte message header, or ProtocolError."""
    magic, version, mtype, flags, length, bcrc = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if crc32(memoryview(buf)[:HEADER.size]) != _U32.unpack_from(buf, HEADER.size)[0]:
        raise ProtocolError("header checksum mismatch")
    if version != PROTO_VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks "
                            f"{PROTO_VERSION})")
    if mtype not in TYPE_NAMES:
        raise ProtocolError(f"unknown message type {mtype}")
    if accept is not None and mtype not in accept:
        raise ProtocolError(f"unexpected message {type_name(mtype)}")
    if flags:
        raise ProtocolError(f"reserved flags set ({flags:#x})")
    limit = min(max_body, TYPE_MAX_BODY[mtype])
    if length > limit:
        raise ProtocolError(f"{type_name(mtype)} body of {length} bytes exceeds the limit "
                            f"of {limit}")
    return mtype, length, bcrc


def read_message(src, *, max_body: int = MAX_BODY, accept=None,
                 idle_timeout: float | None = None,
                 msg_timeout: float | None = None) -> Message | None:
    """The next message from src (a socket, TLS socket, or binary file object).

    Returns None on a clean end of stream between messages. idle_timeout: seconds to wait for
    the first byte of a message; msg_timeout: seconds from its first byte until it is complete
    (slow peers are cut off). Both None: block. accept: the set of types this side may
    receive. The body is allocated only after the header passed every check, so a peer can
    make this side allocate at most min(max_body, TYPE_MAX_BODY[type]) bytes.
    Raises ProtocolError (ProtocolTimeout, ConnectionClosed) for everything else.
    """
    r = _Reader(src)
    hb = bytearray(HEADER_SIZE)
    hv = memoryview(hb)
    now = time.monotonic()
    idle_deadline = None if idle_timeout is None else now + idle_timeout
    # the first byte starts the message clock
    if r.fill(hv[:1], idle_deadline, "message header", started=False) == 0:
        return None
    deadline = None if msg_timeout is None else time.monotonic() + msg_timeout
    r.fill(hv[1:], deadline, "message header", started=True)
    mtype, length, bcrc = check_header(hb, max_body=max_body, accept=accept)
    body = bytearray(length)
    bv = memoryview(body)
    if length:
        r.fill(bv, deadline, f"{type_name(mtype)} body", started=True)
    if crc32(bv) != bcrc:
        raise ProtocolError(f"{type_name(mtype)} body checksum mismatch")
    return Message(mtype, bv)


def data_waiting(sock, timeout: float = 0.0) -> bool:
    """True when bytes of a next message are available on sock within timeout seconds
    (already decrypted TLS data counts)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    p = select.poll()
    try:
        p.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(p.poll(max(0, int(timeout * 1000))))
    except (OSError, ValueError):
        return True  # let the read report the error


# ------------------------------------------------------------------------------ JSON bodies
def _no_constant(name):
    raise ValueError(f"{name} is not allowed")


def load_json(body, *, max_len: int = MAX_JSON_LIST, what: str = "message") -> dict:
    """A JSON object from a message body, or ProtocolError (bad UTF-8, bad JSON, NaN,
    nesting too deep, huge numbers, not an object, too long)."""
    if len(body) > max_len:
        raise ProtocolError(f"{what}: JSON body of {len(body)} bytes exceeds {max_len}")
    try:
        text = bytes(body).decode("utf-8")
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError(f"{what}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int too long, NaN
        raise ProtocolError(f"{what}: bad JSON body ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: JSON body is not an object")
    return obj


class Field(NamedTuple):
    """A constraint for `expect`: type (int, str, bool, list, dict, float), range (ints,
    floats: lo..hi inclusive), length (str: characters; list/dict: items), a regex for str,
    optional (absent or null allowed)."""
    type: type
    lo: float | None = None
    hi: float | None = None
    maxlen: int | None = None
    pattern: re.Pattern | None = None
    optional: bool = False
    minlen: int = 0


def _check_value(name: str, v: Any, f: Field, what: str) -> None:
    t = f.type
    if t is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif t is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    else:
        ok = isinstance(v, t)
    if not ok:
        raise ProtocolError(f"{what}: field {name!r} must be {t.__name__}, "
                            f"got {type(v).__name__}")
    if t in (int, float):
        if (f.lo is not None and v < f.lo) or (f.hi is not None and v > f.hi):
            raise ProtocolError(f"{what}: field {name!r} = {v} out of range "
                                f"[{f.lo}, {f.hi}]")
    elif t in (str, list, dict):
        maxlen = f.maxlen if f.maxlen is not None else (256 if t is str else None)
        if (maxlen is not None and len(v) > maxlen) or len(v) < f.minlen:
            raise ProtocolError(f"{what}: field {name!r} has {len(v)} items/characters "
                                f"(allowed {f.minlen}..{maxlen})")
        if t is str and f.pattern is not None and not f.pattern.fullmatch(v):
            raise ProtocolError(f"{what}: field {name!r} = {v[:64]!r} is not valid")


def expect(obj, fields: dict, *, what: str = "message") -> dict:
    """Check obj (a dict) against fields: {name: type | Field}. A plain type means required,
    ints >= 0 and < 2**63, str of 1..256 characters. Unknown extra keys are ignored (they are
    not returned). Returns {name: value} of the checked fields (None for absent optional
    ones). Raises ProtocolError naming the first bad field."""
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    out: dict[str, Any] = {}
    for name, spec in fields.items():
        f = spec if isinstance(spec, Field) else _default_field(spec)
        v = obj.get(name)
        if v is None:
            if f.optional:
                out[name] = None
                continue
            raise ProtocolError(f"{what}: missing field {name!r}")
        _check_value(name, v, f, what)
        out[name] = v
    return out


def _default_field(t: type) -> Field:
    if t is int:
        return Field(int, 0, I63)
    if t is str:
        return Field(str, maxlen=256, minlen=1)
    return Field(t)


# field definitions shared by the messages
F_HOST = Field(str, maxlen=253, minlen=1, pattern=HOST_RE)
F_SESSION = Field(str, maxlen=MAX_SESSION, minlen=1, pattern=SESSION_RE)
F_SEGNO = Field(int, 0, MAX_SEGNO)
F_SEG_ID = Field(int, 0, U32)
F_FRAME = Field(int, 0, MAX_FRAME_NO)
F_END = Field(int, 0, MAX_FRAME_NO + 1)
F_ID = Field(int, 0, I63)

HELLO = {"proto": Field(int, PROTO_VERSION, PROTO_VERSION), "host": F_HOST,
         "tool": Field(str, maxlen=64, minlen=1), "conn": Field(int, 0, 1023),
         "conns": Field(int, 1, 1024)}
WELCOME = {"proto": Field(int, PROTO_VERSION, PROTO_VERSION), "host": F_HOST,
           "server": Field(str, maxlen=128, minlen=1), "max_body": Field(int, 1, MAX_BODY)}
INVENTORY_ITEM = {"session": F_SESSION, "segno": F_SEGNO, "seg_id": F_SEG_ID,
                  "frames": F_END, "sealed": bool}
LACKS_ITEM = {"session": F_SESSION, "segno": F_SEGNO,
              "ranges": Field(list, maxlen=MAX_RANGES)}
FRAMES_META = {"session": F_SESSION, "segno": F_SEGNO, "seg_id": F_SEG_ID, "first": F_FRAME,
               "n": Field(int, 1, MAX_BODY // logframe.FRAME_SIZE), "id": F_ID}
ACK = {"id": F_ID, "session": F_SESSION, "segno": F_SEGNO, "first": F_FRAME, "end": F_END}
ERROR = {"reason": Field(str, maxlen=1024, minlen=0)}
PING = {"t": Field(int, 0, I63)}


def _segments(obj: dict, item: dict, what: str) -> dict:
    d = expect(obj, {"segments": Field(list, maxlen=MAX_SEGMENTS),
                     "more": Field(bool, optional=True)}, what=what)
    segs = []
    seen = set()
    for k, s in enumerate(d["segments"]):
        v = expect(s, item, what=f"{what} segment {k}")
        key = (v["session"], v["segno"])
        if key in seen:
            raise ProtocolError(f"{what}: segment {key[0]}.{key[1]} listed twice")
        seen.add(key)
        segs.append(v)
    return {"segments": segs, "more": bool(d["more"])}


def check_ranges(ranges, what: str = "ranges") -> list[list[int]]:
    """[[a, e], ...] frame ranges: 0 <= a < e <= 2**32, sorted, not overlapping."""
    out, prev = [], -1
    for r in ranges:
        if (not isinstance(r, list) or len(r) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            raise ProtocolError(f"{what}: a range must be [first, end] integers")
        a, e = r
        if not (0 <= a < e <= MAX_FRAME_NO + 1) or a < prev:
            raise ProtocolError(f"{what}: bad range [{a}, {e}]")
        prev = e
        out.append([a, e])
    return out


def parse_json(msg: Message) -> dict:
    """The validated JSON body of a non-FRAMES message: a dict of its known fields (for
    INVENTORY / LACKS: {"segments": [...], "more": bool}; STATUS: the object as sent)."""
    t, what = msg.mtype, type_name(msg.mtype)
    obj = load_json(msg.body, max_len=TYPE_MAX_BODY.get(t, MAX_JSON_SMALL), what=what)
    if t == T_HELLO:
        return expect(obj, HELLO, what=what)
    if t == T_WELCOME:
        return expect(obj, WELCOME, what=what)
    if t == T_INVENTORY:
        return _segments(obj, INVENTORY_ITEM, what)
    if t == T_LACKS:
        d = _segments(obj, LACKS_ITEM, what)
        for s in d["segments"]:
            s["ranges"] = check_ranges(s["ranges"], f"{what} {s['session']}.{s['segno']}")
        return d
    if t == T_ACK:
        d = expect(obj, ACK, what=what)
        if d["end"] < d["first"]:
            raise ProtocolError(f"{what}: end {d['end']} < first {d['first']}")
        return d
    if t == T_ERROR:
        return expect(obj, ERROR, what=what)
    if t in (T_PING, T_PONG):
        return expect(obj, PING, what=what)
    if t == T_STATUS:
        return obj
    raise ProtocolError(f"{what} has no JSON body")


# ------------------------------------------------------------------------------ FRAMES
def unpack_frames(body) -> tuple[dict, list[memoryview]]:
    """(meta, raw frames) of a FRAMES body. Checks the meta JSON field by field and that the
    raw LOG frames tile the rest of the body exactly: each frame header is checked by the
    LOG's own parser (magic, header CRC, version, kind, lengths), its seg_id must be the
    meta's and the frame numbers must be first, first+1, ... The frame bodies (lz4) are not
    decoded here: the store decodes and checks them. The views point into body (no copy)."""
    mv = memoryview(body).cast("B")
    if len(mv) < 4:
        raise ProtocolError("FRAMES: body shorter than its meta length")
    mlen = _U32.unpack_from(mv)[0]
    if mlen > MAX_META or 4 + mlen > len(mv):
        raise ProtocolError(f"FRAMES: bad meta length {mlen}")
    meta = expect(load_json(mv[4:4 + mlen], max_len=MAX_META, what="FRAMES meta"),
                  FRAMES_META, what="FRAMES meta")
    if meta["first"] + meta["n"] > MAX_FRAME_NO + 1:
        raise ProtocolError("FRAMES meta: frame numbers past 2**32")
    frames: list[memoryview] = []
    off, end = 4 + mlen, len(mv)
    fs = logframe.FRAME_SIZE
    while off < end:
        k = len(frames)
        if k >= meta["n"]:
            raise ProtocolError(f"FRAMES: {end - off} bytes after the {meta['n']} frames")
        h = logframe.parse_header(mv[off:off + fs])
        if isinstance(h, str):
            raise ProtocolError(f"FRAMES: frame {k} (no. {meta['first'] + k}): {h}")
        if h.seg_id != meta["seg_id"]:
            raise ProtocolError(f"FRAMES: frame {k} has seg_id {h.seg_id:#x}, "
                                f"the meta says {meta['seg_id']:#x}")
        if h.frame_no != meta["first"] + k:
            raise ProtocolError(f"FRAMES: frame {k} is no. {h.frame_no}, expected "
                                f"{meta['first'] + k}")
        flen = fs + h.stored_len
        if off + flen > end:
            raise ProtocolError(f"FRAMES: frame {k} (no. {h.frame_no}) runs past the body")
        frames.append(mv[off:off + flen])
        off += flen
    if len(frames) != meta["n"]:
        raise ProtocolError(f"FRAMES: {len(frames)} frames in the body, the meta says "
                            f"{meta['n']}")
    return meta, frames
