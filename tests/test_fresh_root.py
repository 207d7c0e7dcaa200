"""The README's first command on a fresh machine: `./bootstrap.sh demo` in a new Debian root.

For each suite (Debian 12 bookworm, Debian 13 trixie): debootstrap a minbase root (nothing but
Debian's required packages: no python3, no ca-certificates, no clang), copy this checkout's
tracked files in (no .venv, no bpf/build), then chroot into it with the host's /dev, /sys
and /proc bound in and a bpffs of its own at /sys/fs/bpf, in a mount namespace of its own
(its own /run too: a plain directory of the root), and run
`./bootstrap.sh demo` (bootstrap installs every package it needs, makes .venv, builds the BPF
object with the clang it chose and runs the demo on a loop device it makes itself; BPF runs
on the host's kernel), then `./bootstrap.sh test` on a short pure-logic module (the test
path's set-up: pytest in .venv, pytest's exit status).

pip in the new root trusts what this machine trusts: the CA bundle the environment (or the
host's pip config) names is copied to a path of its own in the root (the root's
ca-certificates package rewrites /etc/ssl/certs) and SSL_CERT_FILE, PIP_CERT and
REQUESTS_CA_BUNDLE point at it; /etc/resolv.conf is copied too.

Cached between runs on one machine under $BLKREWIND_TEST_CACHE (default
/var/cache/blkrewind-test): the debootstrapped root per suite as a tarball, apt's .deb
archive per suite and pip's cache (bound into the root). It passes with an empty cache too
(slower: see README, Requirements). Everything is torn down even on failure: the chroot's
processes are killed, its mounts die with its mount namespace (and anything left under the
root on the host is unmounted, deepest first), loop devices backed by files in the root are
detached (the demo detaches its own: one left fails the test), BPF pins its tracer left go with
the namespace's bpffs; then the root's tmpfs is unmounted.

The runs are queued in the background at the session's start (tests/vm/background.py, behind
nothing: the guests of the kernel matrix follow them); the tests, run last, check their outcome.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import debmirror
import pytest
from conftest import ROOT, _is_under, attached_loops, background_jobs, detach_loop, mounts, umount

pytestmark = [pytest.mark.slow]

SUITES = ("bookworm", "trixie")
CACHE = Path(os.environ.get("BLKREWIND_TEST_CACHE", "/var/cache/blkrewind-test"))
CA_IN_ROOT = "/etc/blkrewind-test/host-ca.pem"  # a path ca-certificates does not manage
SRC_IN_ROOT = "/src/blkrewind"
ROOT_TMPFS = "6g"  # limit of the root's tmpfs (a bookworm root after the demo: about 2 GB)
TIMEOUT = 1500  # seconds for one suite inside the root (about 1.5-2 min here, warm or empty cache)


def say(msg: str) -> None:
    print(f"fresh-root: {msg}", flush=True)


# --------------------------------------------------------------------------- what the host gives
def reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, loop devices, BPF)"
    for tool in ("debootstrap", "unshare", "chroot", "tar", "zstd"):
        if not shutil.which(tool):
            return f"`{tool}` is missing (apt-get install debootstrap util-linux tar zstd)"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "/sys/kernel/btf/vmlinux is missing: the kernel has no BTF"
    if not Path("/dev/loop-control").exists():
        return "/dev/loop-control is missing (modprobe loop)"
    if ca_bundle() is None:
        return "no CA bundle found (SSL_CERT_FILE, PIP_CERT, REQUESTS_CA_BUNDLE, pip config cert)"
    return None


def ca_bundle() -> Path | None:
    """The CA bundle this machine's pip trusts: the environment's, else pip's config, else
    OpenSSL's default file."""
    for var in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        v = os.environ.get(var)
        if v and os.path.isfile(v):
            return Path(v)
    p = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL)
    for line in p.stdout.splitlines():
        key, _, val = line.partition("=")
        if key.endswith(".cert"):
            val = val.strip().strip("'\"")
            if os.path.isfile(val):
                return Path(val)
    d = ssl.get_default_verify_paths()
    for f in (d.cafile, d.openssl_cafile):
        if f and os.path.isfile(f):
            return Path(f)
    return None


