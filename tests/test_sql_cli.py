"""`blkrewind sql`: the documented views and their columns, the three output formats,
read-only, and one-line errors."""
from __future__ import annotations

import csv
import io
import json
from datetime import datetime

import pytest
from conftest import assert_one_line_error, run_cli
from synth import SynthSession, cli_main

from blkrewind.analytics import views
from blkrewind.formats import record

COLUMNS = {
    "devices": ["device", "host", "name", "path", "size_bytes", "sessions", "first_time",
                "last_time", "restorable_from", "restorable_to"],
    "writes": ["time", "stamp", "device", "session", "op", "sector", "length", "pid", "tid",
               "comm", "cgroup_id", "flags", "captured", "complete", "randomness", "dirty_pid",
               "dirty_tid", "dirty_comm", "dirty_cgroup_id", "dirty_time"],
    "marks": ["name", "time", "stamp", "session", "devices", "pid", "comm", "restorable"],
    "sessions": ["session", "host", "started", "ended", "clean", "stamp_base", "end_stamp",
                 "watermark", "watermark_time", "first_gap", "gap_reason", "stamps_after_gap",
                 "devices", "drops", "version", "kernel"],
    "restorable": ["device", "session", "from_stamp", "to_stamp", "from_time", "to_time",
                   "baseline_end", "reason"],
    "gaps": ["session", "device", "stamp", "last_stamp", "resumed", "time", "resumed_time",
             "missing", "cause", "reason", "watermark", "stamps_after"],
    "loss": ["session", "time", "drops", "drop_bytes", "read_errs", "truncs", "counters"],
    "completions": ["time", "session", "device", "sector", "length", "error", "stamps", "old"],
    "baseline": ["time", "session", "device", "sector", "length", "zero", "reread"],
    "points": ["time", "stamp", "session", "what", "device", "payload"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("sql")
    s = SynthSession(str(d / "log"), seed=51, size=2 << 20)
    s.baseline()
    s.write(0, b"\x11" * 4096, flags=record.F_FUA | record.F_SYNC, comm="dbwriter", pid=1234)
    s.write(8192, b"\x22" * 1536, flags=record.F_PREFLUSH, comm="dbwriter", pid=1234)
    s.flush()
    s.mark("checkpoint")
    s.discard(1 << 20, 65536)
    s.write_zeroes(65536, 4096)
    big = s.write(4 << 10 << 8, s.rng.randbytes(300 << 10))  # 5 pieces of 64 KiB
    s.complete([big])
    lost = s.write(0, b"\x33" * (128 << 10), drop_piece=1)  # its second piece is lost
    s.mark("late")
    s.end(drops=3)
    from blkrewind.cli import main
    assert main(["ingest", "--log", str(d / "log"), "--store", str(d / "store")]) == 0
    return s, d / "store", big, lost


def sql(capsys, store, q, fmt="json"):
    rc, out, err = cli_main(capsys, "sql", "--store", store, q, "--format", fmt)
    assert rc == 0, err
    return json.loads(out) if fmt == "json" else out


def test_views_and_columns_are_as_documented(capsys, store):
    s, st, *_ = store
    for name, cols in COLUMNS.items():
        rc, out, err = cli_main(capsys, "sql", "--store", st, f"SELECT * FROM {name} LIMIT 0",
                                "--format", "csv")
        assert rc == 0, err
        assert out.splitlines()[0].split(",") == cols, name
        doc = views.__doc__.split(f"\n{name} -- ", 1)[1].split("\n\n", 1)[0]
        for c in cols:  # each column is explained in the module docstring
            assert c in doc, (name, c)


def test_writes_one_row_per_bio(capsys, store):
    s, st, big, lost = store
    rows = sql(capsys, st, "SELECT * FROM writes ORDER BY stamp")
    assert [r["stamp"] for r in rows] == [b[0] for b in s.bios]
    by = {r["stamp"]: r for r in rows}
    assert {r["device"] for r in rows} == {"synth:loop7"}
    fua = next(r for r in rows if r["comm"] == "dbwriter" and r["length"] == 4096)
    assert fua["flags"] == "FUA,SYNC" and fua["op"] == "write" and fua["pid"] == 1234
    assert fua["sector"] == 0 and fua["complete"] and fua["captured"] == 4096
    pre = next(r for r in rows if r["comm"] == "dbwriter" and r["length"] == 1536)
    assert pre["flags"] == "PREFLUSH" and pre["sector"] == 16
    ops = [r["op"] for r in rows]
    assert {"write", "flush", "discard", "write_zeroes"} <= set(ops)
    assert by[big]["length"] == 300 << 10 and by[big]["captured"] == 300 << 10
    assert by[lost]["complete"] is False and by[lost]["captured"] == 64 << 10
    datetime.fromisoformat(fua["time"])  # ISO 8601 with a zone
    assert "+" in fua["time"] or fua["time"].endswith("Z")


def test_marks_sessions_restorable_gaps_loss(capsys, store):
    s, st, big, lost = store
    marks = sql(capsys, st, "SELECT * FROM marks ORDER BY stamp")
    assert [(m["name"], m["restorable"]) for m in marks] == [("checkpoint", True), ("late", False)]
    assert marks[0]["devices"] == ["synth:loop7"] and marks[0]["comm"] == "blkrewind"
    ses = sql(capsys, st, "SELECT * FROM sessions")
    assert len(ses) == 1 and ses[0]["clean"] and ses[0]["watermark"] == lost - 1
    assert ses[0]["first_gap"] == lost and ses[0]["drops"] == 3
    rs = sql(capsys, st, "SELECT * FROM restorable")
    assert rs[0]["from_stamp"] == s.baseline_end and rs[0]["to_stamp"] == lost - 1
    assert rs[0]["reason"] is None
    gaps = sql(capsys, st, "SELECT * FROM gaps")
    assert gaps[0]["stamp"] == lost and "incomplete" in gaps[0]["reason"]
    loss = sql(capsys, st, "SELECT * FROM loss")
    assert loss[0]["drops"] == 3 and json.loads(loss[0]["counters"])["drops"] == 3
    comp = sql(capsys, st, "SELECT * FROM completions WHERE NOT old")
    assert comp[0]["stamps"] == [big]
    assert sql(capsys, st, "SELECT count(*) AS n FROM completions WHERE old")[0]["n"] >= 1
    base = sql(capsys, st, "SELECT sum(length) AS n, count(*) FILTER (WHERE zero) AS z "
                           "FROM baseline")[0]
    assert base["n"] >= s.size
    pts = sql(capsys, st, "SELECT * FROM points")
    assert pts[0]["what"] == "baseline_end" and pts[0]["device"] == "synth:loop7"
    dev = sql(capsys, st, "SELECT * FROM devices")[0]
    assert dev["size_bytes"] == s.size and dev["sessions"] == 1 and dev["path"] == "/dev/loop7"
    assert dev["restorable_from"] <= dev["restorable_to"]


def test_formats(capsys, store):
    s, st, *_ = store
    q = "SELECT stamp, op, flags, time FROM writes ORDER BY stamp LIMIT 3"
    js = sql(capsys, st, q, "json")
    rows = list(csv.DictReader(io.StringIO(sql(capsys, st, q, "csv"))))
    assert [int(r["stamp"]) for r in rows] == [r["stamp"] for r in js]
    assert [r["op"] for r in rows] == [r["op"] for r in js]
    table = sql(capsys, st, q, "table")  # not a terminal: plain aligned text
    lines = table.splitlines()
    assert lines[0].split() == ["stamp", "op", "flags", "time"]
    assert set(lines[1]) <= {"-", " "} and lines[-1] == "(3 rows)"
    assert str(js[0]["stamp"]) in lines[2]
    empty = sql(capsys, st, "SELECT * FROM marks WHERE false", "json")
    assert empty == []


@pytest.mark.parametrize("q,words", [
    ("SELECT * FROM no_such_view", ["no_such_view"]),
    ("SELEC 1", ["syntax"]),
    ("CREATE TABLE x (a INT)", ["read-only"]),
    ("INSERT INTO records SELECT * FROM records", ["read-only"]),
    ("DELETE FROM sessions", []),
    ("COPY (SELECT 1) TO '/tmp/blkrewind-sql-test.csv'", []),
    ("SELECT * FROM read_csv('/etc/passwd')", []),
])
def test_errors_are_one_line_and_nothing_is_written(store, q, words):
    s, st, *_ = store
    r = run_cli("sql", "--store", st, q, check=False)
    line = assert_one_line_error(r, *words)
    assert line.startswith("blkrewind sql: error: SQL:")
    n = json.loads(run_cli("sql", "--store", st, "SELECT count(*) AS n FROM sessions",
                           "--format", "json").stdout)[0]["n"]
    assert n == 1


def test_missing_store(tmp_path):
    assert_one_line_error(run_cli("sql", "--store", tmp_path / "none", "SELECT 1", check=False),
                          "no store at")
