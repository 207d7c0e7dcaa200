"""FrameSink (replayer/ingest/sink.py): LOG frames received from the network, stored with the same
bookkeeping as `blkrewind ingest --log`. Real LOGs (tests/synth.py writes them with
tracer.log.LogWriter), their raw frames exactly as in the segment files, a real DuckDB file and
real Parquet files; several threads at once, any order."""
from __future__ import annotations

import json
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from synth import SynthSession, cli_main, history
from test_store import check_points, store_content

from blkrewind.formats import record
from blkrewind.formats.logframe import SegmentReader, list_segments
from blkrewind.replayer.ingest import FrameGroup, FrameRejected, FrameSink, NotYourSession
from blkrewind.replayer.store import Store
from blkrewind.tracer.log import LogWriter


# ----------------------------------------------------------------------------- helpers
def raw_segments(log) -> list[dict]:
    """Per segment of a LOG: its identity and its raw frames (frame_no, bytes)."""
    out = []
    for seg in list_segments(log):
        with SegmentReader(seg.path) as r:
            frames = list(r.raw_frames())
            out.append({"session": r.session, "segno": r.segno, "seg_id": r.seg_id,
                        "sealed": r.sealed, "frames": frames})
    return out


def inventory(segs) -> list[dict]:
    return [{"session": s["session"], "segno": s["segno"], "seg_id": s["seg_id"],
             "frames": len(s["frames"]), "sealed": s["sealed"]} for s in segs]


def groups_of(segs, rng: random.Random, most: int = 4) -> list[FrameGroup]:
    """Every frame of every segment, cut in groups of 1..most consecutive frames."""
    out = []
    for s in segs:
        fr = s["frames"]
        i = 0
        while i < len(fr):
            k = rng.randint(1, most)
            part = fr[i:i + k]
            out.append(FrameGroup(s["session"], s["segno"], s["seg_id"], part[0][0],
                                  [b for _, b in part]))
            i += k
    return out


def store_all(sink, host, groups, threads: int = 2, per_call: int = 3) -> int:
    """Store groups in calls of up to per_call groups from `threads` threads; frames stored."""
    calls = [groups[i:i + per_call] for i in range(0, len(groups), per_call)]
    with ThreadPoolExecutor(threads) as ex:
        results = list(ex.map(lambda c: sink.store(host, c), calls))
    for call, res in zip(calls, results):
        assert [(a, e) for a, e, _ in res] == [(g.first, g.first + len(g.raw_frames))
                                               for g in call]
    return sum(n for res in results for _, _, n in res)


def counts(store_dir) -> dict:
    st = Store.open(store_dir)
    try:
        return {t: st.query_one(f"SELECT count(*) FROM {t}")[0] for t in (
            "records", "base", "marks", "points", "completions", "loss", "payload_files",
            "frame_ranges", "segments", "sessions", "session_devices")}
    finally:
        st.close()


def files(store_dir) -> list[str]:
    return sorted(str(p.relative_to(store_dir)) for p in (store_dir / "payload").rglob("*")
                  if p.is_file())


def ingest(capsys, log, store, *extra) -> str:
    rc, out, err = cli_main(capsys, "ingest", "--log", log, "--store", store, *extra)
    assert rc == 0, err
    return out


def open_sink(store_dir, **kw) -> tuple[Store, FrameSink]:
    st = Store.open(store_dir, write=True, create=True)
    return st, FrameSink(st, **kw)


