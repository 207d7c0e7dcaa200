"""`blkrewind mount` / `umount` / `status` on real traced ext4 and xfs histories.

Checked: a mark's files (sha256) through the mount; --writable replays ext4's journal at a
crash-consistent stamp and the store is unchanged afterwards; a failure and a SIGINT before
every step leave nothing (no loop device, no FUSE mount, no nbdkit/nbdfuse, no registry, no
runtime directory); bad input one line each; writing through a writable mount inside a 160 MiB
memory cgroup finishes (no loop-over-FUSE writeback deadlock).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, attached_loops, cli_command, mounts, need_root, run_cli
from instant_hist import fs_history, tree_sums, wait_until

RUN = Path("/run/blkrewind")


@pytest.fixture(scope="module")
def ext4(tmp_path_factory):
    need_root()
    return fs_history(tmp_path_factory.mktemp("ext4") / "h", "ext4")


def _ours(run_dirs_before: set) -> list[str]:
    """What a mount of this test left: runtime dirs, registry entries, loop devices on them,
    FUSE mounts under them, nbdkit/nbdfuse processes naming them."""
    left = []
    exp = RUN / "exports"
    # `mount` names its run dirs mount-PID-NS (other commands' points, of tests running beside
    # this one on the machine, are not this test's)
    now = {d for d in os.listdir(exp) if d.startswith("mount-")} if exp.exists() else set()
    left += [f"run dir {d}" for d in now - run_dirs_before]
    reg = RUN / "mounts"
    if reg.exists():
        left += [f"registry {n}" for n in os.listdir(reg)]
    def new(path: str) -> bool:   # under a run dir made since (what other runs left under
        # theirs -- a killed serve's detector before a server reaped it -- is not this test's)
        if not path.startswith(f"{exp}/"):
            return False
        d = path[len(str(exp)) + 1:].split("/")[0]
        return d.startswith("mount-") and d not in run_dirs_before

    left += [f"loop {d} -> {b}" for d, b in attached_loops().items() if new(b)]
    left += [f"mount {mp}" for _, mp in mounts() if new(mp)]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ("nbdkit" in cmd or "nbdfuse" in cmd) and any(d in cmd for d in now - run_dirs_before):
            left.append(f"process {pid}: {cmd[:80]}")
    return left


def _exports() -> set:
    exp = RUN / "exports"
    return set(os.listdir(exp)) if exp.exists() else set()


def test_mount_at_each_mark_shows_its_files(ext4, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    before = _exports()
    for mark in ("m1", "m3", "m4"):
        t0 = time.monotonic()
        r = run_cli("mount", "--store", ext4.store, "--device", ext4.name, "--at", mark, mp)
        try:
            assert r.stdout.strip() == str(mp)
            assert time.monotonic() - t0 < 60
            assert tree_sums(mp) == ext4.files[mark], f"files at {mark} differ"
            st = run_cli("status", "--all")   # (--all: tracers of other tests may run)
            assert str(mp) in st.stdout and mark in st.stdout, st.stdout
            cp = run_cli("mount", "--store", ext4.store, "--device", ext4.name, "--at", "m2",
                         mp, check=False)
            assert_one_line_error(cp, "busy")
        finally:
            run_cli("umount", mp)
        assert not _ours(before)
        assert not os.listdir(mp)


def test_mount_of_an_xfs_history_at_a_mark(tmp_path):
    """xfs, read-only: mounted ro,norecovery (the log is not replayed); the mark's files."""
    need_root()
    h = fs_history(tmp_path / "h", "xfs")
    mp = tmp_path / "mnt"
    mp.mkdir()
    before = _exports()
    for mark in ("m2", "m4"):
        run_cli("mount", "--store", h.store, "--device", h.name, "--at", mark, mp)
        try:
            fs, opts = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "--mountpoint",
                                       str(mp)], capture_output=True, text=True).stdout.split()
            assert fs == "xfs" and {"ro", "norecovery"} <= set(opts.split(",")), (fs, opts)
            assert h.files[mark]
            assert tree_sums(mp) == h.files[mark], f"files at {mark} differ"
        finally:
            run_cli("umount", mp)
        assert not _ours(before), _ours(before)
        assert not os.listdir(mp)


def test_writable_mount_replays_the_journal_and_leaves_the_store(ext4, tmp_path):
    """A stamp between two marks (the file system in use: its journal holds transactions)
    mounts with journal recovery on the overlay; writes there never reach the store."""
    r = run_cli("sql", "--store", ext4.store, "--format", "csv",
                "SELECT stamp FROM marks ORDER BY stamp")
    stamps = [int(x) for x in r.stdout.split()[1:]]
    mid = (stamps[0] + stamps[1]) // 2
    sums = {p: p.read_bytes() for p in (ext4.store / "payload").rglob("*") if p.is_file()}
    mp = tmp_path / "mnt"
    mp.mkdir()
    before = _exports()
    run_cli("mount", "--store", ext4.store, "--device", ext4.name, "--at", str(mid), "--writable",
            mp)
    try:
        (mp / "new.bin").write_bytes(os.urandom(3 << 20))
        os.sync()
        assert (mp / "new.bin").stat().st_size == 3 << 20
    finally:
        run_cli("umount", mp)
    assert not _ours(before)
    assert {p: p.read_bytes() for p in (ext4.store / "payload").rglob("*") if p.is_file()} == sums
    assert "all match" in run_cli("verify", "--store", ext4.store).stderr
    # read-only at the same stamp: no journal replay, and no trace of the overlay's writes
    run_cli("mount", "--store", ext4.store, "--device", ext4.name, "--at", str(mid), mp)
    try:
        assert not (mp / "new.bin").exists()
    finally:
        run_cli("umount", mp)


