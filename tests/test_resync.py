"""Never lose a write silently (docs/internals.md, "Gaps and resync"), end to end with real BPF
on real loop devices, driven through the CLI as a user runs it:

- a 1 MiB ring buffer under heavy writes overflows: the loss is reported on stderr and in the
  LOG, the tracer resyncs the regions written since the last checkpoint (while writes go on),
  and after ingest a restore at `latest` equals the device;
- the tracer is SIGKILLed in the middle of a workload and started again on the same LOG: its
  capture stayed attached (pinned), so the new tracer continues the session and reads again
  only the regions written since the last checkpoint; `latest` is exact; with other devices,
  the left capture is detached and a new session reads the devices whole;
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
from conftest import detach_loop, mounts, umount
from conftest import sh as csh
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


def test_ring_overflow_is_reported_resynced_and_latest_is_exact(bpf_variant, make_loop, tmp_path,
                                                                monkeypatch):
    """Heavy 1 MiB writes overflow a 1 MiB ring; then lighter random writes go on while the
    resync reads the dirty regions (its stale-read care is exercised); `latest` is exact.
    The resync says its progress (percent, rate, ETA) like the baseline."""
    monkeypatch.setenv("BLKREWIND_PROGRESS_S", "0.05")
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
    took = [float(x) for x in re.findall(r"resync of \S+ done: .* in ([\d.]+) s \(", err)]
    if max(took) >= 0.3:   # (a quicker one may end before its first progress line)
        assert re.search(r"resync progress \S+: \d+% \(\d+ MiB of \d+ MiB\) at \d+ MiB/s, "
                         r"ETA ", err), err
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


def resync_lines(err: str) -> list[tuple[float, str]]:
    return [(float(m.group(1)), m.group(2)) for m in
            re.finditer(r"resync of \S+ done: ([\d.]+) MB in \d+ chunks \(([^)]*)\)", err)]


def link_ids(session: str) -> list[int]:
    from blkrewind.tracer import pins
    d = Path(pins.PIN_ROOT) / session
    out = []
    for p in sorted(d.glob("link_*")):
        r = subprocess.run(["bpftool", "-j", "link", "show", "pinned", str(p)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        out.append(json.loads(r.stdout)["id"])
    return out


def link_alive(link_id: int) -> bool:
    return subprocess.run(["bpftool", "link", "show", "id", str(link_id)],
                          capture_output=True).returncode == 0


def own_pins(log) -> list[str]:
    """The sessions pinned by tracers of this LOG (other tracers on the machine may pin
    theirs meanwhile: bpffs is the machine's)."""
    from blkrewind.tracer import pins
    return [p.session for p in pins.load_all()
            if os.path.realpath(p.log_dir) == os.path.realpath(log)]


def test_tracer_killed_then_restarted_continues_the_session(bpf_variant, make_loop, tmp_path):
    """SIGKILL in the middle of random writes: the capture stays attached (pinned), the 4 MiB
    ring overflows while no tracer reads it. A new tracer on the same devices and LOG
    continues the same session, keeps the records waiting in the ring, reports the gap
    ("tracer restart") and reads again only the regions written since the dead tracer's last
    checkpoint, not the whole device. `latest` is exact; the points before the crash still
    restore; nothing stays attached after the clean stop."""
    loop = make_loop(size_mb=512, fill="random", dio=True)
    dev = loop.path
    log, store = tmp_path / "log", tmp_path / "store"
    writer = fio(dev, "--rw=randwrite", "--bsrange=4k-64k", "--iodepth=4", "--rate=12m",
                 "--size=512m", runtime=60)
    try:
        first = TraceProc([dev], log, "--ring-mb", "4")
        try:
            time.sleep(1.5)
            pins = own_pins(log)
            assert len(pins) == 1, pins
            session = pins[0]
            ids = link_ids(session)
            assert len(ids) >= 2, ids
        finally:
            first.p.send_signal(signal.SIGKILL)
            first.p.wait(30)
        time.sleep(2.0)  # writes go on: the dirty map takes them, the ring fills and drops
        assert all(link_alive(i) for i in ids), "the capture went away with its tracer"
        with TraceProc([dev], log, "--ring-mb", "4", wait_for="live") as second:
            deadline = time.monotonic() + 60
            while not resync_lines(second.stderr):
                assert time.monotonic() < deadline and second.p.poll() is None, second.stderr
                time.sleep(0.1)
            time.sleep(1.0)
            writer.send_signal(signal.SIGINT)
            writer.wait(30)
            assert second.stop() == 0, second.stderr
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    err = second.stderr
    assert f"session {session} continued" in err, err
    assert "baseline of" not in err, err
    # only the regions written since the last checkpoint, far less than the whole device
    mb, what = resync_lines(err)[0]
    assert "written since stamp" in what and mb * 1e6 < 0.5 * loop.size, (mb, what, err)
    # a clean stop detaches everything
    assert not own_pins(log)
    assert not any(link_alive(i) for i in ids), "links still attached after a clean stop"
    cli("ingest", "--log", log, "--store", store)
    restore_latest_equals(store, dev, tmp_path)
    sessions = sql(store, "SELECT * FROM sessions")
    assert [s["session"] for s in sessions] == [session], sessions
    gaps = sql(store, "SELECT * FROM gaps")
    assert any("tracer restart" in (g["cause"] or "") and g["resumed"] is not None
               for g in gaps), gaps
    loss = sql(store, "SELECT * FROM loss")
    assert any(json.loads(x["counters"]).get("cause") == "tracer restart" for x in loss), loss
    rs = sql(store, "SELECT from_stamp, to_stamp FROM restorable ORDER BY from_stamp")
    assert len(rs) >= 2, rs
    # a point restorable before the crash still restores (a full-size image)
    out = tmp_path / "before-crash.img"
    cli("restore", "--store", store, "--device", dev, "--at", str(rs[0]["to_stamp"]),
        "--to", out)
    assert out.stat().st_size == loop.size


def test_restart_with_other_devices_starts_a_new_session(make_loop, tmp_path, run_cli):
    """The capture a killed tracer left attached is continued only by a tracer of the same
    LOG and devices: with one more device it is detached (said), and a new session reads
    both devices whole. `detach` lists and detaches a capture left attached."""
    a, b = make_loop(size_mb=32, fill="random"), make_loop(size_mb=32, fill="random")
    log = tmp_path / "log"
    first = TraceProc([a.path], log)
    first.p.send_signal(signal.SIGKILL)
    first.p.wait(30)
    (old,) = own_pins(log)
    ids = link_ids(old)
    listed = run_cli("detach").stdout
    assert old in listed and str(log) in listed, listed
    st = json.loads(run_cli("status", "--all", "--format", "json").stdout)
    assert [x["session"] for x in st["left_attached"]
            if os.path.realpath(x["log"]) == os.path.realpath(log)] \
        == [old], st
    with TraceProc([a.path, b.path], log) as second:
        assert second.stop() == 0, second.stderr
    err = second.stderr
    assert f"released the capture left attached by session {old}" in err, err
    assert "the devices differ" in err and "continued" not in err, err
    assert err.count("baseline of") == 2, err
    assert not own_pins(log) and not any(link_alive(i) for i in ids)
    # detach by hand
    third = TraceProc([b.path], log)
    third.p.send_signal(signal.SIGKILL)
    third.p.wait(30)
    (left,) = own_pins(log)
    ids = link_ids(left)
    out = run_cli("detach", "--log", log).stdout
    assert f"detached session {left}" in out, out
    assert not own_pins(log) and not any(link_alive(i) for i in ids)
    r = run_cli("detach", "--log", log, check=False)
    assert r.returncode != 0 and "no capture is left attached for LOG" in r.stderr, r


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


def test_write_error_is_recorded_and_its_range_read_back(bpf_variant, full_tmpfs_loop, tmp_path):
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


def test_skipped_bpf_runs_are_reported_and_the_devices_read_whole(make_loop, tmp_path,
                                                                  monkeypatch):
    """The kernel skips a run of a BPF program that is already running on that CPU (an
    interrupt reaching the same tracepoint): for the queue program that is a write with no
    stamp, record or dirty-map mark. The tracer reads the kernel's count of skipped runs of its
    attached programs (bpf_prog_info.recursion_misses; 0 here, checked) at every checkpoint.
    Skipped runs cannot be caused on purpose, so the test raises the count through the
    tracer's fault-injection hook; the rest is real: the loss is reported, recorded with its
    cause, every traced device is read back whole, and `latest` is exact."""
    loop = make_loop(size_mb=64, fill="random", dio=True)
    dev = loop.path
    log, store, stats = tmp_path / "log", tmp_path / "store", tmp_path / "stats.json"
    hook = tmp_path / "missed"
    hook.write_text("0")
    monkeypatch.setenv("BLKREWIND_TEST_MISSED_RUNS", str(hook))
    with TraceProc([dev], log, "--stats-json", stats) as t:
        p = fio(dev, "--rw=randwrite", "--bs=4k", "--iodepth=4", "--rate=4m", runtime=5)
        time.sleep(2)
        hook.write_text("1")
        wait_fio(p)
        deadline = time.monotonic() + 60
        while not re.search(r"resync of \S+ done", t.stderr) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert t.stop() == 0, t.stderr
    err = t.stderr
    assert "WARNING: records lost (BPF run skipped" in err, err
    assert "1 BPF program runs skipped by the kernel (resynced)" in err, err
    assert json.loads(stats.read_text())["missed_runs"] == 1  # the kernel's own count: 0
    cli("ingest", "--log", log, "--store", store)
    restore_latest_equals(store, dev, tmp_path)
    loss = sql(store, "SELECT json_extract_string(counters, '$.cause') AS cause, "
                      "json_extract(counters, '$.missed') AS missed FROM loss")
    assert any(x["cause"] == "BPF run skipped" and int(x["missed"]) == 1 for x in loss), loss
    starts = points(store, "resync_start")
    assert starts and all(json.loads(s["payload"])["full"] for s in starts), starts
    ends = points(store, "resync_end")
    assert ends and json.loads(ends[-1]["payload"])["bytes"] == 64 << 20, ends
    # no stamp is missing, yet nothing between the loss's `since` and the resync's end is
    # restorable: the unseen write may be anywhere in it
    since, re_ = json.loads(starts[-1]["payload"])["since"], ends[-1]["stamp"]
    rs = sql(store, "SELECT * FROM restorable ORDER BY from_stamp")
    assert rs and all(r["to_stamp"] < since or r["from_stamp"] >= re_ for r in rs), (rs, since, re_)
    assert rs[-1]["from_stamp"] >= re_, rs
    gaps = sql(store, "SELECT * FROM gaps")
    assert any(g["cause"] == "BPF run skipped" and g["resumed"] == re_ for g in gaps), gaps
