"""The real writer of buffered writes (issue 12): two processes write buffered data into two
files of a traced ext4, a flusher writes it back; `writes` attributes each file's data bytes
to the process that dirtied them, not to the flusher that submitted the bios. Beside them a
process that fsyncs its own file (submitter and dirtier are the same) and an O_DIRECT writer
(no dirtier: the submitter is the writer)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from synth import SynthSession
from tracerproc import TraceProc, cli, sh

from blkrewind.formats import record
from blkrewind.replayer import fsmap

FILE_MB = 8

# a child with its own command name (prctl PR_SET_NAME) writes FILE_MB MiB: buffered without
# fsync, buffered with an fsync (it writes its pages back itself), or O_DIRECT
WRITER = r"""
import ctypes, mmap, os, sys
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
how = sys.argv[4]
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC
             | (os.O_DIRECT if how == "direct" else 0), 0o644)
buf = mmap.mmap(-1, 1 << 20)  # page aligned, for O_DIRECT
for i in range(int(sys.argv[3])):
    buf[:] = os.urandom(1 << 20)
    assert os.write(fd, buf) == 1 << 20
if how == "fsync":
    os.fsync(fd)
os.close(fd)
print(os.getpid(), flush=True)
"""


@pytest.mark.bpf
def test_buffered_writes_attributed_to_their_dirtier(make_loop, mkfs, mount_fs, tmp_path):
    loop = make_loop(128)
    mkfs(loop.path)
    mnt = mount_fs(loop.path)
    log, store = tmp_path / "log", tmp_path / "store"
    names = {"a.bin": "writer_aa", "b.bin": "writer_bb", "c.bin": "writer_cc",
             "d.bin": "writer_dd"}
    how = {"a.bin": "buffered", "b.bin": "buffered", "c.bin": "fsync", "d.bin": "direct"}
    with TraceProc([loop.path], log, "--dirtier") as t:
        cli("mark", "m0", "--log", log)
        procs = {f: subprocess.Popen([sys.executable, "-c", WRITER, comm, str(mnt / f),
                                      str(FILE_MB), how[f]], stdout=subprocess.PIPE, text=True)
                 for f, comm in names.items()}
        pids = {}
        for f, p in procs.items():
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            pids[f] = int(out.split()[0])
        sh("sync")  # the flusher (kworker) writes the pages back: the bios are its
        extents = {f: fsmap.merge_extents([(ph, ln) for _, ph, ln in fsmap.fiemap(str(mnt / f))])
                   for f in names}
        assert t.stop() == 0, t.stderr
    assert "dirtier of buffered writes is not recorded" not in t.stderr
    cli("ingest", "--log", log, "--store", store)

    for f, comm in names.items():
        assert sum(e - s for s, e in extents[f]) == FILE_MB << 20
        vals = ", ".join(f"({s}, {e})" for s, e in extents[f])
        q = (f"WITH x(xs, xe) AS (VALUES {vals}) "
             f"SELECT w.comm, w.pid, w.dirty_comm, w.dirty_pid, "
             f"sum(least(w.sector * 512 + w.length, x.xe) - greatest(w.sector * 512, x.xs)) "
             f"AS bytes FROM writes w JOIN x ON w.sector * 512 < x.xe "
             f"AND w.sector * 512 + w.length > x.xs WHERE w.op = 'write' "
             f"GROUP BY ALL ORDER BY bytes DESC")
        rows = json.loads(cli("sql", "--store", store, q, "--format", "json").stdout)
        by_dirtier: dict[tuple[str, int], int] = {}
        for r in rows:
            k = (r["dirty_comm"], r["dirty_pid"])
            by_dirtier[k] = by_dirtier.get(k, 0) + r["bytes"]
        if how[f] == "direct":
            # O_DIRECT: the submitter is the writer; no page-cache dirtier
            assert by_dirtier == {(None, None): FILE_MB << 20}, rows
            assert {(r["comm"], r["pid"]) for r in rows} == {(comm, pids[f])}, rows
            continue
        # every byte of the file's blocks, as written back, is the dirtier's
        assert by_dirtier == {(comm, pids[f]): FILE_MB << 20}, rows
        if how[f] == "fsync":  # written back by the writer itself (F_DIRTYSELF)
            assert {(r["comm"], r["pid"]) for r in rows} == {(comm, pids[f])}, rows
        else:  # submitted by someone else: a flusher thread (kworker) or sync
            assert all(r["comm"] != comm for r in rows), rows

    # blame: the file's bytes by submitter and dirtier
    a = extents["a.bin"][0]
    b = json.loads(cli("blame", "--store", store, "--device", loop.path, "--from", "m0", "--to",
                       "latest", "--range", f"{a[0]}+{a[1] - a[0]}", "--format", "json").stdout)
    assert [(x["dirty_comm"], x["dirty_pid"]) for x in b] == [("writer_aa", pids["a.bin"])], b
    assert sum(x["bytes"] for x in b) == a[1] - a[0] and b[0]["comm"] != "writer_aa", b


# a child with its own command name writes MiB [first, first + n) of an existing file, buffered
HALF = r"""
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
fd = os.open(sys.argv[2], os.O_WRONLY)
for i in range(int(sys.argv[3]), int(sys.argv[3]) + int(sys.argv[4])):
    assert os.pwrite(fd, os.urandom(1 << 20), i << 20) == 1 << 20
