"""Shipping the LOG to a replayer (tracer/shipper.py) against the real `blkrewind serve`.

Real processes, sockets, TLS certificates and stores; real BPF traces on loop devices for the
`bpf` tests. Every server, tracer and loop device is stopped/removed even when a test fails.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import synth
from conftest import ROOT, need_root, run_cli
from tracerproc import TraceProc, copy_device, first_difference, same_file

from blkrewind import tlsconf
from blkrewind.formats import logframe
from blkrewind.formats.ranges import Ranges
from blkrewind.tracer import log as tlog
from blkrewind.tracer.control import ask
from blkrewind.tracer.shipper import Shipper
from blkrewind.tracer.shipstate import RESERVE_BYTES, SHIPPED_JSON, SMALL_SPAN, FullGate

CLI = [sys.executable, "-m", "blkrewind.cli"]


# ------------------------------------------------------------------------------ helpers
def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Serve:
    """`blkrewind serve` as a subprocess on 127.0.0.1:port."""

    def __init__(self, store, port: int, tls: str | None = None):
        self.store, self.port, self.tls = str(store), port, tls
        self.lines: list[str] = []
        self.p: subprocess.Popen[str] | None = None
        self.start()

    def start(self):
        args = [*CLI, "serve", "--store", self.store, "--listen", f"127.0.0.1:{self.port}"]
        args += ["--tls", self.tls] if self.tls else ["--insecure"]
        self.p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        p, err = self.p, self.p.stderr
        assert err is not None, "started with stderr=PIPE"
        threading.Thread(target=lambda: self.lines.extend(err), daemon=True).start()
        deadline = time.monotonic() + 60
        while not any("listening on" in ln for ln in self.lines):
            if p.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError("serve did not start:\n" + self.log)
            time.sleep(0.02)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def kill(self):
        if self.p is not None and self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)

    def stop(self):
        if self.p is not None and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def serve():
    made: list[Serve] = []

    def start(store, port=None, tls=None) -> Serve:
        s = Serve(store, port or free_port(), tls)
        made.append(s)
        return s
    yield start
    for s in made:
        s.kill()


def tls_dirs(base: Path, tracer_host: str = "tracer1") -> tuple[str, str]:
    d = base / "tls"
    tlsconf.init(d, ["replayer=127.0.0.1", tracer_host])
    return str(d / "replayer"), str(d / tracer_host)


def status(tr: TraceProc) -> dict:
    return ask(f"/run/blkrewind/trace-{tr.p.pid}.sock", {"op": "status"}, timeout=30)


def wait_until(cond, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


def write_random(dev, mib: int, seed: int, *, chunk_kib: int = 256, pause: float = 0.0):
    """mib MiB of random O_DIRECT writes of chunk_kib at random 4 KiB-aligned offsets."""
    rng = random.Random(seed)
    size = os.path.getsize(dev) if not str(dev).startswith("/dev/") else \
        int(Path(f"/sys/class/block/{os.path.basename(str(dev))}/size").read_text()) * 512
    n = chunk_kib << 10
    import mmap
    buf = mmap.mmap(-1, n)
    fd = os.open(str(dev), os.O_WRONLY | os.O_DIRECT)
    try:
        for _ in range((mib << 20) // n):
            buf.seek(0)
            buf.write(rng.randbytes(n))
            os.pwrite(fd, buf, 4096 * rng.randrange(0, (size - n) // 4096))
            if pause:
                time.sleep(pause)
    finally:
        os.close(fd)
        buf.close()


def restore_matches(store, device_key: str, at: str, expected) -> None:
    out = Path(store).parent / f"restore-{abs(hash((device_key, at)))}.img"
    run_cli("restore", "--store", store, "--device", device_key, "--at", at, "--to", out)
    try:
        assert same_file(out, expected), (f"restore of {device_key} at {at} differs: "
                                          f"{first_difference(out, expected)}")
    finally:
        out.unlink(missing_ok=True)


def restorable_to(store, device_key: str) -> int | None:
    cp = run_cli("sql", "--store", store, "--format", "json",
                 f"SELECT max(to_stamp) AS s FROM restorable WHERE device = '{device_key}'")
    rows = json.loads(cp.stdout)
    return rows[0]["s"] if rows else None


def log_size(log_dir) -> int:
    return sum(s.size for s in logframe.list_segments(log_dir))


# ------------------------------------------------------------------------------ no BPF
def test_ranges():
    r = Ranges([(5, 7), (0, 2)])
    r.add(2, 3)
    r.add(6, 10)
    assert r.as_list() == [[0, 3], [5, 10]]
    r.remove(1, 6)
    assert r.as_list() == [[0, 1], [6, 10]]
    assert r.covers(6, 10) and not r.covers(0, 2) and r.covers(3, 3)
    assert r.count() == 5
    assert Ranges([(0, 10)]).difference(r).as_list() == [[1, 6]]
    assert r.intersection(0, 8).as_list() == [[0, 1], [6, 8]]


def test_full_gate_one_episode_per_fill():
    """The LOG-full rule: a big span refused while the LOG is below the low-water mark, then
    small spans that would fit: still the same episode (CI saw two "LOG FULL" episodes when a
    2 MB span was refused at 6.5 of 8 MB and the next 4 KiB span ended the episode)."""
    mb = 1 << 20
    free = FullGate(8 * mb)
    assert free.admit(6 * mb, 2 * mb) == (True, True)
    assert free.admit(6 * mb + mb // 2, 2 * mb) == (False, False)     # episode begins at 6.5 MB
    full = FullGate(8 * mb, full_level=6 * mb + mb // 2)
    assert full.admit(6 * mb + mb // 2, 4096) == (False, True)        # reserve, still full
    assert full.admit(5 * mb + 3 * mb // 4, 4096) == (False, True)    # not a gap freed yet
    assert full.admit(5 * mb, 4096) == (True, True)                   # 1/8 freed: resumes
    assert full.need(6 * mb + mb // 2, 4096) == mb + 4096
    assert full.admit(8 * mb + RESERVE_BYTES, SMALL_SPAN)[1] is False  # reserve used up
    assert full.admit(6 * mb, SMALL_SPAN + 1)[1] is False              # not small: dropped


def test_log_inventory_and_raw_frames(tmp_path):
    got = []
    w = tlog.LogWriter(tmp_path, "S1", host="h", segment_bytes=1 << 20,
                       on_frame=lambda *a: got.append(a))
    for _ in range(7):
        w.append(os.urandom(300_000), 1, 1, 2)
    w.close()
    inv = tlog.inventory(tmp_path, offsets=True)
    assert [(i["segno"], i["frames"], i["sealed"]) for i in inv] == \
        [(0, 5, True), (1, 5, True), (2, 3, True)]
    for it in inv:
        mine = [a for a in got if a[1] == it["segno"]]
        # the writer reported HEADER, DATA and SEAL frames with their offsets and sizes
        assert [a[2] for a in mine] == list(range(it["frames"]))
        assert [a[3] for a in mine] == it["offsets"][:-1]
        assert it["offsets"][-1] == it["size"] == os.path.getsize(it["path"])
        with logframe.SegmentReader(it["path"]) as r:
            raw = b"".join(b for _, b in r.raw_frames())
        assert raw == Path(it["path"]).read_bytes()
    # a torn tail is not counted
    last = inv[-1]["path"]
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) - 10)   # cuts into the SEAL
    inv2 = tlog.inventory(tmp_path)
    assert inv2[-1]["frames"] == inv[-1]["frames"] - 1 and not inv2[-1]["sealed"]


def test_old_sessions_shipped_and_restart_reinventories(tmp_path, serve):
    """A LOG of two finished sessions (synthetic, written by LogWriter) is shipped to a real
    server; the server is SIGKILLed and restarted; a second Shipper on the same LOG finds
    everything held (acked from the INVENTORY answer, nothing resent); the store restores
    both devices exactly."""
    log_dir, store = tmp_path / "log", tmp_path / "store"
    a = synth.history(log_dir, seed=3, nbios=120, host="h1", name="loop7")
    b = synth.history(log_dir, seed=4, nbios=120, host="h1", name="loop8",
                      dev=synth.record.kdev(7, 8))
    srv = serve(store)
    msgs: list[str] = []
    sh = Shipper(log_dir, f"127.0.0.1:{srv.port}", insecure=True, host="h1", say=msgs.append)
    sh.start()
    wait_until(lambda: sh.status()["frames_unacked"] == 0, 60, "all acked")
    st = sh.stop(5)
    assert st["frames_acked"] == sum(i["frames"] for i in tlog.inventory(log_dir))
    cache = json.loads((log_dir / SHIPPED_JSON).read_text())
    assert all(s["acked"] == [[0, s["frames"]]] for s in cache["segments"])
    # the store's watermarks follow the acks within ~0.2 s (the server's finalizer); wait
    # for them (through the running server's query socket) before killing it
    for s, key in ((a, "h1:loop7"), (b, "h1:loop8")):
        wait_until(lambda: restorable_to(store, key) == s.last_stamp, 30, f"{key} finalized",
                   every=0.3)

    srv.kill()
    srv.start()
    (log_dir / SHIPPED_JSON).unlink()   # only the server's answer can tell now
    sh2 = Shipper(log_dir, f"127.0.0.1:{srv.port}", insecure=True, host="h1", say=msgs.append)
    sh2.start()
    wait_until(lambda: sh2.status()["frames_unacked"] == 0, 60, "all acked after restart")
    st2 = sh2.stop(5)
    assert st2["bytes_sent"] == 0, st2
    srv.stop()
    for s, key in ((a, "h1:loop7"), (b, "h1:loop8")):
        img = tmp_path / f"{s.name}.expected"
        img.write_bytes(s.image)
        restore_matches(store, key, "latest", img)


def test_connections_up_counts_only_welcomed_connections(tmp_path):
    """A peer that accepts TCP connections and closes them before any WELCOME: the shipper
    keeps reconnecting and connections_up stays 0 (a connection that never got its WELCOME
    was counted down all the same, and the count went negative)."""
    log_dir = tmp_path / "log"
    synth.history(log_dir, seed=5, nbios=10, host="h1", name="loop7")
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(16)
    accepted: list[int] = []

    def accept_and_close():
        while True:
            try:
                c, _ = lsn.accept()
            except OSError:
                return
            c.close()
            accepted.append(1)

    threading.Thread(target=accept_and_close, daemon=True).start()
    sh = Shipper(log_dir, f"127.0.0.1:{lsn.getsockname()[1]}", insecure=True, host="h1",
                 say=lambda m: None)
    sh.start()
    try:
        wait_until(lambda: len(accepted) >= 6, 60, "reconnects")
        time.sleep(0.5)   # the last closes reach the shipper
        assert sh.status()["connections_up"] == 0
    finally:
        sh.stop(0)
        lsn.close()


def test_ship_refuses_bad_options(tmp_path, run_cli, assert_one_line_error):
    need_root()  # the checks come after trace's root check
    cp = run_cli("trace", "--device", "/dev/null", "--log", tmp_path, "--ship",
                 "127.0.0.1:1", check=False)
    assert_one_line_error(cp, "--tls")
    cp = run_cli("trace", "--device", "/dev/null", "--log", tmp_path, "--ship",
                 "8.8.8.8:7000", "--insecure", check=False)
    assert_one_line_error(cp, "--insecure refused")
    cp = run_cli("trace", "--device", "/dev/null", "--log", tmp_path, "--log-max-mb", "5",
                 check=False)
    assert_one_line_error(cp, "--ship")


# ------------------------------------------------------------------------------ BPF
@pytest.mark.bpf
def test_trace_ship_tls_restores_exact(tmp_path, make_loop, serve):
    """trace --ship --tls to a TLS serve: the host name is the certificate's CN; a mark and
    latest restore from the replayer's store equal the device."""
    srv_tls, cli_tls = tls_dirs(tmp_path)
    store = tmp_path / "store"
    srv = serve(store, tls=srv_tls)
    dev = make_loop(64)
    with TraceProc([dev], tmp_path / "log", "--ship", f"127.0.0.1:{srv.port}",
                   "--tls", cli_tls) as tr:
        write_random(dev, 8, seed=1)
        run_cli("mark", "m1", "--log", tmp_path / "log")
        copy_device(dev, tmp_path / "m1.img")
        write_random(dev, 8, seed=2)
        st = status(tr)
        assert st["host"] == "tracer1" and st["shipper"]["tls"]
        assert tr.stop() == 0, tr.stderr
    assert "everything acknowledged" in tr.stderr, tr.stderr
    key = f"tracer1:{os.path.basename(dev.path)}"
    srv.stop()
    restore_matches(store, key, "m1", tmp_path / "m1.img")
    restore_matches(store, key, "latest", dev.path)


