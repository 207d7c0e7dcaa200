#!/usr/bin/env python3
"""The dirty map's cost, and the resync's read rate against dd, side by side in one run.

  sudo .venv/bin/python bench/bench_dirty.py [--runtime 6] [--rounds 2] [--size-mb 1024]
                                             [--interleaved-runtime 60] [--window 0.5]

cost    fio O_DIRECT libaio to a loop device over a fully allocated file on the disk (direct
        I/O), jobs rand 4 KiB (iodepth 16) and seq 1 MiB (iodepth 4), each traced by an
        in-process Tracer (tracer/session.py, no baseline) with the dirty map off and on
        (Capture.set_dirty_tracking: the cfg switch, same object, same process), in the order
        off, on, on, off per round. Reports fio MB/s per mode, and the BPF cost: kernel BPF
        stats (BPF_ENABLE_STATS) of the block_bio_queue program, ns per run and ns per captured
        bio. Checkpoints and resyncs are stopped in these runs (a resync would add reads).
interleaved  the same jobs, one long fio run each under one tracer, the dirty map switched
        off/on every --window seconds; each window's MB/s from the device's completed-write
        counter (/sys/block/X/stat), so adjacent off/on windows are pairs with the disk's drift
        cancelled. Reports the mean on/off ratio with its 95 % confidence interval: an interval
        that holds 1.0 means no measurable change at that resolution.
resync  two dirty sets on the same device: "contiguous" (512 MiB written sequentially) and
        "scattered" (random 1 MiB writes over the device, 256 MiB in all); the Tracer resyncs
        them (Resync.request), and dd (iflag=direct, bs=1M, one dd per run of the same ranges)
        reads the same ranges before and after. Reports MB/s of each and the ratio. The resync
        rate includes putting the chunks into the LOG (same disk).

Prints tables and writes bench/results/dirty-<date>.json. Asserts nothing. MB = 10^6 bytes.
Makes its own loop device under /var/tmp/blkrewind-bench/run-*, touches nothing else, and
removes everything on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_capture import (  # noqa: E402
    JOBS,
    RESULTS,
    Workspace,
    fio_args,
    fio_result,
    interleaved_run,
    machine,
    queue_prog,
    say,
    sh,
    start_tracer,
)

from blkrewind.tracer import libbpf as L  # noqa: E402

MB = 1e6


def cost_run(a, ws: Workspace, dev: str, job: str, dirty: bool, idx: int) -> dict:
    log = ws.new_log()
    out = ws.dir / f"fio-{job}-{idx}.json"
    stats_fd = L.enable_run_stats()
    t = start_tracer(dev, log, a.ring_mb)
    try:
        t.resync.stop(finish=False)          # no checkpoints, no resync: the BPF cost only
        t.capture.set_dirty_tracking(dirty)
        prog = queue_prog(t)
        ns0, cnt0 = t.capture.prog_stats(prog)
        bios0 = t.capture.state().bios
        p = sh(*fio_args(dev, job, a.runtime, out), check=False, timeout=a.runtime * 10 + 120)
        ns1, cnt1 = t.capture.prog_stats(prog)
        st = t.capture.state().as_dict()
    finally:
        stats = t.stop()
        os.close(stats_fd)
        shutil.rmtree(log, ignore_errors=True)
    if p.returncode != 0:
        raise RuntimeError(f"fio: {(p.stderr or p.stdout).strip()[-300:]}")
    f = fio_result(out)
    bios = st["bios"] - bios0
    r = {"job": job, "dirty": dirty, "mb_s": f["mb_s"], "iops": f["iops"],
         "bpf_ns_per_run": (ns1 - ns0) / max(1, cnt1 - cnt0), "bpf_runs": cnt1 - cnt0,
         "bpf_ns_per_bio": (ns1 - ns0) / max(1, bios), "bios": bios, "drops": st["drops"],
         "dirty_races": st["dirty_races"], "tracer_failure": stats.get("failure")}
    say(f"  {job:6} dirty map {'on ' if dirty else 'off'} {r['mb_s']:8.1f} MB/s  "
        f"BPF {r['bpf_ns_per_bio']:7.0f} ns/bio ({r['bpf_ns_per_run']:6.0f} ns/run)  "
        f"drops {r['drops']}")
    return r


def dd_ranges(dev: str, ranges: list[tuple[int, int]]) -> float:
    """Seconds for dd to read the ranges (coalesced into runs), one dd per run."""
    runs: list[list[int]] = []
    for off, n in sorted(ranges):
        if runs and runs[-1][0] + runs[-1][1] == off:
            runs[-1][1] += n
        else:
            runs.append([off, n])
    t0 = time.monotonic()
    for off, n in runs:
        sh("dd", f"if={dev}", "of=/dev/null", "bs=1M", "iflag=direct,skip_bytes,count_bytes",
           f"skip={off}", f"count={n}", "status=none")
    return time.monotonic() - t0


def resync_run(a, ws: Workspace, dev: str, size: int, scenario: str) -> dict:
    log = ws.new_log()
    t = start_tracer(dev, log, a.ring_mb)
    try:
        since = t.capture.state().stamp
        if scenario == "contiguous":
            args = ["fio", "--name=w", f"--filename={dev}", "--rw=write", "--bs=1m",
                    "--size=512m", "--offset=256m"]
        else:
            args = ["fio", "--name=w", f"--filename={dev}", "--rw=randwrite", "--bs=1m",
                    "--io_size=256m", "--norandommap", "--randrepeat=0"]
        sh(*args, "--direct=1", "--ioengine=libaio", "--iodepth=8", "--output=/dev/null",
           timeout=600)
        t.durable(120)
        before = t.resync.resyncs
        t.resync.request(since=since, cause="bench")
        deadline = time.monotonic() + 600
        while t.resync.resyncs == before and time.monotonic() < deadline and not t.failure:
            time.sleep(0.05)
        last = dict(t.resync.last or {})
    finally:
        t.stop()
        shutil.rmtree(log, ignore_errors=True)
    if not last:
        raise RuntimeError(f"the resync did not finish: {t.failure}")
    ranges = last.pop("ranges")
    dd1 = dd_ranges(dev, ranges)
    dd2 = dd_ranges(dev, ranges)
    dd_s = (dd1 + dd2) / 2
    r = {"scenario": scenario, "bytes": last["bytes"], "chunks": last["chunks"],
         "regions": last["regions"], "rereads": last["rereads"],
         "resync_mb_s": last["bytes"] / MB / last["seconds"],
         "dd_mb_s": last["bytes"] / MB / dd_s, "dd_runs_s": [round(dd1, 3), round(dd2, 3)]}
    r["ratio"] = r["resync_mb_s"] / r["dd_mb_s"]
    say(f"  resync {scenario:10} {last['bytes'] / MB:7.0f} MB: resync {r['resync_mb_s']:6.0f} "
        f"MB/s, dd {r['dd_mb_s']:6.0f} MB/s, ratio {r['ratio']:.2f}")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--runtime", type=int, default=6, help="seconds per fio run (6)")
    ap.add_argument("--rounds", type=int, default=2, help="off/on/on/off rounds per job (2)")
    ap.add_argument("--size-mb", type=int, default=1024, help="loop device size (1024)")
    ap.add_argument("--ring-mb", type=int, default=128)
    ap.add_argument("--jobs", nargs="+", choices=list(JOBS), default=["rand4k", "seq1m"])
    ap.add_argument("--interleaved-runtime", type=int, default=60,
                    help="seconds of the interleaved run per job (60)")
    ap.add_argument("--window", type=float, default=0.5,
                    help="interleaved: seconds per dirty-map setting (0.5)")
    ap.add_argument("--skip", choices=["cost", "interleaved", "resync"], action="append",
                    default=[])
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if os.geteuid() != 0:
        say("bench_dirty: must run as root (loop devices, BPF)")
        return 2

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ws = Workspace(None)
    cost: list[dict] = []
    resync: list[dict] = []
    inter: list[dict] = []
    try:
        size = a.size_mb << 20
        say(f"setting up: {a.size_mb} MiB fully allocated file on {ws.dir} (direct I/O loop)")
        dev = ws.disk_loop(size)
        if "cost" not in a.skip:
            say(f"cost: fio {a.runtime} s per run, dirty map off/on/on/off x {a.rounds}")
            i = 0
            for job in a.jobs:
                for _ in range(a.rounds):
                    for dirty in (False, True, True, False):
                        i += 1
                        cost.append(cost_run(a, ws, dev, job, dirty, i))
        if "interleaved" not in a.skip:
            say(f"cost, interleaved: one fio run of {a.interleaved_runtime} s per job, the dirty "
                f"map switched every {a.window} s")
            for job in a.jobs:
                inter.append(interleaved_run(
                    a, ws, dev, job, "dirty map",
                    lambda t, on: t.capture.set_dirty_tracking(on)))
        if "resync" not in a.skip:
            say("resync vs dd")
            for scenario in ("contiguous", "scattered"):
                resync.append(resync_run(a, ws, dev, size, scenario))
    finally:
        ws.close()

    rows = []
    for job in a.jobs:
        off = [r for r in cost if r["job"] == job and not r["dirty"]]
        on = [r for r in cost if r["job"] == job and r["dirty"]]
        if not off or not on:
            continue
        m = {k: (statistics.mean(r["mb_s"] for r in v),
                 statistics.mean(r["bpf_ns_per_bio"] for r in v)) for k, v in (("off", off),
                                                                                 ("on", on))}
        rows.append({"job": job, "off_mb_s": m["off"][0], "on_mb_s": m["on"][0],
                     "ratio": m["on"][0] / m["off"][0], "off_ns_bio": m["off"][1],
                     "on_ns_bio": m["on"][1], "dirty_ns_bio": m["on"][1] - m["off"][1],
                     "off_spread": [round(r["mb_s"], 1) for r in off],
                     "on_spread": [round(r["mb_s"], 1) for r in on]})
    result = {"started": started, "machine": machine(), "args": {k: str(v) for k, v in vars(a).items()},
              "cost": rows, "cost_runs": cost, "interleaved": inter, "resync": resync}
    out = a.out or RESULTS / f"dirty-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if rows:
        print("| job | dirty map off | on | ratio | BPF ns/bio off | on | dirty map ns/bio |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['job']} | {r['off_mb_s']:.0f} MB/s {r['off_spread']} | {r['on_mb_s']:.0f} MB/s "
                  f"{r['on_spread']} | {r['ratio']:.3f} | {r['off_ns_bio']:.0f} | {r['on_ns_bio']:.0f} | "
                  f"{r['dirty_ns_bio']:+.0f} |")
    if inter:
        print("| job (interleaved) | pairs | dirty map off | on | on/off | 95 % CI | measurable | "
              "BPF ns/bio off | on |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in inter:
            print(f"| {r['job']} | {r['pairs']} x {r['window_s']} s | {r['off_mb_s']:.1f} MB/s | "
                  f"{r['on_mb_s']:.1f} MB/s | {r['ratio']:.4f} | {r['ci95'][0]:.4f}..{r['ci95'][1]:.4f}"
                  f" | {'yes' if r['measurable'] else 'no'} | {r['off_ns_bio']:.0f} | "
                  f"{r['on_ns_bio']:.0f} |")
    if resync:
        print("| dirty set | bytes | resync | dd (same ranges) | ratio |")
        print("|---|---|---|---|---|")
        for r in resync:
            print(f"| {r['scenario']} | {r['bytes'] / MB:.0f} MB | {r['resync_mb_s']:.0f} MB/s | "
                  f"{r['dd_mb_s']:.0f} MB/s | {r['ratio']:.2f} |")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
