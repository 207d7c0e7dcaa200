"""Shared fixtures: loop devices, file systems, running the CLI, and the `bpf` marker.

Everything a test creates here is cleaned up even when the test fails, and the
session ends with a check that no loop device or mount made under pytest's
temporary directory is left behind.

Fixtures
  make_loop(size_mb=64, *, dio=False, fill=None) -> Loop   (alias: loopdev)
  mount_fs(dev, fstype=None, opts=None) -> Path of the mount point
  mkfs(dev, "ext4" | "xfs")
  run_cli(*args, check=True, timeout=300, ...) -> CompletedProcess
  assert_one_line_error(cp, *words) -> the error line
The helpers are plain functions too (`from conftest import run_cli`).

Marker
  @pytest.mark.bpf: needs root and working BPF with the object built; when not
  available the test fails if CI=true, else it is skipped.
"""
from __future__ import annotations

import ctypes
import functools
import gc
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BPF_OBJECT = ROOT / "bpf" / "build" / "blkrewind.bpf.o"
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def _unavailable(reason: str) -> None:
    """Fail in CI (a skipped test there is a test that did not run), skip elsewhere."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: failing instead of skipping)", pytrace=False)
    try:  # report the skip at the test, not here
        exc = pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:
        pytest.skip(reason)
    raise exc


# --------------------------------------------------------------------------- root / BPF checks
def root_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop devices, mounts, BPF)"
    if not Path("/dev/loop-control").exists():
        return "/dev/loop-control is missing (modprobe loop)"
    if not shutil.which("losetup"):
        return "losetup is missing (util-linux)"
    return None


def _bpf_syscall_probe() -> str | None:
    """BPF_PROG_GET_NEXT_ID: allowed -> 0 or ENOENT; not allowed -> EPERM."""
    nr = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine)
    if nr is None:
        return None  # unknown arch: trust the other checks
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 4)()  # start_id = 0, next_id, open_flags
    rc = libc.syscall(nr, 11, ctypes.byref(attr), ctypes.sizeof(attr))
    err = ctypes.get_errno()
    if rc < 0 and err != 2:
        return f"the bpf() syscall is refused: {os.strerror(err)}"
    return None


@functools.cache
def bpf_reason() -> str | None:
    """Why BPF tests cannot run here, or None when they can."""
    r = root_reason()
    if r:
        return r
    if not VMLINUX_BTF.exists():
        return f"{VMLINUX_BTF} is missing: the kernel has no BTF"
    if not BPF_OBJECT.exists():
        return f"{BPF_OBJECT} is not built: run .venv/bin/python bpf/build.py (./bootstrap.sh does)"
    bpftool = shutil.which("bpftool") or ("/usr/sbin/bpftool" if os.path.exists("/usr/sbin/bpftool") else None)
    if bpftool:
        p = subprocess.run([bpftool, "prog", "show"], capture_output=True, text=True)
        if p.returncode != 0:
            return f"bpftool prog show failed: {(p.stderr or p.stdout).strip()[:200]}"
        return None
    return _bpf_syscall_probe()


def need_root() -> None:
    r = root_reason()
    if r:
        _unavailable(r)


def need_root_bpf() -> None:
    r = bpf_reason()
    if r:
        _unavailable(f"BPF unavailable: {r}")


def pytest_runtest_setup(item):
    # runs before the test's fixtures are set up: no loop device is made for a test that cannot run
    if item.get_closest_marker("bpf") is not None:
        need_root_bpf()


# --------------------------------------------------------------------------- guests in the background
def _is_vm_item(item) -> bool:
    return item.get_closest_marker("vm") is not None


def pytest_collection_modifyitems(session, config, items):
    # the VM tests last: their guests boot in the background from the session's start
    # (tests/vm/background.py) while the other tests run
    items[:] = [i for i in items if not _is_vm_item(i)] + [i for i in items if _is_vm_item(i)]


@pytest.fixture(scope="session")
def vm_background(request, tmp_path_factory, _no_leaked_loops_or_mounts):
    """The guests of the selected VM tests, queued at the session's start (see
    tests/vm/background.py); closed (guests killed, their loop devices detached) before the
    leak check at the session's end."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "vm"))
    import background
    items = request.session.items
    vm_items = [i for i in items if _is_vm_item(i)]
    bg = background.Background(background.workers(len(vm_items) == len(items)))
    for module in dict.fromkeys(i.module for i in vm_items):
        module.submit_vm_jobs(bg, tmp_path_factory, [i for i in vm_items if i.module is module])
    yield bg
    problems = bg.close()
    if problems:
        pytest.fail("guests' cleanup:\n  " + "\n  ".join(problems), pytrace=False)


