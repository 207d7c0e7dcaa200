"""The store and `blkrewind ingest`: crash safe, idempotent, order independent; the
watermark; corrupt and torn LOGs; store errors. Real LOGs (tests/synth.py writes them
with tracer.log.LogWriter), real DuckDB and Parquet files, no mocks."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, assert_one_line_error, run_cli
from synth import SynthSession, cli_main, history
from synth import restored as restore_bytes

from blkrewind.errors import UserError
from blkrewind.replayer.store import Store


# ----------------------------------------------------------------------------- helpers
def ingest(capsys, log, store, *extra) -> str:
    rc, out, err = cli_main(capsys, "ingest", "--log", log, "--store", store, *extra)
    assert rc == 0, err
    return out


def sql(capsys, store, q):
    rc, out, err = cli_main(capsys, "sql", "--store", store, q, "--format", "json")
    assert rc == 0, err
    return json.loads(out)


def check_points(capsys, store, s: SynthSession, tmp_path, device="loop7") -> None:
    """Every mark, every snapshot at or after the baseline end, and latest == the model."""
    def after_baseline(stamp: int) -> bool:
        assert s.baseline_end is not None, "the synthetic session has no baseline"
        return stamp >= s.baseline_end

    for name, img in s.at_mark.items():
        if after_baseline(s.marks[name][-1]):
            assert restore_bytes(capsys, store, name, tmp_path, device) == img, name
    for stamp, img in s.at_stamp.items():
        if after_baseline(stamp):
            assert restore_bytes(capsys, store, str(stamp), tmp_path, device) == img, stamp
    assert restore_bytes(capsys, store, "latest", tmp_path, device) == bytes(s.image)


def store_content(capsys, store) -> dict:
    """What a user can see of a store, for comparing stores."""
    return {q: sql(capsys, store, q) for q in (
        "SELECT * FROM writes ORDER BY stamp",
        "SELECT * FROM marks ORDER BY stamp",
        "SELECT * FROM restorable ORDER BY device, session",
        "SELECT * FROM sessions ORDER BY session",
        "SELECT * FROM devices ORDER BY device",
        "SELECT * FROM baseline ORDER BY reread",
        "SELECT * FROM completions ORDER BY time, sector",
        "SELECT * FROM loss ORDER BY time",
        "SELECT * FROM points ORDER BY stamp",
    )}


def segments(log):
    return sorted(p for p in log.iterdir() if p.name.endswith(".brlog"))


# ------------------------------------------------------------------------------- tests
def test_ingest_builds_a_store_and_reports(capsys, tmp_path):
    s = history(tmp_path / "log", seed=11)
    store = tmp_path / "store"
    out = ingest(capsys, tmp_path / "log", store)
    assert f"restorable stamps {s.baseline_end}..{s.last_stamp}" in out, out
    assert "synth:loop7" in out and "ingested" in out
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700
    assert (store / "meta.duckdb").is_file()
    files = list((store / "payload").rglob("*.parquet"))
    assert files
    # lz4 where it pays (the baseline is half zeroes), plain where the data is random
    codecs = {pq.ParquetFile(f).metadata.row_group(0).column(4).compression for f in files}
    assert codecs & {"LZ4", "LZ4_RAW"} and codecs <= {"LZ4", "LZ4_RAW", "UNCOMPRESSED"}
    # the metadata knows every bio, every mark, the device and the baseline
    writes = sql(capsys, store, "SELECT stamp, op, sector, length FROM writes ORDER BY stamp")
    assert [(w["stamp"], w["sector"], w["length"]) for w in writes] == \
        [(st, sec, n) for st, _op, sec, n in s.bios]
    assert {m["name"] for m in sql(capsys, store, "SELECT name FROM marks")} == set(s.marks)
    check_points(capsys, store, s, tmp_path)
    # nothing new: a second run ingests nothing and changes nothing
    before = store_content(capsys, store)
    out = ingest(capsys, tmp_path / "log", store)
    assert "ingested 0 segments" in out
    assert store_content(capsys, store) == before


def test_shuffled_parallel_and_twice_give_the_same_store(capsys, tmp_path):
    log = tmp_path / "log"
    s = history(log, seed=12, nbios=200, segment_bytes=128 << 10)
    segs = segments(log)
    assert len(segs) >= 8
    ref = tmp_path / "ref"
    ingest(capsys, log, ref, "--jobs", "1")
    # segment by segment in a random order, then all of it in parallel, then again
    other = tmp_path / "other"
    random.Random(3).shuffle(segs)
    for i, seg in enumerate(segs):
        one = tmp_path / f"one-{i}"
        one.mkdir()
        os.link(seg, one / seg.name)
        ingest(capsys, one, other)
        shutil.rmtree(one)
    ingest(capsys, log, other, "--jobs", "4")
    ingest(capsys, log, other, "--jobs", "4")
    third = tmp_path / "third"
    ingest(capsys, log, third, "--jobs", "4")
    a = store_content(capsys, ref)
    assert store_content(capsys, other) == a
    assert store_content(capsys, third) == a
    for st in (ref, other, third):
        check_points(capsys, st, s, tmp_path)


def test_two_ingests_at_once(tmp_path):
    """A second writer waits for the store's lock; the result is the same store."""
    log = tmp_path / "log"
    s = history(log, seed=13, nbios=150, segment_bytes=64 << 10)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "blkrewind.cli", "ingest", "--log", str(log), "--store", str(store)]
    ps = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for _ in range(2)]
    results = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in ps]
    for rc, err in results:
        assert rc == 0 or "is busy" in err, err
        assert "Traceback" not in err
    ref = tmp_path / "ref"
    run_cli("ingest", "--log", log, "--store", ref)
    q = "SELECT * FROM writes ORDER BY stamp"
    assert run_cli("sql", "--store", store, q, "--format", "csv").stdout == \
        run_cli("sql", "--store", ref, q, "--format", "csv").stdout
    assert s.bios