@pytest.mark.bpf
def test_server_late_and_killed_mid_stream(tmp_path, make_loop, serve):
    """The server starts after the tracer (the LOG buffers, shipping catches up), then is
    SIGKILLed while frames stream and restarted: everything ends up in the store, exact."""
    store, port = tmp_path / "store", free_port()
    dev = make_loop(64)
    with TraceProc([dev], tmp_path / "log", "--ship", f"127.0.0.1:{port}", "--insecure",
                   "--segment-mb", "4") as tr:
        write_random(dev, 6, seed=3)
        run_cli("mark", "early", "--log", tmp_path / "log")
        copy_device(dev, tmp_path / "early.img")
        assert status(tr)["shipper"]["connections_up"] == 0
        assert "cannot reach" in tr.stderr
        srv = serve(store, port=port)
        wait_until(lambda: status(tr)["shipper"]["frames_unacked"] == 0, 60, "catch-up")
        writer = threading.Thread(target=write_random, args=(dev, 24, 4),
                                  kwargs={"pause": 0.01})
        writer.start()
        try:
            wait_until(lambda: status(tr)["shipper"]["frames_acked"] > 0, 30, "acks")
            time.sleep(0.5)
            srv.kill()   # SIGKILL mid-stream
            time.sleep(1.0)
            srv.start()
        finally:
            writer.join()
        wait_until(lambda: status(tr)["shipper"]["frames_unacked"] == 0, 90, "catch-up 2")
        st = status(tr)["shipper"]
        assert st["reconnects"] >= 1, st
        assert tr.stop() == 0, tr.stderr
    assert "everything acknowledged" in tr.stderr, tr.stderr
    srv.stop()
    key = f"{socket.gethostname()}:{os.path.basename(dev.path)}"
    restore_matches(store, key, "early", tmp_path / "early.img")
    restore_matches(store, key, "latest", dev.path)


