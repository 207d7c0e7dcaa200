"""The fixtures themselves, with real loop devices: they make what they say, and clean up
everything afterwards -- also when the test fails, holds a file open on the mount, mounts by
hand, or leaks a device on its own (the session guard catches that)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import conftest as C
import pytest

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- in-process
def test_make_loop_sparse(make_loop, tmp_path):
    loop = make_loop(size_mb=16)
    assert loop.path.startswith("/dev/loop") and Path(loop.path).is_block_device()
    assert loop.backing.parent == tmp_path and loop.size == 16 << 20
    assert C.sh("blockdev", "--getsize64", loop.path).stdout.strip() == str(16 << 20)
    assert C.loop_backing(loop.path) == str(loop.backing)
    assert os.stat(loop.backing).st_blocks == 0  # sparse
    assert os.fspath(loop) == str(loop) == loop.path
    assert not loop.dio


def test_make_loop_random_fill_direct_io(make_loop):
    loop = make_loop(size_mb=8, dio=True, fill="random")
    assert loop.dio, "direct I/O not in effect on the loop device"
    with open(loop.path, "rb") as dev, open(loop.backing, "rb") as f:
        data = dev.read()
        assert data == f.read() and len(data) == 8 << 20
    assert data[:1 << 20] != bytes(1 << 20)


def test_make_loop_rejects_an_unknown_fill(make_loop):
    with pytest.raises(ValueError):
        make_loop(size_mb=1, fill="ones")


@pytest.mark.parametrize("fstype,size_mb", [("ext4", 64), ("xfs", 320)])
def test_mkfs_mount_write(fstype, size_mb, make_loop, mkfs, mount_fs):
    loop = make_loop(size_mb=size_mb)
    mkfs(loop, fstype)
    mnt = mount_fs(loop.path, fstype)
    assert (loop.path, str(mnt)) in C.mounts()
    payload = os.urandom(3 << 20)
    with open(mnt / "f.bin", "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    assert (mnt / "f.bin").read_bytes() == payload


def test_mount_options(make_loop, mkfs, mount_fs):
    loop = make_loop(size_mb=32)
    mkfs(loop, "ext4")
    mnt = mount_fs(loop, opts="ro")
    with pytest.raises(OSError):
        (mnt / "x").write_text("no")


def test_mkfs_rejects_an_unknown_fs():
    with pytest.raises(ValueError):
        C.mkfs("/dev/null", "btrfs")


def test_loopdev_is_make_loop(loopdev, make_loop):
    assert loopdev is make_loop


def test_run_cli_and_one_line_error(run_cli, assert_one_line_error, tmp_path):
    cp = run_cli("--version")
    assert cp.stdout.startswith("blkrewind ")
    line = assert_one_line_error(run_cli("trace", "--device", "/etc/hostname", "--log",
                                         tmp_path / "log", check=False))
    assert line.startswith("blkrewind ") and "error" in line


def test_run_cli_check_failure_shows_the_output(run_cli, tmp_path):
    with pytest.raises(AssertionError) as e:
        run_cli("trace", "--device", "/etc/hostname", "--log", tmp_path / "log")
    msg = str(e.value)
    assert "exited" in msg and "stdout: " in msg and "stderr: blkrewind " in msg


def test_assert_one_line_error_refuses(assert_one_line_error):
    cp = subprocess.CompletedProcess
    with pytest.raises(AssertionError):
        assert_one_line_error(cp([], 0, "", ""))
    with pytest.raises(AssertionError):
        assert_one_line_error(cp([], 1, "", "one\ntwo\n"))
    with pytest.raises(AssertionError):
        assert_one_line_error(cp([], 1, "", "Traceback (most recent call last):"))
    with pytest.raises(AssertionError):
        assert_one_line_error(cp([], 2, "", "error: x\n"), "y")
    assert assert_one_line_error(cp([], 2, "", "error: x\n"), "x") == "error: x"


def test_run_cli_timeout(run_cli):
    with pytest.raises(AssertionError, match="timed out"):
        run_cli("--version", timeout=0.001)


# --------------------------------------------------------------------------- inner sessions
INNER_CONFTEST = """
import importlib.util, os, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("blkrewind_conftest", {path!r})
mod = importlib.util.module_from_spec(spec)
sys.modules["blkrewind_conftest"] = mod
spec.loader.exec_module(mod)
if os.environ.get("INNER_NO_BPF_OBJECT"):
    mod.BPF_OBJECT = Path("/nonexistent/blkrewind.bpf.o")
