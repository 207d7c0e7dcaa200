"""Benchmark of the replayer's store: ingest MB/s and restore MB/s against dd.

    .venv/bin/python bench/bench_store.py [--dir DIR] [--device-mib 1024] [--writes-mib 1024]
                                          [--jobs 2] [--rounds 3] [--cold] [--before TREE]

1. Builds a synthetic LOG with tracer.log.LogWriter: a device of --device-mib
   whose baseline is random data in 1 MiB chunks, then --writes-mib of random
   writes (--write-kib: 4 KiB .. 1 MiB, 64 KiB pieces, random 4 KiB-aligned
   offsets, overlapping) --
   about 2 GiB of payload with the defaults, in frames of ~4 MiB and segments
   of 64 MiB, as the tracer writes them.
2. `blkrewind ingest` of that LOG (--cold: drop the page cache first, so the
   LOG is read from disk): payload MB/s, CPU seconds.
3. `blkrewind restore --at latest --to` an image in DIR: MB/s of device size
   (wall time of the command, start-up included), alternating --rounds times
   with `dd if=/dev/zero of=DIR/dd.img bs=1M count=<device MiB> conv=fsync`
   (the same bytes to the same kind of target); medians and their ratio.
   --before TREE: that checkout's restore too, in turns with this one's (who goes
   first alternates), from the same store; wall time and CPU of each, medians.

Everything is made under --dir (default: a new directory in $TMPDIR or /tmp,
and removed at the end unless --keep).
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from blkrewind.formats import record  # noqa: E402
from blkrewind.tracer.log import LogWriter  # noqa: E402

SPAN = 4 << 20
DEV = record.kdev(7, 99)
REAL0 = 1_764_000_000 * 10**9


def make_log(log_dir: str, device_bytes: int, write_bytes: int, seed: int = 1,
             write_kib=(4, 4, 8, 16, 64, 128, 256, 512, 1024), *,
             session: str = "20261125T120000Z-bench001", host: str = "bench", dev: int = DEV,
             baseline_bytes: int | None = None, data=None, compression_level: int = 0) -> dict:
    """A valid session in a LOG, as the tracer writes it: a baseline of `baseline_bytes`
    (default: the whole device) in 1 MiB chunks, then `write_bytes` of writes of `write_kib`
    sizes in MAX_PIECE pieces, in ~4 MiB frames. data(rng, n) gives the payload (default:
    random bytes). Also used by bench_ship.py."""
    rng = random.Random(seed)
    if data is None:
        pool = os.urandom(96 << 20)

        def data(rng, n: int) -> memoryview:
            off = rng.randrange(0, len(pool) - n)
            return memoryview(pool)[off:off + n]
    if baseline_bytes is None:
        baseline_bytes = device_bytes
    w = LogWriter(log_dir, session, host=host, segment_bytes=64 << 20, fsync="never",
                  compression_level=compression_level)
    mono = 10**12
    stamp = REAL0
    seq = useq = 0
    span: list[bytes] = []
    size = 0
    payload = 0

    def emit(rec: bytes) -> None:
        nonlocal size
        span.append(rec)
        size += len(rec)
        if size >= SPAN:
            flush()

    def flush() -> None:
        nonlocal size, mono, span
        if span:
            mono += 1_000_000
            w.append(b"".join(span), len(span), mono, mono + REAL0 - 10**12)
            span, size = [], 0

    def json_rec(rtype, obj, **kw):
        nonlocal useq
        useq += 1
        emit(record.json_record(rtype, obj, seq=useq, **kw))

    json_rec(record.R_SESSION, {"session": session, "host": host,
                                "stamp_base": stamp, "seq_base": 1, "version": "bench"})
    json_rec(record.R_DEVICE, {"name": "bench0", "path": "/dev/bench0", "dev": dev,
                               "size_bytes": device_bytes, "host": host}, dev=dev)
    chunk = 1 << 20
    for off in range(0, baseline_bytes, chunk):
        useq += 1
        n = min(chunk, baseline_bytes - off)
        emit(record.make_record(data(rng, n), rtype=record.R_BASE, seq=useq, dev=dev,
                                sector=off // 512, bio_size=n, aux=useq, ktime_ns=mono))
        payload += n
    seq += 1
    emit(record.make_record(f'{{"dev": {dev}, "what": "baseline_end"}}'.encode(),
                            rtype=record.R_POINT, stamp=stamp, seq=seq, ktime_ns=mono))
    stamp += 1
    done = 0
    while done < write_bytes:
        n = 1024 * rng.choice(write_kib)
        off = 4096 * rng.randrange(0, (device_bytes - n) // 4096)
        d = data(rng, n)
        pos = 0
        while pos < n:
            ln = min(record.MAX_PIECE, n - pos)
            seq += 1
            fl = (record.F_FIRST if pos == 0 else 0) | (record.F_LAST if pos + ln == n else 0)
            emit(record.make_record(d[pos:pos + ln], rtype=record.R_BIO, stamp=stamp, seq=seq,
                                    ktime_ns=mono, sector=off // 512, dev=dev, bio_size=n,
                                    offset=pos, flags=fl, op=record.OP_WRITE, tgid=1, tid=1,
                                    comm=b"bench"))
            pos += ln
        stamp += 1
        done += n
        payload += n
    json_rec(record.R_END, {"end_stamp": stamp, "end_seq": seq, "clean": True})
    flush()
    w.close()
    return {"payload": payload, "log_bytes": w.bytes_written, "bios": stamp - REAL0 - 1}


def cli(*args, env=None, tree: str = ROOT) -> tuple[float, float, str]:
    """Run blkrewind of checkout tree; (wall seconds, CPU seconds of the child, stderr+stdout)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "blkrewind.cli", *map(str, args)], cwd=tree,
                       capture_output=True, text=True,
                       env=None if env is None else {**os.environ, **env})
    dt = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"blkrewind {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt, cpu, p.stdout + p.stderr


