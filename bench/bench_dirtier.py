#!/usr/bin/env python3
"""The dirtier's cost (issue 12): who dirtied a page-cache folio (dirtier_btf on
writeback_dirty_folio) and the R_DIRTY lookup of writeback bios, switched off and on.

  sudo .venv/bin/python bench/bench_dirtier.py [--runtime 60] [--window 0.5] [--size-mb 2048]
                                               [--file-mb 1024] [--jobs bufseq64k bufrand4k]
                                               [--shift N | --compare-shift N |
                                                --no-owner | --compare-owner A B]

One traced ext4 on a loop device over a fully allocated file on the disk (direct I/O), an in-
process Tracer (tracer/session.py, no baseline, checkpoints and resync stopped), one fio run
per job of buffered writes (psync, no O_DIRECT, no fsync) into one --file-mb file on it,
overwritten for --runtime seconds: the flusher writes the pages back and they are dirtied
again, so the tracepoint fires and the writeback bios look their dirtier up all along. The
dirtier is switched off/on every --window seconds (Capture.set_dirtier: the cfg switch, same
object, same process; --compare-shift N: kept on, switched between one entry per folio and one
per 2^N pages of the file, Capture.set_dirtier_shift; --compare-owner A B: kept on, switched
between two modes of Capture.set_dirtier_owner: 0 an entry per range always, 1 a file's one
writer in owner_map, 2 that and a per-CPU last file, the default; --no-owner: off/on with
per-range entries only, the code before owner_map), the interleaved method of
bench_dirty.py: each "on" window is compared with the mean of the "off" windows around it. Per
window: fio's CPU time per KiB written (its threads' schedstat run time over its wchar: the
dirtier_btf runs are in the writer's context; throttling pauses cost no CPU, so this is the
steadiest figure with buffered writes; windows with less than 1 MiB written are left out of the
pairs; the off/on columns are ratios of sums), fio's write rate (its wchar, /proc/PID/io: what
the writer got through the page cache; bursty: balance_dirty_pages pauses the writer), the
device's completed writes (/sys/block/X/stat: the writeback), and kernel BPF stats
(BPF_ENABLE_STATS) of dirtier_btf (runs, ns per run) and of the block_bio_queue program (ns per
run: the lookup is in it). Reports both on/off ratios with their 95 % confidence intervals (an
interval that holds 1.0: no measurable change at that resolution), and the dirtier program's
CPU time as a share of one CPU. Prints a table and writes bench/results/dirtier-<date>.json.
Asserts nothing.
Makes its own loop device and mount under /var/tmp/blkrewind-bench/run-*, removes them on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_capture import (  # noqa: E402
    RESULTS,
    Workspace,
    device_written,
    interleaved_tracer,
    machine,
    queue_prog,
    say,
    sh,
    t95,
)

MB = 1e6
JOBS = {"bufseq64k": dict(rw="write", bs="64k"), "bufrand4k": dict(rw="randwrite", bs="4k")}


def fio_args(path: Path, job: str, runtime: int, size_mb: int, out: Path) -> list[str]:
    j = JOBS[job]
    return ["fio", f"--name={job}", f"--filename={path}", f"--rw={j['rw']}", f"--bs={j['bs']}",
            "--ioengine=psync", "--direct=0", "--thread", "--time_based",
            f"--runtime={runtime}", f"--size={size_mb}m", "--output-format=json",
            f"--output={out}"]


def wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError(f"no wchar in /proc/{pid}/io")


def cpu_ns(pid: int) -> int:
    """CPU time (ns) the threads of process pid ran: the sum of their schedstat run times."""
    n = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                n += int(f.read().split()[0])
        except (OSError, ValueError):
            pass
    return n


def ci(ratios: list[float]) -> tuple[float, float, float]:
    mean = statistics.mean(ratios)
    half = t95(len(ratios)) * statistics.stdev(ratios) / len(ratios) ** 0.5
    return mean, mean - half, mean + half


def pair_ratios(windows: list[dict], key: str) -> list[float]:
    return [w[key] / ((windows[i - 1][key] + windows[i + 1][key]) / 2)
            for i, w in enumerate(windows[1:-1], 1)
            if w["on"] and None not in (w[key], windows[i - 1][key], windows[i + 1][key])
            and windows[i - 1][key] + windows[i + 1][key] > 0]


def cpu_per_kib(ws: list[dict]) -> float:
    """fio's CPU ns per KiB written over windows (ratio of the sums)."""
    return sum(w["fio_cpu_ns"] for w in ws) * 1024 / max(1, sum(w["fio_bytes"] for w in ws))


