"""Payload integrity (replayer/integrity.py): missing, truncated and damaged Parquet files are
found (quick: size; full: CRC), never served by a restore (page checksums), dropped exactly
(the batch's metadata, in one transaction; the file moved aside), reported as lacking, and
stored again from the LOG -- by `blkrewind ingest --log` or over FrameSink -- after which the
restores are exact again. Real LOGs, real DuckDB and Parquet files, no mocks."""
from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
from synth import SynthSession, cli_main, history
from test_sink import inventory, raw_segments
from test_store import check_points, ingest, restore_bytes, sql

from blkrewind.replayer.ingest import FrameGroup, FrameSink
from blkrewind.replayer.integrity import verify_store
from blkrewind.replayer.store import Store


def open_sink(store_dir, **kw):
    st = Store.open(store_dir, write=True)
    return st, FrameSink(st, **kw)


def batch_of_file(store_dir, rel) -> dict:
    st = Store.open(store_dir)
    try:
        bid, session, segno, a, e = st.query_one(
            "SELECT batch, session, segno, first_frame, end_frame FROM payload_files "
            "WHERE path = ?", [rel])
        lo = st.query_one("SELECT min(stamp) FROM records WHERE batch = ?", [bid])[0]
        return {"batch": bid, "session": session, "segno": segno, "range": [a, e],
                "min_stamp": lo}
    finally:
        st.close()


def rows_of_batch(store_dir, bid) -> int:
    st = Store.open(store_dir)
    try:
        return sum(st.query_one(f"SELECT count(*) FROM {t} WHERE batch = ?", [bid])[0]
                   for t in ("records", "base", "marks", "points", "completions", "loss",
                             "payload_files", "frame_ranges"))
    finally:
        st.close()


def send_lacking(sink, host, segs, lacks) -> int:
    by = {(x["session"], x["segno"]): x for x in segs}
    n = 0
    for item in lacks:
        x = by[(item["session"], item["segno"])]
        fr = dict(x["frames"])
        for a, e in item["ranges"]:
            res = sink.store(host, [FrameGroup(x["session"], x["segno"], x["seg_id"], a,
                                               [fr[i] for i in range(a, e)])])
            n += res[0][2]
    return n


def test_a_missing_or_truncated_file_is_dropped_and_stored_again(capsys, tmp_path):
    log = tmp_path / "log"
    s = history(log, seed=61, nbios=200, segment_bytes=128 << 10)
    store = tmp_path / "store"
    ingest(capsys, log, store)
    segs = raw_segments(log)
    st = Store.open(store)
    paths = [p for (p,) in st.query("SELECT p.path FROM payload_files p JOIN records r ON "
                                    "r.batch = p.batch GROUP BY p.path ORDER BY min(r.stamp)")]
    st.close()
    gone, cut = paths[len(paths) // 2], paths[-2]
    lost = [batch_of_file(store, gone), batch_of_file(store, cut)]
    assert all(rows_of_batch(store, b["batch"]) for b in lost)
    os.unlink(store / gone)
    with open(store / cut, "r+b") as f:
        f.truncate(os.path.getsize(store / cut) - 100)
    st = Store.open(store)
    found = verify_store(st)   # read-only: reports, changes nothing
    st.close()
    assert len(found) == 2
    assert any(x.startswith(f"{gone}: missing") for x in found)
    assert any(x.startswith(f"{cut}: ") and "recorded" in x for x in found)
    calls = []
    st, sink = open_sink(store, on_lost=lambda host, items: calls.append((host, items)))
    lines = sink.check(full=False)
    assert len(lines) == 2 and all("\n" not in x for x in lines)
    assert {x.split(":")[0] for x in lines} == {gone, cut}
    want = sorted([{"session": b["session"], "segno": b["segno"], "ranges": [b["range"]]}
                   for b in lost], key=lambda x: x["segno"])
    assert calls == [("synth", want)]
    assert sink.lacks("synth", inventory(segs)) == want
    assert sink.check(full=True) == []
    st.close()
    for b in lost:
        assert rows_of_batch(store, b["batch"]) == 0
    assert (store / "damaged" / s.session / os.path.basename(cut)).is_file()
    # nothing past the first dropped stamp is exposed
    first = min(b["min_stamp"] for b in lost)
    rs = sql(capsys, store, "SELECT from_stamp, to_stamp FROM restorable")
    assert rs and all(r["to_stamp"] < first for r in rs)
    ses = sql(capsys, store, "SELECT watermark FROM sessions")
    assert ses[0]["watermark"] < first
    assert s.baseline_end is not None, "the history has its baseline"
    for stamp, img in s.at_stamp.items():
        if s.baseline_end <= stamp < first:
            assert restore_bytes(capsys, store, str(stamp), tmp_path) == img
    # the LOG ingest stores exactly the dropped frames again
    out = ingest(capsys, log, store)
    assert "ingested 2 segments" in out
    check_points(capsys, store, s, tmp_path)
    st = Store.open(store)
    assert verify_store(st) == []
    st.close()


def test_a_flipped_byte_is_never_served_and_is_stored_again_over_the_network(capsys, tmp_path):
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=62, segment_bytes=256 << 10)
    s.baseline()
    s.workload(80, marks=2, snapshots=2)
    before = s.snapshot()
    last = s.write(0, s.rng.randbytes(256 << 10))   # visible at latest: nothing writes after it
    s.end()
    store = tmp_path / "store"
    ingest(capsys, log, store)
    st = Store.open(store)
    rel, prg = st.query_one("SELECT p.path, r.prg FROM records r JOIN payload_files p ON "
                            "p.id = r.pfile WHERE r.stamp = ? ORDER BY r.\"offset\" LIMIT 1",
                            [last])
    st.close()
    victim = store / rel
    col = pq.ParquetFile(victim).metadata.row_group(prg).column(4)
    assert col.compression == "UNCOMPRESSED"   # random data: a flipped byte stays a wrong byte
    at = col.data_page_offset + col.total_compressed_size // 2
    data = bytearray(victim.read_bytes())
    data[at] ^= 0x01
    victim.write_bytes(bytes(data))
    # without any check: the restore fails (one line, non-zero), it never writes wrong data
    out = tmp_path / "x.img"
    rc, _, err = cli_main(capsys, "restore", "--store", store, "--device", "loop7", "--at",
                          "latest", "--to", out)
    assert rc != 0 and "Traceback" not in err
    assert "checksum" in err.lower() or "damaged" in err.lower(), err
    assert len(err.strip().splitlines()) == 1
    # the quick check only sees sizes; the full check sees the CRC
    info = batch_of_file(store, rel)
    calls = []
    st, sink = open_sink(store, on_lost=lambda host, items: calls.append((host, items)))
    assert sink.check(full=False) == []
    v = verify_store(st)
    assert len(v) == 1 and rel in v[0] and "checksum" in v[0]
    lines = sink.check(full=True)
    assert len(lines) == 1 and "checksum" in lines[0] and "damaged/" in lines[0]
    moved = store / "damaged" / s.session / os.path.basename(rel)
    assert moved.read_bytes() == bytes(data)       # the evidence is kept as it was
    want = [{"session": s.session, "segno": info["segno"], "ranges": [info["range"]]}]
    assert calls == [("synth", want)]
    segs = raw_segments(log)
    assert sink.lacks("synth", inventory(segs)) == want
    st.close()
    rs = sql(capsys, store, "SELECT to_stamp FROM restorable")
    assert rs[0]["to_stamp"] < info["min_stamp"] <= last
    # the tracer sends what the store lacks: exact again
    st, sink = open_sink(store)
    assert send_lacking(sink, "synth", segs, sink.lacks("synth", inventory(segs))) == \
        info["range"][1] - info["range"][0]
    assert sink.lacks("synth", inventory(segs)) == []
    sink.finalize()
    assert verify_store(st) == []
    st.close()
    assert restore_bytes(capsys, store, "latest", tmp_path) == bytes(s.image)
    assert restore_bytes(capsys, store, str(before), tmp_path) == s.at_stamp[before]
    check_points(capsys, store, s, tmp_path)


