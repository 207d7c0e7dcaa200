"""Restorable intervals across gaps (docs/internals.md, "Gaps and resync"): the interval
rule against a brute-force reading of the contract, and synthetic histories through a real
LOG and store: lost records, resyncs, several intervals, a gap not resynced, late frames,
the `restorable` and `gaps` views, and the errors for points inside a gap."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest
from synth import SynthSession, cli_main, restored

from blkrewind.errors import NotRestorable
from blkrewind.replayer import points
from blkrewind.replayer.store import Store
from blkrewind.replayer.watermark import _intervals, device_windows


# ------------------------------------------------------------ the rule, brute force
def _brute(start, top, gaps, resyncs):
    """Restorable stamps by the contract's words, stamp by stamp."""
    out = set()
    for p in range(start, top + 1):
        ok = True
        for g in gaps:
            if g > p:
                continue
            cover = [r for r in resyncs if r["end"] is not None and r["since"] <= g < r["start"]]
            if not cover or min(r["end"] for r in cover) > p:
                ok = False
                break
        if ok:
            out.add(p)
    return out


@pytest.mark.parametrize("seed", range(60))
def test_intervals_match_the_contract(seed):
    rng = random.Random(seed)
    top = rng.randrange(20, 120)
    start = rng.randrange(0, 15)
    gaps = sorted(rng.sample(range(0, top + 1), rng.randrange(0, 8)))
    resyncs: list[dict] = []
    for _ in range(rng.randrange(0, 5)):
        rs = rng.randrange(1, top + 3)
        since = rng.randrange(0, rs)
        end = rs + rng.randrange(1, 6) if rng.random() < 0.85 else None
        resyncs.append({"start": rs, "since": since, "end": end, "cause": "x"})
    resyncs.sort(key=lambda r: r["start"])
    # gap runs as the scan keeps them
    runs: list[tuple[int, int, str | None, bool]] = []
    for g in gaps:
        if runs and runs[-1][1] == g - 1:
            runs[-1] = (runs[-1][0], g, None, False)
        else:
            runs.append((g, g, None, False))
    ivs = _intervals(start, top, device_windows(runs, resyncs, None))
    got: set[int] = set()
    for a, b in ivs:
        assert a <= b
        got.update(range(a, b + 1))
    assert got == _brute(start, top, gaps, resyncs), (ivs, gaps, resyncs)
    # intervals are maximal and in order
    assert all(b1 + 1 < a2 for (_, b1), (a2, _) in zip(ivs, ivs[1:]))


# ------------------------------------------------------------ synthetic histories
def ingest(capsys, log, store):
    rc, out, err = cli_main(capsys, "ingest", "--log", log, "--store", store)
    assert rc == 0, err
    return out


def sql(capsys, store, q):
    rc, out, err = cli_main(capsys, "sql", "--store", store, q, "--format", "json")
    assert rc == 0, err
    return json.loads(out)


def refused(capsys, store, at, tmp_path, *words):
    rc, _, err = cli_main(capsys, "restore", "--store", store, "--device", "loop7", "--at", at,
                          "--to", tmp_path / "no.img")
    assert rc == 5, err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "no.img").exists()
    return err


def _gappy(log, seed=61):
    """baseline, writes, a loss (a lost piece + a lost discard) covered by a resync, more
    writes with marks, a second loss covered, a third loss never resynced."""
    s = SynthSession(str(log), seed=seed, size=2 << 20, chunk=128 << 10, piece=16 << 10)
    s.baseline()
    s.workload(30, marks=1, snapshots=2)
    c1 = s.checkpoint()
    s.workload(5, marks=0, snapshots=0)
    g1 = s.write(64 << 10, s.rng.randbytes(48 << 10), drop_piece=1)
    s.workload(4, marks=0, snapshots=0)
    s.nodata(3, 512 << 10, 64 << 10, lose=True)  # a lost discard
    s.workload(4, marks=0, snapshots=0)
    rs1, re1 = s.resync(c1, "ring full")
    s.workload(30, marks=2, snapshots=3)
    c2 = s.checkpoint()
    g2 = s.nodata(9, 0, 4096, lose=True)  # a lost write-zeroes
    rs2, re2 = s.resync(c2, "log full", between=lambda x: x.workload(3, marks=0, snapshots=0))
    s.workload(20, marks=1, snapshots=2)
    before3 = s.snapshot()
    g3 = s.write(0, s.rng.randbytes(8192), drop_piece=0)
    s.workload(10, marks=1, snapshots=1)
    s.end(drops=3)
    return s, dict(c1=c1, g1=g1, rs1=rs1, re1=re1, c2=c2, g2=g2, rs2=rs2, re2=re2, g3=g3,
                   before3=before3)


