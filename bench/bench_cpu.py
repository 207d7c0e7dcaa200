#!/usr/bin/env python3
"""CPU per write of the capture: the rows of issue 14's table in one run, for one or more
checkouts side by side.

Wall-clock ratios need a quiet machine; CPU per write / per byte of the tracer's own threads and
the kernel's BPF stats do not. So this bench measures those, by accounting:

  tracer CPU per 4 KiB write   user + kernel time of the tracer's threads (/proc/self/task/*/stat
                               of a tracer process doing nothing else), per write fio completed
  BPF per captured bio         run_time_ns of every attached program (kernel BPF stats,
                               BPF_ENABLE_STATS) over the bios the capture counted
  context switches per write   fio's own (its JSON "ctx") + the tracer's threads' voluntary and
                               nonvoluntary switches, per write; untraced: fio's alone. Also
                               the system-wide /proc/stat ctxt per write (noisy on a shared box)
  tracer CPU-s per GB          the tracer's threads at seq 1 MiB writes (fio --rate-mb, below the
                               drop-free rate), per GB of payload captured
  IOPS ratio                   traced / untraced 4 KiB runs of the same round (wall clock: noisy;
                               both capped at --rate-iops, so 1.0 means it kept up)

The device is a loop device over a file on a tmpfs (fast, no disk), the LOG a directory on
/dev/shm (standing in for a second fast disk; sealed segments are deleted as the run goes, as
shipping would). fio writes O_DIRECT with libaio (bench_capture's jobs). Each --tree is a
checkout of blkrewind with a built BPF object (bpf/build/blkrewind.bpf.o); its tracer runs in a
child process that imports that checkout (so two commits compare in one run). Per round: an
untraced 4 KiB run, then for each tree in turn a traced 4 KiB and a traced 1 MiB run; rounds
alternate the trees' order.

usage: sudo .venv/bin/python bench/bench_cpu.py [--tree DIR ...] [--rounds 3] [--runtime 6]
       [--rate-iops 50000] [--rate-mb 400] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHM = Path("/dev/shm")
CLK = os.sysconf("SC_CLK_TCK")
MB = 1e6


# ------------------------------------------------------------------------- the child (tracer)
def _task_stats() -> dict[int, tuple[float, int]]:
    """tid -> (user + system CPU seconds, context switches) of this process's threads."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/status") as f:
                ctx = sum(int(line.split()[1]) for line in f
                          if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(tid)] = ((int(st[11]) + int(st[12])) / CLK, ctx)
    return out


