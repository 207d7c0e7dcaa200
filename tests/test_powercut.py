"""A power cut of the traced host (issue 10): QEMU SIGKILLed in the middle of heavy writes, the
LOG recovered by the next `trace`, restores exact at every mark from before the cut and at the
new `latest`. MOMENTS (5) random moments, one guest each, booted in the background (tests/vm/background.py).

The guest (tests/vm/powercut_guest.{sh,py}; Debian's 6.12 under software emulation, booted by
tests/vm/kernels.py) has two virtio-blk disks, raw image files here: log.img (an ext4 made here
before the boot; the LOG in it) and dev.img (the traced device, zeros; the guest's /dev/loopN
over it with direct I/O). Both drives are cache=writeback: what QEMU wrote to an image (all
the guest flushed: fsync -> FLUSH -> fdatasync, and whatever else it already wrote) is in this
host's page cache and survives QEMU's death; what sits in the guest's memory (its page cache,
ext4's uncommitted journal, the tracer's ring and queue) is lost -- a power cut of a machine
whose disks honour FLUSH. The guest traces the device (`trace`, default LOG settings but 16
MiB segments and, by turns, `--log-mode buffered` (the page cache; segments grow as written)
and `direct` (O_DIRECT into preallocated segments: the cut leaves a zero-padded tail or a
torn frame)), marks m0 on the zeros, then writes heavily: a seeded plan of O_DIRECT writes
of 4 KiB-1 MiB, a mark after every 4 of them (so the device at every mark is known without a
copy); once it says so (OUT/heavy) this host waits a random 0.5-6 s and SIGKILLs QEMU.

"Boot again" happens on this host, not in a second boot of the guest: a boot under emulation
costs 1-3 minutes of this 2-core machine per moment, and what a second boot exercises -- the
journal replay of the LOG's file system, then `trace` on the same LOG and the same device --
runs here the same way: log.img is attached to a loop device and mounted (ext4 replays its
journal), and `blkrewind trace` runs on this host's kernel over /dev/loopN, the loop device of
the number the guest traced, attached to dev.img before the boot (so the number is ours), with
--host set to the guest's name: the new session's device is the guest's (virtme-ng:loopN).
Checked, per moment:
  - the LOG as the cut left it (read first: per segment, good frames, a torn or zero-padded
    tail): the new trace seals each unsealed segment, says so, cuts a torn tail and says so,
    removes a segment file the cut left unnamed (a cut in a segment roll: then every named
    segment is sealed) and says so, and keeps every good frame (the same frames and records
    after its repair);
  - every mark the guest saw return is in the LOG (`mark` returns once the mark's frame is
    fsynced, so every frame fsynced before it is too: OUT/durable.txt lists them);
  - a new session reads the device (its baseline), takes writes and a mark `after-cut`, stops;
  - ingest; restore at every mark of the old session (against the plan replayed over zeros),
    at `after-cut` and at `latest` (against O_DIRECT reads of the device): byte for byte.
Each moment's numbers go to /tmp/blkrewind-powercut.json (BLKREWIND_POWERCUT_RESULTS).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "vm"))

import kernels as vm  # noqa: E402
import powercut_guest as pg  # noqa: E402
from conftest import background_jobs, detach_loop, sh, umount  # noqa: E402
from tracerproc import TraceProc, cli, copy_device, direct_writes, first_difference  # noqa: E402

SERIES = os.environ.get("BLKREWIND_POWERCUT_SERIES", "6.12")
MOMENTS = int(os.environ.get("BLKREWIND_POWERCUT_MOMENTS", "5"))
SEED = int(os.environ.get("BLKREWIND_POWERCUT_SEED", str(random.SystemRandom().randrange(1 << 30))))
GUEST_TIMEOUT = 900
CUT_AFTER = (0.5, 6.0)  # seconds after OUT/heavy
LOG_MODES = ("buffered", "direct")


class Moment:
    """One guest: its images, the host's loop device over dev.img, the cut."""

    def __init__(self, base: Path, i: int):
        self.i = i
        self.seed = SEED + i
        # the LOG's write modes by turn: page cache (segments grow) and O_DIRECT into
        # preallocated segments (a zero-padded tail after the cut)
        self.log_mode = LOG_MODES[i % len(LOG_MODES)]
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
        self.qemu_cpu_s: float | None = None  # QEMU's CPU time up to the cut
        self.boot_panics = 0

    def prepare(self) -> None:
        with open(self.log_img, "wb") as f:
            f.truncate(pg.LOG_MB << 20)
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
           self.log_img)
        with open(self.dev_img, "wb") as f:
            f.truncate(pg.DEV_MB << 20)
        # a loop device no tracer on this machine traces already (another test's stale tracer
        # may still trace a number that was freed and is now ours: `trace` would refuse it)
        from blkrewind.commands.trace import _already_traced
        from blkrewind.errors import UserError
        skipped = []
        try:
            for _ in range(8):
                loop = sh("losetup", "--find", "--show", self.dev_img).stdout.strip()
                try:
                    _already_traced([loop])
                except UserError:
                    skipped.append(loop)  # kept attached meanwhile: --find passes it over
                    continue
                self.loop = loop
                break
            else:
                raise AssertionError(f"every loop device offered is traced already: {skipped}")
        finally:
            for loop in skipped:
                detach_loop(loop, str(self.dev_img))

    def qemu_opts(self) -> list[str]:
        drives = []
        for serial, img in (("pclog", self.log_img), ("pcdev", self.dev_img)):
            drives += [f"-drive if=none,id={serial},file={img},format=raw,cache=writeback",
                       f"-device virtio-blk-pci,drive={serial},serial={serial}"]
        return [f"--qemu-opts={' '.join(drives)}"]

    def run(self, kimg: Path) -> None:
        t0 = time.monotonic()
        self.prepare()
        loop = self.loop
        assert loop is not None, "prepare() attaches the loop device or raises"
        rng = random.Random(self.seed)
        cut_after = self.cut_after = round(rng.uniform(*CUT_AFTER), 2)
        heavy = self.out / "heavy"

        def cutter(pgid: int) -> None:
            def wait_and_cut():
                while not heavy.exists():
                    if pgid not in vm._RUNNING:
                        return
                    time.sleep(0.05)
                t_heavy = time.monotonic()
                time.sleep(cut_after)
                if pgid in vm._RUNNING:
                    self.qemu_cpu_s = _cpu_seconds(pgid)
                    os.killpg(pgid, signal.SIGKILL)  # the power cut: QEMU dies at once
                    self.cut_at_s = round(time.monotonic() - t_heavy, 2)
            threading.Thread(target=wait_and_cut, daemon=True).start()

        for attempt in (1, 2):
            r = vm.run_guest(kimg, self.out, ["sh", "tests/vm/powercut_guest.sh", str(self.out),
                                              loop[len("/dev/loop"):], str(self.seed),
                                              self.log_mode],
                             timeout=GUEST_TIMEOUT, extra=self.qemu_opts(), on_start=cutter)
            # software emulation's rare boot crash (an int3 Oops while the kernel patches its
            # own code on another vCPU): before the guest ran anything; boot again, once
            if "Kernel panic" in r.stdout and not (self.out / "trace.stderr").exists():
                self.boot_panics += 1
                continue
            break
        self.rc, self.console = r.returncode, r.stdout
        self.seconds = time.monotonic() - t0

    def cleanup(self) -> list[str]:
        return detach_loop(self.loop, str(self.dev_img)) if self.loop else []