def test_store_lock_and_busy_errors(tmp_path):
    history(tmp_path / "log", seed=23, nbios=5)
    store = tmp_path / "store"
    w = Store.open(store, write=True, create=True)
    env = dict(os.environ, BLKREWIND_STORE_WAIT="0.3")
    try:
        with pytest.raises(UserError, match="is busy"):
            Store.open(store, write=True, wait=0.2)
        assert_one_line_error(run_cli("ingest", "--log", tmp_path / "log", "--store", store,
                                      check=False, env=env), "is busy", f"pid {os.getpid()}")
        # a reader while a writer has the database open
        assert_one_line_error(run_cli("sql", "--store", store, "SELECT 1", check=False, env=env),
                              "is busy")
    finally:
        w.close()
    Store.open(store, write=True, wait=0.2).close()
    run_cli("sql", "--store", store, "SELECT 1", env=env)


def test_missing_or_foreign_store(tmp_path):
    nostore = tmp_path / "nostore"
    assert_one_line_error(run_cli("sql", "--store", nostore, "SELECT 1", check=False),
                          "no store at")
    assert_one_line_error(run_cli("restore", "--store", nostore, "--device", "loop7", "--at",
                                  "latest", "--to", tmp_path / "x.img", check=False), "no store at")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli("sql", "--store", foreign, "SELECT 1", check=False),
                          "not a blkrewind store")
    history(tmp_path / "log", seed=14, nbios=5)
    assert_one_line_error(run_cli("ingest", "--log", tmp_path / "log", "--store", foreign,
                                  check=False), "not a blkrewind store")
    assert (foreign / "notes.txt").read_text() == "mine"
    assert_one_line_error(run_cli("ingest", "--log", tmp_path / "nolog", "--store",
                                  tmp_path / "s", check=False), "no LOG")


@pytest.mark.parametrize("how", ["piece", "record"])
def test_a_missing_stamp_stops_the_watermark(capsys, tmp_path, how):
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=15)
    s.baseline()
    s.workload(40, marks=1, snapshots=0)
    before = s.snapshot()
    if how == "piece":  # one payload piece of a 300 KiB write never reached the LOG
        lost = s.write(512 * 64, s.rng.randbytes(300 << 10), drop_piece=2)
    else:  # the only record of a discard was lost
        lost = s.nodata(3, 0, 1 << 20, lose=True)
    s.mark("after")
    s.workload(30, marks=0, snapshots=0)
    s.end(drops=1)
    store = tmp_path / "store"
    out = ingest(capsys, log, store)
    assert f"restorable stamps {s.baseline_end}..{lost - 1}" in out, out
    assert f"gap from stamp {lost} " in out and "not restorable after it" in out, out
    gaps = sql(capsys, store, "SELECT * FROM gaps")
    assert [g["stamp"] for g in gaps] == [lost]
    assert ("incomplete" if how == "piece" else "missing") in gaps[0]["reason"]
    assert gaps[0]["stamps_after"] > 20
    rs = sql(capsys, store, "SELECT * FROM restorable")
    assert [(r["from_stamp"], r["to_stamp"]) for r in rs] == [(s.baseline_end, lost - 1)]
    assert restore_bytes(capsys, store, str(before), tmp_path) == s.at_stamp[before]
    assert restore_bytes(capsys, store, "latest", tmp_path) == s.at_stamp[before]
    for at in (str(lost), "after", str(s.last_stamp)):
        rc, _, err = cli_main(capsys, "restore", "--store", store, "--device", "loop7", "--at", at,
                              "--to", tmp_path / "x.img")
        assert rc == 5, err
        assert f"past the consistent watermark {lost - 1} of synth:loop7" in err
        assert f"first gap at stamp {lost}" in err
        assert not (tmp_path / "x.img").exists()
    assert sql(capsys, store, "SELECT drops FROM loss")[0]["drops"] == 1


