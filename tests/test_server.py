"""The replayer service (replayer/server.py, `blkrewind serve`): real TLS sockets on 127.0.0.1,
certificates made here, a real store, a `blkrewind serve` process; a minimal client built on
blkrewind/formats/wire.py plays the tracer's shipper."""
from __future__ import annotations

import datetime as dt
import json
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest
from conftest import assert_one_line_error, cli_command, run_cli
from synth import history

from blkrewind import tlsconf
from blkrewind.formats import logframe, wire

TIMEOUTS = ["--idle-timeout", "3", "--message-timeout", "1", "--hello-timeout", "1",
            "--store-retry", "0.5"]


# ------------------------------------------------------------------------------ helpers
def log_segments(log_dir) -> list[tuple[str, int, int | None, list[bytes]]]:
    """(session, segno, seg_id, raw frames) of every segment of a LOG directory (seg_id
    None: no frames)."""
    out = []
    for sg in logframe.list_segments(log_dir):
        data = open(sg.path, "rb").read()
        frames, off, seg_id = [], 0, None
        while off < len(data):
            h = logframe.parse_header(data[off:off + logframe.FRAME_SIZE])
            assert not isinstance(h, str), h
            seg_id = h.seg_id
            frames.append(data[off:off + logframe.FRAME_SIZE + h.stored_len])
            off += logframe.FRAME_SIZE + h.stored_len
        out.append((sg.session, sg.segno, seg_id, frames))
    return out


class ServerProc:
    """`blkrewind serve` in a subprocess, its stderr in a file."""

    def __init__(self, tmp: Path, store: Path, tls: Path | None, *extra: str, name="serve"):
        self.logpath = tmp / f"{name}.log"
        self.store = store
        mode = ["--tls", str(tls)] if tls else ["--insecure"]
        self.cmd = [*cli_command(), "serve", "--store", str(store), "--listen", "127.0.0.1:0",
                    *mode, *TIMEOUTS, *extra]
        self.start()

    def start(self) -> None:
        self._f = open(self.logpath, "a")
        self.p = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=self._f)
        self.offset = len(self.text())
        m = self.wait_log(r"listening on 127\.0\.0\.1:(\d+)", timeout=60)
        self.port = int(m.group(1))

    def text(self) -> str:
        try:
            return self.logpath.read_text()
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        return len(self.text())

    def wait_log(self, pattern: str, timeout: float = 10, start: int | None = None):
        start = self.offset if start is None else start
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text()[start:])
            if m:
                return m
            if self.p.poll() is not None:
                raise AssertionError(f"server exited {self.p.returncode}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not logged within {timeout}s:\n"
                                     f"{self.text()[start:][-3000:]}")
            time.sleep(0.02)

    def wait_count(self, needle: str, n: int, start: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.text()[start:].count(needle) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} logged {self.text()[start:].count(needle)} "
                                     f"times, expected {n}:\n{self.text()[start:][-3000:]}")
            time.sleep(0.05)

    def rss_mb(self) -> float:
        for ln in open(f"/proc/{self.p.pid}/status"):
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.p.poll() is None:
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
                raise AssertionError(f"server did not stop on {sig}:\n{self.text()[-2000:]}")
        self._f.close()
        return self.p.returncode


def client_ctx(tls: Path, host_dir: Path | None, ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(ca or tls / "ca.pem"))
    if host_dir is not None:
        ctx.load_cert_chain(str(host_dir / "cert.pem"), str(host_dir / "key.pem"))
    return ctx


