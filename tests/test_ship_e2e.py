"""Shipping end to end (issue 3), as an operator runs it: tracers in network namespaces (the
network lab, tests/netlab.py) trace real loop devices with real BPF and ship their LOGs over
mutual TLS 1.3 to one `blkrewind serve` in the root namespace; restores are compared byte for
byte with copies of the devices taken at fsfreeze'd marks.

    root ns:  loop devices, ext4 mounts, workloads, `blkrewind serve` on the lab bridge
    ns a:     blkrewind trace --tls hosta --ship BRIDGE:PORT  (device A)
    ns b:     blkrewind trace --tls hostb --ship BRIDGE:PORT  (device B)

Every test cleans up its namespaces, processes, mounts and loop devices, pass or fail (the
netlab, make_loop and mount_fs fixtures; servers are killed by the `servers` fixture).
"""
from __future__ import annotations

import hashlib
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

import netlab as _netlab
import pytest
from conftest import umount
from tracerproc import copy_device, direct_writes, first_difference, same_file, sh, write_file

from blkrewind import tlsconf

pytestmark = [pytest.mark.bpf]
netlab = _netlab.netlab                          # the network lab's fixtures
no_leaked_netlab = _netlab.no_leaked_netlab

ROOT = Path(__file__).resolve().parents[1]
BLK = [sys.executable, "-m", "blkrewind.cli"]
DEV_MB = 64
FUZZ_N = int(os.environ.get("BLKREWIND_FUZZ_N", 2000))   # fuzzed messages (one per connection)


