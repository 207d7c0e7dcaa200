#!/usr/bin/env python3
"""Capture overhead: fio O_DIRECT to a loop device, untraced vs traced, side by side.

  sudo .venv/bin/python bench/bench_capture.py [--runtime 8] [--mode overhead|rate|all]

overhead  for each backing (a loop device over a fully allocated file on the real disk with
          direct I/O, and one over a file on a tmpfs) and each job (seq 1 MiB iodepth 4,
          rand 4 KiB iodepth 16; libaio, O_DIRECT, time based), runs fio untraced, traced by
          `blkrewind trace --device LOOP --log DIR --no-baseline -- fio ...`, untraced again.
interleaved  per job, one long fio run (--interleaved-runtime) to the disk loop device under
          one in-process tracer whose capture of the device is switched off and on every
          --window seconds (Capture.set_traced: off, the BPF programs pass its bios untouched);
          each window's MB/s from the device's completed-write counter. Each "on" window
          against the mean of the "off" windows around it cancels the disk's drift, which
          sequential runs cannot (this VM's disk moves by 2x within minutes). With the LOG on
          the same disk, LOG writes flushed after their window blur the pairs: measure the
          LOG's share of the disk with `overhead`, the capture's own cost here with --log-dir
          on another device.
rate      seq 1 MiB, numjobs 2, to the tmpfs loop device (>= 2 GB/s here; --rate-mb caps
          it, several values make a sweep): untraced, then traced, to show what is lost at
          that rate. Each run also reports how many of the machine's cores were busy.

Prints a table and writes bench/results/capture-<date>.json. Reports ratios, asserts nothing.
The traced run skips the baseline read (--no-baseline): it measures the cost of capturing
writes, not the one-time cost of reading the device. MB = 10^6 bytes.

Makes its own loop devices and tmpfs under /var/tmp/blkrewind-bench/run-*, touches nothing
else, and removes everything on exit (also on an error or SIGTERM); a run that was killed is
cleaned up by the next one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/var/tmp/blkrewind-bench")
RESULTS = ROOT / "bench" / "results"
MB = 1e6

JOBS = {
    "seq1m": dict(rw="write", bs="1m", iodepth=4),
    "rand4k": dict(rw="randwrite", bs="4k", iodepth=16),
}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sh(*cmd, check=True, timeout=600) -> subprocess.CompletedProcess:
    argv = [str(c) for c in cmd]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p


def blkrewind_cmd() -> list[str]:
    exe = ROOT / ".venv" / "bin" / "blkrewind"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "blkrewind.cli"]


def loop_backing(dev: str) -> str | None:
    try:
        return Path(f"/sys/block/{os.path.basename(dev)}/loop/backing_file").read_text() \
            .rstrip("\n").removesuffix(" (deleted)")
    except OSError:
        return None


def attached_loops() -> dict[str, str]:
    out = {}
    for p in Path("/sys/block").glob("loop*"):
        b = loop_backing(p.name)
        if b:
            out[f"/dev/{p.name}"] = b
    return out


def mount_points() -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f]


def file_free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# --------------------------------------------------------------------------- the work area
class Workspace:
    """/var/tmp/blkrewind-bench/run-XXXX: backing files, tmpfs, LOGs; all removed by close()."""

    def __init__(self, log_dir: Path | None):
        WORK.mkdir(parents=True, exist_ok=True)
        reap_stale()
        self.dir = Path(tempfile.mkdtemp(prefix="run-", dir=WORK))
        (self.dir / "pid").write_text(f"{os.getpid()}\n")
        self.log_parent = log_dir or self.dir
        self.loops: list[tuple[str, str]] = []
        self.tmpfs: Path | None = None
        self.logs = 0

    def make_file(self, path: Path, size: int) -> None:
        """A fully allocated file of zeroes (written, not fallocated: no unwritten extents)."""
        chunk = bytes(8 << 20)
        with open(path, "wb") as f:
            left = size
            while left > 0:
                left -= f.write(chunk[:min(left, len(chunk))])
            f.flush()
            os.fsync(f.fileno())

    def loop(self, backing: Path, dio: bool) -> str:
        cmd = ["losetup", "--find", "--show"] + (["--direct-io=on"] if dio else []) + [backing]
        dev = sh(*cmd).stdout.strip()
        self.loops.append((dev, str(backing)))
        return dev

    def disk_loop(self, size: int) -> str:
        f = self.dir / "disk.img"
        self.make_file(f, size)
        return self.loop(f, dio=True)

    def tmpfs_loop(self, size: int) -> str:
        self.tmpfs = self.dir / "tmpfs"
        self.tmpfs.mkdir()
        sh("mount", "-t", "tmpfs", "-o", f"size={(size >> 20) + 16}m,mode=0700", "blkrewind-bench",
           self.tmpfs)
        f = self.tmpfs / "mem.img"
        self.make_file(f, size)
        return self.loop(f, dio=False)

    def new_log(self) -> Path:
        self.logs += 1
        return self.log_parent / f"log-{os.getpid()}-{self.logs}"

    def close(self) -> None:
        problems = []
        for dev, backing in reversed(self.loops):
            if loop_backing(dev) == backing:  # still ours
                cp = sh("losetup", "-d", dev, check=False)
                if cp.returncode != 0:
                    problems.append(f"losetup -d {dev}: {cp.stderr.strip()}")
        self.loops.clear()
        if self.tmpfs is not None and str(self.tmpfs) in mount_points():
            if sh("umount", self.tmpfs, check=False).returncode != 0:
                time.sleep(1)  # a loop device just detached may still hold it for a moment
                if sh("umount", self.tmpfs, check=False).returncode != 0:
                    sh("umount", "-l", self.tmpfs, check=False)
                    problems.append(f"{self.tmpfs} was busy: lazily unmounted")
        for i in range(1, self.logs + 1):
            shutil.rmtree(self.log_parent / f"log-{os.getpid()}-{i}", ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        for p in problems:
            say(f"cleanup: {p}")


def reap_stale() -> None:
    """Clean up after a bench run that was killed: run dirs whose pid is gone."""
    for d in WORK.glob("run-*"):
        try:
            pid = int((d / "pid").read_text())
        except (OSError, ValueError):
            pid = 0
        if pid and os.path.exists(f"/proc/{pid}"):
            continue
        say(f"cleaning up a killed bench run: {d}")
        for dev, b in attached_loops().items():
            if b.startswith(str(d) + "/"):
                sh("losetup", "-d", dev, check=False)
        if str(d / "tmpfs") in mount_points():
            time.sleep(0.5)
            if sh("umount", d / "tmpfs", check=False).returncode != 0:
                sh("umount", "-l", d / "tmpfs", check=False)
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- fio and trace
def fio_args(dev: str, job: str, runtime: int, out: Path, numjobs: int = 1, size: int = 0,
             rate_mb: int | None = None) -> list[str]:
    j = JOBS[job]
    a = ["fio", f"--name={job}", f"--filename={dev}", f"--rw={j['rw']}", f"--bs={j['bs']}",
         f"--iodepth={j['iodepth']}", "--ioengine=libaio", "--direct=1", "--time_based",
         f"--runtime={runtime}", f"--numjobs={numjobs}", "--group_reporting",
         "--output-format=json", f"--output={out}"]
    if numjobs > 1:  # each job its own part of the device
        part = (size // numjobs) & ~((1 << 20) - 1)
        a += [f"--size={part}", f"--offset_increment={part}"]
    if rate_mb:  # total over the jobs
        a.append(f"--rate={int(rate_mb * MB / numjobs)}")
    return a


def fio_result(out: Path) -> dict:
    text = out.read_text()
    data = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    w = data["jobs"][0]["write"]
    return {"mb_s": w["bw_bytes"] / MB, "io_bytes": w["io_bytes"], "iops": w["iops"],
            "runtime_s": w["runtime"] / 1000, "lat_mean_us": w["lat_ns"]["mean"] / 1000}


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    return busy, busy + v[3] + v[4]


def busy_cores(t0: tuple[int, int]) -> float:
    t1 = cpu_ticks()
    return (os.cpu_count() or 1) * (t1[0] - t0[0]) / max(1, t1[1] - t0[1])


def _written(dev: int) -> int | None:
    """Bytes the block device dev (a dev_t) has completed writing (/sys stat, field 7 in
    sectors); None when it is not a block device (e.g. a tmpfs's)."""
    try:
        with open(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat") as f:
            return int(f.read().split()[6]) * 512
    except (OSError, IndexError, ValueError):
        return None


def disk_written(path: Path) -> int | None:
    """Bytes the block device holding path has completed writing."""
    return _written(os.stat(path).st_dev)


@dataclass
class Run:
    backing: str
    job: str
    phase: str             # untraced1 | traced | untraced2
    fio: dict | None = None
    stats: dict | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"backing": self.backing, "job": self.job, "phase": self.phase, "fio": self.fio,
                "trace_stats": self.stats, "error": self.error, **self.extra}


class Bench:
    def __init__(self, args, ws: Workspace):
        self.a = args
        self.ws = ws
        self.runs: list[Run] = []
        self.trace_error: str | None = None

    def fio(self, dev, backing, job, phase, numjobs=1, rate_mb=None) -> Run:
        out = self.ws.dir / f"fio-{backing}-{job}-{phase}.json"
        r = Run(backing, job, phase)
        d0, c0 = disk_written(self.ws.dir), cpu_ticks()
        p = sh(*fio_args(dev, job, self.a.runtime, out, numjobs, self.a.size_mb << 20, rate_mb), check=False,
               timeout=self.a.runtime * 10 + 120)
        if p.returncode != 0:
            r.error = f"fio exited {p.returncode}: {(p.stderr or p.stdout).strip()[-300:]}"
        else:
            r.fio = fio_result(out)
            self._disk_rate(r, d0)
            r.extra["busy_cores"] = busy_cores(c0)
        self.report(r)
        self.runs.append(r)
        return r

    def trace_cmd(self, dev: str, log: Path, stats: Path) -> list[str]:
        c = [*blkrewind_cmd(), "trace", "--device", dev, "--log", str(log), "--stats-json", str(stats)]
        if not self.a.baseline:
            c.append("--no-baseline")
        if self.a.ring_mb:
            c += ["--ring-mb", str(self.a.ring_mb)]
        return c

    def traced(self, dev, backing, job, phase="traced", numjobs=1, rate_mb=None) -> Run:
        r = Run(backing, job, phase)
        if self.trace_error:
            r.error = self.trace_error
            self.runs.append(r)
            return r
        out = self.ws.dir / f"fio-{backing}-{job}-{phase}.json"
        log, stats = self.ws.new_log(), self.ws.dir / f"stats-{backing}-{job}-{phase}.json"
        need = int(self.a.runtime * 3e9)  # a LOG grows at most at the write rate (~2-3 GB/s)
        if file_free_bytes(self.ws.log_parent) < need:
            say(f"warning: less than {need / 1e9:.0f} GB free under {self.ws.log_parent}: the LOG "
                f"may fill the file system (--log-dir elsewhere, or a shorter --runtime)")
        cmd = self.trace_cmd(dev, log, stats) + ["--"] + fio_args(
            dev, job, self.a.runtime, out, numjobs, self.a.size_mb << 20, rate_mb)
        t0 = time.monotonic()
        d0, c0 = disk_written(self.ws.dir), cpu_ticks()
        p = sh(*cmd, check=False, timeout=self.a.runtime * 10 + 300)
        r.extra["busy_cores"] = busy_cores(c0)  # over the tracer's whole run
        r.extra["trace_wall_s"] = round(time.monotonic() - t0, 3)
        if p.returncode != 0 or not out.exists():
            r.error = f"blkrewind trace exited {p.returncode}: {p.stderr.strip().splitlines()[-1:] or ''}"
        else:
            r.fio = fio_result(out)
            self._disk_rate(r, d0, r.extra["trace_wall_s"])
        if stats.exists():
            r.stats = json.loads(stats.read_text())
            if r.fio and r.stats:
                run_s = r.fio["runtime_s"] or 1
                r.extra["delivered_mb_s"] = r.stats.get("bytes", 0) / MB / run_s
                r.extra["captured_fraction"] = r.stats.get("bytes", 0) / max(1, r.fio["io_bytes"])
                r.extra["consumer_cpu_pct"] = 100 * r.stats.get("consumer_cpu_s", 0) / max(
                    1e-9, r.stats.get("wall_s", 0))
        log_bytes = sum(f.stat().st_size for f in log.glob("*") if f.is_file()) if log.exists() else 0
        r.extra["log_bytes"] = log_bytes
        shutil.rmtree(log, ignore_errors=True)
        self.report(r)
        self.runs.append(r)
        return r

    def _disk_rate(self, r: Run, d0: int | None, wall: float | None = None) -> None:
        """What the disk under the backing file wrote meanwhile (device and LOG writes, when
        they share it), per second of fio's runtime (of the tracer's wall time for a traced
        run: its LOG is flushed after fio ends)."""
        d1 = disk_written(self.ws.dir)
        if d0 is not None and d1 is not None and r.fio:
            r.extra["disk_written_bytes"] = d1 - d0
            r.extra["disk_mb_s"] = (d1 - d0) / MB / (wall or r.fio["runtime_s"] or 1)

    def probe_trace(self, dev: str) -> None:
        """One short traced `true`: if `blkrewind trace` cannot run, say so once, skip traced runs."""
        log, stats = self.ws.new_log(), self.ws.dir / "stats-probe.json"
        p = sh(*self.trace_cmd(dev, log, stats), "--", "true", check=False, timeout=300)
        shutil.rmtree(log, ignore_errors=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            self.trace_error = f"blkrewind trace does not work here yet: {last}"
            say(self.trace_error + " -- running the untraced runs only")

    @staticmethod
    def report(r: Run) -> None:
        if r.error:
            say(f"  {r.backing:6} {r.job:6} {r.phase:10} error: {r.error}")
            return
        assert r.fio is not None, "a run without an error has fio's result"
        s = f"  {r.backing:6} {r.job:6} {r.phase:10} {r.fio['mb_s']:9.1f} MB/s"
        if r.extra.get("disk_mb_s") is not None:
            s += f"  (disk wrote {r.extra['disk_mb_s']:7.1f} MB/s)"
        if r.stats:
            s += (f"  delivered {r.extra.get('delivered_mb_s', 0):8.1f} MB/s  drops {r.stats.get('drops')}"
                  f"  tracer CPU {r.extra.get('consumer_cpu_pct', 0):.0f}%")
        say(s)

    # ------------------------------------------------------------------ modes
    def overhead(self, devs: dict[str, str]) -> None:
        for backing, dev in devs.items():
            for job in self.a.jobs:
                self.fio(dev, backing, job, "untraced1")
                self.traced(dev, backing, job)
                self.fio(dev, backing, job, "untraced2")

    def rate(self, dev: str) -> None:
        for mb in self.a.rate_mb or [None]:
            at = f"@{mb}" if mb else ""
            self.fio(dev, "tmpfs", "seq1m", "rate-untraced" + at, numjobs=2, rate_mb=mb)
            self.traced(dev, "tmpfs", "seq1m", "rate-traced" + at, numjobs=2, rate_mb=mb)


# --------------------------------------------------------------------------- interleaved
def quiet(_msg: str) -> None:
    pass


def start_tracer(dev: str, log: Path, ring_mb: int, say_fn=quiet, dirtier: bool = False):
    """An in-process Tracer (tracer/session.py) of dev, no baseline, LOG in log."""
    sys.path.insert(0, str(ROOT))
    from blkrewind.tracer.session import TraceOptions, Tracer
    t = Tracer(TraceOptions(devices=[dev], log_dir=str(log), ring_bytes=ring_mb << 20,
                            baseline=False, dirtier=dirtier), say=say_fn)
    t.start()
    t.run_baseline(threading.Event())   # not used: baseline=False
    return t


def queue_prog(t) -> str:
    from blkrewind.tracer.capture import ATTACH
    where = t.capture.attached["queue"]
    return next(p for p, w in ATTACH["queue"] if w == where)


def device_written(dev: str) -> int:
    """Bytes the block device dev (a path) has completed writing."""
    n = _written(os.stat(dev).st_rdev)
    if n is None:
        raise RuntimeError(f"{dev}: no write counter in /sys")
    return n


def t95(n: int) -> float:
    """Two-sided 95 % Student t quantile for n - 1 degrees of freedom (n >= 2)."""
    table = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26,
             10: 2.23, 12: 2.18, 15: 2.13, 20: 2.09, 25: 2.06, 30: 2.04, 40: 2.02, 60: 2.00}
    df = max(1, n - 1)
    return table[max(k for k in table if k <= df)]


def drop_sealed_segments(log: Path, done: threading.Event) -> None:
    """Delete every LOG segment but the newest while a long run goes on: the tracer still
    writes every byte, but a LOG on a tmpfs (the stand-in for a second disk) must not fill
    the memory (seq 1 MiB writes ~2 GB/s of it)."""
    while not done.wait(0.2):
        segs = sorted(log.glob("*.brlog"))
        for f in segs[:-1]:
            f.unlink(missing_ok=True)


@contextmanager
def interleaved_tracer(ws: Workspace, dev: str, ring_mb: int, dirtier: bool = False):
    """An in-process tracer of dev for an interleaved run: kernel BPF stats on, resync and
    checkpoints stopped, sealed LOG segments deleted as it goes; stopped, its LOG removed,
    at the end."""
    from blkrewind.tracer import libbpf as L
    log = ws.new_log()
    stats_fd = L.enable_run_stats()
    t = start_tracer(dev, log, ring_mb, dirtier=dirtier)
    done = threading.Event()
    janitor = threading.Thread(target=drop_sealed_segments, args=(log, done), daemon=True)
    janitor.start()
    try:
        t.resync.stop(finish=False)
        yield t
    finally:
        t.stop()
        done.set()
        janitor.join()
        os.close(stats_fd)
        shutil.rmtree(log, ignore_errors=True)


def interleaved_run(a, ws: Workspace, dev: str, job: str, what: str, switch) -> dict:
    """One fio run of a.interleaved_runtime seconds under one in-process tracer (resync and
    checkpoints stopped); switch(tracer, on) turns `what` off and on every a.window seconds.
    Each window's throughput comes from the device's completed-write counter, its BPF cost
    from the kernel's BPF stats. Each "on" window is compared with the mean of the two "off"
    windows around it, so the drift of the disk (page cache, file system, neighbours)
    cancels: the mean on/off ratio and its 95 % confidence interval say what `what` costs,
    and whether that is measurable at all."""
    import statistics
    out = ws.dir / f"fio-{job}-interleaved.json"
    windows: list[dict] = []
    with interleaved_tracer(ws, dev, a.ring_mb) as t:
        cap = t.capture
        prog = queue_prog(t)
        p = subprocess.Popen(fio_args(dev, job, a.interleaved_runtime, out),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # fio ramps up
        on = False
        switch(t, on)
        t0, s0, (ns0, c0), b0 = time.monotonic(), device_written(dev), cap.prog_stats(prog), \
            cap.state().bios
        end = t0 + a.interleaved_runtime - 2.0
        while time.monotonic() + a.window <= end and p.poll() is None:
            time.sleep(a.window)
            t1, s1, (ns1, c1), b1 = time.monotonic(), device_written(dev), cap.prog_stats(prog), \
                cap.state().bios
            windows.append({"on": on, "seconds": t1 - t0,
                            "mb_s": (s1 - s0) / (t1 - t0) / MB,
                            "bpf_ns_per_run": (ns1 - ns0) / max(1, c1 - c0),
                            "bpf_ns_per_bio": (ns1 - ns0) / max(1, b1 - b0), "bios": b1 - b0})
            on = not on
            switch(t, on)
            t0, s0, ns0, c0, b0 = t1, s1, ns1, c1, b1
        p.wait(a.interleaved_runtime + 120)
        st = t.capture.state().as_dict()
    if p.returncode != 0:
        raise RuntimeError(f"fio: {(p.stderr.read() if p.stderr else '').strip()[-300:]}")
    ratios = [w["mb_s"] / ((windows[i - 1]["mb_s"] + windows[i + 1]["mb_s"]) / 2)
              for i, w in enumerate(windows[1:-1], 1)
              if w["on"] and windows[i - 1]["mb_s"] + windows[i + 1]["mb_s"] > 0]
    mean = statistics.mean(ratios)
    half = t95(len(ratios)) * statistics.stdev(ratios) / len(ratios) ** 0.5
    off = [w for w in windows if not w["on"]]
    on_ = [w for w in windows if w["on"]]
    r = {"job": job, "what": what, "pairs": len(ratios), "window_s": a.window, "ratio": mean,
         "ci95": [mean - half, mean + half],
         "off_mb_s": statistics.mean(w["mb_s"] for w in off),
         "on_mb_s": statistics.mean(w["mb_s"] for w in on_),
         "off_ns_bio": statistics.mean(w["bpf_ns_per_bio"] for w in off),
         "on_ns_bio": statistics.mean(w["bpf_ns_per_bio"] for w in on_),
         "off_ns_run": statistics.mean(w["bpf_ns_per_run"] for w in off),
         "on_ns_run": statistics.mean(w["bpf_ns_per_run"] for w in on_),
         "measurable": not (mean - half <= 1.0 <= mean + half),
         "drops": st["drops"], "dirty_races": st["dirty_races"], "windows": windows}
    say(f"  {job:6} interleaved, {what} off/on every {a.window} s: on/off {mean:.4f} (95 % CI "
        f"{mean - half:.4f}..{mean + half:.4f}, {len(ratios)} pairs), off {r['off_mb_s']:.1f} "
        f"MB/s, on {r['on_mb_s']:.1f} MB/s, BPF {r['off_ns_run']:.0f} -> {r['on_ns_run']:.0f} "
        f"ns/run, drops {st['drops']}")
    return r


# --------------------------------------------------------------------------- summary
def summarize(runs: list[Run]) -> list[dict]:
    """One row per (mode, backing, job): the untraced runs, their mean, the traced run, ratios."""
    by = {(r.backing, r.job, r.phase): r for r in runs}
    keys = []
    for r in runs:
        at = r.phase.partition("@")[2]
        k = ("rate" if r.phase.startswith("rate") else "overhead", r.backing, r.job, at)
        if k not in keys:
            keys.append(k)
    rows = []
    for mode, backing, job, at in keys:
        at = f"@{at}" if at else ""
        phases = ("rate-untraced" + at,) if mode == "rate" else ("untraced1", "untraced2")
        u = [by.get((backing, job, p)) for p in phases]
        t = by.get((backing, job, "rate-traced" + at if mode == "rate" else "traced"))
        um = [x.fio["mb_s"] for x in u if x and x.fio]
        mean = sum(um) / len(um) if um else None
        row = {"mode": mode, "backing": backing, "job": job + (" x2" if mode == "rate" else ""),
               "rate_mb": int(at[1:]) if at else None,
               "untraced1_mb_s": um[0] if um else None,
               "untraced2_mb_s": um[1] if len(um) > 1 else None,
               "untraced_mean_mb_s": mean,
               "traced_mb_s": t.fio["mb_s"] if t and t.fio else None,
               "disk_untraced_mb_s": _mean([x.extra.get("disk_mb_s") for x in u if x]),
               "disk_traced_mb_s": t.extra.get("disk_mb_s") if t else None,
               "busy_untraced": _mean([x.extra.get("busy_cores") for x in u if x]),
               "busy_traced": t.extra.get("busy_cores") if t else None}
        row["ratio"] = row["traced_mb_s"] / mean if row["traced_mb_s"] and mean else None
        if t and t.stats:
            row.update(delivered_mb_s=t.extra.get("delivered_mb_s"),
                       captured_fraction=t.extra.get("captured_fraction"),
                       drops=t.stats.get("drops"), drop_bytes=t.stats.get("drop_bytes"),
                       consumer_cpu_pct=t.extra.get("consumer_cpu_pct"),
                       records=t.stats.get("records"), log_bytes=t.extra.get("log_bytes"))
        if t and t.error:
            row["traced_error"] = t.error
        rows.append(row)
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def job_label(row: dict) -> str:
    return row["job"] + (f" @{row['rate_mb']}" if row.get("rate_mb") else "")


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        width = int("".join(ch for ch in fmt.split(".")[0] if ch.isdigit()) or 0)
        return "-".rjust(width) if v is None else format(v, fmt)
    head = (f"{'mode':8} {'backing':7} {'job':15} {'untraced1':>9} {'untraced2':>9} {'mean':>9} "
            f"{'disk:unt':>9} {'disk:trc':>9} "
            f"{'traced':>9} {'ratio':>6} {'delivered':>9} {'captured':>8} {'drops':>8} {'CPU%':>5} "
            f"{'cores:u':>7} {'cores:t':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['mode']:8} {r['backing']:7} {job_label(r):15} {f(r['untraced1_mb_s'], '9.1f')} "
            f"{f(r['untraced2_mb_s'], '9.1f')} {f(r['untraced_mean_mb_s'], '9.1f')} "
            f"{f(r.get('disk_untraced_mb_s'), '9.1f')} {f(r.get('disk_traced_mb_s'), '9.1f')} "
            f"{f(r['traced_mb_s'], '9.1f')} {f(r['ratio'], '6.2f')} {f(r.get('delivered_mb_s'), '9.1f')} "
            f"{f(None if r.get('captured_fraction') is None else 100 * r['captured_fraction'], '7.1f')}"
            f"{'%' if r.get('captured_fraction') is not None else ' '} {f(r.get('drops'), '8d')} "
            f"{f(r.get('consumer_cpu_pct'), '5.0f')} {f(r.get('busy_untraced'), '7.2f')} "
            f"{f(r.get('busy_traced'), '7.2f')}{' *' if r.get('drops') else ''}")
    lines.append("MB/s of fio (10^6 B/s); ratio = traced / mean untraced; delivered = payload MB/s "
                 "captured into the LOG during the fio run; captured = captured payload / bytes fio "
                 "wrote; drops = records lost; CPU% = tracer process CPU / its wall time (100 = "
                 "one core). The copy into the ring buffer is paid by fio's own thread. "
                 "disk:unt / disk:trc = MB/s the disk under the backing file (and the LOG, "
                 "unless --log-dir puts it elsewhere) wrote during the untraced / traced runs: "
                 "when they are about equal, the disk's write rate is the limit and tracing "
                 "shares it with the LOG (every byte is written twice). cores:u / cores:t = "
                 "busy cores of the whole machine during the untraced fio run / the traced "
                 "run (its start and stop included).")
    if any(r.get("drops") for r in rows):
        lines.append("* records were dropped (ring buffer full): fio did not pay for copying them, so "
                     "this ratio understates the cost of capturing every write; see captured.")
    return "\n".join(lines)


def machine() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = sh("git", "-C", ROOT, "rev-parse", "--short", "HEAD", check=False).stdout.strip()
    dirty = bool(sh("git", "-C", ROOT, "status", "--porcelain", check=False).stdout.strip())
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu,
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "fio": sh("fio", "--version", check=False).stdout.strip(),
            "commit": commit + ("+dirty" if dirty else "")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--mode", choices=["overhead", "interleaved", "rate", "all"],
                    default="overhead")
    ap.add_argument("--runtime", type=int, default=8, help="seconds per fio run (8)")
    ap.add_argument("--size-mb", type=int, default=1024, help="size of each loop device (1024)")
    ap.add_argument("--backing", choices=["disk", "tmpfs", "both"], default="both",
                    help="overhead mode: which loop devices (both)")
    ap.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS))
    ap.add_argument("--log-dir", type=Path, help="where the LOGs go (default: next to the disk "
                    "backing file, under /var/tmp/blkrewind-bench)")
    ap.add_argument("--rate-mb", type=int, nargs="+", help="rate mode: cap fio at this many "
                    "MB/s in total; several values: one untraced and one traced run each "
                    "(default: as fast as it goes)")
    ap.add_argument("--ring-mb", type=int, help="pass --ring-mb to blkrewind trace "
                    "(interleaved: the tracer's ring, default 128)")
    ap.add_argument("--interleaved-runtime", type=int, default=60,
                    help="interleaved: seconds of the fio run per job (60)")
    ap.add_argument("--window", type=float, default=0.5,
                    help="interleaved: seconds per setting (0.5)")
    ap.add_argument("--baseline", action="store_true", help="let the tracer read the baseline "
                    "(by default --no-baseline: fio starts at once)")
    ap.add_argument("--no-trace", action="store_true", help="untraced runs only")
    ap.add_argument("--out", type=Path, help="result JSON (default bench/results/capture-<date>.json)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        say("bench_capture: must run as root (loop devices, tmpfs, BPF)")
        return 2
    for tool in ("fio", "losetup"):
        if not shutil.which(tool):
            say(f"bench_capture: {tool} is missing (./bootstrap.sh installs it)")
            return 2
    if a.log_dir:
        a.log_dir.mkdir(parents=True, exist_ok=True)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)  # unwinds through the finally below
    signal.signal(signal.SIGTERM, on_term)

    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ws = Workspace(a.log_dir)
    bench = Bench(a, ws)
    inter: list[dict] = []
    try:
        size = a.size_mb << 20
        devs: dict[str, str] = {}
        if a.mode == "interleaved" or a.mode in ("overhead", "all") and a.backing in ("disk", "both"):
            say(f"setting up: {a.size_mb} MiB fully allocated file on {ws.dir} (direct I/O loop)")
            devs["disk"] = ws.disk_loop(size)
        if a.mode in ("rate", "all") or a.mode != "interleaved" and a.backing in ("tmpfs", "both"):
            say(f"setting up: {a.size_mb} MiB file on a tmpfs (loop)")
            devs["tmpfs"] = ws.tmpfs_loop(size)
        if a.mode == "interleaved":
            a.ring_mb = a.ring_mb or 128
            say(f"interleaved: one fio run of {a.interleaved_runtime} s per job, capture of "
                f"{devs['disk']} switched every {a.window} s; LOG under {ws.log_parent}")

            def capture(t, on: bool) -> None:
                t.capture.set_traced(t.devs[0].kdev, on)
            for job in a.jobs:
                inter.append(interleaved_run(a, ws, devs["disk"], job, "capture", capture))
        elif a.no_trace:
            bench.trace_error = "not traced (--no-trace)"
        else:
            bench.probe_trace(next(iter(devs.values())))
        if a.mode != "interleaved":
            say(f"fio, {a.runtime} s per run: {', '.join(f'{k} {v}' for k, v in devs.items())}")
        if a.mode in ("overhead", "all"):
            bench.overhead({k: v for k, v in devs.items() if a.backing in (k, "both")})
        if a.mode in ("rate", "all"):
            bench.rate(devs["tmpfs"])
    finally:
        ws.close()
    rows = summarize(bench.runs)
    result = {"started": started, "machine": machine(), "args": {k: str(v) for k, v in vars(a).items()},
              "trace_error": bench.trace_error, "summary": rows, "interleaved": inter,
              "runs": [r.as_dict() for r in bench.runs]}
    out = a.out or RESULTS / f"capture-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if rows:
        print(table(rows))
    if inter:
        print("| job | LOG | pairs | capture off | on | on/off | 95 % CI | BPF ns/run off | on |"
              " drops |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in inter:
            print(f"| {r['job']} | {ws.log_parent} | {r['pairs']} x {r['window_s']} s | "
                  f"{r['off_mb_s']:.1f} MB/s | {r['on_mb_s']:.1f} MB/s | **{r['ratio']:.3f}** | "
                  f"{r['ci95'][0]:.3f}..{r['ci95'][1]:.3f} | {r['off_ns_run']:.0f} | "
                  f"{r['on_ns_run']:.0f} | {r['drops']} |")
    if bench.trace_error:
        print(f"traced runs: {bench.trace_error}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