class Client:
    def __init__(self, port: int, ctx: ssl.SSLContext | None, timeout: float = 10):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        wire.tune_socket(raw)
        self.s = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx else raw
        self.next_id = 0

    def send(self, bufs) -> None:
        wire.send_buffers(self.s, bufs)

    def recv(self, timeout: float = 10) -> wire.Message | None:
        return wire.read_message(self.s, accept=wire.SERVER_TO_CLIENT, idle_timeout=timeout,
                                 msg_timeout=timeout)

    def hello(self, host: str = "synth", conn: int = 0) -> dict:
        self.send(wire.encode_json(wire.T_HELLO, {"proto": 1, "host": host, "tool": "test",
                                                  "conn": conn, "conns": 2}))
        m = self.recv()
        assert m is not None and m.mtype == wire.T_WELCOME, m and wire.parse_json(m)
        return wire.parse_json(m)

    def frames_msg(self, seg, a: int, e: int, mid: int | None = None) -> list:
        session, segno, seg_id, frames = seg
        if mid is None:
            mid, self.next_id = self.next_id, self.next_id + 1
        return wire.encode_frames({"session": session, "segno": segno, "seg_id": seg_id,
                                   "first": a, "id": mid}, frames[a:e])

    def inventory(self, segs) -> list[dict]:
        inv = [{"session": s, "segno": n, "seg_id": sid, "frames": len(fr), "sealed": True}
               for s, n, sid, fr in segs]
        self.send(wire.encode_json(wire.T_INVENTORY, {"segments": inv, "more": False}))
        out = []
        while True:
            m = self.recv()
            assert m is not None and m.mtype == wire.T_LACKS, m and wire.parse_json(m)
            d = wire.parse_json(m)
            out += d["segments"]
            if not d["more"]:
                return out

    def ship(self, segs, *, per_msg: int = 6, window: int = 4, lacks=None,
             on_ack=None) -> list[dict]:
        """Send frames (all of segs, or the LACKS ranges) with up to `window` unacked
        messages; returns the ACKs, checked against what was sent."""
        by_key = {(s[0], s[1]): s for s in segs}
        todo = []
        if lacks is None:
            for seg in segs:
                todo += [(seg, a, min(a + per_msg, len(seg[3])))
                         for a in range(0, len(seg[3]), per_msg)]
        else:
            for it in lacks:
                seg = by_key[(it["session"], it["segno"])]
                for a, e in it["ranges"]:
                    todo += [(seg, x, min(x + per_msg, e)) for x in range(a, e, per_msg)]
        sent: dict[int, tuple] = {}
        acks = []
        k = 0
        while k < len(todo) or sent:
            while k < len(todo) and len(sent) < window:
                seg, a, e = todo[k]
                mid = self.next_id
                self.send(self.frames_msg(seg, a, e))
                sent[mid] = (seg[0], seg[1], a, e)
                k += 1
            m = self.recv()
            assert m is not None, "server closed"
            d = wire.parse_json(m)
            assert m.mtype == wire.T_ACK, d
            assert (d["session"], d["segno"], d["first"], d["end"]) == sent.pop(d["id"])
            acks.append(d)
            if on_ack is not None:
                on_ack(d)
        return acks

    def error_or_close(self, timeout: float = 10) -> str | None:
        """The reason of the server's ERROR, or None if it closed without one."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                m = self.recv(max(0.1, deadline - time.monotonic()))
            except wire.ProtocolTimeout:
                raise AssertionError("the server neither answered nor closed") from None
            except wire.ProtocolError:
                return None
            if m is None:
                return None
            if m.mtype == wire.T_ERROR:
                return wire.parse_json(m)["reason"]

    def error(self, timeout: float = 10) -> str:
        """The reason of the server's ERROR; fails if it closed without one."""
        reason = self.error_or_close(timeout)
        assert reason is not None, "the server closed without an ERROR"
        return reason

    def close(self) -> None:
        try:
            self.s.close()
        except OSError:
            pass


def store_counts(store: Path, session: str) -> tuple:
    from blkrewind.replayer.query import open_for_reading

    with open_for_reading(store) as st:
        return (st.query_one("SELECT count(*) FROM frame_ranges WHERE session = ?", [session])[0],
                st.query_one("SELECT count(*) FROM sessions WHERE session = ?", [session])[0],
                st.query_one("SELECT count(*) FROM segments WHERE session = ?", [session])[0],
                st.query_one("SELECT count(*) FROM payload_files WHERE session = ?",
                             [session])[0])


NOTHING = (0, 0, 0, 0)


