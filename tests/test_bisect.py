"""`blkrewind bisect` on a real traced ext4: the injected bad point is found among 30 marks, and
among unmarked FUA points, in at most ceil(log2(n)) + 1 checks; the search logic alone on a
list (skips)."""
from __future__ import annotations

import math
import mmap
import os
import struct
import sys
import time

import pytest
from tracerproc import TraceProc, cli, sh

from blkrewind.replayer.bisect import search

CHECK = ("import os, struct, sys; d = open(os.path.join(os.environ['BLKREWIND_MOUNT'], "
         "'state.bin'), 'rb').read(8); v = struct.unpack('<Q', d)[0]; "
         "open(os.environ['LOG_CHECKS'], 'a').write(os.environ['BLKREWIND_POINT'] + '\\n'); "
         "sys.exit(1 if v >= int(os.environ['BAD_FROM']) else 0)")


def test_search_logic():
    cands = [(i, "") for i in range(100)]
    for bad in (0, 1, 37, 99, 100):
        seen = []

        def check(s):
            seen.append(s)
            return "bad" if s >= bad else "good"
        lo, hi, n, skipped = search(cands, check)
        assert (lo, hi) == (bad - 1, bad) and n <= math.ceil(math.log2(101)) and not skipped

    def check2(s):
        return "skip" if s in (40, 41, 42) else ("bad" if s >= 41 else "good")
    lo, hi, n, skipped = search(cands, check2)
    assert lo == 39 and hi == 43 and set(skipped) <= {40, 41, 42}   # ambiguous: reported


def _version_writer(path):
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    buf = mmap.mmap(-1, 4096)

    def put(v: int) -> None:
        buf.seek(0)
        buf.write(struct.pack("<Q", v) + bytes(4088))
        os.pwrite(fd, buf, 0)
    return fd, put


def _setup(make_loop, tmp_path):
    loop = make_loop(size_mb=48)
    dev = loop.path
    sh("mkfs.ext4", "-q", "-F", dev)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", dev, mnt)
    with open(mnt / "state.bin", "wb") as f:
        f.write(bytes(4096))
        f.flush()
        os.fsync(f.fileno())
    sh("fsfreeze", "--freeze", mnt)   # the file's mapping checkpointed: noload mounts see it
    sh("fsfreeze", "--unfreeze", mnt)
    return dev, mnt


def _bisect(store, dev, good, bad, level, bad_from, tmp_path):
    logf = tmp_path / f"checks-{level}.txt"
    env_cmd = ["env", f"LOG_CHECKS={logf}", f"BAD_FROM={bad_from}", sys.executable, "-c", CHECK]
    r = cli("bisect", "--store", store, "--device", dev, "--good", good, "--bad", bad,
            "--level", level, "--", *env_cmd)
    checks = logf.read_text().split()
    return r, checks


@pytest.mark.bpf
def test_bisect_marks_and_fua_points(make_loop, tmp_path):
    dev, mnt = _setup(make_loop, tmp_path)
    log, store = tmp_path / "log", tmp_path / "store"
    try:
        with TraceProc([dev], log) as t:
            fd, put = _version_writer(mnt / "state.bin")
            try:
                put(0)
                cli("mark", "m0", "--log", log)
                for v in range(1, 31):          # 30 marks; bad from version 19 on
                    put(v)
                    cli("mark", f"m{v}", "--log", log)
                for v in range(100, 141):       # unmarked FUA writes; bad from 127 on
                    put(v)
                    time.sleep(0.01)
                cli("mark", "end", "--log", log)
            finally:
                os.close(fd)
            assert t.stop() == 0, t.stderr
    finally:
        sh("umount", mnt)
    cli("ingest", "--log", log, "--store", store)

    r, checks = _bisect(store, dev, "m0", "m30", "marks", 19, tmp_path)
    assert "last good: stamp" in r.stdout and "(mark m18," in r.stdout, r.stdout + r.stderr
    assert "first bad: stamp" in r.stdout and "(mark m19)" in r.stdout
    n = 29                                          # marks strictly between m0 and m30
    assert len(checks) <= math.ceil(math.log2(n)) + 1, checks
    assert "--at stamp:" in r.stdout

    # unmarked: between m30 and end only FUA writes (and whatever ext4 flushes)
    fua = cli("sql", "--store", store, "--format", "csv",
              "SELECT count(*) FROM writes w, marks a, marks b WHERE a.name = 'm30' AND "
              "b.name = 'end' AND w.stamp > a.stamp AND w.stamp < b.stamp AND "
              "(w.flags LIKE '%FUA%' OR w.flags LIKE '%PREFLUSH%' OR w.op = 'flush')").stdout
    n = int(fua.splitlines()[1])
    assert n >= 41, fua
    r, checks = _bisect(store, dev, "m30", "end", "flush", 127, tmp_path)
    assert len(checks) <= math.ceil(math.log2(n)) + 1, (checks, n)
    good = int(r.stdout.split("last good: stamp ")[1].split()[0])
    bad = int(r.stdout.split("first bad: stamp ")[1].split()[0])
    # the last good point holds version 126, the first bad one 127
    for stamp, want in ((good, 126), (bad, 127)):
        cli("files", "--store", store, "--device", dev, "--at", f"stamp:{stamp}", "state.bin",
            "--out", tmp_path / f"f{stamp}")
        v = struct.unpack("<Q", (tmp_path / f"f{stamp}" / "state.bin").read_bytes()[:8])[0]
        assert v == want, (stamp, v)