def child(log_dir: str, dev: str, log_mode: str = "", options: dict | None = None) -> int:
    """Run a Tracer of dev (imported from the checkout on sys.path[0]); on stdin, "start"
    snapshots the counters, "stop" prints their deltas as one JSON line, "quit" ends.
    options: TraceOptions fields to set (e.g. wake_bytes)."""
    from blkrewind import tracer
    from blkrewind.tracer import libbpf as L
    from blkrewind.tracer.capture import ATTACH
    from blkrewind.tracer.session import TraceOptions, Tracer
    stats_fd = L.enable_run_stats()
    opts = TraceOptions(devices=[dev], log_dir=log_dir, ring_bytes=128 << 20, baseline=False)
    if log_mode:
        if not hasattr(opts, "log_mode"):
            raise SystemExit(f"{tracer.__file__}: this checkout has no log_mode")
        opts.log_mode = log_mode
    for k, v in (options or {}).items():
        if not hasattr(opts, k):
            raise SystemExit(f"{tracer.__file__}: this checkout's TraceOptions has no {k}")
        setattr(opts, k, type(getattr(opts, k))(v))
    t = Tracer(opts, say=lambda m: None)
    t.start()
    t.run_baseline(threading.Event())
    rs, cap = t.resync, t.capture
    if rs is None or cap is None:
        raise SystemExit("the tracer started without its capture")
    rs.stop(finish=False)
    progs = [next(p for p, w in ATTACH[what] if w == where)
             for what, where in cap.attached.items()]
    done = threading.Event()

    from blkrewind.tracer import log as tlog
    retire = getattr(tlog, "retire_segment", None)  # recycling, where the checkout has it
    if os.environ.get("BENCH_CPU_NO_RECYCLE"):
        retire = None

    def janitor() -> None:  # a tmpfs LOG must not fill the memory: as if shipped, acked
        while not done.wait(0.2):
            for f in sorted(Path(log_dir).glob("*.brlog"))[:-1]:
                try:
                    retire(f) if retire else f.unlink()
                except FileNotFoundError:
                    pass

    jt = threading.Thread(target=janitor, daemon=True)
    jt.start()
    skip = {threading.get_native_id(), jt.native_id}  # this thread reads stdin, the janitor

    def snap() -> dict:
        st = cap.state()
        return {"tasks": _task_stats(), "bpf": {p: cap.prog_stats(p) for p in progs},
                "bios": st.bios, "bytes": st.bytes, "drops": st.drops}

    print(json.dumps({"ready": True, "tracer": tracer.__file__, "progs": progs}), flush=True)
    s0: dict | None = None
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "start":
                s0 = snap()
                print(json.dumps({"ok": True}), flush=True)
            elif cmd == "stop":
                if s0 is None:
                    raise SystemExit("bench_cpu child: stop before start")
                t.wait_collected(30)
                s1 = snap()
                names = {th.native_id: th.name for th in threading.enumerate()}
                threads: dict = {}
                for tid, (cpu, ctx) in s1["tasks"].items():
                    if tid in skip:
                        continue
                    c0, x0 = s0["tasks"].get(tid, (0.0, 0))
                    name = names.get(tid, "main" if tid == os.getpid() else "other")
                    name = name.split("_")[0] if name.startswith("encoder") else name
                    a = threads.setdefault(name, [0.0, 0])
                    a[0] += cpu - c0
                    a[1] += ctx - x0
                bpf = {p: [s1["bpf"][p][0] - s0["bpf"][p][0], s1["bpf"][p][1] - s0["bpf"][p][1]]
                       for p in progs}
                print(json.dumps({"threads": threads, "bpf": bpf,
                                  **{k: s1[k] - s0[k] for k in ("bios", "bytes", "drops")}}),
                      flush=True)
            elif cmd == "quit":
                break
    finally:
        done.set()
        t.stop()
        os.close(stats_fd)
    return 0


# ------------------------------------------------------------------------- the parent
class Tree(str):
    """A --tree spec; name: its directory's name and mode (a mode may hold a '/')."""

    @property
    def name(self) -> str:
        path, sep, mode = self.partition(":")
        return Path(path).name + sep + mode


def proc_ctxt() -> int:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("ctxt "):
                return int(line.split()[1])
    return 0


def make_zram_fs(work: Path, size_mb: int = 2048) -> tuple[int, Path]:
    """ext4 on a new zram device, mounted under work: (zram id, mount point)."""
    n = int(Path("/sys/class/zram-control/hot_add").read_text())
    mnt = work / "zram"
    try:
        Path(f"/sys/block/zram{n}/disksize").write_text(f"{size_mb}M")
        subprocess.run(["mkfs.ext4", "-q", "-F", f"/dev/zram{n}"], check=True)
        mnt.mkdir()
        subprocess.run(["mount", f"/dev/zram{n}", str(mnt)], check=True)
    except BaseException:
        drop_zram(n, mnt)
        raise
    return n, mnt


def drop_zram(n: int, mnt: Path) -> None:
    subprocess.run(["umount", str(mnt)], capture_output=True)
    try:
        Path("/sys/class/zram-control/hot_remove").write_text(str(n))
    except OSError as e:
        print(f"bench_cpu: cannot remove zram{n}: {e}", file=sys.stderr)


def parse_mode(spec: str) -> tuple[str, dict]:
    """LOG_MODE[/norecycle][,OPTION=VALUE...] -> (LOG_MODE[/norecycle], TraceOptions fields)"""
    mode, *rest = spec.split(",")
    opts = {}
    for kv in rest:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"bench_cpu: {kv!r}: not OPTION=VALUE")
        opts[k] = v
    return mode, opts