def test_corrupt_frame_in_the_middle(tmp_path):
    log = tmp_path / "log"
    s = history(log, seed=16, nbios=200, segment_bytes=1 << 20)
    segs = segments(log)
    assert len(segs) >= 3
    victim = segs[len(segs) // 2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    store = tmp_path / "store"
    r = run_cli("ingest", "--log", log, "--store", store, check=False)
    assert r.returncode == 3
    line = assert_one_line_error(r, "corrupt")
    assert victim.name in line
    # everything good is in; nothing past the damage is exposed
    n = json.loads(run_cli("sql", "--store", store, "SELECT count(*) AS n FROM writes",
                           "--format", "json").stdout)[0]["n"]
    assert 0 < n < len(s.bios)
    rs = json.loads(run_cli("sql", "--store", store, "SELECT * FROM restorable",
                            "--format", "json").stdout)
    top = max(st for st, *_ in s.bios)
    assert all(x["to_stamp"] is None or x["to_stamp"] < top for x in rs)
    assert_one_line_error(run_cli("restore", "--store", store, "--device", "loop7", "--at",
                                  top, "--to", tmp_path / "x.img", check=False), "watermark")
    # the other segments were ingested: a second run finds the same damage, adds nothing
    r2 = run_cli("ingest", "--log", log, "--store", store, check=False)
    assert r2.returncode == 3 and "corrupt" in r2.stderr


def test_torn_tail_is_a_note(capsys, tmp_path):
    log = tmp_path / "log"
    s = history(log, seed=17, nbios=120)
    last = segments(log)[-1]
    size = last.stat().st_size
    with open(last, "r+b") as f:  # the SEAL and the end of the last frame are gone
        f.truncate(size - 48 - 20)
    store = tmp_path / "store"
    rc, out, err = cli_main(capsys, "ingest", "--log", log, "--store", store)
    assert rc == 0, err
    assert "torn tail" in out and last.name in out
    assert s.baseline_end is not None, "the history has its baseline"
    name = next(n for n, st in s.marks.items() if st[-1] >= s.baseline_end)
    assert restore_bytes(capsys, store, name, tmp_path) == s.at_mark[name]


def test_a_live_session_is_ingested_as_it_grows(capsys, tmp_path):
    """Segments still being written: what is there is ingested; the next run continues
    each segment where the last one stopped, and the watermark moves on."""
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=18, segment_bytes=512 << 10)
    s.baseline()
    s.workload(60, marks=1, snapshots=0)
    s.flush_frame()
    a = s.snapshot()
    store = tmp_path / "store"
    ingest(capsys, log, store)
    assert restore_bytes(capsys, store, "latest", tmp_path) == s.at_stamp[a]
    prog = sql(capsys, store, "SELECT 1 AS x")  # the store answers while no ingest runs
    assert prog == [{"x": 1}]
    s.workload(60, marks=1, snapshots=0)
    s.flush_frame()
    b = s.snapshot()
    ingest(capsys, log, store)
    assert restore_bytes(capsys, store, "latest", tmp_path) == s.at_stamp[b]
    assert restore_bytes(capsys, store, str(a), tmp_path) == s.at_stamp[a]
    s.workload(30, marks=0, snapshots=2)
    s.end()
    ingest(capsys, log, store)
    check_points(capsys, store, s, tmp_path)
    ref = tmp_path / "ref"
    ingest(capsys, log, ref)
    assert store_content(capsys, store) == store_content(capsys, ref)


def test_an_ingest_killed_midway_leaves_a_consistent_store(capsys, tmp_path):
    log = tmp_path / "log"
    s = history(log, seed=19, nbios=400, size=8 << 20, segment_bytes=256 << 10)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "blkrewind.cli", "ingest", "--log", str(log), "--store",
           str(store), "--jobs", "2"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if len(list((store / "payload").rglob("*.parquet"))) >= 3:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    # a payload file written but never committed, as a crash between rename and commit leaves
    orphan = store / "payload" / s.session / "999999-000001-000002.parquet"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"PAR1 not really")
    out = ingest(capsys, log, store)
    assert "removed" in out and not orphan.exists()
    ref = tmp_path / "ref"
    ingest(capsys, log, ref)
    assert store_content(capsys, store) == store_content(capsys, ref)
    check_points(capsys, store, s, tmp_path)