@pytest.mark.bpf
def test_shipping_tracer_killed_and_started_again_continues_its_session(tmp_path, make_loop,
                                                                        serve):
    """A shipping tracer is SIGKILLed mid-stream; writes go on with no tracer; the tracer started
    again continues the session (its capture stayed attached), ships the new segments of the same
    session to the replayer, which serves `latest` equal to the device; one session in the store."""
    log_dir, store = tmp_path / "log", tmp_path / "store"
    srv = serve(store)
    dev = make_loop(64)
    ship = ("--ship", f"127.0.0.1:{srv.port}", "--insecure", "--segment-mb", "2")
    first = TraceProc([dev], log_dir, *ship)
    try:
        write_random(dev, 6, seed=40)
        from blkrewind.tracer import pins
        wait_until(lambda: [p for p in pins.load_all() if p.baseline_done and p.safe], 10,
                   "a checkpoint after the baseline")
        first.p.send_signal(signal.SIGKILL)
        first.p.wait(30)
        write_random(dev, 4, seed=41)     # nobody reads the ring now: the capture goes on
    finally:
        first.kill()
    with TraceProc([dev], log_dir, *ship, wait_for="live") as second:
        wait_until(lambda: "resync of" in second.stderr, 60, "the resync:\n" + second.stderr)
        write_random(dev, 3, seed=42)
        assert second.stop() == 0, second.stderr
    assert "continued" in second.stderr and "baseline of" not in second.stderr, second.stderr
    assert "not acknowledged" not in second.stderr, second.stderr
    key = f"{socket.gethostname()}:{os.path.basename(dev.path)}"
    cp = run_cli("sql", "--store", store, "--format", "json", "SELECT session FROM sessions")
    assert len(json.loads(cp.stdout)) == 1, cp.stdout
    restore_matches(store, key, "latest", dev.path)
    srv.stop()