globals().update({{k: v for k, v in vars(mod).items() if not k.startswith("__")}})
"""


RECORD = """
import json, os, subprocess
from pathlib import Path
import pytest

def record(loop, mnt=None):
    with open(os.environ["INNER_INFO"], "a") as f:
        f.write(json.dumps({"dev": loop.path, "backing": str(loop.backing),
                            "mnt": str(mnt) if mnt else None}) + "\\n")
"""


def run_inner(tmp_path: Path, source: str, **env) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run a pytest session on `source` with this conftest; return it and what its tests recorded
    (each test appends a JSON line to $INNER_INFO)."""
    d = tmp_path / "inner"
    d.mkdir()
    (d / "conftest.py").write_text(INNER_CONFTEST.format(path=str(HERE / "conftest.py")))
    (d / "pytest.ini").write_text("[pytest]\nmarkers =\n    bpf: needs BPF\n")
    (d / "test_inner.py").write_text(RECORD + textwrap.dedent(source))
    info = tmp_path / "info.jsonl"
    info.touch()
    e = {k: v for k, v in os.environ.items() if k != "CI"}
    e.update(INNER_INFO=str(info), **env)
    cp = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA",
                         f"--basetemp={tmp_path / 'base'}", "test_inner.py"],
                        cwd=d, env=e, capture_output=True, text=True, timeout=300,
                        stdin=subprocess.DEVNULL)
    recs = [json.loads(line) for line in info.read_text().splitlines()]
    return cp, recs


def outcomes(cp: subprocess.CompletedProcess) -> dict[str, str]:
    """test name -> PASSED/FAILED/ERROR/SKIPPED from the -rA summary ("FAILED+ERROR" when a
    failed test's teardown also erred)."""
    out: dict[str, str] = {}
    for line in cp.stdout.splitlines():
        for word in ("PASSED", "FAILED", "ERROR", "SKIPPED"):
            if line.startswith(word + " "):
                rest = line[len(word) + 1:]
                if word == "SKIPPED":  # SKIPPED [1] test_inner.py:12: reason
                    rest = rest.split("] ", 1)[-1]
                name = rest.split(" - ")[0].split("::")[-1].split(":")[0].strip()
                out[name] = "+".join(sorted({*out.get(name, "").split("+"), word} - {""}))
    return out


def assert_nothing_left(tmp_path: Path, recs: list[dict]) -> None:
    for r in recs:
        assert C.loop_backing(r["dev"]) != r["backing"], f"{r['dev']} still attached: {r}"
    base = str(tmp_path)
    assert not [m for m in C.mounts() if m[1].startswith(base)], C.mounts()
    assert not [d for d, b in C.attached_loops().items() if b.startswith(base)]
    losetup = C.sh("losetup", "-a").stdout
    assert base not in losetup, losetup