def drop_caches() -> None:
    subprocess.run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        print(f"(cannot drop caches: {e.strerror})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--device-mib", type=int, default=1024)
    ap.add_argument("--writes-mib", type=int, default=1024)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before ingest/restore")
    ap.add_argument("--rounds", type=int, default=3, help="restore and dd runs, alternating")
    ap.add_argument("--write-kib", default="4,4,8,16,64,128,256,512,1024",
                    help="sizes of the writes to pick from, KiB (multiples of 4)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--before", metavar="TREE",
                    help="another checkout (e.g. git archive COMMIT | tar -x -C DIR) whose "
                         "restore runs in turns with this one's, from the same store")
    ap.add_argument("--randomness-ab", action="store_true",
                    help="only ingest, --rounds times each with and without the per-write "
                         "randomness (replayer/entropy.py), alternating: its cost")
    a = ap.parse_args()
    base = a.dir or tempfile.mkdtemp(prefix="bench-store-")
    os.makedirs(base, exist_ok=True)
    log, store = os.path.join(base, "log"), os.path.join(base, "store")
    img, ddimg = os.path.join(base, "restored.img"), os.path.join(base, "dd.img")
    try:
        t0 = time.monotonic()
        info = make_log(log, a.device_mib << 20, a.writes_mib << 20,
                        write_kib=[int(x) for x in a.write_kib.split(",")])
        print(f"LOG: {info['payload'] / 2**30:.2f} GiB payload, {info['bios']} bios, "
              f"{info['log_bytes'] / 2**30:.2f} GiB of segments, made in "
              f"{time.monotonic() - t0:.1f} s")
        subprocess.run(["sync"])  # a tracer's LOG is durable; no writeback left to compete with
        if a.cold:
            drop_caches()
        if a.randomness_ab:
            return randomness_ab(a, log, store, info)
        dt, cpu, out = cli("ingest", "--log", log, "--store", store, "--jobs", a.jobs)
        print(f"ingest  : {info['payload'] / dt / 1e6:7.0f} MB/s payload  ({dt:.1f} s wall, "
              f"{cpu:.1f} s CPU = {cpu / dt:.2f} cores, --jobs {a.jobs})")
        du = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(store) for f in fs)
        print(f"store   : {du / 2**30:.2f} GiB ({du / info['payload']:.3f} x payload)")
        # restore and dd, alternating, --rounds times each: this VM's disk varies a lot
        # from one second to the next; medians of interleaved runs compare fairly
        trees = {"now": ROOT, **({"before": os.path.abspath(a.before)} if a.before else {})}
        rest: list[float] = []
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in trees}
        dds: list[float] = []
        for r in range(a.rounds):
            order = list(trees.items())
            for name, tree in (order if r % 2 == 0 else order[::-1]):
                if a.cold:
                    drop_caches()
                dt, cpu, out = cli("restore", "--store", store, "--device", "bench0", "--at",
                                   "latest", "--to", img, tree=tree)
                runs[name].append((dt, cpu))
                if a.before:
                    print(f"{name:6s} restore {dt:.2f} s, {cpu:.2f} s CPU", flush=True)
                os.unlink(img)
            t0 = time.monotonic()
            subprocess.run(["dd", "if=/dev/zero", f"of={ddimg}", "bs=1M", f"count={a.device_mib}",
                            "conv=fsync"], capture_output=True, text=True, check=True)
            dds.append(time.monotonic() - t0)
            os.unlink(ddimg)
        size = a.device_mib << 20
        rest = [dt for dt, _ in runs["now"]]

        def show(ts):
            return " ".join(f"{size / t / 1e6:.0f}" for t in ts)

        r_med = size / sorted(rest)[len(rest) // 2] / 1e6
        d_med = size / sorted(dds)[len(dds) // 2] / 1e6
        print(f"restore : {r_med:7.0f} MB/s of device, median of {show(rest)} "
              f"(CLI wall time incl. start-up)")
        print(f"dd      : {d_med:7.0f} MB/s, median of {show(dds)} "
              f"(dd if=/dev/zero of=DIR/dd.img bs=1M count={a.device_mib} conv=fsync)")
        print(f"restore / dd = {r_med / d_med:.2f}")
        if a.before:
            med = {k: (sorted(dt for dt, _ in v)[len(v) // 2], sorted(c for _, c in v)[len(v) // 2])
                   for k, v in runs.items()}
            for k, (dt, cpu) in med.items():
                print(f"{k:6s}: restore {size / dt / 1e6:.0f} MB/s ({size / dt / 1e6 / d_med:.2f}x "
                      f"dd), {cpu / (size / 1e9):.2f} CPU-s per GB of device "
                      f"(medians of {a.rounds})")
            print(f"now / before: wall {med['now'][0] / med['before'][0]:.2f}, "
                  f"CPU {med['now'][1] / med['before'][1]:.2f}")
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


def randomness_ab(a, log: str, store: str, info: dict) -> None:
    """Ingest the LOG into a new store with BLKREWIND_RANDOMNESS=0 and =1, alternating."""
    res: dict[str, list[tuple[float, float]]] = {"0": [], "1": []}
    for _ in range(a.rounds):
        for k in ("0", "1"):
            shutil.rmtree(store, ignore_errors=True)
            dt, cpu, _ = cli("ingest", "--log", log, "--store", store, "--jobs", a.jobs,
                             env={"BLKREWIND_RANDOMNESS": k})
            res[k].append((dt, cpu))
    for k, name in (("0", "without"), ("1", "with   ")):
        ts = " ".join(f"{info['payload'] / dt / 1e6:.0f}" for dt, _ in res[k])
        print(f"ingest {name} randomness: MB/s {ts}; CPU s "
              f"{' '.join(f'{c:.1f}' for _, c in res[k])}")
    med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    cpus = {k: sorted(c for _, c in v)[len(v) // 2] for k, v in res.items()}
    print(f"with / without: wall {med['1'][0] / med['0'][0]:.3f}, "
          f"CPU {cpus['1'] / cpus['0']:.3f} (medians of {a.rounds})")


if __name__ == "__main__":
    main()
