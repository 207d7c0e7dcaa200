"""Each error a user can make gets one line and a non-zero exit, never a traceback;
and a corrupt or torn LOG is detected, reported, and never misread."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from tracerproc import ROOT, cli, copy_device

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_not_root(tmp_path):
    r = subprocess.run([*NOBODY, sys.executable, "-m", "blkrewind.cli", "trace", "--device",
                        "/dev/loop0", "--log", str(tmp_path / "log")],
                       capture_output=True, text=True, cwd=ROOT)
    one_line_error(r, "must run as root")


def test_not_a_block_device(tmp_path):
    one_line_error(cli("trace", "--device", "/etc/hostname", "--log", tmp_path, check=False),
                   "is not a block device")


def test_unknown_device(tmp_path):
    one_line_error(cli("trace", "--device", "/dev/blkrewind-nope", "--log", tmp_path, check=False),
                   "no such device")


def test_detach_of_a_log_without_a_left_capture(tmp_path):
    one_line_error(cli("detach", "--log", tmp_path / "nolog", check=False),
                   "no capture is left attached for LOG")
    r = subprocess.run([*NOBODY, sys.executable, "-m", "blkrewind.cli", "detach"],
                       capture_output=True, text=True, cwd=ROOT)
    one_line_error(r, "must run as root")


def test_mark_without_tracer():
    one_line_error(cli("mark", "x", "--log", "/nonexistent-log", check=False))


@pytest.mark.parametrize("name", ["latest", "123", "2026-01-01T10:00:00", "", "stamp:5"])
def test_mark_names_that_would_be_ambiguous(name):
    one_line_error(cli("mark", name, check=False))


def test_store_missing(tmp_path):
    one_line_error(cli("restore", "--store", tmp_path / "nostore", "--device", "loop0", "--at",
                       "latest", "--to", tmp_path / "x.img", check=False))
    one_line_error(cli("sql", "--store", tmp_path / "nostore", "SELECT 1", check=False))


@pytest.mark.bpf
def test_no_bpf_object(make_loop, tmp_path):
    loop = make_loop(size_mb=8)
    env = dict(os.environ, BLKREWIND_BPF_OBJECT=str(tmp_path / "missing.o"))
    r = subprocess.run([sys.executable, "-m", "blkrewind.cli", "trace", "--device", loop.path,
                        "--log", str(tmp_path / "log")], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    one_line_error(r, "BPF object")
    bad = tmp_path / "bad.o"
    bad.write_bytes(os.urandom(4096))
    env["BLKREWIND_BPF_OBJECT"] = str(bad)
    r = subprocess.run([sys.executable, "-m", "blkrewind.cli", "trace", "--device", loop.path,
                        "--log", str(tmp_path / "log")], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    one_line_error(r)


@pytest.fixture
def traced_history(make_loop, tmp_path):
    """A small real history: a loop device written under `trace -- ...`, several segments."""
    loop = make_loop(size_mb=32)
    log = tmp_path / "log"
    script = (f"for i in 1 2 3 4 5 6; do dd if=/dev/urandom of={loop.path} bs=1M count=2 "
              f"seek=$((i*3)) oflag=direct status=none; done")
    cli("trace", "--device", loop.path, "--log", log, "--segment-mb", "1", "--", "sh", "-c", script)
    final = tmp_path / "final.img"
    copy_device(loop.path, final)
    return loop, log, final


@pytest.mark.bpf
def test_unknown_mark_and_unknown_device(traced_history, tmp_path):
    loop, log, _ = traced_history
    store = tmp_path / "store"
    cli("ingest", "--log", log, "--store", store)
    one_line_error(cli("restore", "--store", store, "--device", loop.path, "--at", "nosuchmark",
                       "--to", tmp_path / "x.img", check=False), "nosuchmark")
    one_line_error(cli("restore", "--store", store, "--device", "/dev/blkrewind-nope", "--at",
                       "latest", "--to", tmp_path / "x.img", check=False))
    one_line_error(cli("sql", "--store", store, "SELECT * FROM no_such_view", check=False))


def _segments(log):
    return sorted(p for p in log.iterdir() if p.name.endswith(".brlog"))


@pytest.mark.bpf
def test_corrupt_log_is_reported_and_good_frames_kept(traced_history, tmp_path):
    loop, log, final = traced_history
    segs = _segments(log)
    assert len(segs) >= 3
    victim = segs[1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte in the middle of a sealed segment
    victim.write_bytes(bytes(data))
    store = tmp_path / "store"
    r = cli("ingest", "--log", log, "--store", store, check=False)
    assert r.returncode != 0 and "corrupt" in r.stderr.lower() and "Traceback" not in r.stderr
    # the frames before the damage are stored; nothing past the gap is exposed
    import json
    n = json.loads(cli("sql", "--store", store, "SELECT count(*) AS n FROM writes",
                       "--format", "json").stdout)[0]["n"]
    assert n > 0
    last = json.loads(cli("sql", "--store", store, "SELECT max(stamp) AS s FROM writes",
                          "--format", "json").stdout)[0]["s"]
    rs = json.loads(cli("sql", "--store", store, "SELECT * FROM restorable",
                        "--format", "json").stdout)
    assert all(r_["to_stamp"] is None or r_["to_stamp"] < last for r_ in rs)
    r2 = cli("restore", "--store", store, "--device", loop.path, "--at", str(last),
             "--to", tmp_path / "x.img", check=False)
    one_line_error(r2, "watermark")


@pytest.mark.bpf
def test_torn_tail_is_cut_and_everything_before_stays(traced_history, make_loop, tmp_path):
    loop, log, final = traced_history
    last = _segments(log)[-1]
    size = last.stat().st_size
    with open(last, "r+b") as f:  # a crash tore the last frame
        f.truncate(size - 100)
    store = tmp_path / "store"
    r = cli("ingest", "--log", log, "--store", store, check=False)
    assert "Traceback" not in r.stderr
    # a tracer starting on the LOG cuts the torn tail and says so
    other = make_loop(size_mb=8)
    r = cli("trace", "--device", other.path, "--log", log, "--", "true")
    assert "torn tail" in r.stderr, r.stderr
    cli("ingest", "--log", log, "--store", store)


# ------------------------------------------------------- a LOG that would capture itself
def test_a_log_on_the_traced_device_is_refused(make_loop, mount_fs, mkfs, tmp_path):
    """Its own writes would be captured into it without end: refused before anything is
    loaded, also when the LOG's file system sits on a loop device whose backing file lies on
    the traced device, or on a partition of the traced disk."""
    from conftest import detach_loop
    from conftest import sh as csh
    outer = make_loop(size_mb=64)
    mkfs(outer.path)
    mnt = mount_fs(outer.path)
    one_line_error(cli("trace", "--device", outer.path, "--log", mnt / "log", check=False),
                   f"is on {outer.path}, which is traced")
    assert not (mnt / "log").exists()
    # a loop device over a file on the traced device, with the LOG's file system on it
    backing = mnt / "inner.img"
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    inner = csh("losetup", "--find", "--show", backing).stdout.strip()
    try:
        mkfs(inner)
        mnt2 = mount_fs(inner)
        one_line_error(cli("trace", "--device", outer.path, "--log", mnt2 / "log", check=False),
                       f"is on {outer.path} (through {os.path.basename(inner)}), which is traced")
        csh("umount", mnt2)
    finally:
        assert detach_loop(inner, str(backing)) == []
    # a partition of the traced disk
    img = tmp_path / "parted.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    csh("sh", "-c", f"echo 'start=2048, size=30000' | sfdisk -q {img}")
    disk = csh("losetup", "--find", "--show", "--partscan", img).stdout.strip()
    try:
        csh("partx", "--add", disk)  # the partition scan at attach finds nothing here
        name = os.path.basename(disk) + "p1"
        dev = open(f"/sys/block/{os.path.basename(disk)}/{name}/dev").read().strip()
        part = tmp_path / name  # its own node: no udev here to make /dev/loopNp1
        csh("mknod", part, "b", *dev.split(":"))
        mkfs(part)
        mnt3 = mount_fs(part)
        one_line_error(cli("trace", "--device", disk, "--log", mnt3 / "log", check=False),
                       f"is on {disk} (through {name}), which is traced")
        csh("umount", mnt3)
    finally:
        assert detach_loop(disk, str(img)) == []


@pytest.mark.bpf
def test_a_log_in_memory_is_traced_with_a_warning(make_loop, tmp_path):
    from conftest import sh as csh
    loop = make_loop(size_mb=8)
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    csh("mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "blkrewind-test-log", mnt)
    try:
        r = cli("trace", "--device", loop.path, "--log", mnt / "log", "--", "true")
        assert f"WARNING: the LOG {mnt / 'log'} is on a tmpfs: it lives in memory" in r.stderr
    finally:
        csh("umount", mnt)