@pytest.mark.bpf
@pytest.mark.parametrize("mode", ["buffered", "prealloc"])
def test_retention_keeps_log_under_limit(mode, tmp_path, make_loop, serve):
    """--log-max-mb with the server up: acked, sealed segments are deleted (prealloc: kept as
    spares that the writer reuses, at most log.SPARES of them), the LOG stays under the limit,
    nothing is dropped and the store is exact."""
    log_dir, store = tmp_path / "log", tmp_path / "store"
    srv = serve(store)
    dev = make_loop(64)
    limit = 6 << 20
    sizes = []
    spares: set[int] = set()
    with TraceProc([dev], log_dir, "--ship", f"127.0.0.1:{srv.port}", "--insecure",
                   "--segment-mb", "1", "--log-max-mb", "6", "--log-mode", mode) as tr:
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                sizes.append(log_size(log_dir))
                spares.add(sum(1 for n in os.listdir(log_dir) if tlog.SPARE_RE.fullmatch(n)))
                time.sleep(0.02)
        t = threading.Thread(target=sample)
        t.start()
        try:
            for seed in range(6):   # 30 MiB, paced so the replayer keeps up
                write_random(dev, 5, seed=10 + seed, pause=0.02)
                wait_until(lambda: status(tr)["shipper"]["frames_unacked"] < 4, 60, "acks")
        finally:
            stop.set()
            t.join()
        st = status(tr)
        assert tr.stop() == 0, tr.stderr
    assert st["shipper"]["segments_deleted"] > 10, st
    assert st["log_full_drops"] == 0 and "LOG FULL" not in tr.stderr, tr.stderr
    assert max(spares) <= (tlog.SPARES if mode == "prealloc" else 0), spares
    if mode == "prealloc":  # spares were made and taken again: > 10 retired, <= 2 left
        assert max(spares) > 0, spares
    assert max(sizes) <= limit + (1 << 20), max(sizes)
    srv.stop()
    restore_matches(store, f"{socket.gethostname()}:{os.path.basename(dev.path)}", "latest",
                    dev.path)