def background_jobs(vm_background, module: str):
    """The background queue for a VM test module's tests; fails (CI) or skips them when the
    module said its jobs cannot run here (bg.unavailable)."""
    why = vm_background.unavailable(module)
    if why:
        _unavailable(why)
    return vm_background


@pytest.fixture(scope="session", autouse=True)
def _start_vm_guests(request):
    """Starts the background guests at the first test when VM tests are selected."""
    if any(_is_vm_item(i) for i in request.session.items):
        request.getfixturevalue("vm_background")


# --------------------------------------------------------------------------- small helpers
def sh(*cmd, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    argv = [os.fspath(c) if isinstance(c, os.PathLike) else str(c) for c in cmd]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p


def _unescape_mount(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[tuple[str, str]]:
    """(source, mount point) of every mount, in mount order."""
    with open("/proc/mounts") as f:
        return [(_unescape_mount(a), _unescape_mount(b))
                for a, b, *_ in (line.split() for line in f if line.strip())]


def loop_backing(dev: str) -> str | None:
    """The backing file of /dev/loopN now, or None when it is not attached."""
    name = os.path.basename(dev)
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            s = f.read().rstrip("\n")
    except OSError:
        return None
    return s.removesuffix(" (deleted)")


def attached_loops() -> dict[str, str]:
    """{/dev/loopN: backing file} of every attached loop device."""
    out = {}
    for p in Path("/sys/block").glob("loop*"):
        b = loop_backing(p.name)
        if b:
            out[f"/dev/{p.name}"] = b
    return out


def _is_under(path: str, base: Path) -> bool:
    try:
        Path(path).relative_to(base)
        return True
    except ValueError:
        return False


def _release_test_frames() -> None:
    """A failed test's frames (kept for post-mortem debugging in sys.last_*) may hold open
    files on a mount we are about to unmount: drop them."""
    for a in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, a):
            try:
                delattr(sys, a)
            except AttributeError:
                pass
    gc.collect()


def umount(where: str) -> list[str]:
    """Unmount, retrying after releasing a failed test's frames; `umount -l` as the last resort.
    Returns problems (empty when it unmounted cleanly)."""
    if sh("umount", where, check=False).returncode == 0:
        return []
    _release_test_frames()
    time.sleep(0.1)
    if sh("umount", where, check=False).returncode == 0:
        return []
    holders = sh("fuser", "-vm", where, check=False).stderr.strip() if shutil.which("fuser") else ""
    lazy = sh("umount", "-l", where, check=False)
    msg = f"{where} was busy, lazily unmounted" + (f"; held by:\n{holders}" if holders else "")
    if lazy.returncode != 0:
        msg = f"cannot unmount {where}: {lazy.stderr.strip()}"
    return [msg]


def unmount_device(dev: str) -> list[str]:
    """Unmount everything mounted from dev (or its partitions), deepest mount point first."""
    problems = []
    mine = [mp for src, mp in mounts() if src == dev or (src.startswith(dev + "p") and src[len(dev) + 1:].isdigit())]
    for mp in sorted(set(mine), key=len, reverse=True):
        problems += umount(mp)
    return problems


def _openers(dev: str) -> str:
    """The processes that have dev open, as 'pid (comm), ...'."""
    out = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == dev for fd in fd_dir.iterdir()):
                pid = fd_dir.parent.name
                out.append(f"{pid} ({Path(f'/proc/{pid}/comm').read_text().strip()})")
        except OSError:
            continue
    return ", ".join(out)


def detach_loop(dev: str, backing: str, wait: float = 10.0) -> list[str]:
    """Unmount what is mounted from dev and detach it, if it is still attached to backing;
    then verify it is gone. Never touches a device attached to another file."""
    if loop_backing(dev) != backing:
        return []  # already gone (the number may have been reused by someone else: leave it)
    problems = unmount_device(dev)
    if loop_backing(dev) == backing:
        # Write back and drop the device's page cache first: dirty pages a killed writer left
        # would otherwise land in whatever file is attached to this loop number next.
        sh("blockdev", "--flushbufs", dev, check=False)
        p = sh("losetup", "-d", dev, check=False)
        if p.returncode != 0 and loop_backing(dev) == backing:
            problems.append(f"losetup -d {dev}: {p.stderr.strip()}")
    deadline = time.monotonic() + wait
    while loop_backing(dev) == backing and time.monotonic() < deadline:
        time.sleep(0.05)
    if loop_backing(dev) == backing:
        still = [mp for src, mp in mounts() if src == dev]
        users = _openers(dev)
        problems.append(f"{dev} ({backing}) is still attached after losetup -d"
                        + (f"; mounted on {still}" if still else "")
                        + (f"; open by: {users}" if users else
                           " (a lazily unmounted file system or an open file keeps it)")
                        + "; it goes away when released")
    return problems