def chroot_env() -> dict[str, str]:
    """A clean environment for the root: no host paths (PIP_FIND_LINKS, ...) leak in, but the
    network settings do (proxies, a PyPI mirror given by URL)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
           "SSL_CERT_FILE": CA_IN_ROOT, "PIP_CERT": CA_IN_ROOT, "REQUESTS_CA_BUNDLE": CA_IN_ROOT}
    for k in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
              "PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT"):
        v = os.environ.get(k)
        if v and (k == "PIP_DEFAULT_TIMEOUT" or "://" in v or "proxy" in k.lower()) \
                and not v.startswith("file:"):
            env[k] = v
    return env


# --------------------------------------------------------------------------- the cached root
class Locked:
    """An exclusive lock on CACHE/<name>.lock (two runs on one machine share the cache)."""

    def __init__(self, name: str):
        CACHE.mkdir(parents=True, exist_ok=True)
        self.path = CACHE / f"{name}.lock"

    def __enter__(self):
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


def root_tarball(suite: str) -> Path:
    """CACHE/<suite>-minbase.tar.zst: a debootstrapped minbase root, made on first use."""
    tar = CACHE / f"{suite}-minbase.tar.zst"
    if tar.exists():
        return tar
    work = CACHE / f".{suite}.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.monotonic()
    try:
        p = subprocess.run(["debootstrap", "--variant=minbase", suite, str(work),
                            debmirror.mirror()],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1200)
        if p.returncode != 0:
            log = work / "debootstrap" / "debootstrap.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise AssertionError(f"debootstrap {suite} exited {p.returncode}:\n"
                                 f"{(p.stderr or p.stdout)[-3000:]}\n{tail}")
        assert not [mp for _, mp in mounts() if _is_under(mp, work)], "debootstrap left mounts"
        part = tar.with_name(tar.name + f".{os.getpid()}")
        subprocess.run(["tar", "--zstd", "--numeric-owner", "-C", str(work), "-cpf", str(part), "."],
                       check=True, stdin=subprocess.DEVNULL)
        os.replace(part, tar)
    finally:
        if not [mp for _, mp in mounts() if _is_under(mp, work)]:
            shutil.rmtree(work, ignore_errors=True)
    say(f"{suite}: debootstrap --variant=minbase + tarball in {time.monotonic() - t0:.0f} s")
    return tar


def copy_checkout(dest: Path) -> None:
    """This checkout's tracked files as they are now (no .venv, no bpf/build, no .git)."""
    dest.mkdir(parents=True)
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             check=True, stdin=subprocess.DEVNULL).stdout
        files = [f for f in out.decode().split("\0")
                 if f and ((ROOT / f).is_symlink() or (ROOT / f).is_file())]
        for f in files:
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / f).is_symlink():  # blkrewind/tracer -> ../tracer, ...
                os.symlink(os.readlink(ROOT / f), dest / f)
            else:
                shutil.copy2(ROOT / f, dest / f)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, symlinks=True, ignore=shutil.ignore_patterns(
            ".venv", "build", "__pycache__", "*.egg-info", ".git", ".pytest_cache"))
    assert (dest / "bootstrap.sh").exists()


# --------------------------------------------------------------------------- running inside
# Runs under `unshare --mount` (private propagation): every mount made here, and every mount
# the demo makes in the root, lives in that namespace and goes with it.
INSIDE = r"""
set -eu
R=$1 APT=$2 PIP=$3; shift 3
mount --rbind /dev "$R/dev"
mount --rbind /sys "$R/sys"
# A bpffs of its own, like a fresh machine's: the root's tracer cannot see (and must not sweep
# as orphans) the captures other tracers on this host pinned; its own pins go with the namespace.
mount -t bpf bpf "$R/sys/fs/bpf"
mount --rbind /proc "$R/proc"
mkdir -p "$R/var/cache/apt/archives" "$R/root/.cache/pip"
mount --bind "$APT" "$R/var/cache/apt/archives"
mount --bind "$PIP" "$R/root/.cache/pip"
# This namespace began as a copy of the host's mounts, the other tests' file systems and FUSE
# points included; a copy would keep their devices busy until the namespace ends (a loop
# device then stays attached after `losetup -d`: seen in CI, the host's mounts being private).
# Keep only the root's tree, its ancestors and the system's; drop the rest.
awk '{print $2}' /proc/self/mounts | sort -ru | while read -r m; do
    m=$(printf '%b' "$m")
    case "$m" in
        "$R"|"$R"/*|/|/dev|/dev/*|/sys|/sys/*|/proc|/proc/*) continue ;;
    esac
    case "$R/" in "$m"/*) continue ;; esac   # an ancestor of the root
    umount -l "$m" 2>/dev/null || true
done
exec chroot "$R" "$@"
"""


