"""The wire protocol (blkrewind/formats/wire.py): framing, limits, validation, fuzzing."""
from __future__ import annotations

import io
import json
import os
import random
import socket
import struct
import threading
import time
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth import history

from blkrewind.formats import logframe, wire


def segment_frames(path) -> tuple[int | None, list[bytes]]:
    """(seg_id, raw frames) of a segment file, walked with the LOG's header parser (seg_id
    None: no frames)."""
    data = open(path, "rb").read()
    frames, off = [], 0
    seg_id = None
    while off < len(data):
        h = logframe.parse_header(data[off:off + logframe.FRAME_SIZE])
        assert not isinstance(h, str), h
        seg_id = h.seg_id if seg_id is None else seg_id
        n = logframe.FRAME_SIZE + h.stored_len
        frames.append(data[off:off + n])
        off += n
    return seg_id, frames


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    d = tmp_path_factory.mktemp("wirelog")
    s = history(d, seed=3, nbios=60, segment_bytes=1 << 20)
    segs = logframe.list_segments(d)
    seg_id, frames = segment_frames(segs[0].path)
    return s.session, segs[0].segno, seg_id, frames


def read_all(data: bytes, **kw):
    return wire.read_message(io.BytesIO(data), **kw)


def msg_bytes(bufs) -> bytes:
    return b"".join(bytes(b) for b in bufs)


# ---------------------------------------------------------------------------------- framing
def test_header_layout():
    h = wire.header(wire.T_PING, 5, 123)
    assert len(h) == wire.HEADER_SIZE == 20
    assert h[:4] == b"BRW1" and h[4] == wire.PROTO_VERSION and h[5] == wire.T_PING
    assert struct.unpack_from("<HIII", h, 6) == (0, 5, 123, zlib.crc32(h[:16]))


@pytest.mark.parametrize("mtype,obj", [
    (wire.T_HELLO, {"proto": 1, "host": "db-1.example", "tool": "0.1.0", "conn": 0, "conns": 2}),
    (wire.T_WELCOME, {"proto": 1, "host": "db-1", "server": "rep", "max_body": wire.MAX_BODY}),
    (wire.T_INVENTORY, {"segments": [{"session": "S1", "segno": 0, "seg_id": 7, "frames": 9,
                                      "sealed": True}], "more": False}),
    (wire.T_LACKS, {"segments": [{"session": "S1", "segno": 3, "ranges": [[0, 2], [5, 9]]}],
                    "more": True}),
    (wire.T_ACK, {"id": 4, "session": "S1", "segno": 0, "first": 1, "end": 5}),
    (wire.T_ERROR, {"reason": "no"}),
    (wire.T_PING, {"t": 12}),
    (wire.T_PONG, {"t": 12}),
    (wire.T_STATUS, {"anything": [1, 2, {"x": "y"}]}),
])
def test_json_roundtrip(mtype, obj):
    m = read_all(msg_bytes(wire.encode_json(mtype, obj)))
    assert m.mtype == mtype
    got = wire.parse_json(m)
    for k, v in obj.items():
        assert got[k] == v


def test_clean_eof_and_stream_of_messages():
    data = msg_bytes(wire.encode_json(wire.T_PING, {"t": 1})) + \
        msg_bytes(wire.encode(wire.T_FRAMES, [b"\0\0\0\0"]))
    f = io.BytesIO(data)
    ping, frames = wire.read_message(f), wire.read_message(f)
    assert ping is not None and ping.mtype == wire.T_PING
    assert frames is not None and bytes(frames.body) == b"\0\0\0\0"
    assert wire.read_message(f) is None


def good_ping() -> bytearray:
    return bytearray(msg_bytes(wire.encode_json(wire.T_PING, {"t": 1})))


def rehead(b: bytearray) -> bytearray:
    b[16:20] = struct.pack("<I", zlib.crc32(bytes(b[:16])))
    return b


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b.__setitem__(slice(0, 4), b"XXXX"), "bad magic"),
    (lambda b: b.__setitem__(8, b[8] ^ 1), "header checksum"),
    (lambda b: rehead(b).__setitem__(4, 2) or rehead(b), "unsupported protocol version 2"),
    (lambda b: b.__setitem__(5, 99) or rehead(b), "unknown message type 99"),
    (lambda b: b.__setitem__(6, 1) or rehead(b), "reserved flags"),
    (lambda b: b.__setitem__(slice(8, 12), struct.pack("<I", 1 << 30)) or rehead(b),
     "exceeds the limit"),
    (lambda b: b.__setitem__(-1, b[-1] ^ 0xFF), "body checksum mismatch"),
    (lambda b: b.__delitem__(slice(-2, None)), "truncated message"),
    (lambda b: b.__delitem__(slice(7, None)), "truncated message"),
])
def test_bad_header_and_body(mutate, reason):
    b = good_ping()
    mutate(b)
    with pytest.raises(wire.ProtocolError, match=reason):
        read_all(bytes(b))


