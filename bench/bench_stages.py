#!/usr/bin/env python3
"""Where the capture's cost goes at fast 4 KiB writes: the tracer's work added stage by stage.

One process loads the real BPF programs once; fio writes rand 4 KiB O_DIRECT (libaio, iodepth
16) to a loop device over a fully allocated file on the disk, in runs of --runtime seconds that
cycle through the stages --rounds times (side by side, so the disk's drift spreads over all):

  off        capture disabled: no BPF program does anything
  attached   programs enabled, the device added but switched off: every bio and request
             takes the early exit (or the lookup of a switched-off device)
  capture    the device traced; a consumer thread only hands ring space back
  copy       ... and copies every span out of the ring
  lz4        ... and encodes it as the LOG does (tracer/log.py encode_span)
  write-new  ... and writes the encoded span into new pages of a tmpfs file (cut back at
             1 GiB): what the LOG's writer does
  write-over ... and writes it over pages a 64 MiB tmpfs file already has

Prints each stage's mean IOPS and its ratio to `off`.

usage: sudo .venv/bin/python bench/bench_stages.py [--runtime 5] [--rounds 3] [--stages ...]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capture import Workspace, fio_args, fio_result  # noqa: E402

from blkrewind.formats.logframe import encode_span  # noqa: E402
from blkrewind.tracer import calibrate, devices  # noqa: E402
from blkrewind.tracer.capture import Capture  # noqa: E402
from blkrewind.tracer.ringbuf import RingConsumer  # noqa: E402

STAGES = ("off", "attached", "capture", "copy", "lz4", "write-new", "write-over")
SHM = Path("/dev/shm")


def fio_iops(dev: str, runtime: int, out: Path) -> float:
    subprocess.run(fio_args(dev, "rand4k", runtime, out), capture_output=True, check=True)
    return fio_result(out)["iops"]


def consume(ring: RingConsumer, stage: str, stop: threading.Event, sink: Path) -> None:
    fd = os.open(sink, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while not stop.is_set():
            view, _, end = ring.peek()
            if view is None:
                ring.wait(0.05)
                continue
            if stage == "copy":
                bytes(view)
            elif stage in ("lz4", "write-new", "write-over"):
                body = encode_span(view)
                if stage != "lz4":
                    os.write(fd, body.data)
                    at = os.lseek(fd, 0, os.SEEK_CUR)
                    if stage == "write-over" and at > 64 << 20:
                        os.lseek(fd, 0, os.SEEK_SET)
                    elif stage == "write-new" and at > 1 << 30:
                        os.ftruncate(fd, 0)
                        os.lseek(fd, 0, os.SEEK_SET)
            view.release()
            ring.release(end)
            time.sleep(0.002)  # the collector's batching wait
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run (5)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--size-mb", type=int, default=1024)
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_stages: run as root", file=sys.stderr)
        return 2
    ws = Workspace(None)
    sink = SHM / f"blkrewind-stages-{os.getpid()}"
    res: dict[str, list[float]] = {s: [] for s in a.stages}
    try:
        dev = ws.disk_loop(a.size_mb << 20)
        d = devices.inspect(dev)
        with Capture(ring_bytes=128 << 20) as cap:
            cap.attach()
            calibrate.calibrate(cap, dev)
            cap.init_counters(1, 1)
            cap.add_device(d.kdev, 0)
            ring = RingConsumer(cap.fd["rb"], cap.ring_bytes)
            try:
                for r in range(a.rounds):
                    for stage in a.stages:
                        stop = threading.Event()
                        t = threading.Thread(target=consume, args=(ring, stage, stop, sink))
                        t.start()
                        cap.set_traced(d.kdev, stage not in ("off", "attached"))
                        cap.enable(stage != "off")
                        try:
                            iops = fio_iops(dev, a.runtime, ws.dir / "fio-stages.json")
                        finally:
                            cap.enable(False)
                            time.sleep(0.1)
                            stop.set()
                            t.join()
                        res[stage].append(iops)
                        print(f"round {r + 1} {stage:10} {iops:9.0f} IOPS  "
                              f"(drops so far {cap.state().drops})", flush=True)
            finally:
                ring.close()
    finally:
        sink.unlink(missing_ok=True)
        ws.close()
    base = res[a.stages[0]]
    print(f"\n| stage | IOPS (mean of {a.rounds}) | ratio to {a.stages[0]} |\n|---|---|---|")
    for stage, v in res.items():
        print(f"| {stage} | {sum(v) / len(v):.0f} | {sum(v) / sum(base):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