def submit_vm_jobs(bg, tmp_path_factory, items) -> None:
    """Queues the guests of the moments selected (items: this module's tests in the session;
    tests/vm/background.py); each moment's loop device is detached at the session's end."""
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (loop devices, mounts, BPF)"
    elif shutil.which("qemu-system-x86_64") is None:
        reason = "qemu-system-x86_64 is missing"
    else:
        try:
            vm.vng()
        except vm.VmError as e:
            reason = str(e)
    if reason:
        bg.unavailable(__name__, reason)
        return
    base = tmp_path_factory.mktemp("powercut")
    ms = [Moment(base, i) for i in range(MOMENTS)]
    bg.data["moments"] = ms

    def run(m: Moment) -> None:
        m.run(bg.kernel(SERIES))

    selected = {it.callspec.params["i"] for it in items if hasattr(it, "callspec")}
    for m in ms:
        if m.i in selected:
            bg.submit(f"powercut-{m.i}", run, m)

    def cleanup() -> list[str]:
        problems = []
        for m in ms:
            problems += m.cleanup()
        return problems
    bg.on_close(cleanup)


@pytest.fixture(scope="module")
def moments(vm_background):
    return background_jobs(vm_background, __name__)


def _cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) of the processes of a process group (QEMU's, vng's)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(f[2]) == pgid:
            total += int(f[11]) + int(f[12])
    return round(total / os.sysconf("SC_CLK_TCK"), 1)