def settled(store: Path, timeout: float = 30) -> None:
    """Waits (up to `timeout` s, then lets the caller's check speak) until the watermark of
    every ended session without a gap reached its end: a running server computes
    watermarks at most every finalize_every s (longer after a long run), so frames an
    INVENTORY no longer lacks become restorable a moment later, not at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cp = run_cli("sql", "--store", store, "--format", "json",
                     "SELECT count(*) AS n FROM sessions WHERE end_stamp IS NOT NULL "
                     "AND first_gap IS NULL AND coalesce(watermark + 1, 0) < end_stamp",
                     check=False)
        if cp.returncode != 0:  # a server started without the SQL views: nothing to wait on
            return
        if json.loads(cp.stdout)[0]["n"] == 0:
            return
        time.sleep(0.1)


def restore_image(store: Path, out: Path, device: str = "synth:loop7", at: str = "latest") -> bytes:
    settled(store)
    run_cli("restore", "--store", store, "--device", device, "--at", at, "--to", out, "--force",
            timeout=120)
    return out.read_bytes()


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    tls = d / "tls"
    tlsconf.init(tls, ["replayer=127.0.0.1", "synth", "other"])
    # a certificate for "synth" from another CA
    evil = d / "evil"
    tlsconf.init(evil, ["synth"])
    # an expired certificate for "synth" from the right CA
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    ca_cert = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((tls / "ca-key.pem").read_bytes(), None)
    key, cert = tlsconf.make_host_cert(ca_key, ca_cert, "synth", [], days=1,
                                       not_before=dt.datetime.now(dt.timezone.utc)
                                       - dt.timedelta(days=10))
    exp = d / "expired"
    exp.mkdir()
    (exp / "cert.pem").write_bytes(tlsconf._cert_pem(cert))
    (exp / "key.pem").write_bytes(tlsconf._key_pem(key))
    # a self-signed certificate claiming CN=synth
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    sk = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "synth")])
    now = dt.datetime.now(dt.timezone.utc)
    sc = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(sk.public_key()).serial_number(1)
          .not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=1)).sign(sk, hashes.SHA256()))
    selfs = d / "selfsigned"
    selfs.mkdir()
    (selfs / "cert.pem").write_bytes(tlsconf._cert_pem(sc))
    (selfs / "key.pem").write_bytes(tlsconf._key_pem(sk))
    return {"tls": tls, "evil": evil / "synth", "expired": exp, "selfsigned": selfs}


@pytest.fixture(scope="module")
def good_log(tmp_path_factory):
    d = tmp_path_factory.mktemp("goodlog")
    s = history(d / "log", seed=21, nbios=200, host="synth")
    return d / "log", s


@pytest.fixture(scope="module")
def served(tmp_path_factory, pki, good_log):
    """A TLS server with the good LOG shipped to it."""
    tmp = tmp_path_factory.mktemp("served")
    srv = ServerProc(tmp, tmp / "store", pki["tls"] / "replayer", "--max-conns", "8")
    try:
        c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
        c.hello()
        segs = log_segments(good_log[0])
        lacks = c.inventory(segs)
        assert sum(e - a for it in lacks for a, e in it["ranges"]) == \
            sum(len(s[3]) for s in segs)
        c.ship(segs, lacks=lacks, per_msg=32)
        assert c.inventory(segs) == []
        c.close()
        yield srv, segs, tmp
    finally:
        srv.stop()


def fresh_log(tmp: Path, seed: int, host: str = "synth", **kw):
    d = tmp / f"log-{seed}-{host}"
    s = history(d, seed=seed, nbios=kw.pop("nbios", 20), host=host, **kw)
    return s, log_segments(d)


# ------------------------------------------------------------------------------ good path
def test_good_path_restore_equals_ingest(served, good_log, tmp_path):
    srv, segs, _ = served
    log_dir, synth = good_log
    # restore and sql while the server runs (through its query socket)
    img = restore_image(srv.store, tmp_path / "served.img")
    assert img == bytes(synth.image)
    cp = run_cli("sql", "--store", srv.store, "--format", "json",
                 "SELECT device, count(*) AS n FROM writes GROUP BY device")
    rows = json.loads(cp.stdout)
    assert rows[0]["device"] == "synth:loop7" and rows[0]["n"] > 100
    # the same LOG ingested from the directory: the same image, the same rows
    other = tmp_path / "ingested"
    run_cli("ingest", "--log", log_dir, "--store", other)
    assert restore_image(other, tmp_path / "ingested.img") == img
    from blkrewind.analytics.views import define_views
    from blkrewind.replayer.query import RemoteStore, open_for_reading
    q = "SELECT count(*), sum(length), max(stamp), count(DISTINCT session) FROM writes"
    with open_for_reading(srv.store, views=define_views) as st:
        assert isinstance(st, RemoteStore)
        a = st.query(q)
    with open_for_reading(other, views=define_views) as st:
        assert not isinstance(st, RemoteStore)
        b = st.query(q)
    assert a == b and a[0][0] > 100
    # a mark, restored through the server
    name, stamp = next(iter(synth.marks.items()))
    assert restore_image(srv.store, tmp_path / "m.img", at=f"mark:{name}") == synth.at_mark[name]


def test_query_socket_is_read_only(served):
    srv, _, _ = served
    from blkrewind.errors import UserError
    from blkrewind.replayer.query import RemoteStore, open_for_reading

    with open_for_reading(srv.store) as st:
        assert isinstance(st, RemoteStore)
        n = st.query_one("SELECT count(*) FROM records")[0]
        for q in ("DELETE FROM records", "CREATE TABLE x (a INT)", "SELECT 1; SELECT 2",
                  "COPY records TO '/tmp/x.csv'", "ATTACH ':memory:' AS m", "SET threads = 1",
                  "CHECKPOINT", "PRAGMA enable_profiling",
                  "SELECT * FROM read_text('/etc/hostname')", "SELECT * FROM '/etc/passwd'"):
            with pytest.raises(UserError, match="SQL: "):
                st.query(q)
        assert st.query_one("SELECT count(*) FROM records")[0] == n
        cols, _ = st.user_query("SELECT stamp, len FROM records WHERE len > 0 LIMIT 1")
        assert cols == ["stamp", "len"]
        a = st.numpy("SELECT stamp, len FROM records WHERE len > $m ORDER BY stamp", {"m": 0})
        assert len(a["stamp"]) > 0 and (a["len"] > 0).all()
    cp = run_cli("sql", "--store", srv.store, "DELETE FROM records", check=False)
    assert "only queries are allowed" in assert_one_line_error(cp)
    st = os.stat(srv.store / "serve.sock")
    assert st.st_mode & 0o777 == 0o600
    assert os.stat(srv.store).st_mode & 0o777 == 0o700


def test_status_while_serving(served, pki):
    srv, _, _ = served
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
    c.hello()
    for k, (b, unacked) in enumerate([(1000, 10), (3000, 4096)]):
        c.send(wire.encode_json(wire.T_STATUS, {
            "time_ns": time.time_ns(),
            "tracer": {"session": "S", "host": "synth", "kernel": {"bytes": b, "drops": 2}},
            "shipper": {"bytes_unacked": unacked, "oldest_unacked_age_s": 1.5,
                        "log_bytes": 123456, "log_full": False, "connections_up": 2,
                        "ship_to": "127.0.0.1:1"}}))
        time.sleep(0.2)
    c.send(wire.encode_json(wire.T_PING, {"t": 7}))
    m = c.recv()
    assert m is not None and m.mtype == wire.T_PONG and wire.parse_json(m)["t"] == 7
    cp = run_cli("status", "--store", srv.store, "--format", "json")
    d = json.loads(cp.stdout)
    assert d["served"] is True
    h = {x["host"]: x for x in d["hosts"]}["synth"]
    assert h["connections"] >= 1
    assert h["tracer"]["unacked_bytes"] == 4096 and h["tracer"]["drops"] == 2
    assert h["tracer"]["capture_rate_Bps"] > 0
    dev = h["devices"][0]
    assert dev["device"] == "synth:loop7" and dev["watermark"] is not None
    cp = run_cli("status", "--store", srv.store)
    assert "synth:loop7" in cp.stdout and "synth" in cp.stdout
    c.close()


# ------------------------------------------------------------------------------ authentication
@pytest.mark.parametrize("who", ["nocert", "evil", "expired", "selfsigned"])
def test_unauthorised_clients(served, pki, who):
    srv, _, _ = served
    mark = srv.mark()
    d = None if who == "nocert" else pki[who]
    c = Client(srv.port, client_ctx(pki["tls"], d))
    with pytest.raises((wire.ProtocolError, ssl.SSLError, OSError)):
        c.hello()
    c.close()
    srv.wait_log(r"peer 127\.0\.0\.1:\d+: TLS handshake failed: \S+", start=mark)


def test_plain_tcp_to_tls_server_and_silence(served):
    srv, _, _ = served
    mark = srv.mark()
    c = Client(srv.port, None)
    c.s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert c.error_or_close() is None
    c.close()
    srv.wait_log(r"TLS handshake failed", start=mark)
    mark = srv.mark()
    t0 = time.monotonic()
    c = Client(srv.port, None)
    assert c.error_or_close(timeout=10) is None      # handshake never started
    assert time.monotonic() - t0 < 5
    c.close()
    srv.wait_log(r"TLS handshake failed: not completed within 1 s", start=mark)


def test_hello_claiming_another_host(served, pki):
    srv, _, _ = served
    mark = srv.mark()
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "other"))
    c.send(wire.encode_json(wire.T_HELLO, {"proto": 1, "host": "synth", "tool": "t",
                                           "conn": 0, "conns": 1}))
    reason = c.error_or_close()
    assert reason and "certificate is for 'other'" in reason
    c.close()
    srv.wait_log(r"peer 127\.0\.0\.1:\d+ host other: protocol violation: HELLO names host "
                 r"'synth'", start=mark)


def test_no_hello_in_time(served, pki):
    srv, _, _ = served
    mark = srv.mark()
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
    t0 = time.monotonic()
    assert c.error_or_close() == "no HELLO within 1 s"
    assert time.monotonic() - t0 < 5
    srv.wait_log(r"host synth: no HELLO within 1 s; closing", start=mark)
    c.close()


def test_frames_of_another_hosts_session(served, pki, tmp_path):
    srv, segs, _ = served
    mark = srv.mark()
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "other"))
    c.hello("other")
    before = store_counts(srv.store, segs[0][0])
    c.send(c.frames_msg(segs[1], 1, 3))   # data frames of synth's session
    reason = c.error_or_close()
    assert reason and "belongs to host synth" in reason
    c.close()
    srv.wait_log(r"host other: protocol violation: FRAMES .*belongs to host synth", start=mark)
    assert store_counts(srv.store, segs[0][0]) == before
    # its INVENTORY may not name them either
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "other"))
    c.hello("other")
    c.send(wire.encode_json(wire.T_INVENTORY, {"segments": [
        {"session": segs[0][0], "segno": 0, "seg_id": segs[0][2], "frames": 3,
         "sealed": True}]}))
    assert "belongs to host synth" in c.error()
    c.close()
    # a new session whose segment HEADER names synth, sent by other
    s, fsegs = fresh_log(tmp_path, 31, host="synth")
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "other"))
    c.hello("other")
    c.send(c.frames_msg(fsegs[0], 0, 3))
    assert "names host 'synth', not 'other'" in c.error()
    c.close()
    assert store_counts(srv.store, s.session) == NOTHING


def test_replayed_frames_are_acked_not_stored_again(served, pki):
    srv, segs, _ = served
    before = store_counts(srv.store, segs[0][0])
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
    c.hello()
    acks = c.ship(segs[:3], per_msg=4)
    assert acks and all(a["end"] > a["first"] for a in acks)
    c.close()
    assert store_counts(srv.store, segs[0][0]) == before


# ------------------------------------------------------------------------------ bad messages
def _bad_message_case(srv, pki, tmp_path, seed: int, make, expect: str):
    """A fresh session; `make(client, segs)` sends something bad. The connection gets ERROR
    (or is cut), the reason is logged, nothing of the session is stored, and a good client
    is served afterwards."""
    s, segs = fresh_log(tmp_path, seed)
    mark = srv.mark()
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
    c.hello()
    make(c, segs)
    reason = c.error_or_close()
    c.close()
    m = srv.wait_log(r"peer 127\.0\.0\.1:\d+ host synth: (.*); closing", start=mark)
    assert re.search(expect, m.group(1)), m.group(1)
    if reason is not None:
        assert re.search(expect, reason), reason
    assert store_counts(srv.store, s.session) == NOTHING
    # the service goes on
    g = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
    g.hello()
    g.send(wire.encode_json(wire.T_PING, {"t": 1}))
    pong = g.recv()
    assert pong is not None and pong.mtype == wire.T_PONG
    g.close()


def _raw(c, msg: bytes) -> None:
    c.s.sendall(msg)


def _join(bufs) -> bytearray:
    return bytearray(b"".join(bytes(b) for b in bufs))


def _recrc(b: bytearray) -> bytearray:
    b[12:16] = struct.pack("<I", zlib.crc32(bytes(b[20:])))
    b[16:20] = struct.pack("<I", zlib.crc32(bytes(b[:16])))
    return b


def test_wrong_body_checksum(served, pki, tmp_path):
    def make(c, segs):
        b = _join(c.frames_msg(segs[0], 0, 4))
        b[-1] ^= 0x40
        _raw(c, bytes(b))
    _bad_message_case(served[0], pki, tmp_path, 41, make, "body checksum mismatch")


def test_corrupt_log_frame_inside_valid_message(served, pki, tmp_path):
    def make(c, segs):
        b = _join(c.frames_msg(segs[0], 0, 4))
        b[-10] ^= 0x01     # inside the last frame's lz4 body; the message CRC is recomputed
        _raw(c, bytes(_recrc(b)))
    _bad_message_case(served[0], pki, tmp_path, 42, make, "protocol violation: FRAMES .*")


def test_good_then_bad_message_in_one_batch(served, pki, tmp_path):
    """Two FRAMES sent back to back (merged into one store call): the good one is stored and
    acked, the bad one rejected."""
    srv = served[0]
    s, segs = fresh_log(tmp_path, 43)
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
    c.hello()
    good = _join(c.frames_msg(segs[0], 0, 2))
    bad = _join(c.frames_msg(segs[0], 2, 4))
    bad[-10] ^= 1
    c.s.sendall(bytes(good) + bytes(_recrc(bad)))
    m = c.recv()
    assert m is not None and m.mtype == wire.T_ACK and wire.parse_json(m)["end"] == 2
    assert "protocol violation" in c.error()
    c.close()
    fr, sess, sg, _ = store_counts(srv.store, s.session)
    assert fr >= 1 and sg == 1


@pytest.mark.parametrize("what,expect", [
    ("oversized", r"FRAMES body of 1073741824 bytes exceeds the limit"),
    ("version", r"unsupported protocol version 2"),
    ("type", r"unknown message type 77"),
    ("flags", r"reserved flags"),
    ("magic", r"bad magic"),
    ("server-type", r"unexpected message ACK"),
    ("hello-twice", r"HELLO sent twice"),
    ("bad-json", r"bad JSON"),
    ("meta", r"FRAMES meta: field 'first'"),
])
def test_bad_headers(served, pki, tmp_path, what, expect):
    def make(c, segs):
        if what == "oversized":
            _raw(c, wire.header(wire.T_FRAMES, 1 << 30, 0))
        elif what == "version":
            _raw(c, wire.header(wire.T_PING, 2, zlib.crc32(b"{}"), version=2) + b"{}")
        elif what == "type":
            _raw(c, wire.header(77, 2, zlib.crc32(b"{}")) + b"{}")
        elif what == "flags":
            _raw(c, wire.header(wire.T_PING, 2, zlib.crc32(b"{}"), flags=4) + b"{}")
        elif what == "magic":
            _raw(c, b"XXXX" + bytes(16))
        elif what == "server-type":
            c.send(wire.encode_json(wire.T_ACK, {"id": 1, "session": "a", "segno": 0,
                                                 "first": 0, "end": 1}))
        elif what == "hello-twice":
            c.send(wire.encode_json(wire.T_HELLO, {"proto": 1, "host": "synth", "tool": "t",
                                                   "conn": 0, "conns": 1}))
        elif what == "bad-json":
            c.send(wire.encode(wire.T_INVENTORY, [b"{not json"]))
        elif what == "meta":
            session, segno, seg_id, frames = segs[0]
            m = json.dumps({"session": session, "segno": segno, "seg_id": seg_id,
                            "first": "0", "id": 1, "n": 2}).encode()
            c.send(wire.encode(wire.T_FRAMES, [struct.pack("<I", len(m)) + m, *frames[:2]]))
    _bad_message_case(served[0], pki, tmp_path, 50 + len(what), make, expect)


def test_truncated_message_then_silence(served, pki, tmp_path):
    sent: list[float] = []   # when the half message went

    def make(c, segs):
        b = bytes(_join(c.frames_msg(segs[0], 0, 4)))
        _raw(c, b[:len(b) // 2])
        sent.append(time.monotonic())
    _bad_message_case(served[0], pki, tmp_path, 61, make,
                      r"message not completed in time \(stalled in the FRAMES body\)")
    assert time.monotonic() - sent[-1] < 4   # --message-timeout 1


def test_slow_loris(served, pki, tmp_path):
    stop = threading.Event()

    def make(c, segs):
        b = bytes(_join(c.frames_msg(segs[0], 0, 2)))

        def drip():
            for i in range(len(b)):
                if stop.wait(0.1):
                    return
                try:
                    c.s.sendall(b[i:i + 1])
                except OSError:
                    return
        threading.Thread(target=drip, daemon=True).start()
    try:
        _bad_message_case(served[0], pki, tmp_path, 62, make, r"message not completed in time")
    finally:
        stop.set()


def test_idle_connection_closed(served, pki):
    srv = served[0]
    mark = srv.mark()
    c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
    c.hello()
    t0 = time.monotonic()
    assert c.error_or_close(timeout=10) == "idle for 3 s (no message)"
    assert 2.5 < time.monotonic() - t0 < 6
    c.close()
    srv.wait_log(r"host synth: idle for 3 s \(no message\); closing", start=mark)


def test_connection_limit(served, pki):
    srv = served[0]
    mark = srv.mark()
    ctx = client_ctx(pki["tls"], pki["tls"] / "synth")
    cs = []
    try:
        for k in range(8):
            c = Client(srv.port, ctx)
            c.hello(conn=k)
            cs.append(c)
        extra = Client(srv.port, None)
        assert extra.error_or_close() is None
        extra.close()
        srv.wait_log(r"refused: already 8 connections", start=mark)
    finally:
        for c in cs:
            c.close()
    srv.wait_count("closed by the peer", 8, start=mark)
    c = Client(srv.port, ctx)
    c.hello()
    c.close()


# ------------------------------------------------------------------------------ fuzz
def test_fuzzed_frames_rejected_memory_bounded(served, pki, tmp_path):
    """Hundreds of connections, each sending one mutated message (many thousands of frames in
    all, every message with at least one damaged frame or a damaged framing): every one is
    refused with a logged reason, nothing of the fuzzed session is stored, the server's RSS
    stays bounded, and a good client is served afterwards."""
    srv, segs, _ = served
    s, fsegs = fresh_log(tmp_path, 71, nbios=400, frame_records=(1, 3),
                         segment_bytes=8 << 20)
    rng = random.Random(5)
    ctx = client_ctx(pki["tls"], pki["tls"] / "synth")
    rss0 = srv.rss_mb()
    mark = srv.mark()
    nconn = nframes = 0
    peak = rss0
    for k in range(200):
        seg = rng.choice(fsegs)
        a = rng.randrange(0, len(seg[3]))
        e = min(len(seg[3]), a + rng.randint(10, 60))
        c = Client(srv.port, ctx)
        try:
            c.hello()
            b = _join(c.frames_msg(seg, a, e))
            op = rng.random()
            if op < 0.7:     # damage a frame, keep the message valid
                frames_at = 24 + struct.unpack_from("<I", b, 20)[0]
                for _ in range(rng.randint(1, 3)):
                    i = rng.randrange(frames_at, len(b))
                    b[i] ^= 1 << rng.randrange(8)
                b = _recrc(b)
            elif op < 0.8:   # damage the framing
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            elif op < 0.9:   # lie about the frame numbers / segment
                session, segno, seg_id, frames = seg
                meta = {"session": session, "segno": segno, "seg_id": seg_id ^ rng.choice([0, 1]),
                        "first": a + rng.choice([1, -1 if a else 1]), "id": k}
                b = _join(wire.encode_frames(meta, frames[a:e]))
            else:            # a header promising a large body, then a cut
                b = bytearray(wire.header(wire.T_FRAMES, wire.MAX_BODY, 0)) + b[20:]
            c.s.sendall(bytes(b))
            nframes += e - a
            if op >= 0.9:
                c.s.shutdown(socket.SHUT_WR)
            c.error_or_close()
        except (OSError, ssl.SSLError):
            pass
        finally:
            c.close()
        nconn += 1
        if k % 50 == 0:
            peak = max(peak, srv.rss_mb())
    srv.wait_count("; closing", nconn, start=mark)
    assert nframes > 3000
    assert store_counts(srv.store, s.session) == NOTHING
    text = srv.text()[mark:]
    assert "internal error" not in text
    rss1 = srv.rss_mb()
    assert max(peak, rss1) < rss0 + 200, (rss0, peak, rss1)
    g = Client(srv.port, ctx)
    g.hello()
    assert g.inventory(segs) == []
    g.close()


# ------------------------------------------------------------------------------ crash
def test_sigkill_mid_stream_then_resend(tmp_path, pki):
    s = history(tmp_path / "log", seed=81, nbios=400, host="synth")
    segs = log_segments(tmp_path / "log")
    total = sum(len(x[3]) for x in segs)
    store = tmp_path / "store"
    srv = ServerProc(tmp_path, store, pki["tls"] / "replayer")
    acked: list[dict] = []
    try:
        c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
        c.hello()

        def on_ack(d):
            acked.append(d)
            if len(acked) == 8:
                srv.p.send_signal(signal.SIGKILL)
        with pytest.raises((AssertionError, wire.ProtocolError, OSError)):
            c.ship(segs, per_msg=12, on_ack=on_ack)
        c.close()
        srv.p.wait(10)
        assert len(acked) >= 8
        srv.start()   # same store, new port
        c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
        c.hello()
        lacks = c.inventory(segs)
        missing = {(it["session"], it["segno"], f) for it in lacks
                   for a, e in it["ranges"] for f in range(a, e)}
        # every acknowledged frame survived the SIGKILL
        for d in acked:
            for f in range(d["first"], d["end"]):
                assert (d["session"], d["segno"], f) not in missing
        assert 0 < len(missing) < total
        c.ship(segs, lacks=lacks, per_msg=32)
        assert c.inventory(segs) == []
        c.close()
        assert restore_image(store, tmp_path / "a.img") == bytes(s.image)
        name = sorted(s.marks)[-1]
        assert restore_image(store, tmp_path / "m.img", at=f"mark:{name}") == s.at_mark[name]
    finally:
        assert srv.stop() == 0
    assert not (store / "serve.sock").exists()
    assert "stopped" in srv.text()
    other = tmp_path / "ingested"
    run_cli("ingest", "--log", tmp_path / "log", "--store", other)
    assert restore_image(other, tmp_path / "b.img") == bytes(s.image)


# ------------------------------------------------------------------------------ store full
def test_store_full_refuses_then_recovers(tmp_path, pki):
    """The store's file system fills up: FRAMES are answered with ERROR (nothing acked),
    the server goes on; once space is freed the frames are stored and the store is exact."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    s = history(tmp_path / "log", seed=91, nbios=150, host="synth")
    segs = log_segments(tmp_path / "log")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    srv = None
    try:
        store = mnt / "store"
        srv = ServerProc(tmp_path, store, pki["tls"] / "replayer")
        st = os.statvfs(mnt)
        filler = mnt / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - (2 << 20)))
        mark = srv.mark()
        errors = 0
        for attempt in range(100):
            c = Client(srv.port, client_ctx(pki["tls"], pki["tls"] / "synth"))
            c.hello()
            lacks = c.inventory(segs)
            if not lacks:
                c.close()
                break
            try:
                c.ship(segs, lacks=lacks, per_msg=8)
            except (AssertionError, OSError, wire.ProtocolError) as e:
                assert not isinstance(e, AssertionError) or "store unavailable" in str(e) \
                    or "server closed" in str(e), e
                errors += 1
                if filler.exists():
                    srv.wait_log(r"STORE ERROR storing frames", start=mark)
                    filler.unlink()
                time.sleep(0.6)   # --store-retry 0.5
            c.close()
        else:
            raise AssertionError("never completed")
        assert errors >= 1
        srv.wait_log(r"store unavailable \(.*\); retry later; closing", start=mark)
        assert restore_image(store, tmp_path / "a.img") == bytes(s.image)
    finally:
        if srv is not None:
            srv.stop()
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------------------ a real tracer
@pytest.mark.bpf
def test_status_of_a_real_tracer_shipping(tmp_path, pki, make_loop):
    """`trace --ship` to `serve` (TLS): `blkrewind status` on the tracer side (control socket)
    and `status --store` on the replayer side (the tracer's STATUS messages + the store) show
    the shipping state; after the tracer stops, a restore through the server equals the
    device."""
    from tracerproc import TraceProc

    dev = make_loop(16)
    srv = ServerProc(tmp_path, tmp_path / "store", pki["tls"] / "replayer")
    try:
        with TraceProc([dev.path], tmp_path / "log", "--ship", f"127.0.0.1:{srv.port}",
                       "--tls", pki["tls"] / "synth") as tp:
            data = os.urandom(4 << 20)
            with open(dev.path, "r+b", buffering=0) as f:
                f.seek(1 << 20)
                f.write(data)
                os.fsync(f.fileno())
            t = json.loads(run_cli("status", "--log", tmp_path / "log", "--format",
                                   "json").stdout)
            mine = [x for x in t["tracers"] if x.get("pid") == tp.p.pid]
            assert mine and mine[0]["ship_to"] == f"127.0.0.1:{srv.port}"
            assert mine[0]["host"] == "synth" and mine[0]["log_bytes"] > 0
            assert "unacked_bytes" in mine[0] and mine[0]["capture_rate_Bps"] is not None
            assert "synth" in run_cli("status", "--log", tmp_path / "log").stdout
            deadline = time.monotonic() + 60
            while True:
                d = json.loads(run_cli("status", "--store", srv.store, "--format",
                                       "json").stdout)
                h = {x["host"]: x for x in d["hosts"]}.get("synth")
                if h and h.get("tracer") and h["devices"] and h["devices"][0]["watermark"] \
                        and h["tracer"]["unacked_bytes"] == 0:
                    break
                assert time.monotonic() < deadline, d
                time.sleep(0.5)
            assert h["connections"] >= 1 and h["tracer"]["session"]
            assert h["devices"][0]["lag_s"] is not None
            assert tp.stop() == 0
        img = restore_image(srv.store, tmp_path / "r.img",
                            device=f"synth:{os.path.basename(dev.path)}")
        assert img == Path(dev.path).read_bytes()
    finally:
        srv.stop()


