#!/usr/bin/env python3
"""The ring buffer consumer alone: can Python drain the capture at a given rate?

fio writes 1 MiB O_DIRECT to a loop device over tmpfs at --rate-mb MB/s in all
(two jobs), first untraced, then traced with the real BPF programs and the
tracer's RingConsumer draining into memory (no LOG: bench_capture.py measures
the whole tracer). Prints fio MB/s, delivered MB/s, drops and consumer CPU.

usage: sudo .venv/bin/python bench/bench_consumer.py [--rate-mb 2000] [--runtime 6]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blkrewind.tracer import calibrate, devices  # noqa: E402
from blkrewind.tracer.capture import Capture  # noqa: E402
from blkrewind.tracer.ringbuf import RingConsumer  # noqa: E402


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def fio(dev: str, rate_mb: int, runtime: int) -> float:
    out = sh("fio", "--name=w", f"--filename={dev}", "--rw=write", "--bs=1M", "--direct=1",
             "--ioengine=libaio", "--iodepth=4", "--numjobs=2", f"--rate={rate_mb // 2}m",
             "--size=1g", "--time_based", f"--runtime={runtime}", "--group_reporting",
             "--output-format=json")
    return json.loads(out)["jobs"][0]["write"]["bw_bytes"] / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate-mb", type=int, default=2000)
    ap.add_argument("--runtime", type=int, default=6)
    ap.add_argument("--ring-mb", type=int, default=128)
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="blkrewind-consumer-", dir="/var/tmp")
    sh("mount", "-t", "tmpfs", "-o", "size=1200m", "tmpfs", work)
    dev = None
    try:
        img = os.path.join(work, "d.img")
        sh("dd", "if=/dev/zero", f"of={img}", "bs=1M", "count=1024", "status=none")
        dev = sh("losetup", "--find", "--show", img).strip()
        untraced = fio(dev, a.rate_mb, a.runtime)
        d = devices.inspect(dev)
        with Capture(ring_bytes=a.ring_mb << 20) as cap:
            cap.attach()
            calibrate.calibrate(cap, dev)
            cap.init_counters(1, 1)
            cap.add_device(d.kdev, 0)
            ring = RingConsumer(cap.fd["rb"], cap.ring_bytes)
            stop, got = threading.Event(), [0]

            def drain():
                while not stop.is_set():
                    span, _ = ring.take()
                    got[0] += len(span)
                    if not span:
                        ring.wait(0.05)

            t = threading.Thread(target=drain)
            t.start()
            cap.enable(True)
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
            traced = fio(dev, a.rate_mb, a.runtime)
            dt, r1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_SELF)
            cap.enable(False)
            time.sleep(0.2)
            stop.set()
            t.join()
            ring.close()
            st = cap.state().as_dict()
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        print(f"offered {a.rate_mb} MB/s: fio untraced {untraced:.0f} MB/s, traced {traced:.0f} MB/s "
              f"(ratio {traced / untraced:.2f}); consumer delivered {got[0] / dt / 1e6:.0f} MB/s, "
              f"drops {st['drops']}, consumer CPU {100 * cpu / dt:.0f}% of a core")
    finally:
        if dev:
            subprocess.run(["losetup", "-d", dev])
        subprocess.run(["umount", work])
        os.rmdir(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