def _log_state(log_dir: Path) -> dict:
    """{segment file: {sealed, frames, records, torn, pad, size}} of a LOG, read only."""
    from blkrewind.tracer import log as L
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
@pytest.mark.vm
@pytest.mark.parametrize("i", range(MOMENTS))
def test_power_cut(i, moments, tmp_path):
    m = moments.data["moments"][i]
    # queued behind the kernel matrix's guests and the moments before it
    moments.result(f"powercut-{i}", (GUEST_TIMEOUT + 120) * (MOMENTS + 4))
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
        # unsealed: the segment being written at the cut; every one sealed when the cut fell
        # in a segment roll (old one sealed, new one not named yet: a hidden .tmp file, or
        # nothing if even that did not reach the disk)
        unsealed = [k for k, v in before.items() if not v["sealed"]]
        unfinished = sorted(p.name for p in log.glob(".*.tmp"))
        # ... and `trace` starts on the same LOG and device (the host's page cache of
        # /dev/loopN may hold blocks read before the guest wrote them: dropped)
        sh("blockdev", "--flushbufs", m.loop)
        tracer = TraceProc([m.loop], log, "--host", info["hostname"], "--segment-mb",
                           str(pg.SEGMENT_MB), "--log-mode", m.log_mode, start_timeout=300)
        said = tracer.stderr
        for name in unfinished:
            assert f"removed unfinished segment file {name}" in said, f"{ctx}: {said}"
            assert not (log / name).exists()
        for seg in unsealed:
            assert f"sealed {log / seg}" in said, f"{ctx}: {seg} not sealed:\n{said}"
            if m.log_mode == "direct":  # preallocated: the frames end before the file does,
                # in zeros or in a frame the cut tore
                assert before[seg]["pad"] + before[seg]["torn"] > 0, f"{ctx}: {seg}: {before[seg]}"
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
        # records the guest's capture lost (under emulation the kernel sometimes skips the BPF
        # program: "BPF run skipped") make the points from the loss to the end of its resync
        # not restorable: `restore` refuses them (exit 5), never gives other bytes
        losses = json.loads(cli("sql", "--store", store, "SELECT session, counters FROM loss",
                                "--format", "json").stdout)
        checked, refused = [], []
        for name in in_store + ["latest"]:
            img = tmp_path / f"restored-{name}.img"
            r = cli("restore", "--store", store, "--device", device, "--at", name, "--to", img,
                    timeout=600, check=False)
            # (refused past the watermark, or in a gap of the loss when the resync ended
            # before the mark: "... are not restorable (BPF run skipped ...)")
            if r.returncode == 5 and ("past the consistent watermark" in r.stderr
                                      or "are not restorable" in r.stderr) \
                    and name not in ("after-cut", "latest") \
                    and any(x["session"] == before[old[0]]["session"] for x in losses):
                refused.append(name)
                continue
            assert r.returncode == 0, f"{ctx}: restore at {name} exited {r.returncode}: " \
                f"{r.stderr}\nloss: {losses}"
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
        last = before[(unsealed or list(before))[-1]]
        _record(i, {"seed": m.seed, "log_mode": m.log_mode, "cut_after_s": m.cut_after,
                    "marks_durable": len(names),
                    "marks_in_log": len(in_store) - 1,
                    "torn_bytes": sum(v["torn"] for v in before.values()),
                    "pad_bytes": sum(v["pad"] for v in before.values()),
                    "segments": len(before), "unsealed": len(unsealed),
                    "unfinished": unfinished, "frames_kept": sum(v["frames"] for v in before.values()),
                    "last_segment": {k: last[k] for k in ("frames", "records", "torn", "pad")},
                    "restored_exact": checked,
                    "refused_in_a_loss_window": refused,
                    "losses": [json.loads(x["counters"]).get("cause") if isinstance(
                        x["counters"], str) else x["counters"].get("cause") for x in losses],
                    "guest_uptime_at_start_s": info.get("uptime_at_start_s"),
                    "guest_imports_s": info.get("imports_s"),
                    "guest_trace_started_s": info.get("trace_started_s"),
                    "guest_heavy_at_s": info.get("heavy_at_s"),
                    "durable_at_s": {d["mark"]: d["t"] for d in durable},
                    "repair": [ln.strip() for ln in said.splitlines() if "LOG: " in ln],
                    "qemu_cpu_s": m.qemu_cpu_s, "boot_panics": m.boot_panics,
                    "guest_s": round(m.seconds, 1), "host_s": round(time.monotonic() - t0, 1)})
    finally:
        if tracer is not None:
            tracer.__exit__(None, None, None)  # SIGINT (the capture detaches), else SIGKILL
        problems = umount(str(mnt)) if mounted else []
        problems += detach_loop(log_loop, str(m.log_img))
        assert not problems, problems
