"""A network lab for tests: network namespaces joined to the root namespace by veth pairs on
a private bridge, links that can be cut and restored, and cleanup that always happens.

    with NetLab() as lab:                 # or the `netlab` fixture
        a = lab.add_ns("a")               # netns brwlab-PID-L-a, address a.addr (10.213.N.10+i)
        a.run("ip", "addr")               # nsenter --net=/run/netns/brwlab-... ip addr
        p = a.popen(*cmd)                 # a process inside the namespace (killed at exit)
        a.cut("down")                     # link down; a.cut("loss"): 100 % packet loss
        a.restore()
    lab.addr                              # the root namespace's address on the bridge (10.213.N.1)

Layout: one bridge per lab in the root namespace holding 10.213.N.1/24 (N: the lowest /24 of
10.213.0.0/16 not in use on this machine), and per namespace a veth pair, its root end enslaved
to the bridge, its other end `eth0` inside the namespace with 10.213.N.(10+i)/24; `lo` is up in
each namespace. Everything is named after the test process's pid, so concurrent sessions never
collide, and the session-level leak check (`no_leaked_netlab`, autouse where imported) finds
what a lab of this process left behind.

Loop devices, BPF and the file system are not per network namespace: a tracer in a namespace
traces a loop device made in the root namespace and writes its LOG to the shared file system.
Commands run with `nsenter --net=/run/netns/NAME` (util-linux), which switches the network
namespace only -- not `ip netns exec`, which would also give the command a private copy of
every mount (so a file system the test unmounts would stay mounted, and keep writing, inside
the tracer's copy until it exits).

Packet loss uses `tc qdisc ... netem loss 100%` when the kernel has sch_netem, else the
`blackhole` qdisc (drops every packet), on both ends of the veth pair.
"""
from __future__ import annotations

import fcntl
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

PREFIX = f"brwlab-{os.getpid()}-"          # network namespaces
LINK_PREFIX = f"brh{os.getpid()}"          # veth root ends   (<= 15 chars with the suffix)
BRIDGE_PREFIX = f"brb{os.getpid()}"        # bridges
LOCK = "/run/lock/blkrewind-netlab.lock"

_labs = itertools.count(1)


def _ip(*args, check=True, timeout=30) -> subprocess.CompletedProcess:
    return _run(["ip", *map(str, args)], check=check, timeout=timeout)


def _run(cmd, check=True, timeout=30) -> subprocess.CompletedProcess:
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}: "
                             f"{(p.stderr or p.stdout).strip()}")
    return p


def lab_reason() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the network lab needs root"
    for tool, pkg in (("ip", "iproute2"), ("tc", "iproute2"), ("nsenter", "util-linux")):
        if not shutil.which(tool):
            return f"`{tool}` is missing (apt-get install {pkg})"
    return None


def netns_list() -> list[str]:
    p = _ip("netns", "list", check=False)
    return [ln.split()[0] for ln in p.stdout.splitlines() if ln.strip()]


def links() -> list[str]:
    p = _ip("-o", "link", "show", check=False)
    out = []
    for ln in p.stdout.splitlines():
        m = re.match(r"\d+:\s+([^:@\s]+)", ln)
        if m:
            out.append(m.group(1))
    return out


_netem: bool | None = None


def has_netem() -> bool:
    """Whether the kernel has the netem qdisc (probed once on a throwaway dummy-free veth)."""
    global _netem
    if _netem is None:
        name = f"{LINK_PREFIX}nt"
        _ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")
        try:
            _netem = _run(["tc", "qdisc", "add", "dev", name, "root", "netem", "loss", "100%"],
                          check=False).returncode == 0
        finally:
            _ip("link", "del", name, check=False)
    return _netem