class Child:
    def __init__(self, tree: Path, dev: str, log_dir: Path, log_mode: str = ""):
        log_mode, options = parse_mode(log_mode)
        py = tree / ".venv" / "bin" / "python"
        py = py if py.exists() else Path(sys.executable)
        code = (f"import sys; sys.path.insert(0, {str(tree)!r}); sys.path.insert(1, {str(HERE)!r});"
                f" import bench_cpu; sys.exit(bench_cpu.child({str(log_dir)!r}, {dev!r}, "
                f"{log_mode.split('/')[0]!r}, {options!r}))")
        env = {**os.environ, "BLKREWIND_BPF_OBJECT": str(tree / "bpf/build/blkrewind.bpf.o")}
        if log_mode.endswith("/norecycle"):
            log_mode = log_mode[:-len("/norecycle")]
            env["BENCH_CPU_NO_RECYCLE"] = "1"
        self.p = subprocess.Popen([str(py), "-c", code], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env, cwd=str(tree))
        if self.p.stdin is None or self.p.stdout is None:
            raise RuntimeError("the tracer child has no pipes")
        self.stdin, self.stdout = self.p.stdin, self.p.stdout
        self.hello = self._read()
        if not str(self.hello.get("tracer", "")).startswith(str(tree)):
            raise RuntimeError(f"the child imported {self.hello.get('tracer')}, not {tree}")

    def _read(self) -> dict:
        line = self.stdout.readline()
        if not line:
            raise RuntimeError(f"tracer child exited ({self.p.wait()})")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.stdin.write(cmd + "\n")
        self.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.stdin.write("quit\n")
                self.stdin.close()
                self.p.wait(60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()


def fio_run(dev: str, job: str, runtime: int, out: Path, rate_mb: int | None,
            rate_iops: int | None = None) -> dict:
    from bench_capture import fio_args
    c0, t0 = proc_ctxt(), time.monotonic()
    args = fio_args(dev, job, runtime, out, rate_mb=rate_mb)
    if rate_iops:
        args.append(f"--rate_iops={rate_iops}")
    subprocess.run(args, capture_output=True, check=True)
    wall = time.monotonic() - t0
    text = out.read_text()
    j = json.loads(text[text.index("{"):])["jobs"][0]
    w = j["write"]
    return {"writes": w["total_ios"], "bytes": w["io_bytes"], "iops": w["iops"],
            "fio_ctx": j["ctx"], "sys_ctx": proc_ctxt() - c0, "wall": wall}


def traced(child: Child, dev: str, job: str, a, out: Path) -> dict:
    child.ask("start")
    f = fio_run(dev, job, a.runtime, out, a.rate_mb if job == "seq1m" else None,
                a.rate_iops if job == "rand4k" else None)
    c = child.ask("stop")
    cpu = sum(v[0] for v in c["threads"].values())
    ctx = sum(v[1] for v in c["threads"].values())
    bpf_ns = sum(v[0] for v in c["bpf"].values())
    r = {"job": job, **f, "tracer_cpu_s": cpu, "tracer_ctx": ctx,
         "threads": c["threads"], "bpf": c["bpf"], "bios": c["bios"], "captured": c["bytes"],
         "drops": c["drops"],
         # per write captured (its payload reached the ring): a dropped write costs the
         # tracer nothing and must not flatter the figure
         "captured_writes": c["bytes"] / (f["bytes"] / max(1, f["writes"])),
         "cpu_us_per_write": cpu / max(1, c["bytes"] / (f["bytes"] / max(1, f["writes"]))) * 1e6,
         "bpf_us_per_bio": bpf_ns / max(1, c["bios"]) / 1e3,
         "ctx_per_write": (f["fio_ctx"] + ctx) / max(1, f["writes"]),
         "sys_ctx_per_write": f["sys_ctx"] / max(1, f["writes"]),
         "cpu_s_per_gb": cpu / max(1, c["bytes"]) * 1e9}
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__)
    ap.add_argument("--tree", action="append",
                    help="DIR[:LOG_MODE[/norecycle][,OPTION=VALUE...]]: a blkrewind checkout "
                         "with a built BPF object, and the tracer's log_mode (buffered, "
                         "prealloc, direct; empty: the checkout's; /norecycle: sealed segments "
                         "are deleted, not retired as spares) and TraceOptions fields (e.g. "
                         "DIR:,wake_bytes=1048576) -- repeat to compare (default: this "
                         "checkout)")
    ap.add_argument("--log-fs", choices=["shm", "zram", "disk"], default="shm",
                    help="the LOG's file system: a directory on /dev/shm (tmpfs), ext4 on "
                         "a zram device (a block device in memory: O_DIRECT means what it "
                         "does on a second disk), or a directory next to the bench's work "
                         "area under /var/tmp (the machine's disk, shared with everything "
                         "else on it) (shm)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=6, help="seconds per fio run (6)")
    ap.add_argument("--rate-iops", type=int, default=50000,
                    help="rand 4 KiB runs (traced and untraced) are capped at this many writes "
                         "a second, below the drop-free rate: a dropped write costs the tracer "
                         "nothing and would flatter the per-write figures (50000)")
    ap.add_argument("--rate-mb", type=int, default=400,
                    help="seq 1 MiB runs are capped at this many MB/s, below the drop-free "
                         "rate, so CPU per GB counts every byte (600)")
    ap.add_argument("--size-mb", type=int, default=1024, help="the loop device (1024)")
    ap.add_argument("--json", type=Path, help="write every run as JSON here")
    ap.add_argument("--no-recycle", action="store_true",
                    help="delete sealed segments instead of retiring them as spares")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_cpu: run as root", file=sys.stderr)
        return 2
    variants = []
    for spec in a.tree or [str(ROOT)]:
        path, _, mode = spec.partition(":")
        variants.append((Path(path).resolve(), mode))
    trees = [Tree(f"{p}:{m}" if m else str(p)) for p, m in variants]
    if a.no_recycle:
        os.environ["BENCH_CPU_NO_RECYCLE"] = "1"
    for t, _ in variants:
        if not (t / "bpf/build/blkrewind.bpf.o").exists():
            print(f"bench_cpu: {t} has no BPF object (python bpf/build.py there)", file=sys.stderr)
            return 2
    sys.path.insert(0, str(HERE))
    from bench_capture import Workspace
    ws = Workspace(None)
    runs: list[dict] = []
    zram = None
    if a.log_fs == "zram":
        zram, logs = make_zram_fs(ws.dir)
    elif a.log_fs == "disk":
        logs = Path(tempfile.mkdtemp(prefix="blkrewind-cpu-", dir=ws.dir))
    else:
        logs = Path(tempfile.mkdtemp(prefix="blkrewind-cpu-", dir=SHM))
    try:
        dev = ws.tmpfs_loop(a.size_mb << 20)
        with open("/proc/loadavg") as f:
            load0 = f.read().split()[:3]
        for rnd in range(a.rounds):
            u = fio_run(dev, "rand4k", a.runtime, ws.dir / "fio.json", None, a.rate_iops)
            u.update(job="rand4k", tree="untraced", round=rnd,
                     ctx_per_write=u["fio_ctx"] / max(1, u["writes"]),
                     sys_ctx_per_write=u["sys_ctx"] / max(1, u["writes"]))
            runs.append(u)
            print(f"round {rnd + 1} untraced rand4k {u['iops']:.0f} IOPS", file=sys.stderr)
            order = trees if rnd % 2 == 0 else trees[::-1]
            for i, tree in enumerate(order):
                log = logs / f"log-{rnd}-{i}"
                path, mode = variants[trees.index(tree)]
                ch = Child(path, dev, log, mode)
                try:
                    for job in ("rand4k", "seq1m"):
                        r = traced(ch, dev, job, a, ws.dir / "fio.json")
                        r.update(tree=str(tree), round=rnd)
                        if job == "rand4k":
                            r["iops_ratio"] = r["iops"] / max(1, u["iops"])
                        runs.append(r)
                        print(f"round {rnd + 1} {tree.name:12} {job}: {r['iops']:.0f} IOPS, "
                              f"tracer {r['cpu_us_per_write']:.2f} us/write "
                              f"{r['cpu_s_per_gb']:.3f} CPU-s/GB, BPF "
                              f"{r['bpf_us_per_bio']:.2f} us/bio, ctx "
                              f"{r['ctx_per_write']:.2f}/write, drops {r['drops']}",
                              file=sys.stderr)
                finally:
                    ch.close()
                    shutil.rmtree(log, ignore_errors=True)
        with open("/proc/loadavg") as f:
            load1 = f.read().split()[:3]
    finally:
        shutil.rmtree(logs, ignore_errors=True)
        if zram is not None:
            drop_zram(zram, logs)
        ws.close()
    if a.json:
        a.json.write_text(json.dumps({"runs": runs, "load": [load0, load1]}, indent=1))
    print(report(runs, trees, load0, load1))
    return 0


def _rng(xs, fmt="{:.2f}") -> str:
    xs = sorted(xs)
    if not xs:
        return "-"
    lo, hi = fmt.format(xs[0]), fmt.format(xs[-1])
    med = fmt.format(statistics.median(xs))
    return med if lo == hi else f"{med} ({lo}-{hi})"


def report(runs: list[dict], trees: list[Tree], load0, load1) -> str:
    unt = [r for r in runs if r["tree"] == "untraced"]
    lines = [f"load average {' '.join(load0)} at the start, {' '.join(load1)} at the end; "
             f"median (min-max) of {len(unt)} rounds", "",
             "| measure | " + " | ".join(t.name for t in trees) + " |",
             "|---|" + "---|" * len(trees)]

    def row(label, job, key, fmt="{:.2f}"):
        cells = [_rng([r[key] for r in runs if r["tree"] == str(t) and r["job"] == job], fmt)
                 for t in trees]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("tracer CPU per 4 KiB write, us", "rand4k", "cpu_us_per_write")
    for name in sorted({n for r in runs if r["job"] == "rand4k" and "threads" in r
                        for n in r["threads"]}):
        cells = [_rng([r["threads"].get(name, [0, 0])[0] / max(1, r["captured_writes"]) * 1e6
                       for r in runs if r["tree"] == str(t) and r["job"] == "rand4k"])
                 for t in trees]
        lines.append(f"| ... {name} thread | " + " | ".join(cells) + " |")
    for name in sorted({n for r in runs if r["job"] == "rand4k" and "threads" in r
                        for n in r["threads"]}):
        cells = [_rng([r["threads"].get(name, [0, 0])[1] / max(1, r["writes"])
                       for r in runs if r["tree"] == str(t) and r["job"] == "rand4k"], "{:.3f}")
                 for t in trees]
        lines.append(f"| context switches per write, {name} thread | " + " | ".join(cells)
                     + " |")
    row("BPF programs per captured 4 KiB bio, us", "rand4k", "bpf_us_per_bio")
    for prog in sorted({p for r in runs if r["job"] == "rand4k" and "bpf" in r
                        for p in r["bpf"]}):
        cells = [_rng([r["bpf"][prog][0] / max(1, r["bpf"][prog][1]) / 1e3
                       for r in runs if r["tree"] == str(t) and r["job"] == "rand4k"
                       and prog in r["bpf"]], "{:.3f}") + " / " +
                 _rng([r["bpf"][prog][1] / max(1, r["bios"])
                       for r in runs if r["tree"] == str(t) and r["job"] == "rand4k"
                       and prog in r["bpf"]])
                 for t in trees]
        lines.append(f"| ... {prog}: us per run / runs per captured bio | "
                     + " | ".join(cells) + " |")
    row("context switches per write (fio + tracer)", "rand4k", "ctx_per_write")
    row("... system-wide (/proc/stat ctxt)", "rand4k", "sys_ctx_per_write")
    row("rand 4 KiB IOPS traced / untraced (wall clock)", "rand4k", "iops_ratio")
    row("rand 4 KiB IOPS traced", "rand4k", "iops", "{:.0f}")
    row("tracer CPU-s per GB, seq 1 MiB", "seq1m", "cpu_s_per_gb", "{:.3f}")
    row("BPF programs per captured 1 MiB bio, us", "seq1m", "bpf_us_per_bio", "{:.0f}")
    row("rand 4 KiB drops", "rand4k", "drops", "{:.0f}")
    row("seq 1 MiB drops", "seq1m", "drops", "{:.0f}")
    lines.append(f"| untraced: ctx per write (fio) / system-wide / IOPS | "
                 f"{_rng([r['ctx_per_write'] for r in unt])} / "
                 f"{_rng([r['sys_ctx_per_write'] for r in unt])} / "
                 f"{_rng([r['iops'] for r in unt], '{:.0f}')} |" + " |" * (len(trees) - 1))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
