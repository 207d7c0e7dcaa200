"""What a Prometheus scrape costs `trace` and `serve` (blkrewind/metrics.py).

    sudo .venv/bin/python bench/bench_metrics.py [--scrapes 200] [--mb 64]

A loop device (a sparse file under a temp dir) traced by `blkrewind trace --ship` (plain TCP
on 127.0.0.1) to `blkrewind serve`, both with --metrics; --mb MiB of 64 KiB O_DIRECT writes
first, so the store has history. Then each endpoint is fetched --scrapes times in a row;
reported per scrape: the wall time of the HTTP GET and the CPU time the process spent
(utime+stime from /proc/PID/stat, measured over the whole series minus the same idle span
before it), and the size of the page. The capture path itself does no work for the metrics
(custom collectors read existing state at scrape time), so there is no per-write cost to
measure. Needs root (BPF, loop device).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLK = [sys.executable, "-m", "blkrewind.cli"]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_line(path: str, pattern: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            m = re.search(pattern, f.read())
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise SystemExit(f"no {pattern!r} in {path}:\n" + open(path).read())


def series(pid: int, url: str, n: int) -> dict:
    c0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(1.0)                       # the idle CPU of the same span, to subtract
    idle = cpu_s(pid) - c0
    c0, t0 = cpu_s(pid), time.monotonic()
    size = 0
    for _ in range(n):
        with urllib.request.urlopen(url, timeout=10) as r:
            size = len(r.read())
    wall = time.monotonic() - t0
    cpu = cpu_s(pid) - c0 - idle * wall
    return {"ms_per_scrape": 1000 * wall / n, "cpu_ms_per_scrape": 1000 * max(cpu, 0) / n,
            "bytes": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--mb", type=int, default=64)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-metrics-")
    img = os.path.join(tmp, "dev.img")
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", img], capture_output=True, text=True,
                         check=True).stdout.strip()
    procs = []
    try:
        slog, tlog = os.path.join(tmp, "serve.err"), os.path.join(tmp, "trace.err")
        procs.append(subprocess.Popen([*BLK, "serve", "--store", os.path.join(tmp, "store"),
                                       "--listen", "127.0.0.1:0", "--insecure",
                                       "--metrics", "127.0.0.1:0"], cwd=ROOT,
                                      stderr=open(slog, "w"), stdout=subprocess.DEVNULL))
        listen = wait_line(slog, r"listening on (\S+)")
        surl = wait_line(slog, r"metrics on (\S+)")
        procs.append(subprocess.Popen([*BLK, "trace", "--device", dev, "--log",
                                       os.path.join(tmp, "log"), "--ship", listen,
                                       "--insecure", "--metrics", "127.0.0.1:0"], cwd=ROOT,
                                      stderr=open(tlog, "w"), stdout=subprocess.DEVNULL))
        turl = wait_line(tlog, r"metrics on (\S+)")
        wait_line(tlog, r"(baseline of)", 120)
        subprocess.run(["dd", "if=/dev/urandom", f"of={dev}", "bs=64k", f"count={a.mb * 16}",
                        "oflag=direct", "status=none"], check=True)
        time.sleep(3)
        for name, p, url in (("trace", procs[1], turl), ("serve", procs[0], surl)):
            r = series(p.pid, url, a.scrapes)
            print(f"{name}: {r['ms_per_scrape']:.2f} ms per scrape, "
                  f"{r['cpu_ms_per_scrape']:.2f} ms CPU per scrape, page {r['bytes']} bytes "
                  f"({a.scrapes} scrapes)")
    finally:
        for p in reversed(procs):
            p.send_signal(2)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["losetup", "-d", dev])
        subprocess.run(["rm", "-rf", tmp])
    return 0


if __name__ == "__main__":
    sys.exit(main())
