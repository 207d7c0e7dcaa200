"""Instant access against restore: time to first byte of `export` for sparse devices of 1, 16
and 64 GiB beside `restore` of the same point, and `restore` of a history of 4 KiB writes
against dd.

    .venv/bin/python bench/bench_instant.py [--dir DIR] [--sizes-gib 1,16,64] [--small-mib 512]

1. Per size: a LOG (bench_store.make_log) whose baseline covers the first 64 MiB (the rest
   never written: a sparse history), then 64 MiB of random writes of 4..1024 KiB; ingest.
   `blkrewind export --at latest` is started and timed until `nbdinfo --content` has read
   the export's first sectors (time to first byte, CLI start-up and nbdkit's Python plugin included);
   `blkrewind restore --at latest` of the same point is timed to its end.
2. A 1:1 history of --small-mib of 4 KiB writes over a device of --small-mib (baseline
   random): `restore` against `dd if=/dev/zero bs=1M conv=fsync` of the same size, alternating,
   2 rounds each; the ratio of medians.
Everything is made under --dir and removed at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_store import make_log  # noqa: E402

CLI = [sys.executable, "-m", "blkrewind.cli"]


def run(*args, **kw):
    return subprocess.run([*CLI, *map(str, args)], cwd=ROOT, check=True, capture_output=True,
                          text=True, **kw)


def ttfb(store: str) -> float:
    t0 = time.monotonic()
    p = subprocess.Popen([*CLI, "export", "--store", store, "--device", "bench0", "--at",
                          "latest"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        uri = p.stdout.readline().strip()
        # nbdinfo reads the export's first sectors to say what it holds ("content:")
        subprocess.run(["nbdinfo", "--content", uri], check=True, capture_output=True)
        dt = time.monotonic() - t0
    finally:
        p.send_signal(2)
        p.wait(30)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir")
    ap.add_argument("--sizes-gib", default="1,16,64")
    ap.add_argument("--small-mib", type=int, default=512)
    a = ap.parse_args()
    base = a.dir or tempfile.mkdtemp(prefix="bench-instant-")
    os.makedirs(base, exist_ok=True)
    try:
        for gib in [int(x) for x in a.sizes_gib.split(",")]:
            d = os.path.join(base, f"g{gib}")
            make_log(os.path.join(d, "log"), gib << 30, 64 << 20, baseline_bytes=64 << 20)
            run("ingest", "--log", os.path.join(d, "log"), "--store", os.path.join(d, "store"))
            t_first = ttfb(os.path.join(d, "store"))
            t0 = time.monotonic()
            run("restore", "--store", os.path.join(d, "store"), "--device", "bench0", "--at",
                "latest", "--to", os.path.join(d, "r.img"))
            t_restore = time.monotonic() - t0
            print(f"{gib:3d} GiB sparse: export first byte {t_first:.2f} s; restore "
                  f"{t_restore:.2f} s", flush=True)
            shutil.rmtree(d)
        n = a.small_mib
        d = os.path.join(base, "small")
        make_log(os.path.join(d, "log"), n << 20, n << 20, write_kib=(4,))
        run("ingest", "--log", os.path.join(d, "log"), "--store", os.path.join(d, "store"))
        rs, ds = [], []
        for _ in range(2):
            img = os.path.join(d, "r.img")
            t0 = time.monotonic()
            run("restore", "--store", os.path.join(d, "store"), "--device", "bench0", "--at",
                "latest", "--to", img)
            rs.append(time.monotonic() - t0)
            os.unlink(img)
            t0 = time.monotonic()
            subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={n}",
                            "conv=fsync", "status=none"], check=True)
            ds.append(time.monotonic() - t0)
            os.unlink(img)
        r, dd = sorted(rs)[0], sorted(ds)[0]
        print(f"4 KiB-write history of {n} MiB: restore {n / r * 1.048576:.0f} MB/s "
              f"(runs {', '.join(f'{x:.2f}' for x in rs)} s), dd {n / dd * 1.048576:.0f} MB/s "
              f"(runs {', '.join(f'{x:.2f}' for x in ds)} s): restore/dd = {dd / r:.2f} "
              f"(best of 2 each)")
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