def test_cleanup_on_pass_and_on_failure(tmp_path):
    cp, recs = run_inner(tmp_path, """
    def _fs(make_loop, mkfs, mount_fs):
        loop = make_loop(size_mb=32)
        mkfs(loop, "ext4")
        mnt = mount_fs(loop)
        record(loop, mnt)
        (mnt / "a").write_bytes(os.urandom(100000))
        return loop, mnt

    def test_ok(make_loop, mkfs, mount_fs):
        _fs(make_loop, mkfs, mount_fs)

    def test_raises_inside(make_loop, mkfs, mount_fs):
        _fs(make_loop, mkfs, mount_fs)
        raise RuntimeError("boom inside the test")

    def test_raises_with_a_file_open_on_the_mount(make_loop, mkfs, mount_fs):
        loop, mnt = _fs(make_loop, mkfs, mount_fs)
        f = open(mnt / "held", "w")
        f.write("x")
        raise RuntimeError("boom with an open file")

    def test_mounted_by_hand_then_raises(make_loop, mkfs, tmp_path):
        loop = make_loop(size_mb=32)
        mkfs(loop, "ext4")
        (tmp_path / "m").mkdir()
        subprocess.run(["mount", loop.path, str(tmp_path / "m")], check=True)
        record(loop, tmp_path / "m")
        raise RuntimeError("boom after a mount the fixtures do not know")

    def test_two_devices_then_raises(make_loop):
        for _ in range(2):
            record(make_loop(size_mb=4, fill="random"))
        raise RuntimeError("boom with two devices")

    def test_leaves_a_process_holding_the_device_for_a_while(make_loop):
        loop = make_loop(size_mb=4)
        record(loop)
        # like an orphaned fio job: the device is released only when it exits
        subprocess.Popen(["sh", "-c", f"exec 3<{loop.path}; sleep 2"])

    def test_detached_by_the_test_itself(make_loop):
        loop = make_loop(size_mb=4)
        record(loop)
        subprocess.run(["losetup", "-d", loop.path], check=True)
    """)
    got = outcomes(cp)
    assert got == {"test_ok": "PASSED", "test_raises_inside": "FAILED",
                   "test_raises_with_a_file_open_on_the_mount": "FAILED",
                   "test_mounted_by_hand_then_raises": "FAILED",
                   "test_two_devices_then_raises": "FAILED",
                   "test_leaves_a_process_holding_the_device_for_a_while": "PASSED",
                   "test_detached_by_the_test_itself": "PASSED"}, cp.stdout + cp.stderr
    assert "device cleanup" not in cp.stdout and "mount cleanup" not in cp.stdout, cp.stdout
    assert "tests leaked" not in cp.stdout, cp.stdout
    assert len(recs) == 8
    assert_nothing_left(tmp_path, recs)


def test_session_guard_reports_and_removes_a_leaked_device(tmp_path):
    cp, recs = run_inner(tmp_path, """
    def test_leaks_a_loop_device(tmp_path):
        img = tmp_path / "leak.img"
        img.write_bytes(bytes(1 << 20))
        dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                             capture_output=True, text=True).stdout.strip()
        with open(os.environ["INNER_INFO"], "a") as f:
            f.write(json.dumps({"dev": dev, "backing": str(img)}) + "\\n")
    """)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "tests leaked" in cp.stdout and recs[0]["dev"] in cp.stdout, cp.stdout
    assert "(now cleaned up)" in cp.stdout
    assert "test_leaks_a_loop_device" in cp.stdout  # the backing file's path names the test
    assert_nothing_left(tmp_path, recs)


BPF_INNER = """
@pytest.mark.bpf
def test_needs_bpf(make_loop):
    record(make_loop(size_mb=1))
"""


def test_bpf_marker_skips_outside_ci(tmp_path):
    cp, recs = run_inner(tmp_path, BPF_INNER, INNER_NO_BPF_OBJECT="1")
    assert "1 skipped" in cp.stdout, cp.stdout
    assert "SKIPPED [1] test_inner.py:" in cp.stdout  # reported at the test, not in conftest
    assert "is not built" in cp.stdout
    assert recs == []  # skipped before its fixtures ran


def test_bpf_marker_fails_in_ci(tmp_path):
    cp, recs = run_inner(tmp_path, BPF_INNER, INNER_NO_BPF_OBJECT="1", CI="true")
    assert outcomes(cp) == {"test_needs_bpf": "ERROR"}, cp.stdout  # fails in setup
    assert "CI=true" in cp.stdout and "is not built" in cp.stdout
    assert recs == []


def test_bpf_marker_runs_when_available(tmp_path):
    C.need_root_bpf()
    cp, recs = run_inner(tmp_path, BPF_INNER, CI="true")
    assert outcomes(cp) == {"test_needs_bpf": "PASSED"}, cp.stdout
    assert_nothing_left(tmp_path, recs)
