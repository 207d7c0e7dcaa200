"""The tracer's side of the kernel matrix, run INSIDE a guest (tests/vm/kernels.py boots it).

  python tests/vm/guest.py OUT

The guest sees the host's root read-only (this checkout and its .venv included) and OUT
read-write (shared with the host). Everything else here lives in the guest's memory: a
loop device over a file on a tmpfs, an ext4 on it, its mount. Steps:

  1. `blkrewind trace --ring-mb 8` (the project's own loader loads the programs) through
     an ext4 workload with marks m1..m3; at each mark the file system is frozen, marked
     (`blkrewind mark`) and the device copied with O_DIRECT reads into OUT/copy-mN.img
  2. unmounted, O_DIRECT bursts of 1 MiB writes on the raw device overflow the 8 MiB ring
     (lost records); the tracer's resync reads the lost ranges back; after the tracer
     stopped, OUT/copy-latest.img
  3. OUT/result.json: kernel release, the steps' times, the tracer's stderr and counters.

The host ingests OUT/log and restores at the marks and `latest` (tests/test_kernels.py).
A failure writes OUT/result.json with "error" and exits 1.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

sys.path.insert(0, str(HERE.parents[1]))

from tracerproc import TraceProc, copy_device, direct_writes, sh, write_file  # noqa: E402

from blkrewind import cli as blkrewind_cli  # noqa: E402

DEV_MB = 32
RING_MB = 8  # holds any bio of the workload; the burst (32 MiB in flight) overflows it


def main(out: Path) -> int:
    res: dict = {"release": os.uname().release, "steps": {}}
    t_start = time.monotonic()
    work = Path("/tmp/blkrewind-vm")
    loop = mnt = None
    tracer = None

    def step(name: str, t0: float) -> None:
        res["steps"][name] = round(time.monotonic() - t0, 2)

    try:
        # the guest's /tmp may sit on the read-only root: a tmpfs of our own
        work.mkdir(parents=True, exist_ok=True)
        sh("mount", "-t", "tmpfs", "-o", "size=256m", "blkrewind-vm", work)
        if not Path("/dev/loop-control").exists():
            sh("modprobe", "loop")
        subprocess.run(["modprobe", "ext4"], capture_output=True)
        backing = work / "disk.img"
        with open(backing, "wb") as f:
            f.truncate(DEV_MB << 20)
        loop = sh("losetup", "--find", "--show", backing).strip()
        res["device"] = loop
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", loop)
        mnt = work / "mnt"
        mnt.mkdir()
        sh("mount", "-t", "ext4", loop, mnt)
        log = out / "log"
        rng = random.Random(10)
        copies = {}

        def mark(name: str) -> None:
            sh("fsfreeze", "--freeze", mnt)
            try:
                # `blkrewind mark` through the CLI's entry point, in this process: a new
                # Python costs ~20 s under software emulation
                if blkrewind_cli.main(["mark", name, "--log", str(log)]) != 0:
                    raise AssertionError(f"blkrewind mark {name} failed")
                copy_device(loop, out / f"copy-{name}.img")
                copies[name] = f"copy-{name}.img"
            finally:
                sh("fsfreeze", "--unfreeze", mnt)

        t0 = time.monotonic()
        stats = out / "stats.json"
        try:
            # under software emulation, beside another guest, Python's start alone can take
            # a minute: the start is bounded only by the guest's own timeout
            tracer = TraceProc([loop], log, "--dirtier", "--ring-mb", str(RING_MB),
                               "--fsync-interval", "0.2",
                               "--stats-json", stats, start_timeout=600)
        except AssertionError as e:  # did not start: the kernel may be refused on purpose
            if "(exit " in str(e).split("\n", 1)[0]:
                res["refused"] = str(e).split("\n", 1)[-1].strip()
            raise
        step("trace_start", t0)
        t0 = time.monotonic()
        for i in range(3):
            write_file(mnt / f"f{i}.bin", rng, rng.randrange(1, 1 << 20))
        mark("m1")
        sh("fallocate", "-l", "2M", mnt / "direct.bin")
        direct_writes(mnt / "direct.bin", rng, 16, 32)
        with open(mnt / "f0.bin", "r+b") as g:
            g.seek(12345)
            g.write(rng.randbytes(70001))
            os.fsync(g.fileno())
        mark("m2")
        (mnt / "f1.bin").unlink()
        (mnt / "d").mkdir()
        for i in range(20):
            (mnt / "d" / f"n{i}").write_bytes(rng.randbytes(rng.randrange(1, 10000)))
        sh("sync")
        sh("fstrim", mnt)
        mark("m3")
        step("workload", t0)
        sh("umount", mnt)
        mnt = None
        # lost records: O_DIRECT bursts on the raw device overflow the ring; the
        # tracer's resync reads what was lost back from the device
        t0 = time.monotonic()
        sh("fio", "--name=w", f"--filename={loop}", "--rw=write", "--bs=1m", "--direct=1",
           "--ioengine=libaio", "--iodepth=16", f"--size={DEV_MB // 2}m", "--numjobs=2",
           f"--offset_increment={DEV_MB // 2}m", "--output=/dev/null")
        step("burst", t0)
        t0 = time.monotonic()
        rc = tracer.stop(timeout=600)
        res["trace_stderr"] = tracer.stderr[-3000:]
        res["trace_head"] = tracer.stderr[:2000]  # "capture live ...": the programs loaded
        tracer = None
        assert rc == 0, f"trace exited {rc}:\n{res['trace_stderr']}"
        res["trace_stats"] = json.loads(stats.read_text())
        step("trace_stop", t0)
        copy_device(loop, out / "copy-latest.img")
        copies["latest"] = "copy-latest.img"
        res["copies"] = copies
        res["device_bytes"] = DEV_MB << 20
        res["ok"] = True
        return_code = 0
    except BaseException as e:  # noqa: BLE001 - everything goes to result.json
        res["ok"] = False
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-4000:]
        if tracer is not None:
            res["trace_stderr"] = tracer.stderr[-12000:]  # with the stacks a hung stop prints
        return_code = 1
    finally:
        if tracer is not None:
            tracer.kill()
        if mnt is not None:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        if loop is not None:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["umount", str(work)], capture_output=True)
        res["guest_seconds"] = round(time.monotonic() - t_start, 2)
        os.sync()  # the copies and the LOG reach the host before result.json says done
        tmp = out / "result.json.tmp"
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, out / "result.json")
        os.sync()  # the guest powers off right after this
    return return_code


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