# ------------------------------------------------------------------------------- tests
def test_frames_in_any_order_from_two_threads_equal_log_ingest(capsys, tmp_path):
    log = tmp_path / "log"
    s = history(log, seed=51, nbios=220, segment_bytes=96 << 10)
    segs = raw_segments(log)
    assert len(segs) >= 8 and all(x["sealed"] for x in segs)
    ref = tmp_path / "ref"
    ingest(capsys, log, ref)
    # all frames, shuffled, 2 threads, several groups per call
    net = tmp_path / "net"
    st, sink = open_sink(net)
    groups = groups_of(segs, random.Random(1))
    random.Random(2).shuffle(groups)
    assert sink.lacks("synth", inventory(segs)) == [
        {"session": x["session"], "segno": x["segno"], "ranges": [[0, len(x["frames"])]]}
        for x in segs]
    n = store_all(sink, "synth", groups)
    assert n == sum(len(x["frames"]) for x in segs)
    assert sink.lacks("synth", inventory(segs)) == []
    assert sink.finalize() == [s.session]
    assert sink.check(full=True) == []
    st.close()
    ref_content = store_content(capsys, ref)
    assert store_content(capsys, net) == ref_content
    check_points(capsys, net, s, tmp_path)
    # the LOG ingest of the same LOG into the network-filled store: nothing to do
    out = ingest(capsys, log, net)
    assert "ingested 0 segments" in out
    assert store_content(capsys, net) == ref_content


