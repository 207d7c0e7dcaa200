#!/usr/bin/env python3
"""LOG throughput: write GiB of random-payload spans through LogWriter, read them back.

    .venv/bin/python bench/bench_log.py [--gib 2] [--fsync interval] [--dir /var/tmp/...]

Spans are built like the tracer's: R_BIO records of --record-kib payload, ~--span-mib per span,
from a pool of distinct random spans (lz4 finds nothing to compress, as with real data written
by encrypting or compressing file systems). Reports payload MB/s (span bytes, headers
included), CPU seconds of the process, the time spent in fsync, then the read-back rate.
--cold evicts the segments from the page cache (posix_fadvise, our files only) before reading.
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blkrewind.formats import (
    logframe,
    record,  # noqa: E402
)
from blkrewind.tracer import log  # noqa: E402


def make_pool(n: int, span_bytes: int, rec_bytes: int) -> list[tuple[bytes, int]]:
    pool, stamp = [], 1
    per_span = max(1, span_bytes // rec_bytes)
    for _ in range(n):
        recs = []
        for _ in range(per_span):
            recs.append(record.make_record(os.urandom(rec_bytes), rtype=record.R_BIO, stamp=stamp,
                                           seq=stamp, bio_size=rec_bytes, op=record.OP_WRITE,
                                           flags=record.F_FIRST | record.F_LAST, comm=b"bench"))
            stamp += 1
        pool.append((b"".join(recs), per_span))
    return pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/var/tmp/blkrewind-bench-log")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--span-mib", type=float, default=4.0)
    ap.add_argument("--record-kib", type=int, default=64)
    ap.add_argument("--segment-mib", type=int, default=64)
    ap.add_argument("--fsync", choices=log.FSYNC_MODES, default="interval")
    ap.add_argument("--fsync-interval", type=float, default=1.0)
    ap.add_argument("--level", type=int, default=0, help="lz4 compression level")
    ap.add_argument("--pipeline", action="store_true",
                    help="encode spans in a second thread (logframe.encode_span) while writing")
    ap.add_argument("--cold", action="store_true", help="read back from disk, not page cache")
    ap.add_argument("--keep", action="store_true", help="keep the LOG afterwards")
    a = ap.parse_args()

    d = Path(a.dir)
    if d.exists():
        shutil.rmtree(d)
    pool = make_pool(16, int(a.span_mib * (1 << 20)), a.record_kib << 10)
    target = int(a.gib * (1 << 30))

    fsync_s = [0.0, 0]
    real_fsync = os.fsync

    def timed_fsync(fd):
        t = time.perf_counter()
        real_fsync(fd)
        fsync_s[0] += time.perf_counter() - t
        fsync_s[1] += 1
    os.fsync = timed_fsync

    with log.LogLock(d):
        w = log.LogWriter(str(d), "20250101T000000Z-bench000", host="bench",
                          segment_bytes=a.segment_mib << 20, fsync=a.fsync,
                          fsync_interval=a.fsync_interval, compression_level=a.level)
        nframes = -(-target // len(pool[0][0]))
        spans: Iterator[Any] = (pool[i % len(pool)] for i in range(nframes))
        if a.pipeline:  # what a collector thread could do before queueing the span
            q: queue.Queue = queue.Queue(2)

            def encoder(source):
                for span, nrec in source:
                    q.put((span, nrec, logframe.encode_span(span, a.level)))
                q.put(None)
            encoder_thread = threading.Thread(target=encoder, args=(spans,), daemon=True)
            spans = iter(q.get, None)
        payload = nrec_total = i = 0
        c0, t0 = time.process_time(), time.perf_counter()
        if a.pipeline:
            encoder_thread.start()
        for span, nrec, *body in spans:
            w.append(span, nrec, time.monotonic_ns(), time.time_ns(),
                     body=body[0] if body else None)
            payload += len(span)
            nrec_total += nrec
            i += 1
        w.close()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    os.fsync = real_fsync
    mb = payload / 1e6
    print(f"write: {mb:.0f} MB payload in {i} frames, {len(logframe.list_segments(d))} segments, "
          f"{w.bytes_written / payload:.4f} bytes on disk per payload byte")
    print(f"write: {wall:.2f} s wall = {mb / wall:.0f} MB/s; CPU {cpu:.2f} s "
          f"({cpu / (payload / 1e9):.2f} CPU s/GB, {mb / cpu:.0f} MB/s per core); "
          f"fsync={a.fsync}: {fsync_s[1]} fsyncs took {fsync_s[0]:.2f} s")

    segs = logframe.list_segments(d)
    if a.cold:
        for s in segs:
            fd = os.open(s.path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    got = nrec_got = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for s in segs:
        with logframe.SegmentReader(s.path) as r:
            for f in r.frames():
                got += len(f.data)
                nrec_got += f.nrec
            assert r.sealed and r.torn_bytes == 0
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert (got, nrec_got) == (payload, nrec_total), (got, payload, nrec_got, nrec_total)
    print(f"read{' (cold)' if a.cold else ''}: {got / 1e6:.0f} MB in {wall:.2f} s = "
          f"{got / 1e6 / wall:.0f} MB/s; CPU {cpu:.2f} s")
    if not a.keep:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
