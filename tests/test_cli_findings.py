"""The smaller findings of issue 13, each driven through the CLI as a user would: option
values that make no sense, sql's one-query rule, invalid times, pruned marks, prune
--dry-run, a failed ingest leaving no store, a second ingest saying it waits, a non-root
user, and (BPF) several tracers: mark/status need --log or --all, a mark name set twice is
said, a device traced twice is refused, `trace -- /nonexistent` fails before the baseline."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from synth import SynthSession
from tracerproc import BLKREWIND, ROOT, TraceProc, cli

HOUR = 3600 * 10**9


def one_line_error(r, rc=None, *words):
    assert r.returncode != 0 and (rc is None or r.returncode == rc), r
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("findings")
    s = SynthSession(str(d / "log"), seed=41, size=1 << 20, chunk=128 << 10, piece=16 << 10)
    s.baseline()
    s.workload(20, marks=2, snapshots=0)
    s.end()
    cli("ingest", "--log", d / "log", "--store", d / "store")
    return d / "store"


def test_option_values_that_make_no_sense_are_refused(store, tmp_path):
    out = tmp_path / "x.img"
    for args, words in [
        (("restore", "--store", store, "--device", "loop7", "--at", "latest", "--to", out,
          "--jobs", "0"), ("--jobs must be 1..64, not 0",)),
        (("verify", "--store", store, "--device", "loop7", "--jobs", "0"), ("--jobs",)),
        (("ingest", "--log", tmp_path / "l", "--store", tmp_path / "s", "--jobs", "0"),
         ("--jobs must be 1..64, not 0",)),
        (("prune", "--store", store, "--device", "loop7", "--keep", "1d", "--jobs", "-1"),
         ("--jobs",)),
        (("trace", "--device", "/dev/null", "--log", tmp_path / "l", "--segment-mb", "0"),
         ("--segment-mb",)),
        (("trace", "--device", "/dev/null", "--log", tmp_path / "l", "--fsync-interval", "-1"),
         ("--fsync-interval",)),
        (("trace", "--device", "/dev/null", "--log", tmp_path / "l", "--fsync-interval", "nan"),
         ("--fsync-interval",)),
        (("trace", "--device", "/dev/null", "--log", tmp_path / "l", "--", "/nonexistent"),
         ("cannot run /nonexistent: no such file",)),
        (("trace", "--device", "/dev/null", "--log", tmp_path / "l", "--", "/etc/passwd"),
         ("cannot run /etc/passwd: not executable",)),
        (("trace", "--device", "/dev/null", "--log", tmp_path / "l", "--", str(tmp_path)),
         (f"cannot run {tmp_path}: a directory",)),
        (("status", "--interval", "0"), ("--interval",)),
        (("status", "--store", store, "--all"), ("--all",)),
    ]:
        one_line_error(cli(*args, check=False), 2, *words)
    assert not out.exists()


def test_sql_runs_one_query(store):
    for q, words in [("", ("empty",)), ("  ;  ", ("no statement",)),
                     ("SELECT 1; SELECT 2", ("2 statements",)),
                     ("DROP VIEW writes", ("only queries", "DROP")),
                     ("CREATE TABLE t (a INT)", ("only queries",)),
                     ("SELEC 1", ("SQL:",))]:
        one_line_error(cli("sql", "--store", store, q, check=False), 2, *words)
    r = cli("sql", "--store", store, "SELECT count(*) AS n FROM writes", "--format", "json")
    assert json.loads(r.stdout)[0]["n"] > 0
    assert "writes" in cli("sql", "--store", store, "SHOW TABLES").stdout


def test_an_invalid_time_is_not_a_mark_name(store, tmp_path):
    for at in ("2026-13-45T99:00", "2026-02-30", "2026-11-25T25:00:00"):
        one_line_error(cli("restore", "--store", store, "--device", "loop7", "--at", at,
                           "--to", tmp_path / "x.img", check=False), 2, "not an ISO 8601 time")
    one_line_error(cli("mark", "2026-13-45", check=False), 2, "reads as a time")


def test_prune_dry_run_and_a_pruned_mark(tmp_path):
    log, st = tmp_path / "log", tmp_path / "store"
    s = SynthSession(str(log), seed=43, size=1 << 20, chunk=128 << 10, piece=16 << 10)
    from test_prune import _at
    now = time.time_ns()
    _at(s, now - 3 * HOUR)
    s.baseline()
    s.workload(10, marks=0, snapshots=0)
    s.mark("old")
    _at(s, now - 2 * HOUR)
    s.workload(10, marks=0, snapshots=0)   # the prune point is among these
    _at(s, now - HOUR // 2)
    s.workload(10, marks=0, snapshots=0)
    s.mark("new")
    s.end()
    cli("ingest", "--log", log, "--store", st)
    before = cli("sql", "--store", st, "SELECT count(*) FROM writes").stdout
    r = cli("prune", "--store", st, "--device", "loop7", "--keep", "1h", "--dry-run")
    assert r.stderr.startswith("dry run: would prune synth:loop7 up to stamp"), r.stderr
    assert "Nothing was changed" in r.stderr
    k = int(r.stderr.split("up to stamp ")[1].split()[0])
    assert cli("sql", "--store", st, "SELECT count(*) FROM writes").stdout == before
    cli("restore", "--store", st, "--device", "loop7", "--at", "old", "--to", tmp_path / "o.img")
    r = cli("prune", "--store", st, "--device", "loop7", "--keep", "1h")
    assert f"up to stamp {k} " in r.stderr, r.stderr
    err = one_line_error(cli("restore", "--store", st, "--device", "loop7", "--at", "old",
                             "--to", tmp_path / "p.img", check=False), 5)
    assert err.startswith("blkrewind restore: error: mark 'old' (stamp ") and "no mark named" \
        not in err, err
    assert f"was pruned with the history of synth:loop7 up to stamp {k}; the oldest " \
        f"restorable point is stamp {k} (" in err, err
    # a name that never was a mark is still "no mark named", with the pruning said
    err = one_line_error(cli("restore", "--store", st, "--device", "loop7", "--at", "nosuch",
                             "--to", tmp_path / "p.img", check=False), 5, "no mark named")
    assert "was pruned" in err, err
    cli("restore", "--store", st, "--device", "loop7", "--at", "new", "--to", tmp_path / "n.img")


def test_a_failed_ingest_leaves_no_store_and_a_second_one_says_it_waits(store, tmp_path):
    empty = tmp_path / "empty-log"
    empty.mkdir()
    one_line_error(cli("ingest", "--log", empty, "--store", tmp_path / "new", check=False), 2,
                   "no LOG segments")
    assert not (tmp_path / "new").exists()
    # a store held by another writer: the second ingest says that it waits, then gives up
    from blkrewind.replayer.store import Store
    log = store.parent / "log"
    with Store.open(store, write=True):
        env = dict(os.environ, BLKREWIND_STORE_WAIT="2")
        r = subprocess.run([*BLKREWIND, "ingest", "--log", str(log), "--store", str(store)],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("note: store") and "waiting up to 2 s" in \
        lines[0] and f"(pid {os.getpid()})" in lines[0], r.stderr
    assert "busy" in lines[1]


def test_a_user_who_may_not_read_the_store_is_told_so(store):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a command as another user")
    # (cwd "/": PYTHONPATH makes it this checkout's code, not an installed one's)
    env = dict(os.environ, HOME="/tmp", PYTHONPATH=str(ROOT))
    for args in (("sql", "--store", store, "SELECT 1"), ("status", "--store", store)):
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            *BLKREWIND, *map(str, args)], capture_output=True, text=True,
                           cwd="/", env=env, timeout=60)
        err = one_line_error(r, 4, "permission denied", "root")
        assert "no store" not in err
    for cmd in (("status",), ("mark", "m")):  # the tracers' sockets are root's
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            *BLKREWIND, *cmd], capture_output=True, text=True, cwd="/",
                           env=env, timeout=60)
        one_line_error(r, 2, "must run as root")
    # a LOG it may not read: said, no internal error (a PermissionError before)
    log = os.path.join(os.path.dirname(str(store)), "log")
    for where in (log, "/root/log"):
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            *BLKREWIND, "ingest", "--log", where, "--store", "/tmp/never"],
                           capture_output=True, text=True, cwd="/", env=env, timeout=60)
        one_line_error(r, 2, "permission denied", "root")


@pytest.mark.bpf
def test_several_tracers(make_loop, tmp_path):
    a, b = make_loop(16), make_loop(16)
    # a command that cannot run fails at once, before any baseline
    t0 = time.monotonic()
    one_line_error(cli("trace", "--device", a, "--log", tmp_path / "n", "--", "/nonexistent",
                       check=False), 2, "cannot run /nonexistent")
    assert time.monotonic() - t0 < 10 and not (tmp_path / "n").exists()
    with TraceProc([a], tmp_path / "la") as ta, TraceProc([b], tmp_path / "lb") as tb:
        # (other tests may run tracers on this machine too: never mark with --all here)
        err = one_line_error(cli("mark", "m1", check=False), 2, "tracers are running",
                             "--log", "--all")
        assert str(tmp_path / "la") in err and str(tmp_path / "lb") in err
        one_line_error(cli("status", check=False), 2, "tracers are running")
        r = cli("mark", "m1", "--log", tmp_path / "la")
        assert r.stdout.count("mark 'm1'") == 1 and "set before" not in r.stdout
        r = cli("mark", "m1", "--log", tmp_path / "la")
        assert r.stdout.count("mark 'm1'") == 1 and "was set before in this session" in r.stdout
        st = json.loads(cli("status", "--log", tmp_path / "lb", "--format", "json").stdout)
        assert [t["log"] for t in st["tracers"]] == [str(tmp_path / "lb")]
        logs = [t.get("log") for t in
                json.loads(cli("status", "--all", "--format", "json").stdout)["tracers"]]
        assert str(tmp_path / "la") in logs and str(tmp_path / "lb") in logs
        # a device traced already is refused
        one_line_error(cli("trace", "--device", a, "--log", tmp_path / "lc", check=False), 2,
                       f"{a} is traced already", str(ta.p.pid))
        assert ta.p.poll() is None and tb.p.poll() is None