def stops_within(tr: TraceProc, seconds: float) -> None:
    """The tracer stops on SIGINT within `seconds`, with status 0 (killed, and the test
    fails with its stderr, when it does not)."""
    try:
        rc = tr.stop(seconds)
    except subprocess.TimeoutExpired:
        tr.kill()
        raise AssertionError(f"the tracer did not stop within {seconds} s:\n" + tr.stderr)
    assert rc == 0, tr.stderr


@pytest.mark.bpf
def test_log_full_with_server_down(tmp_path, make_loop, run_cli, assert_one_line_error):
    """No server: the LOG fills up to --log-max-mb, the tracer says LOG FULL once, drops and
    counts spans; the LOG is intact: `ingest --log` works and the point
    before the LOG filled restores exactly."""
    log_dir = tmp_path / "log"
    dev = make_loop(64)
    with TraceProc([dev], log_dir, "--ship", f"127.0.0.1:{free_port()}", "--insecure",
                   "--segment-mb", "1", "--log-max-mb", "8", "--ship-drain", "1") as tr:
        write_random(dev, 1, seed=20)
        run_cli("mark", "before", "--log", log_dir)
        copy_device(dev, tmp_path / "before.img")
        write_random(dev, 16, seed=21)
        st = wait_until(lambda: (s := status(tr))["log_full_drops"] and s, 30, "LOG full")
        assert st["shipper"]["log_full"] and st["shipper"]["log_full_episodes"] == 1
        stops_within(tr, 30)   # not waiting for the replayer or for room in the LOG
    assert tr.stderr.count("LOG FULL") == 1, tr.stderr
    assert "not acknowledged" in tr.stderr
    assert log_size(log_dir) <= (8 << 20) + (1 << 20)
    store = tmp_path / "store"
    run_cli("ingest", "--log", log_dir, "--store", store)
    restore_matches(store, f"{socket.gethostname()}:{os.path.basename(dev.path)}", "before",
                    tmp_path / "before.img")