def test_two_sessions_of_one_device(capsys, tmp_path):
    log = tmp_path / "log"
    s1 = history(log, seed=20, nbios=60)
    # the device changes while not traced; the next session has its own baseline
    changed = bytearray(s1.image)
    changed[0:4096] = b"\xAB" * 4096
    s2 = SynthSession(str(log), seed=21, initial=bytes(changed),
                      stamp_base=s1.next_stamp + 1000)
    s2.baseline()
    s2.workload(60, marks=2, snapshots=2)
    s2.mark("m1")  # the name of a mark of the first session, again
    s2.end()
    store = tmp_path / "store"
    ingest(capsys, log, store)
    ses = sql(capsys, store, "SELECT session, clean, watermark FROM sessions ORDER BY session")
    assert len(ses) == 2 and all(x["clean"] for x in ses)
    dev = sql(capsys, store, "SELECT * FROM devices")
    assert len(dev) == 1 and dev[0]["sessions"] == 2
    assert restore_bytes(capsys, store, "latest", tmp_path) == bytes(s2.image)
    b1, b2, base2 = s1.baseline_end, s2.baseline_end, s2.stamp_base
    assert b1 is not None and b2 is not None and base2 is not None, "both baselines done"
    for stamp, img in list(s1.at_stamp.items()) + list(s2.at_stamp.items()):
        if stamp >= (b1 if stamp < base2 else b2):
            assert restore_bytes(capsys, store, str(stamp), tmp_path) == img, stamp
    # between the two sessions nothing is known
    rc, _, err = cli_main(capsys, "restore", "--store", store, "--device", "loop7", "--at",
                          str(s1.next_stamp + 10), "--to", tmp_path / "x.img")
    assert rc == 5 and "ended" in err
    # a mark name used twice: the newest, said on stderr
    rc, _, err = cli_main(capsys, "restore", "--store", store, "--device", "loop7", "--at", "m1",
                          "--to", tmp_path / "y.img")
    assert rc == 0, err
    assert f"set {len(s1.marks['m1']) + len(s2.marks['m1'])} times; using the newest" in err
    assert (tmp_path / "y.img").read_bytes() == s2.at_mark["m1"]


def test_segment_zero_missing_means_not_restorable_yet(capsys, tmp_path):
    log = tmp_path / "log"
    s = history(log, seed=22, nbios=80, segment_bytes=128 << 10)
    segs = segments(log)
    part = tmp_path / "part"
    part.mkdir()
    for seg in segs[1:]:
        os.link(seg, part / seg.name)
    store = tmp_path / "store"
    out = ingest(capsys, part, store)
    assert "not restorable yet" in out
    rs = sql(capsys, store, "SELECT * FROM restorable")
    assert rs == [] or all(r["to_stamp"] is None for r in rs)
    ingest(capsys, log, store)
    check_points(capsys, store, s, tmp_path)


def test_frame_ranges_cover_every_frame_once(capsys, tmp_path):
    """The store's bookkeeping after LOG ingest: per segment its seg_id, host, seal, and
    frame ranges that cover [0, nframes) exactly once (HEADER and SEAL included)."""
    from blkrewind.formats.logframe import SegmentReader

    log = tmp_path / "log"
    history(log, seed=24, nbios=80, segment_bytes=128 << 10)
    store = tmp_path / "store"
    ingest(capsys, log, store, "--jobs", "2")
    st = Store.open(store)
    try:
        for seg in segments(log):
            with SegmentReader(seg) as r:
                n = len(list(r.frames())) + 2
                key = [r.session, r.segno]
                assert st.query_one("SELECT seg_id, host, sealed, nframes FROM segments WHERE "
                                    "session = ? AND segno = ?", key) == (r.seg_id, "synth",
                                                                         True, n)
            ranges = st.query("SELECT first_frame, end_frame FROM frame_ranges WHERE session = ? "
                              "AND segno = ? ORDER BY first_frame", key)
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        for t in ("records", "base", "marks", "points", "completions", "loss", "payload_files"):
            assert st.query_one(f"SELECT count(*) FROM {t} WHERE batch IS NULL OR batch NOT IN "
                                f"(SELECT batch FROM frame_ranges)")[0] == 0, t
    finally:
        st.close()