# --------------------------------------------------------------------------- loop devices
@dataclass
class Loop:
    path: str        # /dev/loopN
    backing: Path    # the backing file, under the test's tmp_path
    size: int        # bytes
    dio: bool        # direct I/O to the backing file is in effect

    def __str__(self) -> str:
        return self.path

    def __fspath__(self) -> str:
        return self.path


_counter = itertools.count()


@pytest.fixture
def make_loop(tmp_path):
    """Factory: make_loop(size_mb=64, *, dio=False, fill=None) -> Loop.

    fill: None (sparse), "random" (random bytes) or "zero" (allocated zeroes).
    Every device is unmounted and detached when the test ends, pass or fail."""
    made: list[Loop] = []

    def make(size_mb: int = 64, *, dio: bool = False, fill: str | None = None) -> Loop:
        need_root()
        if fill not in (None, "random", "zero"):
            raise ValueError(f"fill must be None, 'random' or 'zero', not {fill!r}")
        size = int(size_mb) << 20
        backing = tmp_path / f"loop{next(_counter)}.img"
        with open(backing, "wb") as f:
            if fill is None:
                f.truncate(size)
            else:
                chunk = 1 << 20
                for off in range(0, size, chunk):
                    n = min(chunk, size - off)
                    f.write(os.urandom(n) if fill == "random" else bytes(n))
        cmd = ["losetup", "--find", "--show"] + (["--direct-io=on"] if dio else []) + [str(backing)]
        p = sh(*cmd, check=False)
        if p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {p.stderr.strip()}")
        dev = p.stdout.strip()
        loop = Loop(dev, backing, size, dio=False)
        made.append(loop)
        try:
            loop.dio = Path(f"/sys/block/{os.path.basename(dev)}/loop/dio").read_text().strip() == "1"
        except OSError:
            pass
        if dio and not loop.dio:
            warnings.warn(f"{dev}: direct I/O requested but not in effect (backing file system "
                          f"{backing.parent} may not support O_DIRECT)")
        return loop

    yield make
    problems = []
    for loop in reversed(made):
        problems += detach_loop(loop.path, str(loop.backing))
    if problems:
        pytest.fail("loop device cleanup:\n  " + "\n  ".join(problems), pytrace=False)


@pytest.fixture
def loopdev(make_loop):
    """Alias of make_loop."""
    return make_loop


def mkfs(dev, fstype: str = "ext4", *extra: str) -> None:
    """Make a file system, quietly, overwriting whatever is there."""
    dev = os.fspath(dev)
    if fstype == "ext4":
        sh("mkfs.ext4", "-q", "-F", *extra, dev)
    elif fstype == "xfs":  # mkfs.xfs wants >= 300 MiB
        sh("mkfs.xfs", "-q", "-f", *extra, dev)
    else:
        raise ValueError(f"mkfs: unsupported file system {fstype!r} (ext4, xfs)")


@pytest.fixture(name="mkfs")
def mkfs_fixture():
    return mkfs


@pytest.fixture
def mount_fs(make_loop, tmp_path):
    """Factory: mount_fs(dev, fstype=None, opts=None) -> mount point (a new directory under
    tmp_path). Unmounted when the test ends (before its loop devices are detached)."""
    made: list[str] = []

    def mount(dev, fstype: str | None = None, opts: str | None = None) -> Path:
        need_root()
        where = tmp_path / f"mnt{next(_counter)}"
        where.mkdir()
        cmd = ["mount"] + (["-t", fstype] if fstype else []) + (["-o", opts] if opts else [])
        sh(*cmd, os.fspath(dev), where)
        made.append(str(where))
        return where

    yield mount
    problems = []
    for where in reversed(made):
        if any(mp == where for _, mp in mounts()):
            problems += umount(where)
    if problems:
        pytest.fail("mount cleanup:\n  " + "\n  ".join(problems), pytrace=False)