@pytest.mark.bpf
def test_stop_while_a_resync_waits_for_log_room(tmp_path, make_loop):
    """A span larger than what is left of --log-max-mb is refused while the LOG is only half
    full: the resync after that loss then finds room to start (a quarter of the limit), but
    its readers wait for half of the limit to be free, which never comes with the replayer
    down. A stop gives that resync up at once (the gap stays reported), as it does one that
    finds no room to start: it used to wait for the room forever. The tracer is held
    (SIGSTOP) while 8 MiB are written, so that the collector takes them as one span whatever
    its batching (test_log_full_with_server_down meets the same when the first span the LOG
    refuses is over ~2 MB: the collector's larger spans made that likely under load)."""
    log_dir = tmp_path / "log"
    dev = make_loop(64)
    with TraceProc([dev], log_dir, "--ship", f"127.0.0.1:{free_port()}", "--insecure",
                   "--segment-mb", "1", "--log-max-mb", "8", "--ship-drain", "1") as tr:
        write_random(dev, 4, seed=30)
        wait_until(lambda: status(tr)["log_bytes"] >= 4 << 20, 30, "the first writes in the LOG")
        os.kill(tr.p.pid, signal.SIGSTOP)
        try:
            write_random(dev, 8, seed=31)
        finally:
            os.kill(tr.p.pid, signal.SIGCONT)
        wait_until(lambda: status(tr)["progress"], 60, "the resync reading")
        time.sleep(0.5)
        assert status(tr)["progress"], tr.stderr   # still there: waiting for room in the LOG
        stops_within(tr, 30)
    assert tr.stderr.count("LOG FULL") == 1, tr.stderr
    assert "the session ends before the resync after a loss could finish" in tr.stderr, tr.stderr


@pytest.mark.bpf
def test_log_full_ends_when_server_returns(tmp_path, make_loop, serve):
    """The LOG fills while the server is down (one episode); the server comes back: acked
    segments are deleted, the tracer says "room again" once, the resync repairs what was
    dropped, and the mark after it and latest restore exactly from the server's store."""
    log_dir, store, port = tmp_path / "log", tmp_path / "store", free_port()
    dev = make_loop(64)
    with TraceProc([dev], log_dir, "--ship", f"127.0.0.1:{port}", "--insecure",
                   "--segment-mb", "1", "--log-max-mb", "8") as tr:
        write_random(dev, 16, seed=22)
        wait_until(lambda: status(tr)["log_full_drops"], 30, "LOG full")
        srv = serve(store, port=port)
        wait_until(lambda: status(tr)["shipper"]["frames_unacked"] == 0, 60, "catch-up")
        write_random(dev, 2, seed=23)   # the next span finds room: the episode ends
        wait_until(lambda: not status(tr)["shipper"]["log_full"], 30, "room again")
        wait_until(lambda: "resync of" in tr.stderr
                   and " done" in tr.stderr.split("resync of")[-1], 60, "the resync")
        run_cli("mark", "after", "--log", log_dir)
        copy_device(dev, tmp_path / "after.img")
        st = status(tr)
        assert st["shipper"]["log_full_episodes"] == 1, tr.stderr
        assert tr.stop() == 0, tr.stderr
    assert tr.stderr.count("LOG FULL") == 1, tr.stderr
    assert tr.stderr.count("LOG has room again") == 1, tr.stderr
    srv.stop()
    key = f"{socket.gethostname()}:{os.path.basename(dev.path)}"
    restore_matches(store, key, "after", tmp_path / "after.img")
    restore_matches(store, key, "latest", dev.path)
