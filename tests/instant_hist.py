"""Traced file-system histories for the instant-access tests (export, mount, rewind).

`fs_history(base, fstype)` makes a loop device with a file system, traces it with the real
tracer (tests/tracerproc.py) through test_e2e's workload (files written, overwritten, deleted,
trimmed; marks m1..m4 taken with the file system frozen, each with a copy of the device taken
at the mark), ingests the LOG, and returns a `Hist`: the store, the device, the copies at the
marks, the final copy, and the files' checksums at each mark. The loop device is detached
before it returns (the tests read the store, not the device), unless keep_device.
"""
from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import detach_loop
from test_e2e import FS_SIZE_MB, Marker, fs_workload
from tracerproc import TraceProc, cli, copy_device, sh


@dataclass
class Hist:
    fstype: str
    store: Path
    dev: str              # the traced device's path (its store name)
    name: str             # the store's device name (loopN)
    copies: dict          # mark -> copy of the device at the mark
    final: Path
    files: dict = field(default_factory=dict)   # mark -> {relpath: sha256}
    backing: Path | None = None


def tree_sums(root: Path) -> dict:
    out = {}
    for dp, dns, fns in os.walk(root):
        dns[:] = [d for d in dns if d != "lost+found"]
        for fn in fns:
            p = Path(dp) / fn
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class SumMarker(Marker):
    """test_e2e's Marker, also keeping the files' checksums at each mark (frozen)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sums: dict = {}

    def __call__(self, name: str, mnt: Path | None = None) -> None:
        if mnt is not None:
            self.sums[name] = tree_sums(mnt)
        super().__call__(name, mnt)


def fs_history(base: Path, fstype: str = "ext4", *, keep_device: bool = False,
               seed: str | None = None) -> Hist:
    rng = random.Random(seed or fstype)
    base.mkdir(parents=True, exist_ok=True)
    backing = base / "dev.img"
    with open(backing, "wb") as f:
        f.truncate(FS_SIZE_MB[fstype] << 20)
    dev = sh("losetup", "--find", "--show", backing).strip()
    ok = False
    try:
        sh(f"mkfs.{fstype}", "-q", "-f" if fstype == "xfs" else "-F", dev)
        mnt = base / "mnt"
        mnt.mkdir()
        log, store = base / "log", base / "store"
        marker = SumMarker(dev, log, base)
        with TraceProc([dev], log, "--segment-mb", "4") as t:
            sh("mount", dev, mnt)
            try:
                fs_workload(mnt, marker, rng)
            finally:
                sh("umount", mnt)
            assert t.stop() == 0, t.stderr
        final = base / "final.img"
        copy_device(dev, final)
        cli("ingest", "--log", log, "--store", store)
        ok = True
        return Hist(fstype, store, dev, os.path.basename(dev), marker.copies, final,
                    marker.sums, backing)
    finally:
        if not (ok and keep_device):
            problems = detach_loop(dev, str(backing))
            assert not problems, problems


class Export:
    """`blkrewind export ...` as a user runs it: a process; its URI from stdout; SIGINT stops
    it."""

    def __init__(self, *args, cmd=None):
        from conftest import cli_command
        self.p = subprocess.Popen([*(cmd or cli_command()), "export", *map(str, args)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL)
        assert self.p.stdout is not None and self.p.stderr is not None, "started with PIPEs"
        self.uri = self.p.stdout.readline().strip()
        if not self.uri:
            err = self.p.stderr.read()
            self.p.wait(30)
            raise AssertionError(f"export did not start (exit {self.p.returncode}): {err}")

    def stop(self) -> tuple[int, str]:
        if self.p.poll() is None:
            self.p.send_signal(2)
        try:
            rc = self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            rc = self.p.wait(30)
        assert self.p.stderr is not None, "started with stderr=PIPE"
        return rc, self.p.stderr.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def nbdcopy(uri: str, out: Path) -> None:
    sh("nbdcopy", uri, out)


def wait_until(pred, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
