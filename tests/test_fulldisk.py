"""The LOG's file system fills up during a workload (a small ext4 on its own loop device): the
tracer drops and counts what it cannot write, says so, keeps running; once space is freed it
resyncs the regions written meanwhile. Nothing in the LOG is corrupted, the marks before the
full episode and after the resync restore exactly, and so does `latest`.

(The store's file system filling up under `serve` is tests/test_server.py::
test_store_full_refuses_then_recovers; a LOG over --log-max-mb is tests/test_shipper.py.)"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest
from tracerproc import TraceProc, cli, copy_device, first_difference, same_file

pytestmark = [pytest.mark.bpf]


def _wait(pred, what: str, t, timeout: float = 60.0, where=None) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            df = ""
            if where is not None:
                st = os.statvfs(where)
                df = (f" ({st.f_bavail * st.f_frsize >> 20} of {st.f_blocks * st.f_frsize >> 20}"
                      f" MiB free: {sorted(os.listdir(where))})")
            raise AssertionError(f"timed out waiting for {what}{df}; the tracer said:\n"
                                 f"{t.stderr}")
        time.sleep(0.1)


def test_log_file_system_fills_then_recovers(make_loop, mkfs, mount_fs, tmp_path):
    dev = make_loop(size_mb=32, fill="random", dio=True)
    logdisk = make_loop(size_mb=192)  # the filler freed below must leave room for the resync
    mkfs(logdisk.path, "ext4", "-m", "0")
    mnt = mount_fs(logdisk.path, "ext4")
    log, store = mnt / "log", tmp_path / "store"
    # leave ~24 MB after the baseline (32 MiB of random data): the workload below writes 96 MiB
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / "filler"
    subprocess.run(["fallocate", "-l", str(free - (64 << 20)), str(filler)], check=True)
    copies = {}
    with TraceProc([dev.path], log) as t:
        cli("mark", "before", "--log", log)
        copies["before"] = tmp_path / "before.img"
        copy_device(dev.path, copies["before"])
        subprocess.run(["fio", "--name=fill", f"--filename={dev.path}", "--rw=randwrite",
                        "--bs=1m", "--direct=1", "--ioengine=libaio", "--iodepth=4",
                        "--size=32m", "--io_size=96m", "--randrepeat=0",
                        "--output=/dev/null"], check=True, timeout=300)
        _wait(lambda: "records are DROPPED" in t.stderr, "the LOG-full warning", t)
        # without --ship: said at the start and in the warning how the LOG is trimmed
        warning = next(ln for ln in t.lines if "records are DROPPED" in ln)
        assert f"ingest --log {log} --store DIR --delete-ingested" in warning, warning
        assert "note: without --ship nothing deletes the LOG" in t.stderr, t.stderr
        # the loss report counts the spans the writer dropped
        _wait(lambda: "spans refused by the LOG so far" in t.stderr, "the loss report", t)
        lost = next(ln for ln in t.lines if "spans refused by the LOG so far" in ln)
        refused = re.search(r"(\d+) spans refused by the LOG so far", lost)
        assert refused and int(refused.group(1)) > 0, lost
        os.unlink(filler)  # space again: the regions written meanwhile are read back
        _wait(lambda: "resync of" in t.stderr and " done" in t.stderr.split("resync of")[-1],
              "the resync", t, timeout=60, where=mnt)
        cli("mark", "after", "--log", log)
        copies["after"] = tmp_path / "after.img"
        copy_device(dev.path, copies["after"])
        assert t.stop() == 0, t.stderr
    out = cli("ingest", "--log", log, "--store", store).stdout  # no CorruptLog: exit 0
    assert "gap from stamp" in out, out
    loss = json.loads(cli("sql", "--store", store, "SELECT * FROM gaps",
                          "--format", "json").stdout)
    assert loss and all(g["resumed"] is not None for g in loss), loss
    for name, copy in [*copies.items(), ("latest", copies["after"])]:
        img = tmp_path / f"{name}-restored.img"
        cli("restore", "--store", store, "--device", dev.path, "--at", name, "--to", img)
        assert same_file(img, copy), f"{name}: {first_difference(img, copy)}"