def test_type_limit_checked_before_allocating():
    # a HELLO claiming 1 MiB: refused from the header alone (HELLO bodies are <= 64 KiB)
    h = wire.header(wire.T_HELLO, 1 << 20, 0)
    with pytest.raises(wire.ProtocolError, match="HELLO body of 1048576 bytes exceeds"):
        read_all(h)
    # the caller's max_body applies to FRAMES
    h = wire.header(wire.T_FRAMES, 5000, 0)
    with pytest.raises(wire.ProtocolError, match="exceeds the limit of 4096"):
        read_all(h, max_body=4096)


def test_accept_set():
    with pytest.raises(wire.ProtocolError, match="unexpected message ACK"):
        read_all(msg_bytes(wire.encode_json(wire.T_ACK, {"id": 1, "session": "s", "segno": 0,
                                                         "first": 0, "end": 1})),
                 accept=wire.CLIENT_TO_SERVER)


def test_encode_refuses_oversized():
    with pytest.raises(ValueError):
        wire.encode(wire.T_HELLO, [bytes(wire.MAX_JSON_SMALL + 1)])


# ---------------------------------------------------------------------------------- sockets
def test_socket_send_large_without_copy_and_read():
    a, b = socket.socketpair()
    try:
        body = os.urandom(3 << 20)
        bufs = wire.encode(wire.T_FRAMES, [b"ab", memoryview(body), b"c"])
        t = threading.Thread(target=wire.send_buffers, args=(a, bufs))
        t.start()
        m = wire.read_message(b, idle_timeout=5, msg_timeout=5)
        t.join()
        assert m is not None and bytes(m.body) == b"ab" + body + b"c"
    finally:
        a.close()
        b.close()


def test_idle_timeout_and_slow_loris():
    a, b = socket.socketpair()
    try:
        t0 = time.monotonic()
        with pytest.raises(wire.ProtocolTimeout, match="idle"):
            wire.read_message(b, idle_timeout=0.2, msg_timeout=0.5)
        assert time.monotonic() - t0 < 1.5
        data = good_ping()
        stop = threading.Event()

        def drip():
            for c in data:
                if stop.wait(0.05):
                    return
                try:
                    a.send(bytes([c]))
                except OSError:
                    return
        th = threading.Thread(target=drip)
        th.start()
        t0 = time.monotonic()
        with pytest.raises(wire.ProtocolTimeout, match="not completed in time"):
            wire.read_message(b, idle_timeout=5, msg_timeout=0.4)
        assert time.monotonic() - t0 < 1.5
        stop.set()
        th.join()
    finally:
        a.close()
        b.close()


def test_truncated_then_eof_on_socket():
    a, b = socket.socketpair()
    try:
        a.sendall(bytes(good_ping())[:10])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(wire.ProtocolError, match="truncated"):
            wire.read_message(b, idle_timeout=2, msg_timeout=2)
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("body,reason", [
    (b"\xff\xfe", "bad JSON"),
    (b"[1,2]", "not an object"),
    (b'{"t": NaN}', "bad JSON"),
    (b'{"t": ' + b"9" * 5000 + b"}", "bad JSON"),
    (b'{"t": true}', "must be int"),
    (b'{"t": -1}', "out of range"),
    (b'{"t": 1.5}', "must be int"),
    (b"{}", "missing field 't'"),
])
def test_bad_json(body, reason):
    m = wire.Message(wire.T_PING, memoryview(body))
    with pytest.raises(wire.ProtocolError, match=reason):
        wire.parse_json(m)


def test_deep_json():
    body = b'{"t": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    with pytest.raises(wire.ProtocolError, match="nested too deeply"):
        wire.parse_json(wire.Message(wire.T_STATUS, memoryview(body)))


@pytest.mark.parametrize("obj,reason", [
    ({"proto": 2, "host": "h", "tool": "x", "conn": 0, "conns": 1}, "proto"),
    ({"proto": 1, "host": "a:b", "tool": "x", "conn": 0, "conns": 1}, "host"),
    ({"proto": 1, "host": "", "tool": "x", "conn": 0, "conns": 1}, "host"),
    ({"proto": 1, "host": "h" * 300, "tool": "x", "conn": 0, "conns": 1}, "host"),
    ({"proto": 1, "host": "h", "tool": "x", "conn": 0}, "missing field 'conns'"),
])
def test_hello_validation(obj, reason):
    m = wire.Message(wire.T_HELLO, memoryview(wire.dump_json(obj)))
    with pytest.raises(wire.ProtocolError, match=reason):
        wire.parse_json(m)


