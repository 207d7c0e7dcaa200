"""Instant access against restore: time to first byte of `export` and to a mounted file
system for sparse devices of 1, 16 and 64 GiB beside `restore` of the same point, rewind against
a full restore, export reads against restore, and `restore` of a history of 4 KiB writes
against dd.

    .venv/bin/python bench/bench_instant.py [--dir DIR] [--sizes-gib 1,16,64]
        [--mount-gib 1,16,64] [--small-mib 512] [--rewind-gib 8] [--rewind-rounds 1]
        [--read-gib 2] [--before DIR]

--before DIR (an older checkout, e.g. `git worktree add /tmp/old COMMIT`): every timed command
runs with both checkouts' code in turns on the same stores (made by this checkout's ingest),
lines prefixed [before] / [now]: a side-by-side comparison on a shared machine.

1. Per size: a LOG (bench_store.make_log) whose baseline covers the first 64 MiB (the rest
   never written: a sparse history), then 64 MiB of random writes of 4..1024 KiB; ingest.
   `blkrewind export --at latest` is started and timed until `nbdinfo --content` has read
   the export's first sectors (time to first byte, CLI start-up and nbdkit's Python plugin included);
   `blkrewind restore --at latest` of the same point is timed to its end.
1b. (--mount-gib) Per size: a sparse file of that size, mkfs.ext4 (lazy init) and one small
   file written; a LOG of its data extents only (fs_log); ingest. `blkrewind mount --at latest`
   timed until it returns (nbdkit, nbdfuse, loop device, mount), then until the file has been
   read from the mount, then `umount`; `restore` of the same point timed.
2. A 1:1 history of --small-mib of 4 KiB writes over a device of --small-mib (baseline
   random): `restore` against `dd if=/dev/zero bs=1M conv=fsync` of the same size, alternating,
   2 rounds each; the ratio of medians.
3. (--rewind-gib N, 0 to skip) A history of a fully written N GiB device (random baseline,
   then N/8 GiB of random writes of 4..1024 KiB): for 1 % and 10 % of the device written
   after a point P (found in `writes`), `restore --at latest` to an image, then `rewind --at
   P` of that image timed against `restore --at P --to` a new image, and both images
   compared (cmp); wall and CPU seconds (user + system) of each command. --rewind-rounds K:
   the rewind to P is timed K times (between two, one untimed rewind forward to latest), the
   fastest compared. Goal: rewind of 1 % >= 20x faster than the full restore.
4. (--read-gib N, 0 to skip) On a fully written N GiB history: `nbdcopy` of `export --at
   latest` to /dev/null (sequential reads through nbdkit's plugin) against `restore` of the
   same point to a file, alternating, 2 rounds each. Goal: export reads >= 0.5x restore.
Everything is made under --dir and removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from bench_store import DEV, REAL0, SPAN, make_log  # noqa: E402

from blkrewind.formats import record  # noqa: E402
from blkrewind.tracer.log import LogWriter  # noqa: E402

CLI = [sys.executable, "-m", "blkrewind.cli"]
CUR = {"root": ROOT}        # the checkout whose CLI runs (--before: an older one in turns)
VERSIONS: list[tuple[str, str]] = [("now", ROOT)]
ROUNDS = {"rewind": 1}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": CUR["root"]}


def run(*args, **kw):
    return subprocess.run([*CLI, *map(str, args)], cwd=CUR["root"], check=True,
                          capture_output=True, text=True, env=_env(), **kw)


def versions():
    """(label, root) of each checkout measured, CUR set to it while the caller's loop body
    runs (always ending on this checkout)."""
    try:
        for label, root in VERSIONS:
            CUR["root"] = root
            yield label
    finally:
        CUR["root"] = ROOT


def through_export(store: str, client: list[str]) -> float:
    """Seconds from `export --at latest` starting to the client (URI in place of "{uri}")
    having finished."""
    t0 = time.monotonic()
    p = subprocess.Popen([*CLI, "export", "--store", store, "--device", "bench0", "--at",
                          "latest"], cwd=CUR["root"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
    assert p.stdout is not None, "started with stdout=PIPE"
    try:
        uri = p.stdout.readline().strip()
        subprocess.run([uri if a == "{uri}" else a for a in client], check=True,
                       capture_output=True)
        return time.monotonic() - t0
    finally:
        p.send_signal(2)
        p.wait(30)


def ttfb(store: str) -> float:
    # nbdinfo reads the export's first sectors to say what it holds ("content:")
    return through_export(store, ["nbdinfo", "--content", "{uri}"])


def fs_log(log_dir: str, image: str, size: int) -> int:
    """A LOG whose baseline holds the data extents of `image` (a sparse file holding a file
    system; holes are never written: a sparse history) in 1 MiB chunks. Returns its bytes."""
    w = LogWriter(log_dir, "20261125T120000Z-benchfs1", host="bench", segment_bytes=64 << 20,
                  fsync="never")
    mono, seq, total = 10**12, 0, 0
    span: list[bytes] = []

    def flush() -> None:
        nonlocal mono, span
        if span:
            mono += 1_000_000
            w.append(b"".join(span), len(span), mono, mono + REAL0 - 10**12)
            span = []

    def emit(rec: bytes) -> None:
        span.append(rec)
        if sum(map(len, span)) >= SPAN:
            flush()

    def js(rtype, obj, **kw) -> None:
        nonlocal seq
        seq += 1
        emit(record.json_record(rtype, obj, seq=seq, **kw))

    js(record.R_SESSION, {"session": "20261125T120000Z-benchfs1", "host": "bench",
                          "stamp_base": REAL0, "seq_base": 1, "version": "bench"})
    js(record.R_DEVICE, {"name": "bench0", "path": "/dev/bench0", "dev": DEV,
                         "size_bytes": size, "host": "bench"}, dev=DEV)
    fd = os.open(image, os.O_RDONLY)
    try:
        off = 0
        while True:
            try:
                off = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, off, os.SEEK_HOLE)
            off -= off % (1 << 20)
            while off < end:
                n = min(1 << 20, size - off)
                seq += 1
                emit(record.make_record(os.pread(fd, n, off), rtype=record.R_BASE, seq=seq,
                                        dev=DEV, sector=off // 512, bio_size=n, aux=seq,
                                        ktime_ns=mono))
                total += n
                off += n
    finally:
        os.close(fd)
    seq += 1
    emit(record.make_record(f'{{"dev": {DEV}, "what": "baseline_end"}}'.encode(),
                            rtype=record.R_POINT, stamp=REAL0, seq=seq, ktime_ns=mono))
    js(record.R_END, {"end_stamp": REAL0 + 1, "end_seq": seq, "clean": True})
    flush()
    w.close()
    return total


def bench_mount(base: str, gib: int) -> None:
    """Time to a mounted file system (`blkrewind mount` returning: nbdkit, nbdfuse, loop,
    mount; first reads of the superblock and root directory included) and to its first file
    read, on a sparse ext4 history of gib GiB, beside `restore` of the same point."""
    d = os.path.join(base, f"m{gib}")
    os.makedirs(d)
    size = gib << 30
    img = os.path.join(d, "fs.img")
    with open(img, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                    img], check=True)
    mnt = os.path.join(d, "mnt")
    os.makedirs(mnt)
    subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
    try:
        with open(os.path.join(mnt, "hello.txt"), "w") as f:
            f.write("hello\n" * 1000)
    finally:
        subprocess.run(["umount", mnt], check=True)
    data = fs_log(os.path.join(d, "log"), img, size)
    os.unlink(img)
    store = os.path.join(d, "store")
    run("ingest", "--log", os.path.join(d, "log"), "--store", store)
    shutil.rmtree(os.path.join(d, "log"))
    for v in versions():
        t0 = time.monotonic()
        run("mount", "--store", store, "--device", "bench0", "--at", "latest", mnt)
        t_mount = time.monotonic() - t0
        try:
            with open(os.path.join(mnt, "hello.txt")) as f:
                ok = f.read() == "hello\n" * 1000
            t_file = time.monotonic() - t0
        finally:
            run("umount", mnt)
        t_restore = timed("restore", "--store", store, "--device", "bench0", "--at", "latest",
                          "--to", os.path.join(d, "r.img"))
        os.unlink(os.path.join(d, "r.img"))
        print(f"[{v}] {gib:3d} GiB sparse ext4 ({data >> 20} MiB of data): mount {t_mount:.2f} s, "
              f"first file read {t_file:.2f} s (content right: {ok}); restore {t_restore:.2f} s",
              flush=True)
    shutil.rmtree(d)


def timed(*args) -> float:
    return timed_cpu(*args)[0]


def timed_cpu(*args) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the command and its children)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    run(*args)
    t = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return t, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime


def same(a: str, b: str) -> bool:
    return subprocess.run(["cmp", "-s", a, b]).returncode == 0


def point_before_last(store: str, nbytes: int) -> tuple[int, int]:
    """The stamp P after which the history's writes add up to at least nbytes, and their sum."""
    q = ("SELECT stamp, sum(length) OVER (ORDER BY stamp DESC) AS after FROM writes "
         "WHERE op = 'write' ORDER BY stamp DESC")
    rows = json.loads(run("sql", "--store", store, q, "--format", "json").stdout)
    for r in rows:
        if r["after"] >= nbytes:
            return int(r["stamp"]) - 1, int(r["after"])
    raise SystemExit(f"the history holds fewer than {nbytes} bytes of writes")