def root_pids(root: Path) -> list[int]:
    """Processes whose root directory is inside the root."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if _is_under(os.readlink(d / "root"), root):
                out.append(int(d.name))
        except (OSError, ValueError):
            continue
    return out


def run_in_root(root: Path, suite: str, script: str, log: Path) -> tuple[int, str]:
    """(exit status, output) of SCRIPT run in the root."""
    apt = CACHE / f"apt-{suite}"
    pip = CACHE / "pip"
    apt.mkdir(parents=True, exist_ok=True)
    pip.mkdir(parents=True, exist_ok=True)
    cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-c", INSIDE, "inside",
           str(root), str(apt), str(pip),
           "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in chroot_env().items()),
           "/bin/bash", "-c", script]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        _running[suite] = proc
        try:
            rc = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            with open(log, "a") as f2:
                f2.write(f"\nfresh-root: killed after {TIMEOUT} s\n")
            rc = -signal.SIGKILL
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            _running.pop(suite, None)
    return rc, log.read_text(errors="replace")


def teardown(root: Path) -> list[str]:
    """Kill, unmount, detach what the root left; returns what had to be cleaned."""
    problems = []
    for attempt in range(50):
        pids = root_pids(root)
        if not pids:
            break
        if attempt == 0:
            problems.append(f"processes left in the root: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    else:
        problems.append(f"processes still in the root: {root_pids(root)}")
    left = sorted({mp for _, mp in mounts() if _is_under(mp, root) and mp != str(root)},
                  key=len, reverse=True)
    for mp in left:
        problems.append(f"mount left: {mp}")
        problems += umount(mp)
    for dev, backing in attached_loops().items():
        if _is_under(backing, root):
            problems.append(f"loop device left: {dev} -> {backing}")
            problems += detach_loop(dev, backing)
    return problems


# --------------------------------------------------------------------------- the test
SCRIPT = f"""
set -eu
cd {SRC_IN_ROOT}
t0=$(date +%s)
./bootstrap.sh demo
t1=$(date +%s)
echo "==> again"
./bootstrap.sh setup
echo "==> test"
./bootstrap.sh test -q -p no:cacheprovider tests/test_record.py
t2=$(date +%s)
echo "TIMES demo=$((t1 - t0)) setup+test=$((t2 - t1))"
# What bootstrap chose and built with:
echo "PYTHON $(.venv/bin/python --version 2>&1)"
for v in 21 20 19 18 17 16 15 14; do
    if command -v clang-$v >/dev/null; then echo "CLANG clang-$v"; break; fi