# --------------------------------------------------------------------------- the CLI
def cli(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run([*BLK, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"blkrewind {' '.join(map(str, args))} exited {r.returncode}\n"
                             f"stdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def sql(store, query: str, timeout=60) -> list[dict]:
    return json.loads(cli("sql", "--store", store, query, "--format", "json",
                          timeout=timeout).stdout or "[]")


class Reader:
    """Collects a process's stderr lines in a thread."""

    def __init__(self, p: subprocess.Popen):
        self.p = p
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        assert self.p.stderr is not None, "started with stderr=PIPE"
        for line in self.p.stderr:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, what: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while sum(what in ln for ln in self.lines) < count:
            if self.p.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                raise AssertionError(f"process exited {self.p.returncode} before {what!r}:\n"
                                     + self.text)
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what!r} after {timeout}s:\n" + self.text)
            time.sleep(0.05)


# --------------------------------------------------------------------------- the replayer
class Server:
    """`blkrewind serve` in the root namespace; restartable; its log kept across restarts."""

    def __init__(self, store: Path, addr: str, port: int, tls: Path):
        self.store, self.addr, self.port, self.tls = store, addr, port, tls
        self.p: subprocess.Popen | None = None
        self.r: Reader | None = None
        self.logs: list[str] = []   # the text of every finished run
        self.starts = 0
        self.pids: list[int] = []   # of every run

    @property
    def listen(self) -> str:
        return f"{self.addr}:{self.port}"

    def start(self, timeout: float = 60) -> "Server":
        assert self.p is None or self.p.poll() is not None
        self.p = subprocess.Popen([*BLK, "serve", "--store", self.store, "--listen", self.listen,
                                   "--tls", self.tls], cwd=ROOT, text=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL)
        self.r = Reader(self.p)
        self.starts += 1
        self.pids.append(self.p.pid)
        self.r.wait_for("listening on", timeout=timeout)
        return self

    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def _proc(self) -> subprocess.Popen:
        assert self.p is not None, "the server was never started"
        return self.p

    def _done(self) -> None:
        assert self.r is not None, "the server was never started"
        self.r._t.join(5)
        self.logs.append(self.r.text)

    def kill(self) -> None:
        if self.alive():
            p = self._proc()
            p.kill()
            p.wait(30)
            self._done()

    def stop(self, timeout: float = 60) -> int:
        p = self._proc()
        if self.alive():
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout)
            finally:
                self._done()
        return p.returncode

    @property
    def log(self) -> str:
        now = self.r.text if self.alive() and self.r is not None else ""   # r: with p
        return "".join(self.logs) + now

    def points_left(self) -> list[str]:
        """What is left of the points any run of this server read (its detector's file-level
        checks: runtime directories RUN_DIR/<device>-<stamp>-<pid>, the mounts in them, loop
        devices on their files, nbdkit and nbdfuse naming them)."""
        from conftest import attached_loops, mounts

        from blkrewind.replayer.export import GONE, RUN_DIR, UNBORN
        ends = tuple(f"-{pid}" for pid in self.pids)

        def ours(path: str) -> bool:
            if not path.startswith(RUN_DIR + "/"):
                return False
            d = path[len(RUN_DIR) + 1:].split("/")[0]
            for prefix in (UNBORN, GONE):   # a directory being made or removed: <prefix><pid>-
                if d.startswith(prefix):
                    return f"-{d[len(prefix):].split('-')[0]}" in ends
            return d.split(".")[0].endswith(ends)
        left = []
        for d in (os.listdir(RUN_DIR) if os.path.isdir(RUN_DIR) else []):
            if ours(f"{RUN_DIR}/{d}"):   # what it holds and who made it: the failure's clue
                held = sorted(os.listdir(f"{RUN_DIR}/{d}")) if os.path.isdir(f"{RUN_DIR}/{d}") \
                    else []
                run = next((k for k, pid in enumerate(self.pids) if d.split(".")[0].endswith(
                    f"-{pid}") or d.startswith((f"{UNBORN}{pid}-", f"{GONE}{pid}-"))), None)
                left.append(f"run dir {d} (of run {run} of {len(self.pids)}, holding {held})")
        left += [f"mount {mp}" for _, mp in mounts() if ours(mp)]
        left += [f"loop {d} -> {b}" for d, b in attached_loops().items() if ours(b)]
        for pid in os.listdir("/proc"):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if ("nbdkit" in cmd or "nbdfuse" in cmd) and any(
                    ours(w) for w in cmd.split("\0") if w.startswith(RUN_DIR)):
                left.append(f"process {pid}: {cmd[:100]}")
        return left


@pytest.fixture
def servers():
    """Server factory; every server is stopped when the test ends, pass or fail (SIGINT, then
    SIGKILL; what a killed one's detector left is removed by `blkrewind umount --stale`)."""
    made: list[Server] = []

    def make(*a) -> Server:
        s = Server(*a)
        made.append(s)
        return s

    yield make
    killed = False
    for s in made:
        if s.p is None:
            continue
        try:
            s.stop(timeout=60)
        except subprocess.TimeoutExpired:
            s.kill()
            killed = True
    if killed:
        cli("umount", "--stale", check=False)


def free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- tracers in namespaces
class NsTracer:
    """`blkrewind trace ... --ship --tls` inside a network namespace of the lab."""

    def __init__(self, ns, devices, log: Path, ship: str, tls: Path, *extra):
        args = [*BLK, "trace"]
        for d in devices:
            args += ["--device", str(d)]
        args += ["--log", str(log), "--ship", ship, "--tls", str(tls), "--segment-mb", "4",
                 *map(str, extra)]
        self.ns, self.log = ns, log
        self.p = ns.popen(*args, cwd=ROOT, text=True, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.r = Reader(self.p)
        self.r.wait_for("baseline of", count=len(devices), timeout=120)

    def stop(self, timeout: float = 120) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        rc = self.p.wait(timeout)
        self.r._t.join(5)
        return rc

    @property
    def stderr(self) -> str:
        return self.r.text


# --------------------------------------------------------------------------- devices and workloads
class Host:
    """One traced host of a test: its namespace, TLS directory, loop device, mount, LOG,
    and the copies of the device taken at its marks."""

    def __init__(self, name: str, ns, tls: Path, loop, mnt: Path, tmp: Path):
        self.name, self.ns, self.tls, self.loop, self.mnt = name, ns, tls, loop, mnt
        self.dev = loop.path
        self.key = f"{name}:{os.path.basename(loop.path)}"   # the store's device key
        self.log = tmp / f"log-{name}"
        self.tmp = tmp
        self.copies: dict[str, Path] = {}
        self.tracer: NsTracer | None = None
        self.mounted = True

    def trace(self, server: Server, *extra) -> NsTracer:
        self.tracer = NsTracer(self.ns, [self.dev], self.log, server.listen, self.tls, *extra)
        return self.tracer

    def mark(self, name: str) -> None:
        """fsfreeze (when mounted), mark, copy the device, thaw."""
        name = f"{self.name}-{name}"
        if self.mounted:
            sh("fsfreeze", "--freeze", self.mnt)
        try:
            r = cli("mark", name, "--log", self.log)
            assert f"mark {name!r}: stamp" in r.stdout, r.stdout
            copy = self.tmp / f"copy-{name}.img"
            copy_device(self.dev, copy)
            self.copies[name] = copy
        finally:
            if self.mounted:
                sh("fsfreeze", "--unfreeze", self.mnt)

    def unmount(self) -> None:
        if self.mounted:
            problems = umount(str(self.mnt))
            assert not problems, problems
            self.mounted = False


class Workload(threading.Thread):
    """Files written (fsync'd), overwritten in place, appended, deleted, until stopped."""

    def __init__(self, mnt: Path, seed: int, pace: float = 0.0):
        super().__init__(daemon=True)
        self.mnt, self.rng, self.pace = mnt, random.Random(seed), pace
        self.stop_ev = threading.Event()
        self.error: BaseException | None = None
        self.ops = 0

    def run(self):
        try:
            rng, d = self.rng, self.mnt / f"w{id(self)}"
            d.mkdir()
            names = [d / f"f{i}" for i in range(24)]   # <= 24 files of <= 640 KiB: fits 64 MiB
            while not self.stop_ev.is_set():
                p = rng.choice(names)
                op = rng.random()
                if op < 0.5 or not p.exists():
                    with open(p, "wb") as f:
                        f.write(rng.randbytes(rng.randrange(1, 512 << 10)))
                        f.flush()
                        os.fsync(f.fileno())
                elif op < 0.75:
                    with open(p, "r+b") as f:
                        f.seek(rng.randrange(0, max(1, p.stat().st_size)))
                        f.write(rng.randbytes(rng.randrange(1, 128 << 10)))
                        f.flush()
                        os.fsync(f.fileno())
                elif op < 0.9:
                    p.unlink()
                else:
                    os.sync()
                self.ops += 1
                if self.pace:
                    self.stop_ev.wait(self.pace)
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def finish(self) -> None:
        self.stop_ev.set()
        self.join(60)
        assert not self.is_alive(), "workload did not stop"
        if self.error:
            raise AssertionError(f"workload failed: {self.error!r}")


def fs_steps(h: Host, rng: random.Random) -> None:
    """A short scripted ext4 history with two marks: writes, O_DIRECT, overwrites, deletes,
    fstrim, many small files."""
    mnt = h.mnt

    for i in range(5):
        write_file(mnt / f"f{i}.bin", rng, rng.randrange(1, 3 << 20))
    h.mark("m1")
    sh("fallocate", "-l", "4M", mnt / "direct.bin")
    direct_writes(mnt / "direct.bin", rng, 20, 64)
    with open(mnt / "f0.bin", "r+b") as f:
        f.seek(4321)
        f.write(rng.randbytes(50001))
        os.fsync(f.fileno())
    for i in (2, 3):
        (mnt / f"f{i}.bin").unlink()
    sh("sync")
    sh("fstrim", mnt)
    h.mark("m2")
    (mnt / "d").mkdir()
    for i in range(60):
        (mnt / "d" / f"n{i}").write_bytes(rng.randbytes(rng.randrange(1, 8000)))
    sh("sync")


# --------------------------------------------------------------------------- checks
def wait_shipped(store: Path, hosts, timeout: float = 90) -> None:
    """Until every session of these hosts ended cleanly in the store, with no gap, and every
    mark taken is restorable."""
    names = {h.name for h in hosts}
    want_marks = {m for h in hosts for m in h.copies}
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            sess = sql(store, "SELECT session, host, clean, first_gap, watermark, end_stamp "
                              "FROM sessions")
            marks = {m["name"] for m in sql(store, "SELECT name FROM marks WHERE restorable")}
            mine = [s for s in sess if s["host"] in names]
            done = ({s["host"] for s in mine} == names
                    and all(s["clean"] and s["first_gap"] is None for s in mine)
                    and want_marks <= marks)
            last = (mine, sorted(want_marks - marks))
            if done:
                return
        except AssertionError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"not everything shipped after {timeout}s: {last}")
        time.sleep(0.5)


def restore(store: Path, key: str, at: str, out: Path) -> Path:
    if out.exists():
        out.unlink()
    cli("restore", "--store", store, "--device", key, "--at", at, "--to", out, timeout=180)
    return out


def check_restores(store: Path, h: Host, final: Path, names=None) -> None:
    out = h.tmp / f"restored-{h.name}.img"
    for name in names if names is not None else h.copies:
        restore(store, h.key, name, out)
        assert same_file(out, h.copies[name]), \
            f"{h.key} at {name}: {first_difference(out, h.copies[name])}"
    restore(store, h.key, "latest", out)
    assert same_file(out, final), f"{h.key} at latest: {first_difference(out, final)}"
    out.unlink()


def file_hash(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------- the lab set-up
class Lab:
    def __init__(self, netlab, make_loop, mount_fs, servers, tmp: Path, nhosts: int = 2):
        self.tmp = tmp
        self.ns = [netlab.add_ns(n) for n in ("a", "b")[:nhosts]]
        tls = tmp / "tls"
        tlsconf.init(tls, [f"replayer={netlab.addr}", "hosta", "hostb", "hostc"])
        self.tlsdir = tls
        self.store = tmp / "store"
        self.server = servers(self.store, netlab.addr, free_port(netlab.addr), tls / "replayer")
        self.hosts: list[Host] = []
        for name, ns in zip(("hosta", "hostb"), self.ns):
            loop = make_loop(size_mb=DEV_MB)
            sh("mkfs.ext4", "-q", "-F", loop.path)
            self.hosts.append(Host(name, ns, tls / name, loop, mount_fs(loop.path), tmp))

    def start(self, *trace_extra) -> None:
        self.server.start()
        for h in self.hosts:
            h.trace(self.server, *trace_extra)

    def finish(self) -> dict[str, Path]:
        """Unmount, a last mark, copy each device, stop the tracers (they drain to the server),
        wait until everything is stored. Returns {host: final copy}."""
        finals = {}
        for h in self.hosts:
            h.unmount()
            h.mark("end")
            finals[h.name] = h.copies[f"{h.name}-end"]
        for h in self.hosts:
            tr = h.tracer
            assert tr is not None, f"{h.name} is not traced"
            rc = tr.stop()
            assert rc == 0, tr.stderr
            assert " 0 records lost" in tr.stderr, tr.stderr
        wait_shipped(self.store, self.hosts)
        return finals

    def check_all(self, finals, names=None) -> None:
        """Restore every host at its marks (or names(host)) and at latest; compare."""
        for h in self.hosts:
            check_restores(self.store, h, finals[h.name], names(h) if names else None)

    def check_keys(self) -> None:
        devs = sql(self.store, "SELECT device, host, name FROM devices ORDER BY device")
        assert [(d["device"], d["host"]) for d in devs] == [(h.key, h.name) for h in self.hosts]
        sess = sql(self.store, "SELECT host, devices FROM sessions")
        for s in sess:
            assert all(d.startswith(s["host"] + ":") for d in s["devices"]), s


@pytest.fixture
def lab(netlab, make_loop, mount_fs, servers, tmp_path):
    # fixtures set up first are torn down last: the network lab (and the tracers in it) and the
    # servers go before the mounts and loop devices they use
    return Lab(netlab, make_loop, mount_fs, servers, tmp_path)


# =========================================================================== tests
def test_two_hosts_ship_over_mutual_tls_and_restore_exactly(lab):
    """Two tracers in two namespaces ship to one replayer; ext4 histories with marks; restores
    at every mark and at latest equal the copies; device keys are host:name."""
    lab.start()
    errors = []

    def run(h, seed):
        try:
            fs_steps(h, random.Random(seed))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(h, i)) for i, h in enumerate(lab.hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    finals = lab.finish()
    lab.check_all(finals)
    lab.check_keys()
    # each host's marks are in its own sessions only
    rows = sql(lab.store, "SELECT m.name, s.host FROM marks m JOIN sessions s USING (session)")
    assert rows and all(r["name"].startswith(r["host"] + "-") for r in rows), rows
    assert lab.server.stop() in (0, 130), lab.server.log
    log = lab.server.log
    assert "Traceback" not in log, log
    for h in lab.hosts:
        assert h.name in log


def test_replayer_crashes_lose_nothing(lab):
    """SIGKILL the replayer 10 times at random moments of a running workload, restarting it
    each time. Every point ever reported restorable stays restorable with the same bytes; in
    the end both devices restore exactly at their marks and at latest."""
    seed = int(os.environ.get("BLKREWIND_CRASH_SEED", random.randrange(1 << 30)))
    print(f"crash seed {seed} (BLKREWIND_CRASH_SEED repeats the run)")
    rng = random.Random(seed)
    t0 = time.monotonic()
    lab.start()
    print(f"{time.monotonic() - t0:.1f}s: started")
    works = [Workload(h.mnt, seed + i, pace=0.03) for i, h in enumerate(lab.hosts)]
    seen: dict[tuple[str, str], int] = {}        # (device, session) -> largest to_stamp seen
    marks_seen: dict[str, int] = {}               # mark reported restorable -> its stamp
    sampled: list[tuple[str, int, str]] = []      # (device, stamp, sha256 of its restore)
    out = lab.tmp / "sample.img"
    for w in works:
        w.start()
    try:
        for k in range(10):
            time.sleep(rng.uniform(0.1, 1.0))
            if k in (1, 5, 8):
                for h in lab.hosts:
                    h.mark(f"c{k}")
            rows = sql(lab.store, "SELECT device, session, max(to_stamp) AS to_stamp "
                                  "FROM restorable WHERE to_stamp IS NOT NULL "
                                  "GROUP BY device, session")
            for m in sql(lab.store, "SELECT name, stamp FROM marks WHERE restorable"):
                assert marks_seen.setdefault(m["name"], m["stamp"]) == m["stamp"], (seed, m)
            for r in rows:
                key = (r["device"], r["session"])
                assert r["to_stamp"] >= seen.get(key, 0), \
                    f"seed {seed}: {key} went back from {seen[key]} to {r['to_stamp']}"
                seen[key] = r["to_stamp"]
            if k in (2, 6) and rows:
                r = rng.choice(rows)
                restore(lab.store, r["device"], str(r["to_stamp"]), out)
                sampled.append((r["device"], r["to_stamp"], file_hash(out)))
            time.sleep(rng.uniform(0.0, 0.5))
            lab.server.kill()
            time.sleep(rng.uniform(0.0, 0.8))
            lab.server.start()
            print(f"{time.monotonic() - t0:.1f}s: crash {k + 1} and restart done")
    finally:
        for w in works:
            w.finish()
    assert all(w.ops > 20 for w in works), [w.ops for w in works]
    print(f"{time.monotonic() - t0:.1f}s: workloads stopped")
    finals = lab.finish()
    print(f"{time.monotonic() - t0:.1f}s: all shipped")
    lab.check_all(finals)
    print(f"{time.monotonic() - t0:.1f}s: restores checked")
    rows = sql(lab.store, "SELECT device, session, from_stamp, to_stamp FROM restorable")
    for key, to in seen.items():   # every stamp once reported restorable still is
        assert any((r["device"], r["session"]) == key and r["from_stamp"] <= to <= r["to_stamp"]
                   for r in rows), (seed, key, to, rows)
    assert not sql(lab.store, "SELECT * FROM gaps"), seed
    now = {m["name"]: m["stamp"] for m in sql(lab.store, "SELECT name, stamp FROM marks "
                                                         "WHERE restorable")}
    assert all(now.get(n) == st for n, st in marks_seen.items()), (seed, marks_seen, now)
    assert len(sampled) >= 1
    for dev, stamp, digest in sampled:
        restore(lab.store, dev, str(stamp), out)
        assert file_hash(out) == digest, f"seed {seed}: {dev} at {stamp} changed after crashes"
    assert lab.server.starts == 11
    # each killed server left the point its detector kept mounted (when one was); the next
    # start removed it, and a stopped server unmounts its own: nothing is left
    assert lab.server.stop() in (0, 130), lab.server.log
    left = lab.server.points_left()
    assert not left, (left, [ln for ln in lab.server.log.splitlines()
                             if "point" in ln or "detector" in ln or "ALERT" in ln][-30:])
    print(f"points left by killed servers, removed at the next start: "
          f"{lab.server.log.count('removed a point left by a process that is gone')}")
    assert "Traceback" not in lab.server.log


def _parquet_files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*.parquet") if p.is_file())


def test_damaged_store_files_are_fetched_again_from_the_logs(lab):
    """With the replayer down, delete some Parquet files and corrupt others; restarted, it
    finds the damage and gets the frames again from the tracers' LOGs; restores are exact."""
    rng = random.Random(7)
    lab.start()
    for i, h in enumerate(lab.hosts):
        fs_steps(h, random.Random(10 + i))
        h.mark("m3")
    wait = time.monotonic() + 60
    names = {m for h in lab.hosts for m in h.copies}
    while {m["name"] for m in sql(lab.store, "SELECT name FROM marks WHERE restorable")} < names:
        assert time.monotonic() < wait, "marks not restorable in time"
        time.sleep(0.3)
    assert lab.server.stop() in (0, 130)
    files = _parquet_files(lab.store)
    assert len(files) >= 6, files
    rng.shuffle(files)
    third = len(files) // 3
    deleted, flipped, cut = files[:third], files[third:2 * third], files[2 * third:2 * third + 2]
    for p in deleted:
        p.unlink()
    for p in flipped:
        with open(p, "r+b") as f:
            size = p.stat().st_size
            for off in sorted(rng.sample(range(size), min(8, size))):
                f.seek(off)
                b = f.read(1)
                f.seek(off)
                f.write(bytes([b[0] ^ 0xFF]))
    for p in cut:
        os.truncate(p, p.stat().st_size // 2)
    lab.server.start()
    # same-size damage is found by the full check, which runs in the background after start-up
    # (until it is done, a restore that reads a damaged file fails with an error)
    lab.server.r.wait_for("full integrity check done", timeout=120)
    finals = lab.finish()
    lab.check_all(finals)
    log = lab.server.log
    assert "DAMAGE (quick check)" in log and "DAMAGE (full check)" in log, log
    assert "Traceback" not in log, log


def test_network_cut_longer_than_timeouts_loses_nothing(lab):
    """Cut host a's link (down) and host b's (100 % loss) for longer than the connection
    timeouts while both write; the tracers keep logging and catch up; restores are exact."""
    from blkrewind.tracer.shipper import CONNECT_TIMEOUT
    dead_after = 6.0
    lab.start("--ship-timeout", dead_after)
    works = [Workload(h.mnt, 100 + i, pace=0.05) for i, h in enumerate(lab.hosts)]
    for w in works:
        w.start()
    try:
        time.sleep(2)
        for h in lab.hosts:
            h.mark("before")
        a, b = lab.hosts
        a.ns.cut("down")
        b.ns.cut("loss")
        t0 = time.monotonic()
        k = 0
        while time.monotonic() - t0 < max(dead_after, CONNECT_TIMEOUT) + 3:
            time.sleep(4)
            for h in lab.hosts:
                h.mark(f"cut{k}")
            k += 1
        a.ns.restore()
        b.ns.restore()
        time.sleep(2)
        for h in lab.hosts:
            h.mark("after")
    finally:
        for w in works:
            w.finish()
    finals = lab.finish()
    # marks before, during (first and last) and after the cut, the end and latest
    lab.check_all(finals, names=lambda h: [f"{h.name}-{m}" for m in
                                           ("before", "cut0", f"cut{k - 1}", "after", "end")])
    for h in lab.hosts:
        assert h.tracer.p.returncode == 0
    # both hosts connected again after the cut (each tracer opens 2 connections)
    log = lab.server.log
    for h in lab.hosts:
        assert log.count(f"host {h.name}: connected") >= 3, log
        # the dead peer is seen either way: no reply while one is due, or a send that stalls
        assert ("lost: no answer from the replayer" in h.tracer.stderr
                or "lost: sending stalled" in h.tracer.stderr), h.tracer.stderr
        assert ") again" in h.tracer.stderr, h.tracer.stderr


# --------------------------------------------------------------------------- hostile clients
ATTACKER = r'''
"""Hostile clients of `blkrewind serve`, run as a process inside a network namespace.
argv[1]: JSON config. Prints a JSON summary on stdout."""
import json, os, random, socket, ssl, struct, sys, threading, time, zlib
from blkrewind.formats import wire
from blkrewind.errors import CorruptLog
from blkrewind.formats import logframe

cfg = json.loads(sys.argv[1])
ADDR, PORT = cfg["addr"], cfg["port"]


def ctx(certdir=None, ca=None, maxver=None):
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.load_verify_locations(ca or cfg["ca"])
    if certdir:
        c.load_cert_chain(os.path.join(certdir, "cert.pem"), os.path.join(certdir, "key.pem"))
    if maxver:
        c.maximum_version = maxver
    return c


def connect(c):
    raw = socket.create_connection((ADDR, PORT), timeout=10)
    raw.settimeout(20)
    return raw if c is None else c.wrap_socket(raw, server_hostname=ADDR)


def outcome(s, timeout=20.0):
    """Read until the server closes: ('error', reason) | ('closed', '') | ('open', '')."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            m = wire.read_message(s, accept=wire.SERVER_TO_CLIENT | {wire.T_PONG})
            if m is None:
                return ("closed", "")
            if m.mtype == wire.T_ERROR:
                return ("error", json.loads(bytes(m.body))["reason"])
            if m.mtype == wire.T_ACK:
                return ("ack", bytes(m.body).decode())
    except (socket.timeout, wire.ProtocolTimeout):
        return ("open", "")
    except (wire.ProtocolError, OSError, ssl.SSLError) as e:
        return ("closed", str(e))


def hello(host):
    return wire.encode_json(wire.T_HELLO, {"proto": 1, "host": host, "tool": "fuzz",
                                           "conn": 0, "conns": 1})


def send(s, bufs):
    wire.send_buffers(s, bufs)


def welcome(s, host):
    send(s, hello(host))
    m = wire.read_message(s, accept=wire.SERVER_TO_CLIENT)
    if m is None or m.mtype != wire.T_WELCOME:
        raise RuntimeError(f"no WELCOME: {m and m.name}")
    return json.loads(bytes(m.body))


def raw_msg(mtype, body, *, magic=wire.MAGIC, version=wire.PROTO_VERSION, flags=0,
            length=None, bcrc=None, hcrc=None):
    h = wire.HEADER.pack(magic, version, mtype, flags, len(body) if length is None else length,
                         zlib.crc32(body) if bcrc is None else bcrc)
    return h + struct.pack("<I", zlib.crc32(h) if hcrc is None else hcrc) + body


def seg_frames(path):
    """The raw frames of a LOG segment file, with its session/segno/seg_id."""
    data = open(path, "rb").read()
    frames, off = [], 0
    while off + logframe.FRAME_SIZE <= len(data):
        h = logframe.parse_header(memoryview(data)[off:off + logframe.FRAME_SIZE])
        if isinstance(h, str):
            break
        n = logframe.FRAME_SIZE + h.stored_len
        frames.append(data[off:off + n])
        off += n
    return frames, h


def frames_msg(meta, frames):
    return b"".join(bytes(b) for b in wire.encode_frames(meta, frames))


def fuzz_message(rng, seg, before_hello):
    """One invalid message, by construction (every kind must make the server close)."""
    frames, session, segno, seg_id = seg
    k = rng.randrange(16)
    js = lambda o: json.dumps(o).encode()
    if k == 0:
        return "random bytes", rng.randbytes(rng.randrange(1, 300))
    if k == 1:
        return "bad magic", raw_msg(wire.T_PING, js({"t": 1}), magic=rng.randbytes(4))
    if k == 2:
        return "bad header crc", raw_msg(wire.T_PING, js({"t": 1}), hcrc=rng.randrange(1 << 32))
    if k == 3:
        return "bad version", raw_msg(wire.T_PING, js({"t": 1}), version=rng.choice([0, 2, 255]))
    if k == 4:
        return "unknown type", raw_msg(rng.choice([0, 11, 12, 99, 255]), js({"t": 1}))
    if k == 5:
        return "flags", raw_msg(wire.T_PING, js({"t": 1}), flags=rng.randrange(1, 1 << 16))
    if k == 6:
        return "huge length", raw_msg(rng.choice([wire.T_FRAMES, wire.T_PING, wire.T_STATUS]),
                                      b"", length=rng.choice([wire.MAX_BODY + 1, (1 << 32) - 1]),
                                      bcrc=0)
    if k == 7:
        return "bad body crc", raw_msg(wire.T_PING, js({"t": 1}), bcrc=rng.randrange(1 << 32))
    if k == 8:
        body = rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe", b'{"t": -1}',
                           b'{"t": "x"}', b'{"t": 1e999}', b"[" * 5000, js({"x": 1})])
        return "bad ping json", raw_msg(rng.choice([wire.T_PING, wire.T_PONG]), body)
    if k == 9:
        t = rng.choice([wire.T_WELCOME, wire.T_LACKS, wire.T_ACK, wire.T_ERROR])
        return "server-only type", raw_msg(t, js({"reason": "x", "segments": []}))
    if k == 10:
        item = {"session": session, "segno": segno, "seg_id": seg_id, "frames": 3,
                "sealed": False}
        bad = rng.choice([("frames", -1), ("segno", 1 << 40), ("session", "../../etc"),
                          ("seg_id", "x"), ("sealed", 3), ("session", "")])
        item[bad[0]] = bad[1]
        return "bad inventory", raw_msg(wire.T_INVENTORY, js({"segments": [item]}))
    if k == 11:   # as the first message only a HELLO naming another host is wrong
        host = rng.choice(["hostb", "evil"] if before_hello else ["hosta", "hostb", "evil"])
        return "second hello" if not before_hello else "hello as another", b"".join(hello(host))
    if k == 12:   # FRAMES with one LOG frame corrupted (the wire CRCs are right)
        first = rng.randrange(len(frames))
        n = rng.randrange(1, min(4, len(frames) - first) + 1)
        fs = [bytearray(f) for f in frames[first:first + n]]
        v = rng.randrange(n)
        pos = rng.randrange(len(fs[v]))
        fs[v][pos] ^= 1 << rng.randrange(8)
        meta = {"session": session, "segno": segno, "seg_id": seg_id, "first": first, "id": 1}
        try:   # an lz4 stream can change without changing what it decodes to (a match
            # offset into a run of zeroes): then it is the same frame, stored already -> ACK
            logframe.decode_raw_frame(bytes(fs[v]), seg_id=seg_id, frame_no=first + v)
            kind = "equivalent LOG frame"
        except CorruptLog:
            kind = "corrupt LOG frame"
        return kind, frames_msg(meta, fs)
    if k == 13:   # FRAMES whose meta contradicts the frames (a new session or segment
        # number would be a legitimate new one for this host: not a lie the server can see)
        first = rng.randrange(len(frames))
        meta = {"session": session, "segno": segno, "seg_id": seg_id, "first": first, "id": 1}
        lie = rng.choice([("first", first + 1), ("first", max(0, first - 1) if first else 1),
                          ("seg_id", seg_id ^ 1), ("id", -1), ("segno", -1)])
        meta[lie[0]] = lie[1]
        return "lying meta", frames_msg(meta, [frames[first]])
    if k == 14:   # FRAMES body cut short or padded (CRCs right)
        meta = {"session": session, "segno": segno, "seg_id": seg_id, "first": 0, "id": 1}
        m = frames_msg(meta, frames[:2])
        body = m[wire.HEADER_SIZE:]
        body = body[:rng.randrange(len(body))] if rng.random() < 0.5 else body + rng.randbytes(9)
        return "bad frames body", raw_msg(wire.T_FRAMES, body)
    # a message that stops in the middle, then the connection ends
    m = raw_msg(wire.T_STATUS, js({"x": "y" * 1000}))
    return "truncated", m[:rng.randrange(1, len(m))]


def mode_fuzz(n, seed, seg, certdir, host):
    t0 = time.monotonic()
    c = ctx(certdir)
    results, secs = {}, {}
    lock = threading.Lock()
    sent = [0]

    def worker(w):
        rng = random.Random(seed * 100 + w)
        for i in range(w, n, 4):
            before_hello = rng.random() < 0.3
            kind, msg = fuzz_message(rng, seg, before_hello)
            t = time.monotonic()
            try:
                s = connect(c)
            except (OSError, ssl.SSLError) as e:
                with lock:
                    results.setdefault("connect failed: " + type(e).__name__, 0)
                    results["connect failed: " + type(e).__name__] += 1
                continue
            try:
                if not before_hello:
                    welcome(s, host)
                    # a few valid messages first: the connection is healthy until the bad one
                    for _ in range(rng.randrange(3)):
                        send(s, wire.encode_json(wire.T_PING, {"t": rng.randrange(1 << 40)}))
                s.sendall(msg)
                with lock:
                    sent[0] += 1
                if kind in ("truncated", "random bytes"):   # maybe shorter than a header
                    s.shutdown(socket.SHUT_WR)
                how, reason = outcome(s, timeout=15)
            except (OSError, ssl.SSLError, RuntimeError) as e:
                how, reason = "closed", str(e)
            finally:
                s.close()
            key = f"{kind}: {how}"
            with lock:
                results[key] = results.get(key, 0) + 1
                secs[kind] = secs.get(kind, 0.0) + time.monotonic() - t

    ts = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return {"sent": sent[0], "results": results, "seconds": time.monotonic() - t0,
            "seconds_by_kind": {k: round(v, 2) for k, v in sorted(secs.items())}}


def mode_handshake(c, plain=None):
    """Try to get in with context c; returns how it ended."""
    try:
        s = connect(c)
    except ssl.SSLError as e:
        return ["handshake refused", str(e)]
    except OSError as e:
        return ["connect failed", str(e)]
    try:
        if plain is not None:
            s.sendall(plain)
        else:
            send(s, hello("hosta"))
        return list(outcome(s))
    except (OSError, ssl.SSLError) as e:
        return ["closed", str(e)]
    finally:
        s.close()


def mode_steal(seg, certdir, host):
    """Host A (valid certificate) sends host B's frames, then an INVENTORY of B's segment."""
    frames, session, segno, seg_id = seg
    out = []
    for what in ("frames", "inventory", "hello as b"):
        s = connect(ctx(certdir))
        try:
            if what == "hello as b":
                send(s, hello("hostb"))
            else:
                welcome(s, host)
                if what == "frames":
                    s.sendall(frames_msg({"session": session, "segno": segno, "seg_id": seg_id,
                                          "first": 0, "id": 1}, frames[:8]))
                else:
                    send(s, wire.encode_json(wire.T_INVENTORY, {"segments": [
                        {"session": session, "segno": segno, "seg_id": seg_id,
                         "frames": len(frames), "sealed": True}]}))
            out.append([what, *outcome(s)])
        finally:
            s.close()
    return out


def mode_flood(n, certdir):
    """n connections at once that say nothing: beyond the limit they are refused."""
    socks, refused = [], 0
    c = ctx(certdir)
    for _ in range(n):
        try:
            socks.append(connect(c))
        except (OSError, ssl.SSLError):
            refused += 1
    closed = 0
    for s in socks:   # a refused connection is closed by the server right after the handshake
        s.settimeout(0.5)
        try:
            if s.recv(1) == b"":
                closed += 1
        except socket.timeout:
            pass
        except (OSError, ssl.SSLError):
            closed += 1
    for s in socks:
        s.close()
    return {"opened": len(socks), "refused": refused, "closed": closed}


def load_seg(s):
    frames, h = seg_frames(s["path"])
    return (frames, s["session"], s["segno"], h.seg_id)


out = {}
mode = cfg["mode"]
if mode == "identity":
    out["no cert"] = mode_handshake(ctx())
    out["other ca"] = mode_handshake(ctx(cfg["other"], ca=cfg["ca"]))
    out["expired"] = mode_handshake(ctx(cfg["expired"]))
    out["tls12"] = mode_handshake(ctx(cfg["hosta"], maxver=ssl.TLSVersion.TLSv1_2))
    out["plain tcp"] = mode_handshake(None, plain=b"".join(hello("hosta")))
    out["steal"] = mode_steal(load_seg(cfg["seg_b"]), cfg["hosta"], "hosta")
    out["flood"] = mode_flood(cfg["flood"], cfg["hosta"])
else:
    # host a's own, already stored segment: a mutation the server cannot tell from the
    # original is ACKed as already stored; every other one must be refused
    out = mode_fuzz(cfg["n"], cfg["seed"], load_seg(cfg["seg_a"]), cfg["hosta"], "hosta")
print(json.dumps(out))
'''


def store_snapshot(store: Path) -> dict:
    return {
        "sessions": sql(store, "SELECT session, host, end_stamp, watermark FROM sessions "
                               "ORDER BY session"),
        "writes": sql(store, "SELECT count(*) AS n, sum(length) AS b, max(stamp) AS s FROM writes"),
        "marks": sql(store, "SELECT name, stamp FROM marks ORDER BY name"),
        "files": sorted(str(p.relative_to(store)) for p in _parquet_files(store)),
    }


def test_hostile_clients_are_refused_and_store_nothing(lab, tmp_path):
    """Clients without a valid certificate, host A sending host B's frames, a connection
    flood and thousands of fuzzed messages: all refused, the service keeps running, nothing is
    stored; a legitimate tracer ships normally afterwards."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from blkrewind.tracer.log import inventory
    a, b = lab.hosts
    lab.start()
    for h in lab.hosts:
        h.mark("m1")
        assert h.tracer.stop() == 0, h.tracer.stderr
    wait_shipped(lab.store, lab.hosts)
    # their first segments: stored, the sessions bound to hosta / hostb
    seg_a, seg_b = ({"session": s["session"], "segno": s["segno"], "path": str(s["path"])}
                    for s in (inventory(h.log)[0] for h in lab.hosts))
    before = store_snapshot(lab.store)

    # credentials: another CA's host, an expired certificate of our CA
    other = tmp_path / "other-ca"
    tlsconf.init(other, ["hosta"])
    ca_cert = x509.load_pem_x509_certificate((lab.tlsdir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((lab.tlsdir / "ca-key.pem").read_bytes(), None)
    key, cert = tlsconf.make_host_cert(ca_key, ca_cert, "hosta", [],
                                       not_before=dt.datetime.now(dt.timezone.utc)
                                       - dt.timedelta(days=10), days=1)
    exp = tmp_path / "expired"
    exp.mkdir(mode=0o700)
    (exp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (exp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    script = tmp_path / "attacker.py"
    script.write_text(ATTACKER)
    base = {"addr": lab.server.addr, "port": lab.server.port, "ca": str(lab.tlsdir / "ca.pem"),
            "hosta": str(a.tls), "other": str(other / "hosta"), "expired": str(exp),
            "seg_a": seg_a, "seg_b": seg_b, "flood": 80}

    r = a.ns.run(sys.executable, script, json.dumps({**base, "mode": "identity"}), timeout=180)
    res = json.loads(r.stdout)
    print("identity:", json.dumps(res, indent=1))
    for k in ("no cert", "other ca", "expired", "tls12", "plain tcp"):
        assert res[k][0] in ("handshake refused", "closed"), (k, res[k])
    steal = {w: (how, reason) for w, how, reason in res["steal"]}
    assert steal["frames"][0] == steal["inventory"][0] == "error", steal
    assert "belongs to host hostb" in steal["frames"][1], steal
    assert "belongs to host hostb" in steal["inventory"][1], steal
    assert steal["hello as b"][0] == "error" and "certificate is for 'hosta'" in \
        steal["hello as b"][1], steal
    assert res["flood"]["opened"] + res["flood"]["refused"] == 80
    assert res["flood"]["closed"] + res["flood"]["refused"] >= 80 - 64, res["flood"]

    r = a.ns.run(sys.executable, script, json.dumps({**base, "mode": "fuzz", "n": FUZZ_N,
                                                     "seed": 1}), timeout=600)
    res = json.loads(r.stdout)
    print("fuzz:", json.dumps(res, indent=1))
    assert res["sent"] >= FUZZ_N * 0.95, res
    # every complete bad message gets an ERROR and the connection closed; a message cut
    # short (or bytes that may be shorter than a header) ends with the connection closed
    wrong = {k: v for k, v in res["results"].items()
             if not (k.endswith(": error") or k.split(":")[0] in ("random bytes", "truncated")
                     and k.endswith(": closed") or k == "equivalent LOG frame: ack")}
    assert not wrong, res["results"]

    assert lab.server.alive(), lab.server.log
    after = store_snapshot(lab.store)
    assert after == before
    log = lab.server.log
    assert "Traceback" not in log
    assert "TLS handshake failed" in log

    # the service still works: host a ships a new session; host b's history is unchanged
    a.trace(lab.server)
    a.unmount()
    a.mark("end")
    assert a.tracer.stop() == 0, a.tracer.stderr
    wait_shipped(lab.store, [a])
    out = restore(lab.store, a.key, "hosta-end", tmp_path / "a.img")
    assert same_file(out, a.copies["hosta-end"])
    out = restore(lab.store, b.key, "hostb-m1", tmp_path / "b.img")
    assert same_file(out, b.copies["hostb-m1"])
    now = store_snapshot(lab.store)["sessions"]
    assert [s for s in now if s["host"] == "hostb"] == \
        [s for s in before["sessions"] if s["host"] == "hostb"]
    assert len([s for s in now if s["host"] == "hosta"]) == 2


def test_netlab_links_cut_and_cleanup(netlab):
    """The lab itself: namespaces reach the root side, a cut link (down or loss) stops
    traffic of that namespace only, restore brings it back, processes are tracked."""
    a, b = netlab.add_ns("a"), netlab.add_ns("b")
    srv = socket.socket()
    srv.bind((netlab.addr, 0))
    srv.listen(8)
    srv.settimeout(5)
    port = srv.getsockname()[1]
    code = (f"import socket; c = socket.create_connection(('{netlab.addr}', {port}), "
            f"timeout=2); c.sendall(b'x')")
    try:
        for ns in (a, b):
            ns.run("python3", "-c", code)
            c, peer = srv.accept()
            assert peer[0] == ns.addr
            c.close()
        for how in ("down", "loss"):
            a.cut(how)
            assert a.run("python3", "-c", code, check=False).returncode != 0, how
            b.run("python3", "-c", code)
            srv.accept()[0].close()
            a.restore()
            a.run("python3", "-c", code)
            srv.accept()[0].close()
        p = a.popen("sleep", "60")
        # nsenter joins the namespace after fork, so the pid shows up there a moment later
        deadline = time.monotonic() + 10
        while p.pid not in a.pids() and time.monotonic() < deadline:
            assert p.poll() is None, "the process in the namespace exited"
            time.sleep(0.02)
        assert p.pid in a.pids()
    finally:
        srv.close()
