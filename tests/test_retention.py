"""LOG retention without shipping (issue 13): `ingest --delete-ingested` deletes only the LOG
segments the store holds whole and durably -- never the newest, never a damaged or unsealed
one -- and every point restores exactly afterwards; beside a running tracer (BPF) the LOG
stays bounded while the history stays whole."""
from __future__ import annotations

import os
import random

import pytest
from synth import SynthSession
from tracerproc import TraceProc, cli, copy_device, direct_writes, same_file


def test_delete_ingested_keeps_what_the_store_lacks(tmp_path):
    log, store = tmp_path / "log", tmp_path / "store"
    s = SynthSession(str(log), seed=51, size=2 << 20, segment_bytes=128 << 10, chunk=128 << 10,
                     piece=16 << 10)
    s.baseline()
    s.workload(40, marks=2, snapshots=0)
    s.end()
    segs = sorted(log.glob("*.brlog"))
    assert len(segs) > 10
    victim = segs[len(segs) // 2]
    os.truncate(victim, victim.stat().st_size - 500)  # damaged: it must stay
    r = cli("ingest", "--log", log, "--store", store, "--delete-ingested", check=False)
    assert r.returncode == 3, r
    left = sorted(p.name for p in log.glob("*.brlog"))
    assert victim.name in left and segs[-1].name in left
    # every other segment was held whole by the store, and is gone
    assert len(left) == 2, left
    # the LOG as it is now ingests again into the same store: nothing new, nothing lost
    r = cli("ingest", "--log", log, "--store", store, check=False)
    assert r.returncode == 3 and "already in the store" in r.stdout
    # a whole LOG: only its newest segment stays, and the points restore exactly
    log2, store2 = tmp_path / "log2", tmp_path / "store2"
    s2 = SynthSession(str(log2), seed=52, size=2 << 20, segment_bytes=128 << 10,
                      chunk=128 << 10, piece=16 << 10)
    s2.baseline()
    s2.workload(40, marks=2, snapshots=0)
    s2.end()
    n = len(list(log2.glob("*.brlog")))
    r = cli("ingest", "--log", log2, "--store", store2, "--delete-ingested")
    assert f"deleted {n - 1} LOG segment(s)" in r.stdout, r.stdout
    assert len(list(log2.glob("*.brlog"))) == 1
    out = tmp_path / "x.img"
    for name, img in s2.at_mark.items():
        cli("restore", "--store", store2, "--device", "loop7", "--at", name, "--to", out,
            "--force")
        assert out.read_bytes() == img, name
    cli("restore", "--store", store2, "--device", "loop7", "--at", "latest", "--to", out,
        "--force")
    assert out.read_bytes() == bytes(s2.image)


@pytest.mark.bpf
def test_delete_ingested_beside_a_running_tracer(make_loop, tmp_path):
    dev = make_loop(32, fill="random")
    log, store = tmp_path / "log", tmp_path / "store"
    rng = random.Random(53)
    with TraceProc([dev], log, "--segment-mb", "1", "--ring-mb", "4") as tr:
        for _ in range(3):
            direct_writes(dev, rng, 40, 400)
            cli("mark", f"m{_}", "--log", log)
            cli("ingest", "--log", log, "--store", store, "--delete-ingested")
            # a running session keeps a ring buffer's worth (4 MiB) of its newest segments
            # (a tracer continuing it after a crash reads them back), plus what rotated since
            kept = sum(p.stat().st_size for p in log.glob("*.brlog"))
            assert kept < 8 << 20, kept
        tr.kill()   # a crash: the capture stays attached, the session may be continued
    cli("ingest", "--log", log, "--store", store, "--delete-ingested")
    with TraceProc([dev], log, "--segment-mb", "1", "--ring-mb", "4", wait_for="live") as tr:
        assert "continued" in tr.stderr, tr.stderr
        direct_writes(dev, rng, 40, 400)
        cli("mark", "after", "--log", log)
        copy_device(dev, tmp_path / "final.img")
        assert tr.stop() == 0, tr.stderr
    cli("ingest", "--log", log, "--store", store, "--delete-ingested")
    assert len(list(log.glob("*.brlog"))) == 1
    out = tmp_path / "x.img"
    cli("restore", "--store", store, "--device", dev, "--at", "latest", "--to", out)
    assert same_file(out, tmp_path / "final.img")
