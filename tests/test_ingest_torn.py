"""Torn tail or damage (issue 13): an incomplete last frame is a torn tail only at the end of
the LOG's newest segment (a tracer seals a segment before it opens the next, and seals what a
dead tracer left when it starts); anywhere else -- a rotated segment cut short -- it is damage:
ingest exits 3 with one line naming the segment, and `restore --at latest` and `status` say
that the history goes on past the gap it leaves."""
from __future__ import annotations

import json
import os

from synth import SynthSession
from tracerproc import cli

from blkrewind.tracer.log import LogLock


def _log(tmp_path, seed):
    s = SynthSession(str(tmp_path / "log"), seed=seed, size=2 << 20, segment_bytes=128 << 10,
                     chunk=128 << 10, piece=16 << 10)
    s.baseline()
    s.workload(60, marks=1, snapshots=0)
    s.end()
    return sorted((tmp_path / "log").glob("*.brlog"))


def _cut(path, n=1000):
    os.truncate(path, path.stat().st_size - n)


def test_a_cut_rotated_segment_is_damage_and_latest_says_the_history_goes_on(tmp_path):
    segs = _log(tmp_path, 31)
    victim = segs[len(segs) * 2 // 3]
    _cut(victim)
    store = tmp_path / "store"
    r = cli("ingest", "--log", tmp_path / "log", "--store", store, check=False)
    assert r.returncode == 3, r
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert victim.name in err and "not the LOG's newest segment" in err, err
    assert "torn tail" not in r.stdout
    r = cli("restore", "--store", store, "--device", "loop7", "--at", "latest", "--to",
            tmp_path / "x.img")
    assert "the history goes on past a gap" in r.stderr and "not restorable" in r.stderr, r
    st = json.loads(cli("status", "--store", store, "--format", "json").stdout)
    dev = st["hosts"][0]["devices"][0]
    assert dev["gap"] is not None and dev["stamps_after_gap"] > 0
    out = cli("status", "--store", store).stdout
    assert "history goes on past it" in out
    # the note column wraps at words: its cells joined again are the whole note
    rows = [ln.split("│") for ln in out.splitlines() if ln.startswith("│")]
    note = " ".join(r[-2].strip() for r in rows if r[-2].strip())
    assert note.endswith(f"; gap: {dev['gap_reason']}; the history goes on past it "
                         f"({dev['stamps_after_gap']} later stamp(s) stored, not restorable)"), out
    assert len(rows) > 1, out   # (it did wrap)


def test_a_torn_tail_at_the_end_of_the_newest_segment_is_a_note(tmp_path):
    segs = _log(tmp_path, 32)
    _cut(segs[-1])
    store = tmp_path / "store"
    r = cli("ingest", "--log", tmp_path / "log", "--store", store)
    assert f"note: {segs[-1].name} ends in" in r.stdout
    assert "a torn tail: the tracer stopped" in r.stdout, r.stdout
    # held by a (live) tracer: it is still writing it
    with LogLock(tmp_path / "log"):
        r = cli("ingest", "--log", tmp_path / "log", "--store", store)
    assert f"(the tracer (pid {os.getpid()}) is still writing it)" in r.stdout, r.stdout


def test_a_rotated_segment_cut_at_a_frame_boundary_is_damage(tmp_path):
    """No incomplete frame to see: whole frames, then the file ends without its SEAL."""
    from blkrewind.tracer.log import SegmentReader

    segs = _log(tmp_path, 33)
    victim = segs[len(segs) // 2]
    with SegmentReader(victim) as rd:
        spans = list(rd.frame_spans())   # (frame_no, offset, size); the last is the SEAL
    assert len(spans) >= 3
    os.truncate(victim, spans[-2][1])   # the last data frame and the SEAL go
    store = tmp_path / "store"
    r = cli("ingest", "--log", tmp_path / "log", "--store", store, check=False)
    assert r.returncode == 3, r
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert victim.name in err and "without its SEAL" in err and "not the LOG's newest" in err
    r = cli("restore", "--store", store, "--device", "loop7", "--at", "latest", "--to",
            tmp_path / "x.img")
    assert "the history goes on past a gap" in r.stderr, r.stderr
    # the newest segment without its SEAL (a tracer killed) is no damage
    segs = _log(tmp_path / "b", 34)
    with SegmentReader(segs[-1]) as rd:
        spans = list(rd.frame_spans())
    os.truncate(segs[-1], spans[-1][1])   # the SEAL goes
    r = cli("ingest", "--log", tmp_path / "b" / "log", "--store", tmp_path / "b" / "store")
    assert r.returncode == 0 and not r.stderr.strip(), r