# ------------------------------------------------------------------------------ damage
def test_damage_found_at_start_is_sent_as_lacks(tmp_path, pki):
    """A stored payload file damaged while the server was down: the full check (in the
    background after start-up) drops its frames and sends an unsolicited LACKS to the
    connected owner; once it resends them the store restores exactly again."""
    import io

    from blkrewind.replayer.server import Limits, Logger, Server
    from blkrewind.replayer.store import Store

    s = history(tmp_path / "log", seed=101, nbios=80, host="synth")
    segs = log_segments(tmp_path / "log")
    store = tmp_path / "store"
    out = io.StringIO()
    srv = Server(store, ("127.0.0.1", 0), tls_dir=pki["tls"] / "replayer",
                 limits=Limits(full_check_delay=1.0), log=Logger(out))
    srv.start()
    try:
        assert srv.address is not None, "started"
        c = Client(srv.address[1], client_ctx(pki["tls"], pki["tls"] / "synth"))
        c.hello()
        c.ship(segs, per_msg=32)
        c.close()
    finally:
        srv.close()
    with Store.open(store) as st:
        rel, session, segno, a, e = st.query_one(
            "SELECT path, session, segno, first_frame, end_frame FROM payload_files "
            "ORDER BY payload_bytes DESC LIMIT 1")
    path = store / rel
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF           # same size: only the full check (CRC) sees it
    path.write_bytes(bytes(b))

    srv = Server(store, ("127.0.0.1", 0), tls_dir=pki["tls"] / "replayer",
                 limits=Limits(full_check_delay=1.0), log=Logger(out))
    srv.start()
    try:
        assert "quick integrity check done" in out.getvalue()
        assert srv.address is not None, "started"
        c = Client(srv.address[1], client_ctx(pki["tls"], pki["tls"] / "synth"))
        c.hello()
        m = c.recv(timeout=20)           # unsolicited
        assert m is not None and m.mtype == wire.T_LACKS
        lacks = wire.parse_json(m)["segments"]
        assert [(x["session"], x["segno"]) for x in lacks] == [(session, segno)]
        assert any(x <= a and e <= y for x, y in lacks[0]["ranges"])
        deadline = time.monotonic() + 10   # (logged once the check is done: after the LACKS)
        while "DAMAGE (full check)" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "DAMAGE (full check)" in out.getvalue()
        assert "host synth: 1 segment(s) lost frames; sending LACKS to conn" in out.getvalue()
        c.ship(segs, lacks=lacks)
        assert c.inventory(segs) == []
        c.close()
        assert restore_image(store, tmp_path / "a.img") == bytes(s.image)
    finally:
        srv.close()
    assert not (store / "serve.sock").exists()