class Netns:
    def __init__(self, lab: "NetLab", index: int, tag: str):
        self.lab = lab
        self.index = index
        self.name = f"{PREFIX}{lab.id}-{tag or index}"
        self.veth = f"{LINK_PREFIX}{lab.id}x{index}"   # root end, on the bridge
        self.inner = "eth0"                             # the end inside the namespace
        self.addr = f"{lab.net}.{10 + index}"
        self.procs: list[subprocess.Popen] = []
        self.state = "up"

    def cmd(self, *args) -> list[str]:
        """The argv that runs args inside this namespace (network only; same mounts)."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *map(str, args)]

    def run(self, *args, check=True, timeout=60) -> subprocess.CompletedProcess:
        return _run(self.cmd(*args), check=check, timeout=timeout)

    def popen(self, *args, **kw) -> subprocess.Popen:
        """Start a process inside the namespace (nsenter execs into it: the Popen's pid is the
        command's). Killed when the lab closes if still running."""
        p = subprocess.Popen(self.cmd(*args), **kw)
        self.procs.append(p)
        return p

    def cut(self, how: str = "down") -> None:
        """Cut this namespace off: 'down' (the veth's root end down: no carrier inside) or
        'loss' (every packet dropped both ways, the link stays up)."""
        if self.state != "up":
            raise AssertionError(f"{self.name} is already cut ({self.state})")
        if how == "down":
            _ip("link", "set", self.veth, "down")
        elif how == "loss":
            q = ["netem", "loss", "100%"] if has_netem() else ["blackhole"]
            _run(["tc", "qdisc", "add", "dev", self.veth, "root", *q])
            self.run("tc", "qdisc", "add", "dev", self.inner, "root", *q)
        else:
            raise ValueError(f"cut: 'down' or 'loss', not {how!r}")
        self.state = how

    def restore(self) -> None:
        if self.state == "down":
            _ip("link", "set", self.veth, "up")
        elif self.state == "loss":
            _run(["tc", "qdisc", "del", "dev", self.veth, "root"])
            self.run("tc", "qdisc", "del", "dev", self.inner, "root")
        self.state = "up"
        self.wait_reachable()

    def wait_reachable(self, timeout: float = 10) -> None:
        """Wait until a TCP SYN from inside reaches the root side (a refusal counts) -- after
        the link comes up the carrier and the neighbour entries take a moment."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.run("python3", "-c", "import socket,sys; s=socket.socket(); s.settimeout(1); "
                         f"sys.exit(s.connect_ex(('{self.lab.addr}', 9)) not in (0, 111))",
                         check=False)
            if p.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} cannot reach {self.lab.addr}: {p.stderr.strip()}")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        p = _ip("netns", "pids", self.name, check=False)
        return [int(x) for x in p.stdout.split() if x.isdigit()]

    def __repr__(self):
        return f"Netns({self.name}, {self.addr})"


class NetLab:
    def __init__(self):
        r = lab_reason()
        if r:
            raise RuntimeError(r)
        self.id = next(_labs)
        self.bridge = f"{BRIDGE_PREFIX}l{self.id}"
        self.namespaces: list[Netns] = []
        self.net = None
        self.addr = None
        self.closed = False
        try:
            self._make_bridge()
        except BaseException:
            self.close()
            raise

    def _make_bridge(self) -> None:
        Path(LOCK).parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK, "w") as lk:  # choosing a free /24 and taking it is one step
            fcntl.flock(lk, fcntl.LOCK_EX)
            used = set(re.findall(r"inet 10\.213\.(\d+)\.", _ip("-4", "-o", "addr", "show").stdout))
            free = next((n for n in range(1, 255) if str(n) not in used), None)
            if free is None:
                raise AssertionError("no free /24 in 10.213.0.0/16 for the network lab")
            self.net = f"10.213.{free}"
            self.addr = f"{self.net}.1"
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.addr}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")

    def add_ns(self, tag: str = "") -> Netns:
        if tag and not re.fullmatch(r"[a-z0-9]{1,8}", tag):
            raise ValueError("tag: 1-8 lower-case letters or digits")
        ns = Netns(self, len(self.namespaces), tag)
        self.namespaces.append(ns)
        _ip("netns", "add", ns.name)
        _ip("link", "add", ns.veth, "type", "veth", "peer", "name", ns.inner, "netns", ns.name)
        _ip("link", "set", ns.veth, "master", self.bridge)
        _ip("link", "set", ns.veth, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        _ip("-n", ns.name, "addr", "add", f"{ns.addr}/24", "dev", ns.inner)
        _ip("-n", ns.name, "link", "set", ns.inner, "up")
        ns.wait_reachable()
        return ns

    def close(self) -> list[str]:
        """Kill what runs in the namespaces, delete them, their veths and the bridge; then check
        that all of it is gone. Returns problems (empty when clean). Idempotent."""
        if self.closed:
            return []
        self.closed = True
        problems: list[str] = []
        for ns in self.namespaces:
            for p in ns.procs:
                if p.poll() is None:
                    p.kill()
            for p in ns.procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    problems.append(f"process {p.pid} in {ns.name} did not die")
            # anything else still in the namespace was started (forked) by our processes
            for pid in ns.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if ns.name in netns_list():
                cp = _ip("netns", "del", ns.name, check=False)
                if cp.returncode != 0:
                    problems.append(f"ip netns del {ns.name}: {cp.stderr.strip()}")
            if ns.veth in links():
                _ip("link", "del", ns.veth, check=False)
        if self.bridge in links():
            _ip("link", "del", self.bridge, check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = self._leftovers()
            if not left:
                break
            time.sleep(0.1)
        problems += [f"still present: {x}" for x in self._leftovers()]
        return problems

    def _leftovers(self) -> list[str]:
        have_ns, have_links = set(netns_list()), set(links())
        out = [f"netns {ns.name}" for ns in self.namespaces if ns.name in have_ns]
        out += [f"link {ns.veth}" for ns in self.namespaces if ns.veth in have_links]
        out += [f"bridge {self.bridge}"] if self.bridge in have_links else []
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        problems = self.close()
        if problems and exc[0] is None:
            raise AssertionError("network lab cleanup:\n  " + "\n  ".join(problems))


@pytest.fixture
def netlab():
    """A NetLab for one test, closed (everything deleted) when it ends, pass or fail."""
    r = lab_reason()
    if r:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{r} (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(r)
    lab = NetLab()
    try:
        yield lab
    finally:
        problems = lab.close()
    if problems:
        pytest.fail("network lab cleanup:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def no_leaked_netlab():
    """At the end of the session: a namespace, veth or bridge named after this process was
    leaked by a lab that was not closed. Report it and delete it."""
    yield
    leaked_ns = [n for n in netns_list() if n.startswith(PREFIX)]
    leaked_links = [ln for ln in links() if ln.startswith((LINK_PREFIX, BRIDGE_PREFIX))]
    if not (leaked_ns or leaked_links):
        return
    for n in leaked_ns:
        for pid in _ip("netns", "pids", n, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("netns", "del", n, check=False)
    for ln in leaked_links:
        _ip("link", "del", ln, check=False)
    pytest.fail("network lab leaked (fix the test's cleanup):\n  "
                + "\n  ".join([f"netns {n}" for n in leaked_ns] + [f"link {x}" for x in leaked_links]),
                pytrace=False)