done
echo "BPFTOOL $(bpftool version | head -n 1)"
"""


class Outcome:
    """What one suite's run left for its test: the log's text, the exit status (None: never
    started), what teardown had to clean, a line of timings."""

    def __init__(self) -> None:
        self.out = ""
        self.returncode: int | None = None
        self.problems: list[str] = []
        self.log: Path | None = None
        self.summary = ""


_running: dict[str, subprocess.Popen] = {}  # suite -> the root's process (killed at close)


def run_suite(suite: str, base: Path) -> Outcome:
    """Unpacks the cached root on a tmpfs, copies the checkout in, runs SCRIPT inside, tears it
    all down (whatever happens)."""
    o = Outcome()
    t_start = time.monotonic()
    with Locked(suite):
        tar = root_tarball(suite)
        t_tar = time.monotonic()
        root = (base / f"{suite}-root").resolve()
        root.mkdir()
        o.log = base / f"{suite}.log"
        t_ready = t_ran = time.monotonic()
        # The root on a tmpfs: dpkg's fsyncs cost nothing, and the root goes with one umount
        # (deleting a root of ~1.5 GB took 10-70 s on this shared disk).
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={ROOT_TMPFS},mode=0755",
                        "blkrewind-fresh-root", str(root)], check=True, stdin=subprocess.DEVNULL)
        used = 0
        try:
            subprocess.run(["tar", "--zstd", "--numeric-owner", "-C", str(root), "-xpf", str(tar)],
                           check=True, stdin=subprocess.DEVNULL)
            ca = root / CA_IN_ROOT.lstrip("/")
            ca.parent.mkdir(parents=True, exist_ok=True)
            bundle = ca_bundle()
            assert bundle is not None
            shutil.copyfile(bundle, ca)
            resolv = root / "etc" / "resolv.conf"
            if resolv.is_symlink() or resolv.exists():
                resolv.unlink()
            shutil.copyfile("/etc/resolv.conf", resolv)
            copy_checkout(root / SRC_IN_ROOT.lstrip("/"))
            assert not (root / SRC_IN_ROOT.lstrip("/") / ".venv").exists()
            t_ready = time.monotonic()
            o.returncode, o.out = run_in_root(root, suite, SCRIPT, o.log)
        finally:
            t_ran = time.monotonic()
            used = shutil.disk_usage(root).used
            o.problems = teardown(root)
            o.problems += umount(str(root))
            if not [mp for _, mp in mounts() if _is_under(mp, root)]:
                root.rmdir()
            else:
                o.problems.append(f"{root} not deleted: mounts are left under it")
    t_end = time.monotonic()
    facts = [line for line in o.out.splitlines()
             if line.split(" ", 1)[0] in ("TIMES", "PYTHON", "CLANG", "BPFTOOL")]
    o.summary = (f"{suite}: root {t_tar - t_start:.0f} s, unpack+copy {t_ready - t_tar:.0f} s, "
                 f"bootstrap+demo+test {t_ran - t_ready:.0f} s, teardown {t_end - t_ran:.0f} s, "
                 f"total {t_end - t_start:.0f} s; root {used / 2**30:.1f} GiB; " + "; ".join(facts))
    return o


def submit_vm_jobs(bg, tmp_path_factory, items) -> None:
    """Queues each selected suite's run in the background (tests/vm/background.py): the run is
    mostly waiting on apt, pip and the disk, so it overlaps the rest of the suite."""
    r = reason()
    if r:
        bg.unavailable(__name__, r)
        return
    selected = [it.callspec.params["suite"] for it in items
                if getattr(it, "originalname", "") == "test_bootstrap_demo_on_fresh_debian"]
    for suite in SUITES:
        if suite in selected:
            bg.submit(f"fresh-{suite}", run_suite, suite, tmp_path_factory.mktemp(f"fresh-{suite}"))

    def stop() -> list[str]:
        # the session ends with a run still going (an interrupted session): kill the root's
        # processes; the job's own teardown then unmounts and detaches
        problems = []
        for suite, proc in list(_running.items()):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                bg.result(f"fresh-{suite}", 120)
            except BaseException as e:  # noqa: BLE001 - reported, the session is ending
                problems.append(f"fresh root {suite}: {e}")
        return problems

    bg.on_close(stop)


@pytest.fixture(scope="module")
def roots(vm_background):
    return background_jobs(vm_background, __name__)


@pytest.mark.vm
@pytest.mark.parametrize("suite", SUITES)
def test_bootstrap_demo_on_fresh_debian(suite, roots):
    # queued at the session's start, run beside the other tests; the empty cache adds a
    # debootstrap per suite (see README, Requirements)
    o: Outcome = roots.result(f"fresh-{suite}", 2 * TIMEOUT + 1800)
    say(o.summary)
    out = o.out
    if o.returncode != 0:
        pytest.fail(f"bootstrap in a fresh {suite} root exited {o.returncode} "
                    f"(log: {o.log}):\n{out[-6000:]}", pytrace=False)
    if o.problems:
        pytest.fail("the fresh root left things behind:\n  " + "\n  ".join(o.problems),
                    pytrace=False)
    facts = [line for line in out.splitlines()
             if line.split(" ", 1)[0] in ("TIMES", "PYTHON", "CLANG", "BPFTOOL")]
    # The demo ran to its end (it says so) and bootstrap installed a clang that builds an
    # object this kernel loads (the demo traced with it).
    assert "done: the earlier content is back" in out, out[-4000:]
    # The second command found everything done (bootstrap is idempotent); `test` then
    # installs only the test suite's own packages besides and runs pytest.
    again = out.split("\n==> again")[-1].split("\n==> test")[0]
    for line in ("packages: all present", "venv: .venv up to date", "is up to date"):
        assert line in again, f"the second bootstrap redid work: {line!r} missing"
    assert " passed" in out.split("\n==> test")[-1], out[-2000:]
    clang = next((f.split()[1] for f in facts if f.startswith("CLANG")), "")
    assert clang and int(clang.split("-")[1]) >= 16, f"no clang >= 16 in the {suite} root: {facts}"
