"""Never lose a write silently (docs/internals.md, "Gaps and resync"), end to end with real BPF
on real loop devices, driven through the CLI as a user runs it:

- a 1 MiB ring buffer under heavy writes overflows: the loss is reported on stderr and in the
  LOG, the tracer resyncs the regions written since the last checkpoint (while writes go on),
  and after ingest a restore at `latest` equals the device;
- the tracer is SIGKILLed in the middle of a workload and started again on the same LOG: the
  new session's baseline reads the devices again, `latest` is exact, the old session stays
  restorable up to its watermark;
- a write fails (the loop device's backing file lives on a full tmpfs): the failure is recorded
  with its error, its range is read back, and `latest` equals what the device really holds.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import detach_loop, mounts, sh as csh, umount
from tracerproc import TraceProc, cli, copy_device, first_difference, same_file

pytestmark = [pytest.mark.bpf]


def sql(store, q):
    return json.loads(cli("sql", "--store", store, q, "--format", "json").stdout)


def restore_latest_equals(store, dev, tmp_path: Path, name="latest") -> None:
    final = tmp_path / f"{name}-device.img"
    copy_device(dev, final)
    out = tmp_path / f"{name}-restored.img"
    cli("restore", "--store", store, "--device", dev, "--at", "latest", "--to", out, "--force")
    assert same_file(out, final), f"restore at latest differs: {first_difference(out, final)}"
    out.unlink()
    final.unlink()


def fio(dev, *args, runtime=None) -> subprocess.Popen:
    cmd = ["fio", "--name=w", f"--filename={dev}", "--direct=1", "--ioengine=libaio",
           "--thread", "--norandommap", "--randrepeat=0", "--refill_buffers",
           "--output=/dev/null", *args]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    return subprocess.Popen(cmd)


def wait_fio(p: subprocess.Popen, timeout=120) -> None:
    try:
        assert p.wait(timeout) == 0, "fio failed"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def points(store, what):
    return sql(store, f"SELECT * FROM points WHERE what = '{what}' ORDER BY stamp")


def test_ring_overflow_is_reported_resynced_and_latest_is_exact(make_loop, tmp_path):
    """Heavy 1 MiB writes overflow a 1 MiB ring; then lighter random writes go on while the
    resync reads the dirty regions (its stale-read care is exercised); `latest` is exact."""
    loop = make_loop(size_mb=256, fill="random", dio=True)
    dev = loop.path
    log, store = tmp_path / "log", tmp_path / "store"
    with TraceProc([dev], log, "--ring-mb", "1") as t:
        wait_fio(fio(dev, "--rw=write", "--bs=1m", "--iodepth=32", "--numjobs=2",
                     "--size=128m", "--offset_increment=128m"))
        wait_fio(fio(dev, "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=4", "--rate=15m",
                     runtime=4))
        assert t.stop() == 0, t.stderr
    err = t.stderr
    # reported: once for the episode, with its cause
    assert "WARNING: records lost (ring full" in err, err
    assert re.search(r"resync of \S+ done: .* restorable again from stamp \d+", err), err
    assert "session ends" not in err, err
    cli("ingest", "--log", log, "--store", store)
    restore_latest_equals(store, dev, tmp_path)
    # the LOG says what was lost and why, and the resync points are there
    loss = sql(store, "SELECT * FROM loss")
    assert loss and max(x["drops"] for x in loss) > 0, loss
    starts, ends = points(store, "resync_start"), points(store, "resync_end")
    assert starts and ends, (starts, ends)
    gaps = sql(store, "SELECT * FROM gaps")
    assert gaps and all(g["resumed"] is not None for g in gaps), gaps
    assert any("ring full" in (g["cause"] or "") for g in gaps), gaps
    rs = sql(store, "SELECT * FROM restorable ORDER BY from_stamp")
    assert len(rs) >= 2, rs  # [baseline_end, gap - 1], [Re, ...]
    last = sql(store, "SELECT max(stamp) AS s FROM writes")[0]["s"]
    assert rs[-1]["to_stamp"] >= last, (rs, last)


def test_tracer_killed_then_restarted_is_exact_again(make_loop, tmp_path):
    """SIGKILL in the middle of random writes (no R_END, maybe a torn LOG tail), then a new
    tracer on the same devices and LOG while the writes go on."""
    loop = make_loop(size_mb=128, fill="random", dio=True)
    dev = loop.path
    log, store = tmp_path / "log", tmp_path / "store"
    writer = fio(dev, "--rw=randwrite", "--bsrange=4k-128k", "--iodepth=8", "--rate=20m",
                 runtime=60)
    try:
        first = TraceProc([dev], log)
        time.sleep(1.5)
        first.p.send_signal(signal.SIGKILL)
        first.p.wait(30)
        time.sleep(0.5)  # writes go on with no tracer
        with TraceProc([dev], log) as second:
            time.sleep(1.5)
            writer.send_signal(signal.SIGINT)
            writer.wait(30)
            assert second.stop() == 0, second.stderr
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    cli("ingest", "--log", log, "--store", store)
    restore_latest_equals(store, dev, tmp_path)
    sessions = sql(store, "SELECT * FROM sessions ORDER BY session")
    assert len(sessions) == 2, sessions
    rs = sql(store, "SELECT session, from_stamp, to_stamp FROM restorable ORDER BY from_stamp")
    assert {r["session"] for r in rs} == {s["session"] for s in sessions}, rs
    old = [r for r in rs if r["session"] == sessions[0]["session"]]
    # the killed session is restorable up to its watermark
    out = tmp_path / "old.img"
    cli("restore", "--store", store, "--device", dev, "--at", str(old[-1]["to_stamp"]),
        "--to", out)
    assert out.stat().st_size == loop.size


@pytest.fixture
def full_tmpfs_loop(tmp_path):
    """A 32 MiB loop device over a sparse file on an 8 MiB tmpfs that is full: its first
    4 MiB are allocated (writes there succeed), writes to its holes fail."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    csh("mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "blkrewind-test-tiny", mnt)
    backing = mnt / "dev.img"
    dev = None
    try:
        with open(backing, "wb") as f:
            f.truncate(32 << 20)
            f.write(os.urandom(4 << 20))
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\xff" * (256 << 10))
                    f.flush()
            except OSError:
                pass
        dev = csh("losetup", "--find", "--show", backing).stdout.strip()
        yield dev, backing
    finally:
        problems = detach_loop(dev, str(backing)) if dev else []
        if any(mp == str(mnt) for _, mp in mounts()):
            problems += umount(str(mnt))
        assert not problems, problems


