"""A power cut of the traced host (issue 10): QEMU SIGKILLed in the middle of heavy writes, the
LOG recovered by the next `trace`, restores exact at every mark from before the cut and at the
new `latest`. MOMENTS random moments, PARALLEL guests at a time.

The guest (tests/vm/powercut_guest.py, Debian's 6.12 under software emulation, booted by
tests/vm/kernels.py) has two virtio-blk disks, raw image files here: log.img (an ext4 made here
before the boot, the LOG in it) and dev.img (the traced data, as the guest's /dev/loopN with
direct I/O). Both drives are cache=writeback: what the guest flushed (fsync -> FLUSH ->
QEMU's fdatasync) and what QEMU already wrote is in this host's page cache and survives QEMU's
death, what sits in the guest's page cache (ext4's uncommitted journal, an unflushed frame) is
lost -- as with a power cut of a machine whose disks honour FLUSH. The guest traces an ext4
workload with marks m1, m2 (file system frozen, O_DIRECT copies of the device), m3 (unmounted),
then writes heavily on the raw device (a seeded plan, a mark h1, h2... every few writes) and
says so (OUT/heavy); this host waits a random 0.3..4 s more and SIGKILLs QEMU.

"Boot again" is done on this host, not by a second boot of the guest: a boot under emulation
costs ~60-100 s per moment, and what the second boot would exercise -- ext4's journal replay of
the LOG's file system, then `trace` on the same LOG and device -- is the same code here: the
LOG's image is attached to a loop device and mounted (the journal replays), and `blkrewind
trace` runs on this host's kernel over /dev/loopN, the loop device of the same number the
guest traced, attached to dev.img before the boot (so the number is ours), with --host set to
the guest's name: the new session's device is the same store device (virtme-ng:loopN) as the
guest's. Then:
  - the LOG as left by the cut is read first (per segment: frames, torn or zero-padded tail);
    the new trace must say it cut the tail and sealed the segment, keep every good frame
    (same frames after the repair), and hold every mark the guest saw return (a mark returns
    once its frame is fsynced: OUT/durable.txt lists them) -- every frame fsynced before the cut
  - a new session reads the device (its baseline), takes a few writes and a mark, stops;
  - ingest, then restore at every mark of the old session (m1..m3 against the copies, each h
    mark against heavy_plan replayed over copy-m3) and at the new mark and `latest` (against
    O_DIRECT reads of the device): byte for byte.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "vm"))

import kernels as vm  # noqa: E402
import powercut_guest as pg  # noqa: E402
from conftest import _unavailable, detach_loop, sh, umount  # noqa: E402
from tracerproc import TraceProc, cli, copy_device, direct_writes, first_difference  # noqa: E402

SERIES = os.environ.get("BLKREWIND_POWERCUT_SERIES", "6.12")
MOMENTS = int(os.environ.get("BLKREWIND_POWERCUT_MOMENTS", "5"))
PARALLEL = int(os.environ.get("BLKREWIND_VM_PARALLEL", "2"))
SEED = int(os.environ.get("BLKREWIND_POWERCUT_SEED", str(random.SystemRandom().randrange(1 << 30))))
GUEST_TIMEOUT = 900
CUT_AFTER = (0.3, 4.0)  # seconds after OUT/heavy


class Moment:
    """One guest: its images, the host's loop device over dev.img, the cut."""

    def __init__(self, base: Path, i: int):
        self.i = i
        self.seed = SEED + i
        self.dir = base / f"moment{i}"
        self.out = self.dir / "out"
        self.out.mkdir(parents=True)
        self.log_img = self.dir / "log.img"
        self.dev_img = self.dir / "dev.img"
        self.loop: str | None = None
        self.cut_after: float | None = None
        self.cut_at_s: float | None = None   # seconds of heavy writes before the cut
        self.rc: int | None = None
        self.console = ""
        self.seconds = 0.0

    def prepare(self) -> None:
        with open(self.log_img, "wb") as f:
            f.truncate(pg.LOG_MB << 20)
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
           self.log_img)
        with open(self.dev_img, "wb") as f:
            f.truncate(pg.DEV_MB << 20)
        self.loop = sh("losetup", "--find", "--show", self.dev_img).stdout.strip()

    def qemu_opts(self) -> list[str]:
        drives = []
        for serial, img in (("pclog", self.log_img), ("pcdev", self.dev_img)):
            drives += [f"-drive if=none,id={serial},file={img},format=raw,cache=writeback",
                       f"-device virtio-blk-pci,drive={serial},serial={serial}"]
        return [f"--qemu-opts={' '.join(drives)}"]

    def run(self, kimg: Path) -> None:
        t0 = time.monotonic()
        self.prepare()
        rng = random.Random(self.seed)
        self.cut_after = round(rng.uniform(*CUT_AFTER), 2)
        heavy = self.out / "heavy"

        def cutter(pgid: int) -> None:
            def wait_and_cut():
                while not heavy.exists():
                    if pgid not in vm._RUNNING:
                        return
                    time.sleep(0.05)
                t_heavy = time.monotonic()
                time.sleep(self.cut_after)
                if pgid in vm._RUNNING:
                    os.killpg(pgid, signal.SIGKILL)  # the power cut: QEMU dies at once
                    self.cut_at_s = round(time.monotonic() - t_heavy, 2)
            threading.Thread(target=wait_and_cut, daemon=True).start()

        r = vm.run_guest(kimg, self.out, ["sh", "tests/vm/powercut_guest.sh", str(self.out),
                                          self.loop[len("/dev/loop"):], str(self.seed)],
                         timeout=GUEST_TIMEOUT, extra=self.qemu_opts(), on_start=cutter)
        self.rc, self.console = r.returncode, r.stdout
        self.seconds = time.monotonic() - t0

    def cleanup(self) -> list[str]:
        return detach_loop(self.loop, str(self.dev_img)) if self.loop else []


