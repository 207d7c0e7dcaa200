"""Files, not sectors, on real traced ext4 and xfs: `diff` lists exactly the files created,
deleted, appended and rewritten in place between two marks (and the ranges from metadata);
`files` copies a file out of a point; `blame` names the process that wrote a file."""
from __future__ import annotations

import json
import os
import random
import time

import pytest
from forensics_workloads import syncfs as wl_syncfs
from tracerproc import TraceProc, cli, sh

pytestmark = [pytest.mark.bpf]

SIZE_MB = {"ext4": 64, "xfs": 320}


def _write(path, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_diff_files_blame(fstype, make_loop, tmp_path):
    rng = random.Random(fstype)
    loop = make_loop(size_mb=SIZE_MB[fstype])
    dev = loop.path
    sh(f"mkfs.{fstype}", "-q", "-f" if fstype == "xfs" else "-F", dev)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log, store = tmp_path / "log", tmp_path / "store"
    sh("mount", dev, mnt)
    try:
        (mnt / "d").mkdir()
        names = ["keep", "append", "rewrite", "delete", "sub/keep2"]
        (mnt / "d" / "sub").mkdir()
        orig = {}
        for n in names:
            orig[n] = rng.randbytes(rng.randrange(20000, 300000))
            _write(mnt / "d" / n, orig[n])
        wl_syncfs(mnt)
        with TraceProc([dev], log) as t:
            _write(mnt / "d" / "early", b"x" * 5000)     # before m1: not in the diff
            wl_syncfs(mnt)
            cli("mark", "m1", "--log", log)
            _write(mnt / "d" / "new", rng.randbytes(123456))
            _write(mnt / "d" / "append", rng.randbytes(40000), "ab")
            with open(mnt / "d" / "rewrite", "r+b") as f:  # in place, same size
                f.seek(8192)
                f.write(rng.randbytes(16384))
                f.flush()
                os.fsync(f.fileno())
            os.unlink(mnt / "d" / "delete")
            wl_syncfs(mnt)
            time.sleep(0.5)
            cli("mark", "m2", "--log", log)
            assert t.stop() == 0, t.stderr
    finally:
        sh("umount", mnt)
    cli("ingest", "--log", log, "--store", store)

    rows = json.loads(cli("diff", "--store", store, "--device", dev, "--from", "m1", "--to", "m2",
                          "--format", "json").stdout)
    got = {(r["path"], r["change"], r["how"]) for r in rows}
    assert got == {("d/new", "created", ""), ("d/delete", "deleted", ""),
                   ("d/append", "modified", "appended"),
                   ("d/rewrite", "modified", "rewritten")}, rows
    by = {r["path"]: r for r in rows}
    assert by["d/new"]["bytes"] == 123456 and by["d/append"]["bytes"] == 40000
    assert by["d/append"]["size_to"] == len(orig["append"]) + 40000
    assert by["d/rewrite"]["written"] >= 16384
    assert by["d/delete"]["size_from"] == len(orig["delete"])

    ranges = json.loads(cli("diff", "--store", store, "--device", dev, "--from", "m1", "--to",
                            "m2", "--ranges-only", "--format", "json").stdout)
    assert ranges and all(r["end"] - r["start"] == r["bytes"] > 0 for r in ranges)
    assert sum(r["bytes"] for r in ranges) >= 123456 + 40000 + 16384

    out = tmp_path / "out"
    r = cli("files", "--store", store, "--device", dev, "--at", "m1", "d/delete", "d/sub",
            "--out", out)
    assert (out / "d" / "delete").read_bytes() == orig["delete"]
    assert (out / "d" / "sub" / "keep2").read_bytes() == orig["sub/keep2"]
    r = cli("files", "--store", store, "--device", dev, "--at", "m2", "d/delete",
            "--out", tmp_path / "out2", check=False)
    assert r.returncode == 1 and "no such file" in r.stderr

    b = json.loads(cli("blame", "--store", store, "--device", dev, "--from", "m1", "--to", "m2",
                       "--path", "d/rewrite", "--format", "json").stdout)
    assert b and sum(x["bytes"] for x in b) >= 16384, b
    assert any(x["comm"].startswith(("python", "kworker")) for x in b), b
    none = json.loads(cli("blame", "--store", store, "--device", dev, "--from", "m1", "--to",
                          "m2", "--path", "d/keep", "--format", "json").stdout)
    assert none == [], none


def _tree_bytes(d) -> int:
    """Apparent bytes of every file under d (a sparse full image counts its whole size)."""
    n = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                n += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return n


def test_files_large_sparse_device_no_rebuild(make_loop, tmp_path, monkeypatch):
    """`files` on a 4 GiB ext4 device with a small history reads the point through the
    export (nbdkit + nbdfuse), not a full rebuild: the temporary directory never holds more
    than a few MiB, and nothing of the export is left afterwards."""
    import threading

    loop = make_loop(size_mb=4096)
    dev = loop.path
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log, store = tmp_path / "log", tmp_path / "store"
    data = random.Random(7).randbytes(300000)
    with TraceProc([dev], log) as t:
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
           dev)
        sh("mount", dev, mnt)
        try:
            wl_syncfs(mnt)
            cli("mark", "m0", "--log", log)
            (mnt / "d").mkdir()
            _write(mnt / "d" / "f", data)
            wl_syncfs(mnt)
            cli("mark", "m1", "--log", log)
        finally:
            sh("umount", mnt)
        assert t.stop() == 0, t.stderr
    cli("ingest", "--log", log, "--store", store)

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("BLKREWIND_TMP", str(tmp))
    # (other tests' exports may come and go meanwhile: only this device's runtime dirs count;
    # its loop device stays attached, so no other test has its name now)
    name = os.path.basename(dev)

    def runs() -> set:
        try:
            return {d for d in os.listdir("/run/blkrewind/exports")
                    if f"_{name}-" in d or d.startswith(f"{name}-")}
        except FileNotFoundError:
            return set()

    peak, seen, done = [0], set(), threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_bytes(tmp))
            seen.update(runs())
            time.sleep(0.01)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    t0 = time.monotonic()
    try:
        r = cli("files", "--store", store, "--device", dev, "--at", "m1", "d/f",
                "--out", tmp_path / "out")
    finally:
        done.set()
        w.join()
    took = time.monotonic() - t0
    assert (tmp_path / "out" / "d" / "f").read_bytes() == data
    assert "rebuilding" not in r.stderr, r.stderr
    assert peak[0] < 16 << 20, f"the temporary directory grew to {peak[0]} bytes"
    assert seen, "files did not read the point through an export"
    assert not runs() & seen, runs()
    print(f"files on a 4 GiB device: {took:.1f} s")

    # SIGINT while a point is open (bisect's CHECK runs on its mount): everything undone
    import signal
    import subprocess

    from tracerproc import BLKREWIND, ROOT
    p = subprocess.Popen([*BLKREWIND, "bisect", "--store", str(store), "--device", dev,
                          "--good", "m0", "--bad", "m1", "--", "sh", "-c",
                          'echo "ready $BLKREWIND_MOUNT"; exec sleep 60'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert p.stdout is not None and p.stderr is not None, "started with PIPEs"
    try:
        line = p.stdout.readline()
        assert line.startswith("ready "), line + p.stderr.read()
        mp = line.split(None, 1)[1].strip()
        assert os.path.ismount(mp) and runs()
        p.send_signal(signal.SIGINT)
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read()
    assert rc != 0 and "Traceback" not in err, err
    assert not os.path.exists(mp) and not runs(), (mp, runs())
    assert not [ln for ln in open("/proc/self/mountinfo") if f"_{name}-" in ln]
    assert not [b for b in sh("losetup", "-a").splitlines() if f"_{name}-" in b]