def full_history(d: str, size: int) -> str:
    """A store under d of a fully written device of size bytes (random baseline, then size/8
    of random writes of 4..1024 KiB); returns its path."""
    make_log(os.path.join(d, "log"), size, size // 8)
    store = os.path.join(d, "store")
    run("ingest", "--log", os.path.join(d, "log"), "--store", store)
    shutil.rmtree(os.path.join(d, "log"))
    return store


def bench_rewind(base: str, gib: int) -> None:
    d = os.path.join(base, "rewind")
    size = gib << 30
    store = full_history(d, size)
    cur, full = os.path.join(d, "cur.img"), os.path.join(d, "full.img")
    for pct in (1, 10):
        at, changed = point_before_last(store, size * pct // 100)
        for v in versions():
            run("restore", "--store", store, "--device", "bench0", "--at", "latest", "--to", cur)
            rw = []    # --rewind-rounds rewinds to P, each after one forward to latest
            for k in range(ROUNDS["rewind"]):
                if k:
                    run("rewind", "--store", store, "--device", "bench0", "--at", "latest",
                        "--from", at, "--to", cur)
                rw.append(timed_cpu("rewind", "--store", store, "--device", "bench0",
                                    "--at", at, "--to", cur))
            t_rewind, c_rewind = min(rw)
            t_full, c_full = timed_cpu("restore", "--store", store, "--device", "bench0", "--at",
                                       at, "--to", full)
            ok = same(cur, full)
            print(f"[{v}] rewind of {pct:2d} % changed ({changed >> 20} MiB written after the "
                  f"point, {gib} GiB device): rewind {t_rewind:.2f} s ({c_rewind:.2f} CPU-s; "
                  f"best of {', '.join(f'{x:.2f}' for x, _ in rw)} s), "
                  f"full restore {t_full:.2f} s ({c_full:.2f} CPU-s): {t_full / t_rewind:.1f}x "
                  f"(CPU {c_full / c_rewind:.1f}x); images equal: {ok}; load "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
            os.unlink(cur)
            os.unlink(full)
    shutil.rmtree(d)


def bench_read(base: str, gib: int) -> None:
    d = os.path.join(base, "read")
    size = gib << 30
    store = full_history(d, size)
    img = os.path.join(d, "r.img")
    es: dict = {}
    rs: dict = {}
    for _ in range(2):
        for v in versions():
            es.setdefault(v, []).append(through_export(store, ["nbdcopy", "{uri}", "null:"]))
            rs.setdefault(v, []).append(timed("restore", "--store", store, "--device", "bench0",
                                              "--at", "latest", "--to", img))
            os.unlink(img)
    mb = size / 1e6
    for v in es:
        e, r = min(es[v]), min(rs[v])
        print(f"[{v}] sequential read of a {gib} GiB point: export (nbdcopy to null:, start-up "
              f"included) {mb / e:.0f} MB/s (runs {', '.join(f'{x:.2f}' for x in es[v])} s), "
              f"restore {mb / r:.0f} MB/s (runs {', '.join(f'{x:.2f}' for x in rs[v])} s): "
              f"export/restore = {r / e:.2f} (best of 2 each)", flush=True)
    shutil.rmtree(d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir")
    ap.add_argument("--sizes-gib", default="1,16,64")
    ap.add_argument("--mount-gib", default="1,16,64", help="'' skips")
    ap.add_argument("--small-mib", type=int, default=512, help="0 skips")
    ap.add_argument("--rewind-gib", type=int, default=8, help="0 skips")
    ap.add_argument("--rewind-rounds", type=int, default=1,
                    help="rewinds timed per point (the best is compared)")
    ap.add_argument("--read-gib", type=int, default=2, help="0 skips")
    ap.add_argument("--before", metavar="DIR",
                    help="an older checkout (git worktree add DIR COMMIT): every timed command "
                         "also runs with its code, in turns with this one, on the same stores")
    a = ap.parse_args()
    ROUNDS["rewind"] = max(1, a.rewind_rounds)
    if a.before:
        VERSIONS.insert(0, ("before", os.path.abspath(a.before)))
    base = a.dir or tempfile.mkdtemp(prefix="bench-instant-")
    os.makedirs(base, exist_ok=True)
    try:
        for gib in [int(x) for x in a.sizes_gib.split(",") if x.strip() and int(x)]:
            d = os.path.join(base, f"g{gib}")
            make_log(os.path.join(d, "log"), gib << 30, 64 << 20, baseline_bytes=64 << 20)
            run("ingest", "--log", os.path.join(d, "log"), "--store", os.path.join(d, "store"))
            for v in versions():
                t_first = ttfb(os.path.join(d, "store"))
                t_restore = timed("restore", "--store", os.path.join(d, "store"), "--device",
                                  "bench0", "--at", "latest", "--to", os.path.join(d, "r.img"))
                os.unlink(os.path.join(d, "r.img"))
                print(f"[{v}] {gib:3d} GiB sparse: export first byte {t_first:.2f} s; restore "
                      f"{t_restore:.2f} s", flush=True)
            shutil.rmtree(d)
        for gib in [int(x) for x in a.mount_gib.split(",") if x.strip() and int(x)]:
            bench_mount(base, gib)
        if a.rewind_gib:
            bench_rewind(base, a.rewind_gib)
        if a.read_gib:
            bench_read(base, a.read_gib)
        n = a.small_mib
        if not n:
            return
        d = os.path.join(base, "small")
        make_log(os.path.join(d, "log"), n << 20, n << 20, write_kib=(4,))
        run("ingest", "--log", os.path.join(d, "log"), "--store", os.path.join(d, "store"))
        rs: dict = {}
        ds: list = []
        img = os.path.join(d, "r.img")
        for _ in range(2):
            for v in versions():
                rs.setdefault(v, []).append(timed("restore", "--store", os.path.join(d, "store"),
                                                  "--device", "bench0", "--at", "latest",
                                                  "--to", img))
                os.unlink(img)
                t0 = time.monotonic()
                subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={n}",
                                "conv=fsync", "status=none"], check=True)
                ds.append(time.monotonic() - t0)
                os.unlink(img)
        dd = min(ds)
        for v in rs:
            r = min(rs[v])
            print(f"[{v}] 4 KiB-write history of {n} MiB: restore {n / r * 1.048576:.0f} MB/s "
                  f"(runs {', '.join(f'{x:.2f}' for x in rs[v])} s), dd "
                  f"{n / dd * 1.048576:.0f} MB/s (runs {', '.join(f'{x:.2f}' for x in ds)} s): "
                  f"restore/dd = {dd / r:.2f} (best of each)", flush=True)
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
