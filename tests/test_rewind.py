"""`blkrewind rewind` on a loop device holding a traced ext4 history's final state."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error, need_root, run_cli, sh
from instant_hist import fs_history


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    need_root()
    return fs_history(tmp_path_factory.mktemp("rw") / "h", "ext4")


def _sectors_written(loop: str) -> int:
    return int(Path(f"/sys/block/{os.path.basename(loop)}/stat").read_text().split()[6])


def _same(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def test_rewind_back_and_forward_writes_only_what_changed(hist, make_loop, tmp_path):
    loop = make_loop(size_mb=128)
    sh("dd", f"if={hist.final}", f"of={loop.path}", "bs=1M", "oflag=direct", "status=none")
    before = _sectors_written(loop.path)
    r = run_cli("rewind", "--store", hist.store, "--device", hist.name, "--at", "m3", "--to",
                loop.path)
    wrote = int(r.stderr.split(" bytes written")[0].rsplit(" ", 1)[1])
    sectors = _sectors_written(loop.path) - before
    assert sectors * 512 == wrote, (sectors, wrote)       # nothing but the changed ranges
    assert 0 < wrote < loop.size
    sh("dd", f"if={loop.path}", f"of={tmp_path / 'now.img'}", "bs=1M", "iflag=direct",
       "status=none")
    assert _same(tmp_path / "now.img", hist.copies["m3"])
    v = run_cli("verify", "--store", hist.store, "--device", hist.name, "--at", "m3", "--live",
                loop.path)
    assert v.stdout.startswith("equal")
    # the device is at m3 now, not at latest: refused, nothing written
    before = _sectors_written(loop.path)
    cp = run_cli("rewind", "--store", hist.store, "--device", hist.name, "--at", "m1", "--to",
                 loop.path, check=False)
    assert_one_line_error(cp, "not at the point")
    assert _sectors_written(loop.path) == before
    # forward again, from m3 to latest
    run_cli("rewind", "--store", hist.store, "--device", hist.name, "--at", "latest", "--from",
            "m3", "--to", loop.path)
    sh("dd", f"if={loop.path}", f"of={tmp_path / 'now.img'}", "bs=1M", "iflag=direct",
       "status=none")
    assert _same(tmp_path / "now.img", hist.final)


def test_rewind_refuses_a_mounted_device_and_bad_input(hist, make_loop, tmp_path):
    loop = make_loop(size_mb=128)
    sh("dd", f"if={hist.final}", f"of={loop.path}", "bs=1M", "oflag=direct", "status=none")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", "-o", "ro,noload", loop.path, mnt)
    try:
        cp = run_cli("rewind", "--store", hist.store, "--device", hist.name, "--at", "m1",
                     "--to", loop.path, check=False)
        assert_one_line_error(cp, "in use")
    finally:
        sh("umount", mnt)
    small = make_loop(size_mb=64)
    cp = run_cli("rewind", "--store", hist.store, "--device", hist.name, "--at", "m1", "--to",
                 small.path, check=False)
    assert_one_line_error(cp, "not the same device")
    cp = run_cli("rewind", "--store", hist.store, "--device", hist.name, "--at", "nosuch",
                 "--to", loop.path, check=False)
    assert_one_line_error(cp, "nosuch")


@pytest.mark.bpf
def test_rewind_of_a_traced_device_keeps_its_history_exact(make_loop, tmp_path):
    """The device is still traced while it is rolled back: the rewind's writes are captured
    like any other, so afterwards `restore --at latest` equals the device (O_DIRECT) and the
    mark placed before the rewind still restores exactly."""
    import random

    from tracerproc import TraceProc, cli, copy_device, direct_writes

    loop = make_loop(size_mb=32)
    log, store = tmp_path / "log", tmp_path / "store"
    rng = random.Random(59)
    with TraceProc([loop.path], log, "--segment-mb", "4") as t:
        direct_writes(loop.path, rng, 24, slots=512)
        cli("mark", "m1", "--log", log)
        copy_device(loop.path, tmp_path / "m1.img")
        direct_writes(loop.path, rng, 24, slots=512)
        cli("mark", "m2", "--log", log)       # everything before it is in the LOG
        copy_device(loop.path, tmp_path / "m2.img")
        assert not _same(tmp_path / "m1.img", tmp_path / "m2.img")
        cli("ingest", "--log", log, "--store", store)   # the live LOG, up to m2
        name = os.path.basename(loop.path)
        r = run_cli("rewind", "--store", store, "--device", name, "--at", "m1", "--from", "m2",
                    "--to", loop.path)
        assert "bytes written" in r.stderr, r.stderr
        copy_device(loop.path, tmp_path / "now.img")
        assert _same(tmp_path / "now.img", tmp_path / "m1.img")
        assert t.stop() == 0, t.stderr
    cli("ingest", "--log", log, "--store", store)
    for at, want in (("latest", tmp_path / "now.img"), ("m1", tmp_path / "m1.img"),
                     ("m2", tmp_path / "m2.img")):
        out = tmp_path / f"restored-{at}.img"
        run_cli("restore", "--store", store, "--device", name, "--at", at, "--to", out)
        assert _same(out, want), f"restore at {at} differs"
    v = run_cli("verify", "--store", store, "--device", name, "--at", "latest", "--live",
                loop.path)
    assert v.stdout.startswith("equal"), v.stdout
