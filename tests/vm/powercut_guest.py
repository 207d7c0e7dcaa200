"""The traced guest of the power-cut test, run INSIDE a guest (tests/test_powercut.py boots it
and SIGKILLs its QEMU in the middle of the heavy writes).

  sh tests/vm/powercut_guest.sh OUT LOOPNO SEED      (starts the tracer, then runs this)

Two virtio-blk disks, raw image files on the host (cache=writeback): serial "pclog" holds an
ext4 (made on the host) with the LOG in log/, serial "pcdev" the traced data, zeros at the
boot. The traced device is /dev/loopLOOPNO over pcdev (--direct-io=on: what the loop device
completed went to the virtual disk); the host recovers on a loop device of the same number over
the same image, so that the new session's device is this one (host:name = virtme-ng:loopN).
`blkrewind trace` (ring 32 MiB, 16 MiB segments, the default LOG fsync every second) runs from
powercut_guest.sh; here, once its baseline is read:

  mark m0 (the device is all zeros), OUT/heavy, then O_DIRECT writes of heavy_plan(SEED) on the
  device (4 KiB to 1 MiB at random offsets), a mark mK after the first K * MARK_EVERY of them,
  without end: the host cuts the power a random moment after OUT/heavy appeared.

Every mark whose `blkrewind mark` returned (it returns once the mark's frame, and so every frame
before it, is fsynced) is appended to OUT/durable.txt (on the host once the write returns: 9p).
The device's content at every mark is known without a copy: expected_at(). If the cut does not
come within HEAVY_MAX seconds, or anything fails, OUT/result.json says so.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEV_MB = 16             # the baseline read under emulation: ~2-3 MiB/s beside another guest
LOG_MB = 256
SEGMENT_MB = 16         # as powercut_guest.sh passes it
MARK_EVERY = 4          # heavy writes between two marks
HEAVY_MAX = 300.0       # seconds of heavy writes without a cut: the host never cut
START_MAX = 600.0       # the tracer's start, beside another guest, under emulation


def heavy_plan(seed: int, dev_bytes: int = DEV_MB << 20):
    """The heavy phase's writes, endless: (offset, data), 4 KiB-aligned, 4 KiB to 1 MiB."""
    rng = random.Random(seed)
    while True:
        size = rng.randrange(1, 257) * 4096
        off = rng.randrange(0, (dev_bytes - size) // 4096 + 1) * 4096
        yield off, rng.randbytes(size)


def expected_at(mark: str, seed: int, dev_bytes: int = DEV_MB << 20) -> bytes:
    """The device at mark mK: zeros, then the first K * MARK_EVERY writes of heavy_plan(seed)."""
    img = bytearray(dev_bytes)
    plan = heavy_plan(seed, dev_bytes)
    for _ in range(int(mark.removeprefix("m")) * MARK_EVERY):
        off, data = next(plan)
        img[off:off + len(data)] = data
    return bytes(img)


def main(out: Path, loop: str, log: str, seed: int, tracer_pid: int) -> int:
    import mmap
    import traceback
    t_start = time.monotonic()
    res: dict = {"release": os.uname().release, "hostname": os.uname().nodename,
                 "device": loop, "uptime_at_start_s": float(Path("/proc/uptime").read_text()
                                                            .split()[0])}
    stderr = out / "trace.stderr"
    try:
        sys.path.insert(0, str(HERE.parents[1]))
        # `blkrewind mark` runs in this process (a new Python costs ~20 s under emulation):
        # its parser and imports are made while the tracer starts
        from blkrewind import cli as blkrewind_cli
        from blkrewind.tracer import session as _  # noqa: F401  (what `mark` asks the tracer with)
        parser = blkrewind_cli.build_parser()
        res["imports_s"] = round(time.monotonic() - t_start, 2)
        while "baseline of" not in stderr.read_text(errors="replace"):
            try:
                os.kill(tracer_pid, 0)
                gone = Path(f"/proc/{tracer_pid}/stat").read_text().split()[2] == "Z"
            except ProcessLookupError:
                gone = True
            if gone or time.monotonic() - t_start > START_MAX:
                raise AssertionError("the tracer did not start:\n"
                                     + stderr.read_text(errors="replace")[-3000:])
            time.sleep(0.1)
        res["trace_started_s"] = round(time.monotonic() - t_start, 2)
        durable = open(out / "durable.txt", "a")

        def mark(k: int) -> None:
            if blkrewind_cli._main(parser.parse_args(["mark", f"m{k}", "--log", log])) != 0:
                raise AssertionError(f"blkrewind mark m{k} failed")
            durable.write(json.dumps({"mark": f"m{k}",
                                      "t": round(time.monotonic() - t_start, 2)}) + "\n")
            durable.flush()

        mark(0)
        res["heavy_at_s"] = round(time.monotonic() - t_start, 2)
        (out / "heavy").write_text(json.dumps(res))
        fd = os.open(loop, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 1 << 20)
        t_heavy = time.monotonic()
        n = 0
        for off, data in heavy_plan(seed):
            buf.seek(0)
            buf.write(data)
            os.pwritev(fd, [memoryview(buf)[:len(data)]], off)
            n += 1
            if n % MARK_EVERY == 0:
                mark(n // MARK_EVERY)
            if time.monotonic() - t_heavy > HEAVY_MAX:
                raise AssertionError(f"no power cut within {HEAVY_MAX:.0f} s of heavy writes")
        raise AssertionError("the heavy plan ended before a power cut")
    except BaseException as e:  # noqa: BLE001 - everything goes to result.json
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-4000:]
        try:
            os.kill(tracer_pid, 9)
        except ProcessLookupError:
            pass
        (out / "result.json").write_text(json.dumps(res, indent=1))
        os.sync()
        return 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]),
                  int(sys.argv[5])))