def test_gaps_resyncs_and_intervals(capsys, tmp_path):
    log, store = tmp_path / "log", tmp_path / "store"
    s, k = _gappy(log)
    ingest(capsys, log, store)
    rs = sql(capsys, store, "SELECT * FROM restorable ORDER BY from_stamp")
    assert [(r["from_stamp"], r["to_stamp"]) for r in rs] == [
        (s.baseline_end, k["g1"] - 1), (k["re1"], k["g2"] - 1), (k["re2"], k["g3"] - 1)]
    assert all(r["reason"] is None and r["from_time"] <= r["to_time"] for r in rs)
    gaps = sql(capsys, store, "SELECT * FROM gaps ORDER BY stamp")
    assert [(g["stamp"], g["resumed"], g["cause"].split(";")[0]) for g in gaps] == [
        (k["g1"], k["re1"], "ring full"), (k["g2"], k["re2"], "log full"),
        (k["g3"], None, "not resynced (yet)")]
    assert gaps[0]["missing"] == 2 and gaps[0]["last_stamp"] == k["re1"] - 1
    assert "incomplete" in gaps[0]["reason"] and "missing" in gaps[1]["reason"]
    assert gaps[0]["device"] == "synth:loop7" and gaps[0]["watermark"] == k["g1"] - 1
    assert gaps[2]["stamps_after"] >= 5 and "3 lost records" in gaps[2]["cause"]
    ses = sql(capsys, store, "SELECT watermark, first_gap FROM sessions")[0]
    assert ses == {"watermark": k["g1"] - 1, "first_gap": k["g1"]}
    marks = {m["name"]: m["restorable"] for m in sql(capsys, store, "SELECT * FROM marks")}
    # every restorable point restores exactly; the others are refused clearly
    inside = lambda p: any(r["from_stamp"] <= p <= r["to_stamp"] for r in rs)  # noqa: E731
    checked = 0
    for name, stamps in s.marks.items():
        assert marks[name] == inside(stamps[-1]), name
        if inside(stamps[-1]):
            assert restored(capsys, store, name, tmp_path) == s.at_mark[name], name
            checked += 1
    for stamp, img in s.at_stamp.items():
        if inside(stamp):
            assert restored(capsys, store, str(stamp), tmp_path) == img, stamp
            checked += 1
    assert checked >= 8
    assert restored(capsys, store, str(k["re1"]), tmp_path) == s.at_stamp[k["re1"]]
    assert restored(capsys, store, str(k["re2"]), tmp_path) == s.at_stamp[k["re2"]]
    assert k["before3"] == k["g3"] - 1
    assert restored(capsys, store, "latest", tmp_path) == s.at_stamp[k["before3"]]
    # refusals: in a window, naming the nearest restorable points; past the open gap
    err = refused(capsys, store, str(k["g1"] + 1), tmp_path, "in a gap of synth:loop7",
                  "ring full", f"stamp {k['g1'] - 1}", f"stamp {k['re1']}")
    assert f"resynced at stamp {k['re1']}" in err
    refused(capsys, store, str(k["rs2"]), tmp_path, "log full", f"stamp {k['re2']}")
    refused(capsys, store, str(k["g3"] + 2), tmp_path,
            f"past the consistent watermark {k['g3'] - 1}", f"first gap at stamp {k['g3']}")
    # a time inside a window
    st = Store.open(store)
    try:
        dev = st.find_device("loop7")
        t = s.time_of[k["g1"] + 1]
        with pytest.raises(NotRestorable, match="in a gap of synth:loop7.*nearest restorable"):
            points.resolve(st, dev, points.Point("time", t, "t"))
        r = points.resolve(st, dev, points.Point("time", s.time_of[k["re1"]], "t"))
        assert r.stamp == k["re1"]
    finally:
        st.close()


def test_latest_after_a_resync(capsys, tmp_path):
    log, store = tmp_path / "log", tmp_path / "store"
    s = SynthSession(str(log), seed=62, size=1 << 20, chunk=64 << 10)
    s.baseline()
    s.workload(20, marks=0, snapshots=0)
    c = s.checkpoint()
    s.random_write(drop_piece=0)
    s.workload(10, marks=0, snapshots=0)
    s.resync(c)
    s.workload(10, marks=1, snapshots=0)
    s.end()
    ingest(capsys, log, store)
    assert restored(capsys, store, "latest", tmp_path) == bytes(s.image)
    assert restored(capsys, store, "m1", tmp_path) == s.at_mark["m1"]