def test_both_paths_into_one_store_never_store_a_frame_twice(capsys, tmp_path):
    log = tmp_path / "log"
    s = history(log, seed=52, nbios=160, segment_bytes=96 << 10)
    segs = raw_segments(log)
    ref = tmp_path / "ref"
    ingest(capsys, log, ref)
    mixed = tmp_path / "mixed"
    # half of the frames (a random half, not whole segments) over the network ...
    groups = groups_of(segs, random.Random(3), most=2)
    half = random.Random(4).sample(groups, len(groups) // 2)
    st, sink = open_sink(mixed)
    store_all(sink, "synth", half)
    sink.finalize()
    st.close()
    # ... then the LOG ingest stores exactly the rest
    ingest(capsys, log, mixed, "--jobs", "2")
    c = counts(mixed)
    assert c == counts(ref) | {"payload_files": c["payload_files"], "frame_ranges": c["frame_ranges"]}
    assert store_content(capsys, mixed) == store_content(capsys, ref)
    # ... and everything over the network again: nothing new
    st, sink = open_sink(mixed)
    before = files(mixed)
    assert store_all(sink, "synth", groups) == 0
    assert sink.lacks("synth", inventory(segs)) == []
    st.close()
    assert files(mixed) == before and counts(mixed) == c
    check_points(capsys, mixed, s, tmp_path)


def test_replays_and_concurrent_duplicates_store_nothing(tmp_path):
    log = tmp_path / "log"
    history(log, seed=53, nbios=80, segment_bytes=128 << 10)
    segs = raw_segments(log)
    groups = groups_of(segs, random.Random(5))
    st, sink = open_sink(tmp_path / "store")
    try:
        # the same calls from 2 threads at the same time: each frame is stored once
        barrier = threading.Barrier(2)

        def both(c):
            barrier.wait()
            return sink.store("synth", c)

        total = 0
        for g in groups:
            with ThreadPoolExecutor(2) as ex:
                a, b = ex.map(both, [[g], [g]])
            assert a[0][:2] == b[0][:2]
            assert sorted([a[0][2], b[0][2]]) == [0, len(g.raw_frames)]
            total += a[0][2] + b[0][2]
        assert total == sum(len(x["frames"]) for x in segs)
        # the same group twice in one call: stored once
        before = st.query("SELECT count(*) FROM frame_ranges")
        assert sink.store("synth", [groups[0], groups[0]]) == [
            (groups[0].first, groups[0].first + len(groups[0].raw_frames), 0)] * 2
        assert st.query("SELECT count(*) FROM frame_ranges") == before
        n_files = len(files(tmp_path / "store"))
        rows = st.query("SELECT count(*) FROM records")
        # a replay of everything: nothing new, no new file
        assert store_all(sink, "synth", groups) == 0
        assert len(files(tmp_path / "store")) == n_files
        assert st.query("SELECT count(*) FROM records") == rows
        # frame_ranges are disjoint and cover every frame exactly once
        fr = st.query("SELECT session, segno, first_frame, end_frame FROM frame_ranges "
                      "ORDER BY session, segno, first_frame")
        for (s1, n1, _, e1), (s2, n2, a2, _) in zip(fr, fr[1:]):
            assert (s1, n1) != (s2, n2) or e1 <= a2
    finally:
        st.close()


def write_log(log, *, header_host: str, record_host: str, device_host: str | None = None,
              session: str = "20261125T130000Z-0badc0de") -> list[dict]:
    """A tiny LOG written by a tracer whose segment header says header_host while its
    R_SESSION / R_DEVICE records name record_host / device_host."""
    dev = record.kdev(7, 3)
    w = LogWriter(str(log), session, host=header_host, fsync="never")
    recs = [record.json_record(record.R_SESSION, {"session": session, "host": record_host,
                                                  "stamp_base": 10**18, "seq_base": 1},
                               seq=1),
            record.json_record(record.R_DEVICE, {"name": "loop3", "path": "/dev/loop3",
                                                 "dev": dev, "size_bytes": 1 << 20,
                                                 "host": device_host or record_host},
                               seq=2, dev=dev)]
    w.append(b"".join(recs), 2, 10**12, 10**18)
    w.append(record.make_record(b"x" * 4096, rtype=record.R_BIO, stamp=10**18, seq=1,
                                ktime_ns=10**12, dev=dev, bio_size=4096,
                                flags=record.F_FIRST | record.F_LAST, op=record.OP_WRITE),
             1, 10**12 + 1, 10**18 + 1)
    w.close()
    return raw_segments(log)


def all_groups(segs) -> list[FrameGroup]:
    return [FrameGroup(s["session"], s["segno"], s["seg_id"], 0, [b for _, b in s["frames"]])
            for s in segs]


def test_hosts_and_session_binding(tmp_path):
    store = tmp_path / "store"
    st, sink = open_sink(store)
    try:
        # host "a" stores (part of) a session: bound to a
        a = write_log(tmp_path / "a", header_host="a", record_host="a")
        g = all_groups(a)[0]
        first = FrameGroup(g.session, g.segno, g.seg_id, 0, g.raw_frames[:2])
        assert sink.store("a", [first]) == [(0, 2, 2)]
        assert st.query("SELECT host FROM sessions") == [("a",)]
        snapshot = counts_live(st), files(store)
        # host "b" may neither send its frames (even ones not stored yet) nor ask about it
        for grp in (first, g):
            with pytest.raises(NotYourSession, match="belongs to host a"):
                sink.store("b", [grp])
        with pytest.raises(NotYourSession):
            sink.lacks("b", inventory(a))
        assert (counts_live(st), files(store)) == snapshot
        assert sink.lacks("a", inventory(a)) == [
            {"session": g.session, "segno": 0, "ranges": [[2, len(g.raw_frames)]]}]
        # a new session whose header or records name another host than the connection's
        cases = [("b", "a", None, "R_SESSION record names host 'a'"),
                 ("b", "b", "a", "R_DEVICE record names host 'a'"),
                 ("a", "a", None, "HEADER names host 'a'")]
        for i, (hh, rh, dh, why) in enumerate(cases):
            segs = write_log(tmp_path / f"x{i}", header_host=hh, record_host=rh, device_host=dh,
                             session=f"20261125T13000{i}Z-0000000{i}")
            with pytest.raises(FrameRejected, match=why):
                sink.store("b", all_groups(segs))
            assert (counts_live(st), files(store)) == snapshot
        # nothing of a call is stored when one of its groups is bad: a good new session of b
        # in the same call as frames of a's session
        good = write_log(tmp_path / "good", header_host="b", record_host="b",
                         session="20261125T130009Z-00000009")
        with pytest.raises(NotYourSession):
            sink.store("b", all_groups(good) + [g])
        assert (counts_live(st), files(store)) == snapshot
        assert sink.store("b", all_groups(good))[0][2] == len(good[0]["frames"])
        assert dict(st.query("SELECT session, host FROM sessions")) == {
            g.session: "a", "20261125T130009Z-00000009": "b"}
        assert st.query("SELECT DISTINCT device FROM session_devices ORDER BY 1") == [
            ("a:loop3",), ("b:loop3",)]
    finally:
        st.close()


def counts_live(st) -> dict:
    return {t: st.query_one(f"SELECT count(*) FROM {t}")[0] for t in (
        "records", "base", "points", "payload_files", "frame_ranges", "segments", "sessions",
        "session_devices")}


def flip(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 0x5A
    return bytes(b)


def test_a_corrupted_frame_rejects_the_whole_call(tmp_path):
    log = tmp_path / "log"
    history(log, seed=54, nbios=60, segment_bytes=256 << 10)
    segs = raw_segments(log)
    seg = max(segs, key=lambda x: len(x["frames"]))
    frames = [b for _, b in seg["frames"]]
    k = len(frames) // 2
    other = all_groups([x for x in segs if x is not seg])
    store = tmp_path / "store"
    st, sink = open_sink(store)
    try:
        snapshot = counts_live(st), files(store)

        def group(raws, first=0, seg_id=None):
            return FrameGroup(seg["session"], seg["segno"],
                              seg["seg_id"] if seg_id is None else seg_id, first, raws)

        body_len = len(frames[k]) - 48
        bad_calls = {
            "body byte (lz4 content checksum)":
                [group(frames[:k] + [flip(frames[k], 48 + body_len // 2)] + frames[k + 1:])],
            "header byte (header CRC)": [group(frames[:k] + [flip(frames[k], 20)] + frames[k + 1:])],
            "truncated frame": [group(frames[:k] + [frames[k][:-1]])],
            "frame numbers off by one": [group(frames[1:], first=0)],
            "wrong seg_id": [group(frames, seg_id=seg["seg_id"] ^ 1)],
            "a good group, then a bad one": other + [group(frames[:k] + [flip(frames[k], 60)])],
            "a frame that is not bytes": [group([frames[0], 12345])],
            "bad session id": [FrameGroup("../etc", 0, 1, 0, frames[:1])],
        }
        for what, call in bad_calls.items():
            with pytest.raises(FrameRejected) as ei:
                sink.store("synth", call)
            line = str(ei.value)
            assert line and "\n" not in line, what
            assert (counts_live(st), files(store)) == snapshot, what
        assert sink.lacks("synth", inventory(segs)) == [
            {"session": x["session"], "segno": x["segno"], "ranges": [[0, len(x["frames"])]]}
            for x in segs]
        # the good frames are welcome afterwards
        assert sum(n for _, _, n in sink.store("synth", all_groups(segs))) == \
            sum(len(x["frames"]) for x in segs)
        # a well-formed frame past the SEAL the store knows: rejected
        from blkrewind.formats.logframe import K_DATA, encode_span, pack_header
        span = record.make_record(b"", rtype=record.R_LOSS, seq=99)
        body = encode_span(span)
        late = pack_header(K_DATA, seg["seg_id"], len(frames), 1, 1, 1, len(span), body.stored_len,
                         body.flags) + body.data + body.crc
        with pytest.raises(FrameRejected, match="past its SEAL"):
            sink.store("synth", [group([late], first=len(frames))])
    finally:
        st.close()


def test_lacks(tmp_path):
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=55, segment_bytes=128 << 10)
    s.baseline()
    s.workload(60, marks=1, snapshots=0)
    s.flush_frame()   # the last segment stays open: not sealed
    segs = raw_segments(log)
    assert not segs[-1]["sealed"] and segs[0]["sealed"]
    st, sink = open_sink(tmp_path / "store")
    try:
        inv = inventory(segs)
        want = {(x["session"], x["segno"]): [[0, len(x["frames"])]] for x in segs}

        def lacks():
            return {(x["session"], x["segno"]): x["ranges"] for x in sink.lacks("synth", inv)}

        assert lacks() == want
        # some frames of some segments
        rng = random.Random(6)
        held: dict = {}
        for x in segs[::2]:
            n = len(x["frames"])
            a = rng.randrange(n)
            e = rng.randint(a + 1, n)
            sink.store("synth", [FrameGroup(x["session"], x["segno"], x["seg_id"], a,
                                            [b for _, b in x["frames"][a:e]])])
            held[(x["session"], x["segno"])] = (a, e, n)
        exp = dict(want)
        for key, (a, e, n) in held.items():
            exp[key] = [r for r in ([0, a], [e, n]) if r[0] < r[1]]
            if not exp[key]:
                del exp[key]
        assert lacks() == exp
        # the tracer's LOG has grown: frames [0, N+5) of the open segment
        more = [dict(i) for i in inv]
        more[-1]["frames"] += 5
        got = {(x["session"], x["segno"]): x["ranges"] for x in sink.lacks("synth", more)}
        last = (segs[-1]["session"], segs[-1]["segno"])
        assert got[last][-1][1] == len(segs[-1]["frames"]) + 5
        # bad inventories are protocol violations (as they arrive: parsed from JSON)
        for bad in ({"session": 1}, {"session": "s", "segno": -1, "seg_id": 1, "frames": 1},
                    "x", {"session": "s", "segno": 0, "seg_id": 1, "frames": True}):
            with pytest.raises(FrameRejected):
                sink.lacks("synth", json.loads(json.dumps([bad])))
        # everything: nothing lacks, sealed segments included
        store_all(sink, "synth", groups_of(segs, random.Random(7)))
        assert sink.lacks("synth", inv) == []
        # a store that knows a segment's SEAL never asks for frames past it
        bigger = [dict(i, frames=i["frames"] + 3) for i in inv]
        assert [x["segno"] for x in sink.lacks("synth", bigger)] == [segs[-1]["segno"]]
        # another segment under a stored segment's name
        with pytest.raises(FrameRejected, match="seg_id"):
            sink.lacks("synth", [dict(inv[0], seg_id=inv[0]["seg_id"] ^ 1)])
    finally:
        st.close()


def test_a_session_streamed_while_it_grows(capsys, tmp_path):
    """Frames of a live session arrive as they are written (out of order inside each
    call's window); the watermark follows, and restores are exact at every step."""
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=56, segment_bytes=128 << 10)
    s.baseline()
    store = tmp_path / "store"
    sent: set = set()

    def ship(rng):
        st, sink = open_sink(store)
        try:
            new = []
            for x in raw_segments(log):
                fr = [(n, b) for n, b in x["frames"] if (x["session"], x["segno"], n) not in sent]
                sent.update((x["session"], x["segno"], n) for n, _ in fr)
                new += [FrameGroup(x["session"], x["segno"], x["seg_id"], n, [b]) for n, b in fr]
            rng.shuffle(new)
            store_all(sink, "synth", new, per_call=2)
            sink.finalize()
        finally:
            st.close()

    rng = random.Random(8)
    for _ in range(3):
        s.workload(40, marks=1, snapshots=0)
        s.flush_frame()
        at = s.snapshot()
        ship(rng)
        rs = sql(capsys, store, "SELECT to_stamp FROM restorable")
        assert rs and rs[-1]["to_stamp"] == at
    s.end()
    ship(rng)
    check_points(capsys, store, s, tmp_path)


def sql(capsys, store, q):
    rc, out, err = cli_main(capsys, "sql", "--store", store, q, "--format", "json")
    assert rc == 0, err
    return json.loads(out)


def test_an_old_store_format_is_refused(tmp_path):
    import duckdb

    store = tmp_path / "old"
    store.mkdir()
    con = duckdb.connect(str(store / "meta.duckdb"))
    con.execute("CREATE TABLE store_info (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO store_info VALUES ('format', '1')")
    con.close()
    from blkrewind.errors import StoreError
    for write in (False, True):
        with pytest.raises(StoreError, match="format 1 is not supported.*no migration"):
            Store.open(store, write=write)
    con = duckdb.connect(str(store / "meta.duckdb"), read_only=True)
    assert [t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()] \
        == ["store_info"]
    con.close()
    assert os.listdir(store) == ["meta.duckdb"] or "lock" in os.listdir(store)