os.close(fd)
print(os.getpid(), flush=True)
"""


@pytest.mark.bpf
def test_one_file_two_writers(make_loop, mkfs, mount_fs, tmp_path, bpf_variant):
    """A file's first writer is its owner (owner_map: no entry per range while it is the only
    one); a second process writing another part of the file makes it shared (per range from
    then on). Each part's bytes, written back by the flusher, are their own writer's: the
    owner's pages dirtied before the sharing through the owner, the second writer's through
    their ranges. Both program variants."""
    loop = make_loop(64)
    mkfs(loop.path)
    mnt = mount_fs(loop.path)
    log, store = tmp_path / "log", tmp_path / "store"
    f = mnt / "shared.bin"
    with open(f, "wb") as fh:      # allocated and written back before tracing
        fh.write(b"\0" * (8 << 20))
    sh("sync")
    pids = {}
    with TraceProc([loop.path], log, "--dirtier") as t:
        # 3 MiB each with 2 MiB untouched between them: no writeback bio holds pages of both
        for comm, first in (("first_half", 0), ("second_half", 5)):
            p = subprocess.run([sys.executable, "-c", HALF, comm, str(f), str(first), "3"],
                               capture_output=True, text=True, check=True, timeout=120)
            pids[comm] = int(p.stdout.split()[0])
        sh("sync")
        fm = fsmap.fiemap(str(f))    # (file offset, device offset, length)
        assert t.stop() == 0, t.stderr
    assert "dirtier of buffered writes is not recorded" not in t.stderr
    cli("ingest", "--log", log, "--store", store)
    for comm, (lo, hi) in (("first_half", (0, 3 << 20)), ("second_half", (5 << 20, 8 << 20))):
        parts = [(ph + max(lo, lg) - lg, ph + min(hi, lg + ln) - lg) for lg, ph, ln in fm
                 if lg < hi and lg + ln > lo]
        assert sum(e - a for a, e in parts) == hi - lo, fm
        vals = ", ".join(f"({a}, {e})" for a, e in parts)
        q = (f"WITH x(xs, xe) AS (VALUES {vals}) "
             f"SELECT w.dirty_comm, w.dirty_pid, sum(least(w.sector * 512 + w.length, x.xe) "
             f"- greatest(w.sector * 512, x.xs)) AS bytes FROM writes w JOIN x "
             f"ON w.sector * 512 < x.xe AND w.sector * 512 + w.length > x.xs "
             f"WHERE w.op = 'write' GROUP BY ALL")
        rows = json.loads(cli("sql", "--store", store, q, "--format", "json").stdout)
        assert [(r["dirty_comm"], r["dirty_pid"], r["bytes"]) for r in rows] == \
            [(comm, pids[comm], 3 << 20)], (comm, rows)


def test_dirtier_columns_from_records(tmp_path):
    """Ingest and the views, from synthetic records: R_DIRTY (here after its bio's records,
    the bio in several pieces), F_DIRTYSELF, neither."""
    s = SynthSession(str(tmp_path / "log"), seed=12, size=2 << 20)
    s.baseline()
    flushed = s.write(0, s.rng.randbytes(200 << 10), pid=70, comm="kworker/u8:1")
    s.dirtier(flushed, pid=555, comm="app")
    own = s.write(1 << 20, b"\x01" * 8192, pid=888, comm="selfw", flags=record.F_DIRTYSELF)
    direct = s.write(1 << 19, b"\x02" * 4096, pid=999, comm="directw")
    s.end()
    cli("ingest", "--log", tmp_path / "log", "--store", tmp_path / "store")
    rows = json.loads(cli("sql", "--store", tmp_path / "store",
                          "SELECT stamp, pid, comm, dirty_pid, dirty_tid, dirty_comm, "
                          "dirty_cgroup_id, dirty_time IS NOT NULL AS dt, captured FROM writes "
                          "WHERE op = 'write' ORDER BY stamp", "--format", "json").stdout)
    by = {r["stamp"]: r for r in rows}
    assert (by[flushed]["pid"], by[flushed]["comm"]) == (70, "kworker/u8:1")
    assert (by[flushed]["dirty_pid"], by[flushed]["dirty_tid"], by[flushed]["dirty_comm"],
            by[flushed]["dirty_cgroup_id"], by[flushed]["dt"]) == (555, 556, "app", 88, True)
    assert by[flushed]["captured"] == 200 << 10  # one row per bio: the join adds none
    assert (by[own]["dirty_pid"], by[own]["dirty_tid"], by[own]["dirty_comm"],
            by[own]["dirty_cgroup_id"]) == (888, 889, "selfw", 77)
    assert by[direct]["dirty_pid"] is None and by[direct]["dirty_comm"] is None

    # a store made before the dirtiers table: read-only, the views show NULL; a writer adds it
    import duckdb
    con = duckdb.connect(str(tmp_path / "store" / "meta.duckdb"))
    con.execute("DROP TABLE dirtiers")
    con.close()
    q = "SELECT dirty_pid, dirty_comm FROM writes WHERE stamp = " + str(flushed)
    assert json.loads(cli("sql", "--store", tmp_path / "store", q, "--format", "json").stdout) \
        == [{"dirty_pid": None, "dirty_comm": None}]
    cli("ingest", "--log", tmp_path / "log", "--store", tmp_path / "store")
    con = duckdb.connect(str(tmp_path / "store" / "meta.duckdb"), read_only=True)
    # the table is back (empty: frames are stored once; an older tracer emitted no R_DIRTY)
    assert con.execute("SELECT count(*) FROM dirtiers").fetchone() == (0,)
    con.close()