def test_a_resync_that_does_not_cover_the_gap(capsys, tmp_path):
    """since > the lost stamp: the gap stays open; nothing after it is restorable."""
    log, store = tmp_path / "log", tmp_path / "store"
    s = SynthSession(str(log), seed=63, size=1 << 20, chunk=64 << 10)
    s.baseline()
    g = s.random_write(drop_piece=0)
    s.workload(5, marks=0, snapshots=0)
    s.resync(s.checkpoint())
    s.workload(5, marks=0, snapshots=0)
    s.end()
    ingest(capsys, log, store)
    rs = sql(capsys, store, "SELECT from_stamp, to_stamp FROM restorable")
    assert rs == [{"from_stamp": s.baseline_end, "to_stamp": g - 1}]
    refused(capsys, store, str(s.last_stamp), tmp_path, "past the consistent watermark")


def test_late_frames_and_incremental_scans(capsys, tmp_path):
    """Ingest with a segment missing (its stamps read as a gap, not resynced), then with
    it: the gap closes. Then more of the session arrives: the scan goes on from where it
    was (scan_state), and the intervals grow."""
    log, store = tmp_path / "log", tmp_path / "store"
    s = SynthSession(str(log), seed=64, size=1 << 20, chunk=64 << 10, segment_bytes=64 << 10)
    s.baseline()
    s.workload(120, marks=2, snapshots=2)
    s.end()
    segs = sorted(os.listdir(log))
    segs = [x for x in segs if x.endswith(".brlog")]
    assert len(segs) >= 5
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    victim = segs[len(segs) // 2]
    shutil.move(str(log / victim), hidden / victim)
    ingest(capsys, log, store)
    rs = sql(capsys, store, "SELECT from_stamp, to_stamp FROM restorable")
    assert len(rs) == 1 and rs[0]["to_stamp"] < s.last_stamp
    gaps = sql(capsys, store, "SELECT * FROM gaps")
    assert len(gaps) == 1 and gaps[0]["resumed"] is None
    shutil.move(str(hidden / victim), log / victim)
    ingest(capsys, log, store)
    rs = sql(capsys, store, "SELECT from_stamp, to_stamp FROM restorable")
    assert rs == [{"from_stamp": s.baseline_end, "to_stamp": s.last_stamp}]
    assert sql(capsys, store, "SELECT * FROM gaps") == []
    assert sql(capsys, store, "SELECT scanned_to FROM scan_state")[0]["scanned_to"] == s.last_stamp
    assert restored(capsys, store, "latest", tmp_path) == bytes(s.image)


def test_growing_session_is_scanned_incrementally(capsys, tmp_path):
    """A session still being written: each ingest scans only the new stamps."""
    from blkrewind.replayer import watermark
    log, store = tmp_path / "log", tmp_path / "store"
    s = SynthSession(str(log), seed=65, size=1 << 20, chunk=64 << 10)
    s.baseline()
    s.workload(40, marks=1, snapshots=0)
    s.flush_frame()
    ingest(capsys, log, store)
    first = sql(capsys, store, "SELECT * FROM restorable")
    assert len(first) == 1 and first[0]["from_stamp"] == s.baseline_end
    c = s.checkpoint()
    s.random_write(drop_piece=0)
    s.workload(10, marks=0, snapshots=0)
    s.resync(c)
    s.workload(10, marks=1, snapshots=0)
    s.end()
    calls = []
    orig = watermark._bad_runs

    def spy(con, session, lo, hi):
        calls.append((lo, hi))
        return orig(con, session, lo, hi)

    watermark._bad_runs = spy
    try:
        ingest(capsys, log, store)
    finally:
        watermark._bad_runs = orig
    assert calls and min(lo for lo, _ in calls) >= first[0]["to_stamp"] - 1, calls
    rs = sql(capsys, store, "SELECT from_stamp, to_stamp FROM restorable ORDER BY from_stamp")
    assert len(rs) == 2 and rs[-1]["to_stamp"] == s.last_stamp
    assert restored(capsys, store, "latest", tmp_path) == bytes(s.image)
    assert restored(capsys, store, "m2", tmp_path) == s.at_mark["m2"]