def test_write_error_is_recorded_and_its_range_read_back(full_tmpfs_loop, tmp_path):
    import mmap
    dev, _ = full_tmpfs_loop
    log, store = tmp_path / "log", tmp_path / "store"
    buf = mmap.mmap(-1, 1 << 20)
    buf.write(os.urandom(1 << 20))
    with TraceProc([dev], log) as t:
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwrite(fd, memoryview(buf)[:256 << 10], 1 << 20)  # allocated: succeeds
            failed = 0
            for off in (16 << 20, 20 << 20):                    # holes: the backing fs is full
                try:
                    os.pwrite(fd, buf, off)
                except OSError:
                    failed += 1
            assert failed == 2
        finally:
            os.close(fd)
        deadline = time.monotonic() + 30
        while "resync of" not in t.stderr and time.monotonic() < deadline:
            time.sleep(0.1)
        assert t.stop() == 0, t.stderr
    err = t.stderr
    assert f"WARNING: a write to {dev} failed" in err, err
    assert re.search(r"resync of \S+ done", err), err
    cli("ingest", "--log", log, "--store", store)
    bad = sql(store, "SELECT sector, error FROM completions WHERE error != 0 ORDER BY sector")
    assert {b["sector"] for b in bad} >= {(16 << 20) // 512, (20 << 20) // 512}, bad
    starts = points(store, "resync_start")
    assert any("write error" in json.dumps(s) for s in starts), starts
    # the device holds zeroes where the writes failed; the restore too
    restore_latest_equals(store, dev, tmp_path)