def test_lacks_and_inventory_validation():
    def lacks(segs):
        return wire.Message(wire.T_LACKS, memoryview(wire.dump_json({"segments": segs})))
    with pytest.raises(wire.ProtocolError, match="bad range"):
        wire.parse_json(lacks([{"session": "s", "segno": 0, "ranges": [[5, 3]]}]))
    with pytest.raises(wire.ProtocolError, match="bad range"):
        wire.parse_json(lacks([{"session": "s", "segno": 0, "ranges": [[0, 5], [3, 8]]}]))
    with pytest.raises(wire.ProtocolError, match="range must be"):
        wire.parse_json(lacks([{"session": "s", "segno": 0, "ranges": [[0, True]]}]))
    with pytest.raises(wire.ProtocolError, match="listed twice"):
        wire.parse_json(lacks([{"session": "s", "segno": 0, "ranges": []}] * 2))
    inv = wire.Message(wire.T_INVENTORY, memoryview(wire.dump_json(
        {"segments": [{"session": "../x", "segno": 0, "seg_id": 1, "frames": 1,
                       "sealed": False}]})))
    with pytest.raises(wire.ProtocolError, match="session"):
        wire.parse_json(inv)


# ---------------------------------------------------------------------------------- FRAMES
def test_frames_roundtrip(seg):
    session, segno, seg_id, frames = seg
    assert len(frames) >= 4
    meta = {"session": session, "segno": segno, "seg_id": seg_id, "first": 1, "id": 9}
    m = read_all(msg_bytes(wire.encode_frames(meta, frames[1:4])))
    got_meta, got = wire.unpack_frames(m.body)
    assert got_meta == dict(meta, n=3)
    assert [bytes(f) for f in got] == frames[1:4]
    # frame 0 (the segment header) and the SEAL travel like the others
    meta0 = dict(meta, first=0)
    _, got = wire.unpack_frames(memoryview(msg_bytes(wire.pack_frames(meta0, frames))))
    assert len(got) == len(frames)


def _frames_body(meta, frames, n=None) -> bytearray:
    m = wire.dump_json(dict(meta, n=len(frames) if n is None else n))
    return bytearray(struct.pack("<I", len(m)) + m + b"".join(frames))


def test_frames_bad(seg):
    session, segno, seg_id, frames = seg
    meta = {"session": session, "segno": segno, "seg_id": seg_id, "first": 1, "id": 9}
    fr = frames[1:3]
    cases = [
        (_frames_body(meta, fr, n=3), "2 frames in the body, the meta says 3"),
        (_frames_body(meta, fr, n=1), "bytes after the 1 frames"),
        (_frames_body(dict(meta, first=2), fr), "is no. 1, expected 2"),
        (_frames_body(dict(meta, seg_id=seg_id ^ 1), fr), "has seg_id"),
        (_frames_body(meta, fr)[:-1], "runs past the body"),
        (_frames_body(meta, [fr[0], fr[1][:30]]), "incomplete frame header"),
        (_frames_body(dict(meta, session="a b"), fr), "session"),
        (_frames_body(dict(meta, first=-1), fr), "out of range"),
        (bytearray(b"\xff\xff\xff\xff"), "bad meta length"),
        (bytearray(b"\x01"), "shorter"),
        (_frames_body(meta, [b"x" * 48]), "bad magic"),
    ]
    corrupt = bytearray(fr[0])
    corrupt[20] ^= 1
    cases.append((_frames_body(meta, [bytes(corrupt), fr[1]]), "header checksum"))
    for body, reason in cases:
        with pytest.raises(wire.ProtocolError, match=reason):
            wire.unpack_frames(body)


# ---------------------------------------------------------------------------------- fuzz
def _process(data: bytes, max_body: int) -> int:
    """Read every message of data, parse each body as the server would. Returns the number of
    messages that passed. Only ProtocolError may escape."""
    f = io.BytesIO(data)
    n = 0
    while True:
        try:
            m = wire.read_message(f, max_body=max_body)
        except wire.ProtocolError:
            return n
        if m is None:
            return n
        try:
            if m.mtype == wire.T_FRAMES:
                wire.unpack_frames(m.body)
            else:
                wire.parse_json(m)
            n += 1
        except wire.ProtocolError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)