@pytest.fixture(scope="module")
def moments(tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor
    _need = _unavailable
    if os.geteuid() != 0:
        _need("needs root (loop devices, mounts, BPF)")
    if shutil.which("qemu-system-x86_64") is None:
        _need("qemu-system-x86_64 is missing")
    try:
        vm.vng()
    except vm.VmError as e:
        _need(str(e))
    kimg = vm.fetch(SERIES, log=lambda m: None)
    base = tmp_path_factory.mktemp("powercut")
    ms = [Moment(base, i) for i in range(MOMENTS)]
    pool = ThreadPoolExecutor(max_workers=max(1, PARALLEL))
    t0 = time.monotonic()
    futures = [pool.submit(m.run, kimg) for m in ms]
    try:
        yield list(zip(ms, futures)), t0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        vm.kill_all()
        problems = []
        for m in ms:
            problems += m.cleanup()
        if problems:
            pytest.fail("power-cut cleanup:\n  " + "\n  ".join(problems), pytrace=False)


def _log_state(log_dir: Path) -> dict:
    """{segment file: {sealed, frames, records, torn, pad, size}} of a LOG, read only."""
    from tracer import log as L
    state = {}
    for s in L.list_segments(log_dir):
        with L.SegmentReader(s.path) as r:
            for _ in r.frames():
                pass
            state[os.path.basename(s.path)] = {
                "session": r.session, "sealed": r.sealed, "frames": r.last_frame,
                "records": r.records, "torn": r.torn_bytes, "pad": r.pad_bytes, "size": r.size}
    return state


def _results_file() -> Path:
    return Path(os.environ.get("BLKREWIND_POWERCUT_RESULTS", "/tmp/blkrewind-powercut.json"))


def _record(i: int, row: dict) -> None:
    f = _results_file()
    try:
        rows = json.loads(f.read_text())
    except (OSError, ValueError):
        rows = {}
    rows[str(i)] = {**row, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    f.write_text(json.dumps(rows, indent=1))


@pytest.mark.bpf
@pytest.mark.slow
@pytest.mark.parametrize("i", range(MOMENTS))
def test_power_cut(i, moments, tmp_path):
    m, fut = moments[0][i]
    fut.result(GUEST_TIMEOUT + 120)
    t0 = time.monotonic()
    ctx = f"moment {i} (seed {m.seed})"
    heavy = m.out / "heavy"
    res_file = m.out / "result.json"
    assert not res_file.exists(), f"{ctx}: the guest failed before the cut: " \
        f"{res_file.read_text()}"
    assert heavy.exists() and m.cut_at_s is not None, \
        f"{ctx}: no cut (vng exit {m.rc}); console tail:\n{m.console[-3000:]}"
    info = json.loads(heavy.read_text())
    durable = [json.loads(ln) for ln in (m.out / "durable.txt").read_text().splitlines()
               if ln.endswith("}")]
    names = [d["mark"] for d in durable]
    assert names[:1] == ["m0"], names

    # "boot again": the LOG's file system is mounted (its journal replays) ...
    log_loop = sh("losetup", "--find", "--show", m.log_img).stdout.strip()
    mnt = tmp_path / "logfs"
    mnt.mkdir()
    mounted = False
    tracer = None
    try:
        sh("mount", "-t", "ext4", log_loop, mnt)
        mounted = True
        log = mnt / "log"
        before = _log_state(log)
        old = [k for k, v in before.items()]
        assert old and all(v["session"] == before[old[0]]["session"] for v in before.values())
        unsealed = [k for k, v in before.items() if not v["sealed"]]
        assert unsealed, f"{ctx}: every segment sealed after a power cut? {before}"
        # ... and `trace` starts on the same LOG and device (the host's page cache of
        # /dev/loopN may hold blocks read before the guest wrote them: dropped)
        sh("blockdev", "--flushbufs", m.loop)
        tracer = TraceProc([m.loop], log, "--host", info["hostname"], "--segment-mb",
                           str(pg.SEGMENT_MB), start_timeout=300)
        said = tracer.stderr
        for seg in unsealed:
            assert f"sealed {log / seg}" in said, f"{ctx}: {seg} not sealed:\n{said}"
            if before[seg]["torn"]:
                assert f"cut torn tail of {log / seg}: {before[seg]['torn']} bytes" in said, said
        after = {k: v for k, v in _log_state(log).items() if k in before}
        for seg, v in before.items():
            a = after[seg]
            assert a["sealed"] and (a["frames"], a["records"]) == (v["frames"], v["records"]), \
                f"{ctx}: {seg} before the repair {v}, after {a}"
        new = [k for k, v in _log_state(log).items() if k not in before]
        assert new, f"{ctx}: no new session in the LOG"
        # the new session: a few writes and a mark, then stop
        rng = random.Random(m.seed ^ 0x5A5A)
        direct_writes(m.loop, rng, 8, (pg.DEV_MB << 20) // (64 << 10))
        cli("mark", "after-cut", "--log", log)
        after_copy = tmp_path / "copy-after-cut.img"
        copy_device(m.loop, after_copy)
        direct_writes(m.loop, rng, 4, (pg.DEV_MB << 20) // (64 << 10))
        rc = tracer.stop(timeout=300)
        assert rc == 0, f"{ctx}: trace exited {rc}:\n{tracer.stderr}"
        tracer = None
        latest_copy = tmp_path / "copy-latest.img"
        copy_device(m.loop, latest_copy)

        store = tmp_path / "store"
        cli("ingest", "--log", log, "--store", store, timeout=600)
        stored = json.loads(cli("sql", "--store", store, "SELECT name FROM marks ORDER BY stamp",
                                "--format", "json").stdout)
        in_store = [r["name"] for r in stored]
        missing = [n for n in names if n not in in_store]
        assert not missing, f"{ctx}: marks fsynced before the cut are gone: {missing}"
        device = f"{info['hostname']}:{os.path.basename(m.loop)}"
        checked = []
        for name in in_store + ["latest"]:
            img = tmp_path / f"restored-{name}.img"
            cli("restore", "--store", store, "--device", device, "--at", name, "--to", img,
                timeout=600)
            if name == "after-cut":
                want = after_copy
            elif name == "latest":
                want = latest_copy
            else:
                want = tmp_path / f"want-{name}.img"
                want.write_bytes(pg.expected_at(name, m.seed))
            assert img.read_bytes() == want.read_bytes(), \
                f"{ctx}: restore at {name} differs: {first_difference(img, want)}"
            checked.append(name)
            img.unlink()
        last = before[unsealed[-1]]
        _record(i, {"seed": m.seed, "cut_after_s": m.cut_after,
                    "marks_durable": len(names),
                    "marks_in_log": len(in_store) - 1,
                    "torn_bytes": sum(v["torn"] for v in before.values()),
                    "pad_bytes": sum(v["pad"] for v in before.values()),
                    "segments": len(before), "frames_kept": sum(v["frames"] for v in before.values()),
                    "last_segment": {k: last[k] for k in ("frames", "records", "torn", "pad")},
                    "restored_exact": checked,
                    "guest_uptime_at_start_s": info.get("uptime_at_start_s"),
                    "guest_imports_s": info.get("imports_s"),
                    "guest_trace_started_s": info.get("trace_started_s"),
                    "guest_heavy_at_s": info.get("heavy_at_s"),
                    "durable_at_s": {d["mark"]: d["t"] for d in durable},
                    "guest_s": round(m.seconds, 1), "host_s": round(time.monotonic() - t0, 1)})
    finally:
        if tracer is not None:
            tracer.kill()
        problems = umount(str(mnt)) if mounted else []
        problems += detach_loop(log_loop, str(m.log_img))
        assert not problems, problems
