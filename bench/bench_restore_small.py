"""`restore` of a history made only of 4 KiB writes against dd, optionally beside another tree
(the code before a change), side by side in one run on the same history.

    .venv/bin/python bench/bench_restore_small.py [--dir DIR] [--device-mib 256]
        [--write-mib 512] [--rounds 3] [--before TREE]

A LOG (bench_store.make_log: baseline of the whole device, then --write-mib of 4 KiB random
writes) is ingested once; then, per round, `blkrewind restore --at latest` from this tree
(and from --before, e.g. `git archive COMMIT | tar -x -C /tmp/old`), and
`dd if=/dev/zero bs=1M conv=fsync` of the device's size into the same directory. Reported:
the restore's own time (its summary line: plan excluded, fsync included), the whole command's
wall time and CPU, medians, and restore/dd. Everything is made under --dir and removed.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_store import make_log  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir")
    ap.add_argument("--device-mib", type=int, default=256)
    ap.add_argument("--write-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", help="another source tree to run beside this one")
    a = ap.parse_args()
    base = a.dir or tempfile.mkdtemp(prefix="bench-restore-small-")
    os.makedirs(base, exist_ok=True)
    trees = {"after": ROOT, **({"before": os.path.abspath(a.before)} if a.before else {})}
    n = a.device_mib
    mb = n * 1.048576
    img = os.path.join(base, "r.img")
    store = os.path.join(base, "store")
    res: dict = {k: [] for k in (*trees, "dd")}
    own: dict = {k: [] for k in trees}
    try:
        make_log(os.path.join(base, "log"), n << 20, a.write_mib << 20, write_kib=(4,))
        subprocess.run([sys.executable, "-m", "blkrewind.cli", "ingest", "--log",
                        os.path.join(base, "log"), "--store", store], cwd=ROOT, check=True,
                       capture_output=True)
        shutil.rmtree(os.path.join(base, "log"))
        # the payload was written with O_DIRECT: read it once so that every run finds it in
        # the page cache (the first run would otherwise pay the disk for the others)
        for d, _, fs in os.walk(os.path.join(store, "payload")):
            for f in fs:
                with open(os.path.join(d, f), "rb") as fh:
                    while fh.read(8 << 20):
                        pass
        for r in range(a.rounds):
            order = list(trees.items())
            for name, tree in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                c0, t0 = _cpu(), time.monotonic()
                p = subprocess.run([sys.executable, "-m", "blkrewind.cli", "restore", "--store",
                                    store, "--device", "bench0", "--at", "latest", "--to", img],
                                   cwd=tree, check=True, capture_output=True, text=True)
                wall, cpu = time.monotonic() - t0, _cpu() - c0
                m = re.search(r" in ([0-9.]+) s", p.stdout + p.stderr)
                res[name].append(wall)
                own[name].append(float(m.group(1)) if m else wall)
                print(f"{name:6s} restore {own[name][-1]:.2f} s (command {wall:.2f} s, "
                      f"{cpu:.2f} s CPU)", flush=True)
                os.unlink(img)
            t0 = time.monotonic()
            subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={n}",
                            "conv=fsync", "status=none"], check=True)
            res["dd"].append(time.monotonic() - t0)
            os.unlink(img)
            print(f"dd     {res['dd'][-1]:.2f} s", flush=True)

        def med(v):
            return sorted(v)[len(v) // 2]
        dd = med(res["dd"])
        print(f"{n} MiB device, {a.write_mib} MiB of 4 KiB writes, medians of {a.rounds}: "
              f"dd {mb / dd:.0f} MB/s")
        for k in trees:
            print(f"  {k}: restore {mb / med(own[k]):.0f} MB/s ({dd / med(own[k]):.2f}x dd); "
                  f"whole command {mb / med(res[k]):.0f} MB/s ({dd / med(res[k]):.2f}x dd)")
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)
        elif os.path.exists(img):
            os.unlink(img)


if __name__ == "__main__":
    main()
