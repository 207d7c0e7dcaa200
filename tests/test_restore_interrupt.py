"""Interrupted restores (issue 13): `blkrewind restore` killed at random moments by SIGINT,
SIGTERM, SIGHUP or SIGKILL never leaves a half image under the final name (a file target is
written beside it and renamed), an image replaced with --force stays as it was until the new
one is complete, and an interrupted restore onto a block device says so loudly, leaves a
marker in the device's first 4 KiB and a note that `verify` and `status` report."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from synth import SynthSession
from tracerproc import BLKREWIND, ROOT, cli

SIGS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A 96 MiB device (mostly random data: the restore writes for a while), ingested."""
    d = tmp_path_factory.mktemp("restore-int")
    s = SynthSession(str(d / "log"), seed=5, size=96 << 20, chunk=1 << 20,
                     segment_bytes=8 << 20, piece=256 << 10)
    s.baseline()
    s.workload(20, marks=1, snapshots=0)
    s.end()
    cli("ingest", "--log", d / "log", "--store", d / "store")
    return d / "store", bytes(s.image)


def _restore(store, target, *extra):
    return subprocess.Popen([*BLKREWIND, "restore", "--store", str(store), "--device", "loop7",
                             "--at", "latest", "--to", str(target), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _interrupt(p, sig, delay):
    time.sleep(delay)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    return p.returncode, err


def _temps(d):
    return [n for n in os.listdir(d) if ".blkrewind-" in n]


def _direct_read(path, n):
    import mmap
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n)
        got = os.preadv(fd, [buf], 0)
        return bytes(buf[:got])
    finally:
        os.close(fd)


def _flush(dev):
    """Write back what a killed restore left dirty in the device's page cache (else the
    kernel may write it later, even into the next file attached to this loop device)."""
    fd = os.open(str(dev), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_new_image_is_absent_or_complete(history, tmp_path):
    store, image = history
    rng = random.Random(1301)
    outcomes = set()
    for i in range(8):
        sig = SIGS[i % len(SIGS)]
        target = tmp_path / f"img{i}.img"
        rc, err = _interrupt(_restore(store, target), sig, rng.uniform(0.2, 1.3))
        if target.exists():  # finished before the signal (it may still have hit the exit)
            assert target.read_bytes() == image, (sig, rc, err)
            outcomes.add("done")
            continue
        outcomes.add("absent")
        assert rc != 0
        if sig != signal.SIGKILL and rc > 0:  # (rc < 0: the signal came before the handlers)
            assert rc == 128 + sig, (sig, rc, err)
            assert err.strip() == f"blkrewind restore: interrupted ({sig.name})", err
        if sig != signal.SIGKILL:
            # (a SIGKILL of an earlier round leaves its own target's temporary image)
            assert [n for n in _temps(tmp_path) if n.startswith(f".{target.name}.")] == [], \
                (sig, rc, err)
    assert "absent" in outcomes
    # a SIGKILL leaves its temporary image beside the target: the next restore there removes it
    p = _restore(store, tmp_path / "k.img")
    deadline = time.monotonic() + 60
    while not [n for n in _temps(tmp_path) if n.startswith(".k.img.")] \
            and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.kill()  # as soon as it writes (a fixed delay let a fast restore finish first)
    p.wait()
    if (tmp_path / "k.img").exists():  # it finished before the kill after all
        (tmp_path / "k.img").unlink()
    left = [n for n in _temps(tmp_path) if n.startswith(".k.img.")]
    r = cli("restore", "--store", store, "--device", "loop7", "--at", "latest", "--to",
            tmp_path / "k.img", check=False)
    if left:
        assert "removed" in r.stderr and "killed" in r.stderr, r.stderr
    assert r.returncode == 0
    assert [n for n in _temps(tmp_path) if n.startswith(".k.img.")] == []
    assert (tmp_path / "k.img").read_bytes() == image


def test_force_over_an_existing_image_keeps_it_until_the_new_one_is_complete(history, tmp_path):
    store, image = history
    rng = random.Random(1302)
    old = rng.randbytes(1 << 20)
    target = tmp_path / "old.img"
    for i, sig in enumerate([signal.SIGTERM, signal.SIGKILL, signal.SIGINT, signal.SIGTERM]):
        target.write_bytes(old)
        rc, err = _interrupt(_restore(store, target, "--force"), sig, rng.uniform(0.3, 1.2))
        got = target.read_bytes()
        assert got == image if rc == 0 else got == old, (sig, rc, err)


def test_an_interrupted_restore_onto_a_device_says_so_and_marks_it(history, make_loop):
    store, image = history
    dev = make_loop(96)
    rng = random.Random(1303)
    seen_marked = False
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
        p = _restore(store, dev, "--force")
        # the marker is written before the data: wait until it is there, then interrupt
        for _ in range(300):
            if f'"pid": {p.pid},'.encode() in _direct_read(str(dev), 4096):
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        rc, err = _interrupt(p, sig, 0)
        _flush(dev)
        if rc == 0:  # it finished first: the device is exact
            assert _direct_read(str(dev), len(image)) == image
            continue
        seen_marked = True
        head = _direct_read(str(dev), 4096)
        assert head.startswith(b"BLKREWIND INCOMPLETE RESTORE"), (sig, rc, err)
        if sig != signal.SIGKILL:
            assert rc == 128 + sig and len(err.strip().splitlines()) == 1, (rc, err)
            assert "INCOMPLETE" in err and str(dev) in err, err
        v = cli("verify", "--store", store, "--device", "loop7", "--live", dev, check=False)
        assert v.returncode == 1 and "incomplete" in v.stdout and "interrupted" in v.stdout, v
        st = cli("status", "--store", store)
        assert f"restore onto {dev}" in st.stdout and "INTERRUPTED" in st.stdout, st.stdout
    assert seen_marked
    # restored again: exact, and neither verify nor status speaks of it any more
    cli("restore", "--store", store, "--device", "loop7", "--at", "latest", "--to", dev,
        "--force")
    assert _direct_read(str(dev), len(image)) == image
    assert "INTERRUPTED" not in cli("status", "--store", store).stdout
    assert cli("verify", "--store", store, "--device", "loop7", "--live", dev).returncode == 0
    _flush(dev)


def test_the_progress_bar_and_the_summary_use_the_same_units(history, tmp_path):
    """On a terminal restore shows a bar in MiB and MiB/s, the units of its summary line."""
    import re

    from tracerproc import run_on_pty

    store, image = history
    out = run_on_pty(["restore", "--store", store, "--device", "loop7", "--at", "latest",
                      "--to", tmp_path / "bar.img"],
                     env=dict(os.environ, TERM="xterm", COLUMNS="160"))
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    summary = [ln for ln in re.split(r"[\r\n]+", text) if ln.startswith("restored ")]
    assert len(summary) == 1 and re.search(r"\d MiB \([\d.]+ MiB of data\) in [\d.]+ s "
                                           r"\(\d+ MiB/s\)", summary[0]), text
    bar = [ln for ln in re.split(r"[\r\n]+", text) if "loop7 @" in ln and "restored" not in ln]
    assert bar, text   # the bar was drawn at least once
    assert all(re.search(r"[\d.]+/[\d.]+ MiB", ln) for ln in bar), bar
    assert any("MiB/s" in ln for ln in bar), bar
    assert not re.search(r"\d ?(kB|MB|GB)\b|[kMG]B/s", text), text  # no decimal units
    assert (tmp_path / "bar.img").read_bytes() == image