# --------------------------------------------------------------------------- leak guard
@pytest.fixture(autouse=True)
def _release_pinned_captures(request):
    """A tracer pins its capture in bpffs (tracer/pins.py) so that it outlives a crash; a test
    that kills a tracer and does not start it again leaves it attached. Detach every capture
    pinned during the test (programs, maps, links), passed or failed."""
    from blkrewind.tracer import pins
    before = set(pins.pin_dirs())
    yield
    base = request.config._tmp_path_factory.getbasetemp().resolve()
    regs = {p.session: p for p in pins.load_all()}
    for s in set(pins.pin_dirs()) - before:
        # Only this run's: another pytest run (or a real tracer) on the machine may be pinning
        # its own capture right now, and its LOG is not under this run's temporary directory.
        p = regs.get(s)
        if p is not None and _is_under(os.path.realpath(p.log_dir), base):
            pins.release_dir(s)


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_loops_or_mounts(tmp_path_factory):
    """At the end of the session: any loop device whose backing file, or any mount whose mount
    point, is under this session's temporary directory was leaked by a test. Report it as an
    error (the backing file's path names the test) and clean it up."""
    base = tmp_path_factory.getbasetemp().resolve()
    yield
    leaked_mounts = [(src, mp) for src, mp in mounts() if _is_under(mp, base)]
    leaked_loops = {d: b for d, b in attached_loops().items() if _is_under(b, base)}
    if not (leaked_mounts or leaked_loops):
        return
    lines = [f"mount {mp} (from {src})" for src, mp in leaked_mounts]
    lines += [f"loop device {d} -> {b}" for d, b in sorted(leaked_loops.items())]
    for _, mp in sorted(leaked_mounts, key=lambda m: len(m[1]), reverse=True):
        umount(mp)
    left = []
    for d, b in leaked_loops.items():
        left += detach_loop(d, b)
    pytest.fail("tests leaked (fix the test's cleanup):\n  " + "\n  ".join(lines)
                + ("\nnot cleaned up yet:\n  " + "\n  ".join(left) if left else "\n(now cleaned up)"),
                pytrace=False)


# --------------------------------------------------------------------------- the CLI
def cli_command() -> list[str]:
    exe = ROOT / ".venv" / "bin" / "blkrewind"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "blkrewind.cli"]


def run_cli(*args, check: bool = True, timeout: float = 300, input: str | None = None,
            env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run `blkrewind ARGS` as a user would; text output. check: assert exit 0, with the
    output in the message."""
    cmd = [*cli_command(), *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args)]
    shown = "blkrewind " + " ".join(cmd[len(cli_command()):])
    try:
        cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input,
                            env=env, cwd=cwd, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        raise AssertionError(f"{shown} timed out after {timeout}s\nstdout: {text(e.stdout)}\n"
                             f"stderr: {text(e.stderr)}") from None
    if check and cp.returncode != 0:
        raise AssertionError(f"{shown} exited {cp.returncode}\nstdout: {cp.stdout}\nstderr: {cp.stderr}")
    return cp


def assert_one_line_error(cp: subprocess.CompletedProcess, *words: str) -> str:
    """A user error: non-zero exit, exactly one line on stderr, no traceback; returns the line."""
    assert cp.returncode != 0, f"expected an error, got exit 0\nstdout: {cp.stdout}\nstderr: {cp.stderr}"
    assert "Traceback" not in (cp.stderr or "") + (cp.stdout or ""), f"traceback:\n{cp.stderr}"
    lines = (cp.stderr or "").strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{cp.stderr}"
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(name="run_cli")
def run_cli_fixture():
    return run_cli


@pytest.fixture(name="assert_one_line_error")
def assert_one_line_error_fixture():
    return assert_one_line_error


# --------------------------------------------------------------------------- BPF variants
@pytest.fixture(params=["modern", "legacy"])
def bpf_variant(request, monkeypatch):
    """Both variants of the capture programs: the legacy one (bpf/legacy.h, for kernels
    without fetch-and-add, bpf_loop or ring buffer dynptrs) forced on this kernel too
    (BLKREWIND_BPF_VARIANT, inherited by the tracers the test starts), so that it is
    exercised here and not only in the kernel matrix's 5.10 guest."""
    monkeypatch.setenv("BLKREWIND_BPF_VARIANT", request.param)
    return request.param