@st.composite
def messages(draw, frames):
    kind = draw(st.integers(0, 4))
    if kind == 0:   # a FRAMES message of real frames, perhaps lying about itself
        session, segno, seg_id, fr = frames
        a = draw(st.integers(0, len(fr) - 1))
        e = draw(st.integers(a + 1, min(len(fr), a + 4)))
        meta = {"session": session, "segno": segno, "seg_id": seg_id,
                "first": draw(st.sampled_from([a, a, a + 1, 0])), "id": draw(st.integers(0, 9))}
        return msg_bytes(wire.encode_frames(meta, fr[a:e]))
    if kind == 1:   # a JSON message with arbitrary fields
        t = draw(st.sampled_from(sorted(wire.TYPE_NAMES)))
        obj = draw(st.dictionaries(st.sampled_from(
            ["proto", "host", "tool", "conn", "conns", "segments", "more", "session", "segno",
             "seg_id", "frames", "sealed", "ranges", "id", "first", "end", "reason", "t", "n"]),
            json_values, max_size=8))
        try:
            return msg_bytes(wire.encode(t, [json.dumps(obj).encode()]))
        except ValueError:
            return b""
    if kind == 2:   # raw bytes after a valid-looking header
        t = draw(st.integers(0, 255))
        body = draw(st.binary(max_size=300))
        return wire.header(t, len(body), zlib.crc32(body)) + body
    if kind == 3:   # a header with a random length and a valid CRC
        return wire.header(draw(st.integers(0, 12)), draw(st.integers(0, 2**32 - 1)), 0,
                           version=draw(st.sampled_from([1, 1, 0, 2])))
    return draw(st.binary(max_size=64))


@st.composite
def mutated_streams(draw, frames):
    data = bytearray(b"".join(draw(st.lists(messages(frames), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        op = draw(st.integers(0, 3))
        i = draw(st.integers(0, len(data) - 1))
        if op == 0:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            del data[i:i + draw(st.integers(1, 64))]
        elif op == 2:
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        else:
            data = data[:i]
    return bytes(data)


def test_fuzz_reader_only_protocol_errors(seg):
    @settings(max_examples=1500, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated_streams(seg))
    def run(data):
        _process(data, max_body=1 << 20)
    run()


def test_fuzz_mutated_stream_of_many_messages(seg):
    """20000 mutations of a stream of valid messages (every type, real LOG frames)."""
    session, segno, seg_id, fr = seg
    base = [msg_bytes(wire.encode_frames({"session": session, "segno": segno, "seg_id": seg_id,
                                          "first": a, "id": a}, fr[a:a + 3]))
            for a in range(0, len(fr) - 3, 3)]
    messages: list[tuple[int, dict]] = [
        (wire.T_HELLO, {"proto": 1, "host": "h", "tool": "t", "conn": 0, "conns": 1}),
        (wire.T_INVENTORY, {"segments": [{"session": "s", "segno": 1, "seg_id": 2,
                                          "frames": 3, "sealed": False}]}),
        (wire.T_LACKS, {"segments": [{"session": "s", "segno": 1, "ranges": [[1, 2]]}]}),
        (wire.T_ACK, {"id": 1, "session": "s", "segno": 0, "first": 0, "end": 1}),
        (wire.T_PING, {"t": 5}), (wire.T_STATUS, {"x": 1})]
    base += [msg_bytes(wire.encode_json(t, o)) for t, o in messages]
    rng = random.Random(7)
    passed = 0
    for _ in range(20000):
        data = bytearray(b"".join(rng.sample(base, 3)))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            op = rng.random()
            if op < 0.6:
                data[i] ^= 1 << rng.randrange(8)
            elif op < 0.8:
                del data[i:i + rng.randint(1, 100)]
            else:
                data[i:i] = rng.randbytes(rng.randint(1, 40))
        passed += _process(bytes(data), max_body=1 << 20)
    assert passed > 1000   # mutations after the first message leave it intact


def test_fuzz_never_allocates_more_than_max_body():
    """Headers with valid CRCs and arbitrary lengths and types: the reader's allocations stay
    below max_body (measured with tracemalloc), whatever the header claims."""
    max_body = 64 << 10
    rng = random.Random(11)
    tracemalloc.start()
    try:
        for k in range(5000):
            tail = rng.randbytes(rng.randrange(100))
            length = rng.choice([rng.randrange(1 << 32), rng.randrange(1 << 20),
                                 rng.randrange(200)])
            data = wire.header(rng.randrange(256) if k % 2 else rng.randrange(1, 11), length,
                               zlib.crc32(tail)) + tail
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            try:
                wire.read_message(io.BytesIO(data), max_body=max_body)
            except wire.ProtocolError:
                pass
            assert tracemalloc.get_traced_memory()[1] - base < max_body + (16 << 10)
    finally:
        tracemalloc.stop()