def test_a_dropped_baseline_chunk_makes_the_device_not_restorable(capsys, tmp_path):
    """Baseline chunks have no stamps: the watermark alone would not notice them gone. The
    baseline_end point counts only once every frame before it is stored."""
    log = tmp_path / "log"
    s = history(log, seed=63, nbios=60, segment_bytes=128 << 10)
    store = tmp_path / "store"
    ingest(capsys, log, store)
    st = Store.open(store)
    rel, = st.query_one("SELECT p.path FROM payload_files p WHERE EXISTS (SELECT 1 FROM base b "
                        "WHERE b.batch = p.batch) AND NOT EXISTS (SELECT 1 FROM records r "
                        "WHERE r.batch = p.batch) ORDER BY p.id LIMIT 1")
    st.close()
    os.unlink(store / rel)
    st, sink = open_sink(store)
    assert len(sink.check(full=False)) == 1
    st.close()
    rs = sql(capsys, store, "SELECT * FROM restorable")
    assert all(r["to_stamp"] is None for r in rs), rs
    rc, _, err = cli_main(capsys, "restore", "--store", store, "--device", "loop7", "--at",
                          "latest", "--to", tmp_path / "x.img")
    assert rc != 0 and not (tmp_path / "x.img").exists()
    ingest(capsys, log, store)
    check_points(capsys, store, s, tmp_path)


def test_a_store_restored_from_an_older_backup_lacks_the_newer_frames(capsys, tmp_path):
    log = tmp_path / "log"
    s = history(log, seed=64, nbios=120, segment_bytes=128 << 10)
    segs = raw_segments(log)
    store = tmp_path / "store"
    st, sink = Store.open(store, write=True, create=True), None
    sink = FrameSink(st)
    half = len(segs) // 2
    for x in segs[:half]:
        sink.store("synth", [FrameGroup(x["session"], x["segno"], x["seg_id"], 0,
                                        [b for _, b in x["frames"]])])
    st.close()
    backup = tmp_path / "backup"
    shutil.copytree(store, backup)
    st, sink = open_sink(store)
    send_lacking(sink, "synth", segs, sink.lacks("synth", inventory(segs)))
    sink.finalize()
    st.close()
    check_points(capsys, store, s, tmp_path)
    # the old copy: consistent, and it lacks exactly what was stored after it was taken
    st, sink = open_sink(backup)
    assert verify_store(st) == [] and sink.check(full=True) == []
    assert sink.lacks("synth", inventory(segs)) == [
        {"session": x["session"], "segno": x["segno"], "ranges": [[0, len(x["frames"])]]}
        for x in segs[half:]]
    send_lacking(sink, "synth", segs, sink.lacks("synth", inventory(segs)))
    sink.finalize()
    st.close()
    check_points(capsys, backup, s, tmp_path)