@pytest.mark.parametrize("step", ["prepare", "nbdkit", "nbdfuse", "loop", "mount"])
def test_failure_and_sigint_at_every_step_leave_nothing(ext4, tmp_path, step):
    mp = tmp_path / "mnt"
    mp.mkdir()
    before = _exports()
    base = [*cli_command(), "mount", "--store", str(ext4.store), "--device", ext4.name, "--at",
            "m2", str(mp)]
    env = dict(os.environ, BLKREWIND_MOUNT_TEST_HOOK=f"fail:{step}")
    cp = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert_one_line_error(cp, f"before {step}")
    assert not _ours(before), _ours(before)
    env["BLKREWIND_MOUNT_TEST_HOOK"] = f"pause:{step}"
    p = subprocess.Popen(base, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    assert p.stderr is not None, "started with stderr=PIPE"
    try:
        line = p.stderr.readline()
        assert f"paused before {step}" in line, line + p.stderr.read()
        p.send_signal(signal.SIGINT)
        rc = p.wait(60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 130, p.stderr.read()
    assert not _ours(before), _ours(before)
    assert not os.path.ismount(mp)


def test_a_read_point_whose_nbdkit_never_gets_ready_leaves_nothing(ext4, monkeypatch):
    """A point read in-process (replayer/pointimage.py: diff, files, serve's detector) whose
    nbdkit does not get ready in time: the error goes on and nbdkit is stopped, though its pid
    was never read from its pid file, before its runtime directory is removed (it went on
    starting and wrote its socket and pid file into the directory being removed)."""
    from blkrewind.errors import UserError
    from blkrewind.replayer import export, mounts, points
    from blkrewind.replayer.pointimage import open_point_image
    from blkrewind.replayer.query import open_for_reading

    real = mounts._wait_pidfile

    def late(proc, pidfile, what, *a, **kw):
        if what == "nbdkit":
            raise UserError("nbdkit did not start within 60 s")
        return real(proc, pidfile, what, *a, **kw)
    monkeypatch.setattr(mounts, "_wait_pidfile", late)
    me = f"-{os.getpid()}"
    with open_for_reading(ext4.store) as st:
        dev = st.find_device(ext4.name)
        with pytest.raises(UserError, match="did not start"):
            with open_point_image(st, dev, points.parse_point("m2")):
                pass
    mine = [d for d in _exports() if d.split(".")[0].endswith(me)]
    running = [pid for pid in os.listdir("/proc") if pid.isdigit() and
               f"{export.RUN_DIR}/".encode() in _cmdline(pid) and me.encode() in _cmdline(pid)]
    assert not (mine or running), (mine, running)


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_bad_input_one_line_each(ext4, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    base = ["mount", "--store", ext4.store, "--device", ext4.name]
    assert_one_line_error(run_cli(*base, "--at", "nosuch", mp, check=False), "nosuch")
    assert_one_line_error(run_cli(*base, "--at", "m1", tmp_path / "nodir", check=False),
                          "not a directory")
    (mp / "x").write_text("x")
    assert_one_line_error(run_cli(*base, "--at", "m1", mp, check=False), "not empty")
    assert_one_line_error(run_cli("umount", tmp_path, check=False), "not a blkrewind mount")


def _memory_cgroup(name: str, limit: int) -> tuple[Path, str]:
    """(cgroup directory, file whose content shows the limit was hit): v2 or v1."""
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.subtree_control").exists() and \
            "memory" in (v2 / "cgroup.subtree_control").read_text():
        cg = v2 / name
        cg.mkdir()
        (cg / "memory.max").write_text(str(limit))
        return cg, "memory.events"
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists():
        cg = v1 / name
        cg.mkdir()
        (cg / "memory.limit_in_bytes").write_text(str(limit))
        return cg, "memory.failcnt"
    pytest.skip("no memory cgroup controller")


def test_writes_through_a_writable_mount_under_memory_pressure(ext4, tmp_path):
    """A writer in a memory cgroup of 40 MiB (the mount's servers leave the caller's cgroup)
    while
    300 MiB are written through the mount and read back (30 MiB, copied 8 times): it must finish, not deadlock."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    before = _exports()
    cg, events_file = _memory_cgroup(f"blkrewind-test-{os.getpid()}", 40 << 20)
    try:
        run_cli("mount", "--store", ext4.store, "--device", ext4.name, "--at", "m4",
                "--writable", mp)
        try:
            w = subprocess.run(["sh", "-c", f"echo $$ > {cg}/cgroup.procs && dd if=/dev/urandom "
                                f"of={mp}/big.bin bs=1M count=30 status=none && sync && "
                                f"for i in 1 2 3 4 5 6 7 8; do cp {mp}/big.bin {mp}/c.bin && sync && "
                                f"rm {mp}/c.bin; done && cat {mp}/big.bin > /dev/null && sync"],
                               capture_output=True, text=True, timeout=300)
            assert w.returncode == 0, w.stderr
            events = (cg / events_file).read_text()
        finally:
            run_cli("umount", mp)
    finally:
        wait_until(lambda: not (cg / "cgroup.procs").read_text().split(), 30, "cgroup empty")
        cg.rmdir()
    assert not _ours(before)
    assert events.strip() and events.strip() != "0", events  # the limit was reached
