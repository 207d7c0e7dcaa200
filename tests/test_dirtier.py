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

from replayer import fsmap
from tracerproc import TraceProc, cli, sh

pytestmark = [pytest.mark.bpf]

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


def test_buffered_writes_attributed_to_their_dirtier(make_loop, mkfs, mount_fs, tmp_path):
    loop = make_loop(128)
    mkfs(loop.path)
    mnt = mount_fs(loop.path)
    log, store = tmp_path / "log", tmp_path / "store"
    names = {"a.bin": "writer_aa", "b.bin": "writer_bb", "c.bin": "writer_cc",
             "d.bin": "writer_dd"}
    how = {"a.bin": "buffered", "b.bin": "buffered", "c.bin": "fsync", "d.bin": "direct"}
    with TraceProc([loop.path], log) as t:
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
        by_dirtier = {}
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
