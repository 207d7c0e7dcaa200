"""Benchmark of FrameSink.store() alone (the store side of shipping), next to LOG ingest.

    .venv/bin/python bench/bench_sink.py [--dir DIR] [--device-mib 256] [--writes-mib 1024]
                                         [--call-mib 16] [--threads 2] [--keep]

1. Builds a LOG with tests/synth.py (a real LOG written by tracer.log.LogWriter): a device of
   --device-mib (half random, half zero 64 KiB blocks), its baseline in 1 MiB chunks, then
   --writes-mib of random writes of 0.5 KiB .. 1 MiB in 64 KiB pieces (plus discards,
   write-zeroes, flushes, completions), packed 48..80 records per frame (~4 MiB frames, as
   the tracer writes them), 64 MiB segments. Random payload: the worst case for the store
   (nothing compresses).
2. Reads every raw frame (48-byte header + body, exactly as in the segment files) into
   memory, cuts them in calls of about --call-mib (8-32 MiB, like the server's FRAMES
   messages), shuffles the calls, and feeds them to FrameSink.store() from --threads
   threads: decode (lz4 + content checksum), parse, Parquet (page checksums, file CRC),
   fsync, rename, DuckDB commit. Payload MB/s = payload bytes stored / wall time.
3. For comparison in the same run: `ingest()` (LOG directory ingest, --jobs = --threads)
   of the same LOG into a second store, and FrameSink.finalize() (watermarks) timed apart.

Everything is made under --dir (default: a new directory in /var/tmp, removed at the end
unless --keep).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from synth import SynthSession  # noqa: E402

from blkrewind.formats.logframe import SegmentReader, list_segments  # noqa: E402
from blkrewind.replayer.ingest import FrameGroup, FrameSink, ingest  # noqa: E402
from blkrewind.replayer.store import Store  # noqa: E402


def make_log(log: str, device_mib: int, writes_mib: int) -> SynthSession:
    s = SynthSession(log, seed=7, size=device_mib << 20, segment_bytes=64 << 20,
                     chunk=1 << 20, frame_records=(48, 80))
    s.baseline(writes_during=4)
    target = writes_mib << 20
    done = 0
    while done < target:
        n0 = len(s.bios)
        s.workload(200, marks=1, snapshots=0)
        done += sum(b[3] for b in s.bios[n0:] if b[1] == 1)
    s.end()
    return s


def read_calls(log: str, call_bytes: int) -> list[list[FrameGroup]]:
    calls, cur, size = [], [], 0
    for seg in list_segments(log):
        with SegmentReader(seg.path) as r:
            frames = list(r.raw_frames())
        i = 0
        while i < len(frames):
            j, n = i, 0
            while j < len(frames) and (j == i or size + n + len(frames[j][1]) <= call_bytes):
                n += len(frames[j][1])
                j += 1
            cur.append(FrameGroup(r.session, r.segno, r.seg_id, frames[i][0],
                                  [b for _, b in frames[i:j]]))
            size += n
            i = j
            if size >= call_bytes:
                calls.append(cur)
                cur, size = [], 0
    if cur:
        calls.append(cur)
    return calls


def payload_of(store_dir: str) -> tuple[int, int]:
    st = Store.open(store_dir)
    try:
        nbytes, nfiles = st.query_one("SELECT sum(payload_bytes), count(*) FROM payload_files")
        return int(nbytes or 0), int(nfiles or 0)
    finally:
        st.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None)
    ap.add_argument("--device-mib", type=int, default=256)
    ap.add_argument("--writes-mib", type=int, default=1024)
    ap.add_argument("--call-mib", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    base = a.dir or tempfile.mkdtemp(prefix="bench-sink-", dir="/var/tmp")
    os.makedirs(base, exist_ok=True)
    log = os.path.join(base, "log")
    try:
        t0 = time.monotonic()
        make_log(log, a.device_mib, a.writes_mib)
        log_bytes = sum(s.size for s in list_segments(log))
        calls = read_calls(log, a.call_mib << 20)
        random.Random(1).shuffle(calls)
        nframes = sum(len(g.raw_frames) for c in calls for g in c)
        print(f"LOG: {log_bytes / 2**20:.0f} MiB in {len(list_segments(log))} segments, "
              f"{nframes} frames, {len(calls)} calls of ~{a.call_mib} MiB; made in "
              f"{time.monotonic() - t0:.1f} s")
        subprocess.run(["sync"])

        # --- FrameSink.store(), --threads threads
        net = os.path.join(base, "net")
        st = Store.open(net, write=True, create=True)
        sink = FrameSink(st)
        c0, t0 = time.process_time(), time.monotonic()
        with ThreadPoolExecutor(a.threads) as ex:
            stored = sum(n for res in ex.map(lambda c: sink.store("synth", c), calls)
                         for _, _, n in res)
        dt = time.monotonic() - t0
        cpu = time.process_time() - c0
        t1 = time.monotonic()
        sink.finalize()
        dfin = time.monotonic() - t1
        st.close()
        assert stored == nframes, (stored, nframes)
        payload, nfiles = payload_of(net)
        sink_rate = payload / dt / 1e6
        print(f"store() : {sink_rate:7.0f} MB/s payload, {log_bytes / dt / 1e6:.0f} MB/s of "
              f"frames ({payload / 2**20:.0f} MiB payload, {nfiles} files, {dt:.1f} s wall, "
              f"{cpu:.1f} s CPU = {cpu / dt:.2f} cores, {a.threads} threads); "
              f"finalize {dfin:.2f} s")

        # --- LOG ingest of the same LOG, same number of threads
        subprocess.run(["sync"])
        ref = os.path.join(base, "ref")
        st = Store.open(ref, write=True, create=True)
        c0, t0 = time.process_time(), time.monotonic()
        res = ingest(st, log, jobs=a.threads)
        dt = time.monotonic() - t0
        cpu = time.process_time() - c0
        st.close()
        assert not res.errors, res.errors
        ing_rate = res.payload_bytes / dt / 1e6
        print(f"ingest  : {ing_rate:7.0f} MB/s payload ({dt:.1f} s wall incl. finalize, "
              f"{cpu:.1f} s CPU = {cpu / dt:.2f} cores, --jobs {a.threads})")
        print(f"store() / ingest = {sink_rate / ing_rate:.2f}")
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