def interleaved(a, ws: Workspace, dev: str, mnt: Path, job: str) -> dict:
    out = ws.dir / f"fio-{job}.json"
    path = mnt / f"{job}.dat"
    sh("fallocate", "-l", f"{a.file_mb}M", path)
    windows: list[dict] = []
    try:
        with interleaved_tracer(ws, dev, a.ring_mb, dirtier=True) as t:
            cap = t.capture
            if "dirtier" not in cap.attached:
                raise RuntimeError(f"dirtier_btf is not attached: {cap.optional_error}")
            qprog = queue_prog(t)
            p = subprocess.Popen(fio_args(path, job, a.runtime, a.file_mb, out),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(2.0)  # fio starts, the page cache fills to the dirty limits
            on = False
            cap.set_dirtier_owner(0 if a.no_owner else a.owner)
            if a.compare_shift is not None:   # "off": per folio, "on": per 2^shift pages
                def switch(on: bool) -> None:
                    cap.set_dirtier_shift(a.compare_shift if on else 0)
                cap.set_dirtier(True)
            elif a.compare_owner:   # "off", "on": two cfg.dirtier_owner modes
                def switch(on: bool) -> None:
                    cap.set_dirtier_owner(a.compare_owner[1] if on else a.compare_owner[0])
                cap.set_dirtier(True)
                cap.set_dirtier_shift(a.shift)
            else:
                def switch(on: bool) -> None:
                    cap.set_dirtier(on)
                cap.set_dirtier_shift(a.shift)
            switch(on)

            def sample():
                return (time.monotonic(), wchar(p.pid), device_written(dev),
                        cap.prog_stats("dirtier_btf"), cap.prog_stats(qprog), cpu_ns(p.pid))
            s0 = sample()
            end = s0[0] + a.runtime - 3.0
            while time.monotonic() + a.window <= end and p.poll() is None:
                time.sleep(a.window)
                s1 = sample()
                dt = s1[0] - s0[0]
                druns = s1[3][1] - s0[3][1]
                qruns = s1[4][1] - s0[4][1]
                windows.append({
                    "on": on, "seconds": dt, "fio_mb_s": (s1[1] - s0[1]) / dt / MB,
                    "dev_mb_s": (s1[2] - s0[2]) / dt / MB,
                    "fio_cpu_ns": s1[5] - s0[5], "fio_bytes": s1[1] - s0[1],
                    "dirtier_runs": druns, "dirtier_ns_per_run": (s1[3][0] - s0[3][0]) / max(1, druns),
                    "dirtier_cpu": (s1[3][0] - s0[3][0]) / (dt * 1e9),
                    "queue_runs": qruns, "queue_ns_per_run": (s1[4][0] - s0[4][0]) / max(1, qruns)})
                on = not on
                switch(on)
                s0 = s1
            p.wait(a.runtime + 120)
            st = cap.state().as_dict()
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    if p.returncode != 0:
        raise RuntimeError(f"fio: {(p.stderr.read() if p.stderr else '').strip()[-300:]}")
    for w in windows:  # a window the writer spent paused (throttled) says nothing per KiB
        w["fio_cpu_ns_per_kib"] = (w["fio_cpu_ns"] * 1024 / w["fio_bytes"]
                                   if w["fio_bytes"] >= 1 << 20 else None)
    on_w = [w for w in windows if w["on"]]
    off_w = [w for w in windows if not w["on"]]
    fio_r, dev_r = ci(pair_ratios(windows, "fio_mb_s")), ci(pair_ratios(windows, "dev_mb_s"))
    cpu_r = ci(pair_ratios(windows, "fio_cpu_ns_per_kib"))
    runs = sum(w["dirtier_runs"] for w in on_w)
    r = {"job": job, "pairs": len(pair_ratios(windows, "fio_mb_s")), "window_s": a.window,
         "fio_ratio": fio_r, "dev_ratio": dev_r, "cpu_ratio": cpu_r,
         "fio_cpu_ns_per_kib_off": cpu_per_kib(off_w), "fio_cpu_ns_per_kib_on": cpu_per_kib(on_w),
         "fio_off_mb_s": statistics.mean(w["fio_mb_s"] for w in off_w),
         "fio_on_mb_s": statistics.mean(w["fio_mb_s"] for w in on_w),
         "dev_off_mb_s": statistics.mean(w["dev_mb_s"] for w in off_w),
         "dev_on_mb_s": statistics.mean(w["dev_mb_s"] for w in on_w),
         "dirtier_ns_per_run_on": (sum(w["dirtier_ns_per_run"] * w["dirtier_runs"] for w in on_w)
                                   / max(1, runs)),
         "dirtier_ns_per_run_off": (sum(w["dirtier_ns_per_run"] * w["dirtier_runs"]
                                        for w in off_w)
                                    / max(1, sum(w["dirtier_runs"] for w in off_w))),
         "dirtier_runs_per_s_on": runs / sum(w["seconds"] for w in on_w),
         "dirtier_cpu_on": statistics.mean(w["dirtier_cpu"] for w in on_w),
         "queue_ns_per_run_off": statistics.mean(w["queue_ns_per_run"] for w in off_w),
         "queue_ns_per_run_on": statistics.mean(w["queue_ns_per_run"] for w in on_w),
         "drops": st["drops"], "loadavg_after": os.getloadavg(), "windows": windows}
    say(f"  {job}: fio CPU per KiB on/off {cpu_r[0]:.4f} ({cpu_r[1]:.4f}..{cpu_r[2]:.4f}), "
        f"fio on/off {fio_r[0]:.4f} ({fio_r[1]:.4f}..{fio_r[2]:.4f}), device on/off "
        f"{dev_r[0]:.4f} ({dev_r[1]:.4f}..{dev_r[2]:.4f}), dirtier_btf "
        f"{r['dirtier_ns_per_run_on']:.0f} ns/run x {r['dirtier_runs_per_s_on']:.0f}/s on, "
        f"queue {r['queue_ns_per_run_off']:.0f} -> {r['queue_ns_per_run_on']:.0f} ns/run")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--runtime", type=int, default=60, help="seconds of fio per job (60)")
    ap.add_argument("--window", type=float, default=0.5, help="seconds per setting (0.5)")
    ap.add_argument("--size-mb", type=int, default=2048, help="loop device size (2048)")
    ap.add_argument("--file-mb", type=int, default=1024, help="the file fio overwrites (1024)")
    ap.add_argument("--ring-mb", type=int, default=128)
    ap.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--shift", type=int, default=None, metavar="N",
                    help="the dirtier kept per 2^N pages (default: the tracer's, "
                         "capture.DIRTIER_SHIFT)")
    ap.add_argument("--compare-shift", type=int, default=None, metavar="N",
                    help="keep the dirtier on and switch between per folio (\"off\") and per "
                         "2^N pages (\"on\") instead of off and on")
    ap.add_argument("--compare-owner", type=int, nargs=2, metavar=("OFF", "ON"),
                    help="keep the dirtier on and switch between two cfg.dirtier_owner modes: "
                         "0 an entry per range always, 1 the file's one writer kept in "
                         "owner_map, 2 that and a per-CPU last file (e.g. 0 2)")
    ap.add_argument("--owner", type=int, default=2, choices=(0, 1, 2),
                    help="cfg.dirtier_owner while the dirtier is switched off and on (2)")
    ap.add_argument("--no-owner", action="store_true",
                    help="switch the dirtier off and on with per-range entries only (no "
                         "owner_map: the code before it)")
    a = ap.parse_args()
    if a.shift is None:
        from blkrewind.tracer.capture import DIRTIER_SHIFT
        a.shift = DIRTIER_SHIFT
    if os.geteuid() != 0:
        say("bench_dirtier: must run as root (loop devices, BPF)")
        return 2

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_before = os.getloadavg()
    ws = Workspace(None)
    mnt = ws.dir / "mnt"
    mounted = False
    rows: list[dict] = []
    try:
        say(f"setting up: {a.size_mb} MiB fully allocated file on {ws.dir} (direct I/O loop), "
            f"ext4")
        dev = ws.disk_loop(a.size_mb << 20)
        sh("mkfs.ext4", "-q", "-F", dev)
        mnt.mkdir()
        sh("mount", dev, mnt)
        mounted = True
        for job in a.jobs:
            rows.append(interleaved(a, ws, dev, mnt, job))
    finally:
        if mounted:
            sh("umount", mnt, check=False)
        ws.close()
    result = {"started": started, "machine": machine(), "loadavg_before": load_before,
              "args": {k: str(v) for k, v in vars(a).items()}, "interleaved": rows}
    out = a.out or RESULTS / f"dirtier-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}")
    print("| job | pairs | fio CPU ns/KiB off | on | on/off (95 % CI) | fio MB/s off | on | "
          "on/off (95 % CI) | device MB/s off | on | on/off (95 % CI) | dirtier_btf ns/run | "
          "runs/s | CPU | queue ns/run off | on |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, d, c = r["fio_ratio"], r["dev_ratio"], r["cpu_ratio"]
        print(f"| {r['job']} | {r['pairs']} x {r['window_s']} s | "
              f"{r['fio_cpu_ns_per_kib_off']:.0f} | {r['fio_cpu_ns_per_kib_on']:.0f} | "
              f"{c[0]:.4f} ({c[1]:.4f}..{c[2]:.4f}) | {r['fio_off_mb_s']:.1f} | "
              f"{r['fio_on_mb_s']:.1f} | {f[0]:.4f} ({f[1]:.4f}..{f[2]:.4f}) | "
              f"{r['dev_off_mb_s']:.1f} | {r['dev_on_mb_s']:.1f} | {d[0]:.4f} ({d[1]:.4f}.."
              f"{d[2]:.4f}) | {r['dirtier_ns_per_run_on']:.0f} | {r['dirtier_runs_per_s_on']:.0f} | "
              f"{100 * r['dirtier_cpu_on']:.2f} % | {r['queue_ns_per_run_off']:.0f} | "
              f"{r['queue_ns_per_run_on']:.0f} |")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
