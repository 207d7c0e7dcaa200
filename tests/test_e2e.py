"""The core promise, end to end, as a user runs it: trace a real loop device with
real BPF, ingest, restore, compare byte for byte.

Every test here creates its own loop devices (conftest's make_loop) and cleans
them up; nothing else is traced or written.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from tracerproc import (
    TraceProc,
    cli,
    copy_device,
    direct_writes,
    first_difference,
    same_file,
    sh,
    write_file,
)

pytestmark = [pytest.mark.bpf]

FS_SIZE_MB = {"ext4": 128, "xfs": 320}  # mkfs.xfs wants >= 300 MiB


class Marker:
    """Quiesced points: freeze the file system, mark, copy the device, thaw."""

    def __init__(self, dev, log, outdir: Path):
        self.dev, self.log, self.outdir = dev, log, outdir
        self.copies: dict[str, Path] = {}

    def __call__(self, name: str, mnt: Path | None = None) -> None:
        if mnt is not None:
            sh("fsfreeze", "--freeze", mnt)
        try:
            r = cli("mark", name, "--log", self.log)
            assert f"mark {name!r}: stamp" in r.stdout
            copy = self.outdir / f"copy-{name}.img"
            copy_device(self.dev, copy)
            self.copies[name] = copy
        finally:
            if mnt is not None:
                sh("fsfreeze", "--unfreeze", mnt)


def fs_workload(mnt: Path, mark, rng: random.Random) -> None:
    # buffered writes with fsync
    for i in range(6):
        write_file(mnt / f"f{i}.bin", rng, rng.randrange(1, 4 << 20))
    mark("m1", mnt)
    # O_DIRECT writes into a preallocated file
    sh("fallocate", "-l", "8M", mnt / "direct.bin")
    direct_writes(mnt / "direct.bin", rng, 40, 128)
    # overwrites in place and appends
    with open(mnt / "f0.bin", "r+b") as f:
        f.seek(12345)
        f.write(rng.randbytes(70001))
        os.fsync(f.fileno())
    with open(mnt / "f1.bin", "ab") as f:
        f.write(rng.randbytes(300000))
        os.fsync(f.fileno())
    mark("m2", mnt)
    # deletes, then discard of the freed space
    for i in (2, 3, 4):
        (mnt / f"f{i}.bin").unlink()
    sh("sync")
    sh("fstrim", mnt)
    mark("m3", mnt)
    # many small files
    (mnt / "d").mkdir()
    for i in range(120):
        (mnt / "d" / f"n{i}").write_bytes(rng.randbytes(rng.randrange(1, 10000)))
    sh("sync")
    mark("m4", mnt)


def raw_workload(dev: str, size: int, rng: random.Random) -> None:
    """After unmounting: write-zeroes, discard and O_DIRECT writes on the raw device."""
    tail = size - (8 << 20)
    sh("dd", "if=/dev/urandom", f"of={dev}", "bs=1M", "count=3", f"seek={tail >> 20}",
       "oflag=direct", "status=none")
    sh("blkdiscard", "-f", "-z", "-o", tail, "-l", 1 << 20, dev)           # WRITE_ZEROES
    sh("blkdiscard", "-f", "-o", tail + (1 << 20), "-l", 1 << 20, dev)     # DISCARD
    sh("dd", "if=/dev/urandom", f"of={dev}", "bs=512", "count=3", f"seek={(tail >> 9) + 8000}",
       "oflag=direct", "status=none")


def restore(store, dev, at, out, *extra):
    return cli("restore", "--store", store, "--device", dev, "--at", at, "--to", out, *extra)


def check_store(store: Path, dev: str, marker: Marker, final: Path, tmp: Path, names=None):
    for name in names or marker.copies:
        out = tmp / f"restored-{name}.img"
        restore(store, dev, name, out, "--force")
        assert same_file(out, marker.copies[name]), \
            f"restore at {name} differs from the copy: {first_difference(out, marker.copies[name])}"
        out.unlink()
    out = tmp / "restored-latest.img"
    restore(store, dev, "latest", out, "--force")
    assert same_file(out, final), f"restore at latest differs: {first_difference(out, final)}"
    out.unlink()


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_filesystem_history_restores_byte_exact(fstype, bpf_variant, make_loop, tmp_path):
    rng = random.Random(fstype)
    loop = make_loop(size_mb=FS_SIZE_MB[fstype])
    dev = loop.path
    sh(f"mkfs.{fstype}", "-q", "-f" if fstype == "xfs" else "-F", dev)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log, store = tmp_path / "log", tmp_path / "store"
    marker = Marker(dev, log, tmp_path)
    with TraceProc([dev], log, "--segment-mb", "4") as t:
        sh("mount", dev, mnt)
        try:
            fs_workload(mnt, marker, rng)
        finally:
            sh("umount", mnt)
        raw_workload(dev, loop.size, rng)
        marker("raw")
        assert t.stop() == 0, t.stderr
    assert "records lost" in t.stderr and "0 records lost" in t.stderr, t.stderr
    final = tmp_path / "final.img"
    copy_device(dev, final)

    cli("ingest", "--log", log, "--store", store)
    check_store(store, dev, marker, final, tmp_path)

    # the same history ingested segment by segment in a shuffled order, then
    # everything again in parallel (a second, idempotent pass)
    segments = sorted(log.glob("*.brlog"))
    assert len(segments) >= 3, segments
    store2 = tmp_path / "store-shuffled"
    rng.shuffle(segments)
    for i, seg in enumerate(segments):
        one = tmp_path / f"one-{i}"
        one.mkdir()
        os.link(seg, one / seg.name)
        cli("ingest", "--log", one, "--store", store2)
        shutil.rmtree(one)
    cli("ingest", "--log", log, "--store", store2, "--jobs", "4")
    check_store(store2, dev, marker, final, tmp_path, names=["m2", "raw"])

    q = "SELECT stamp, op, sector, length, comm FROM writes ORDER BY stamp"
    a = cli("sql", "--store", store, q, "--format", "csv").stdout
    b = cli("sql", "--store", store2, q, "--format", "csv").stdout
    assert a == b and a.count("\n") > 50


def _sector_ids(data: bytes) -> list[int]:
    return [struct.unpack_from("<Q", data, off)[0] for off in range(0, len(data), 512)]


def test_restore_at_any_stamp_is_a_prefix_of_the_history(make_loop, tmp_path):
    """Concurrent O_DIRECT writers; every 512-byte sector names the write that
    wrote it. A restore at stamp S must show, for every sector, the newest
    write at or before S that covers it -- and nothing newer."""
    size = 32 << 20
    loop = make_loop(size_mb=size >> 20)
    dev = loop.path
    log, store = tmp_path / "log", tmp_path / "store"
    writes: dict[int, tuple[int, int]] = {}  # write id -> (sector, nsectors)
    lock = threading.Lock()
    used: set[tuple[int, int]] = set()

    def writer(seed: int, count: int) -> None:
        import mmap
        rng = random.Random(seed)
        buf = mmap.mmap(-1, 256 << 10)
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            for k in range(count):
                wid = seed * 100000 + k + 1
                n = rng.choice([1, 2, 7, 8, 16, 64, 200, 512])
                with lock:
                    while True:
                        sector = rng.randrange(0, size // 512 - n)
                        if (sector, n) not in used:
                            used.add((sector, n))
                            writes[wid] = (sector, n)
                            break
                payload = b"".join(struct.pack("<QQ", wid, sector + j) + bytes(496)
                                   for j in range(n))
                buf.seek(0)
                buf.write(payload)
                os.pwrite(fd, memoryview(buf)[:n * 512], sector * 512)
        finally:
            os.close(fd)

    with TraceProc([dev], log) as t:
        threads = [threading.Thread(target=writer, args=(s, 300)) for s in (1, 2, 3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert t.stop() == 0, t.stderr
    cli("ingest", "--log", log, "--store", store)
    rows = json.loads(cli("sql", "--store", store,
                          "SELECT stamp, sector, length FROM writes WHERE op = 'write' ORDER BY stamp",
                          "--format", "json").stdout)
    by_extent = {(r["sector"], r["length"] // 512): r["stamp"] for r in rows}
    stamp_of = {wid: by_extent[ext] for wid, ext in writes.items()}
    assert len(stamp_of) == 900
    order = sorted(stamp_of.values())
    for S in (order[0], order[150], order[449], order[700], order[-1]):
        expect = [0] * (size // 512)
        expect_stamp = [0] * (size // 512)
        for wid, (sector, n) in writes.items():
            st = stamp_of[wid]
            if st <= S:
                for j in range(sector, sector + n):
                    if st > expect_stamp[j]:
                        expect_stamp[j], expect[j] = st, wid
        out = tmp_path / f"at-{S}.img"
        restore(store, dev, str(S), out)
        got = _sector_ids(out.read_bytes())
        bad = [j for j in range(len(got)) if got[j] != expect[j]]
        assert not bad, f"at stamp {S}: {len(bad)} sectors differ, first {bad[0]}: " \
                        f"holds write {got[bad[0]]}, expected {expect[bad[0]]}"
        out.unlink()


def test_baseline_is_exact_under_full_speed_writes(make_loop, tmp_path):
    """fio writes random blocks (4 KiB..256 KiB, 16 in flight) before, during and after
    the baseline is read, at 120 MB/s: as fast as this VM's LOG keeps up with while the
    baseline is read too (faster, the ring overflows: test_lost_records covers that)."""
    loop = make_loop(size_mb=256, fill="random")
    dev = loop.path
    log, store = tmp_path / "log", tmp_path / "store"
    fio = subprocess.Popen(["fio", "--name=w", f"--filename={dev}", "--rw=randwrite",
                            "--bsrange=4k-256k", "--thread", "--direct=1", "--ioengine=libaio", "--iodepth=16",
                            "--time_based", "--runtime=60", "--norandommap", "--randrepeat=0", "--rate=120m",
                            "--output=/dev/null"])
    try:
        time.sleep(1.0)
        with TraceProc([dev], log) as t:
            time.sleep(1.0)
            fio.send_signal(2)
            fio.wait(30)
            copy = tmp_path / "quiet.img"
            cli("mark", "quiet", "--log", log)
            copy_device(dev, copy)
            assert t.stop() == 0, t.stderr
            assert " 0 records lost" in t.stderr, t.stderr
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    cli("ingest", "--log", log, "--store", store)
    for at in ("quiet", "latest"):
        out = tmp_path / f"restored-{at}.img"
        restore(store, dev, at, out)
        assert same_file(out, copy), f"{at}: {first_difference(out, copy)}"
        out.unlink()


def test_trace_with_command_returns_its_status(make_loop, tmp_path):
    loop = make_loop(size_mb=16)
    log = tmp_path / "log"
    r = cli("trace", "--device", loop.path, "--log", log, "--stats-json", tmp_path / "s.json",
            "--", "sh", "-c", f"dd if=/dev/urandom of={loop.path} bs=64k count=16 oflag=direct "
                              f"status=none && exit 7", check=False)
    assert r.returncode == 7, r.stderr
    assert "capture live" in r.stderr
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["drops"] == 0 and stats["bytes"] >= 1 << 20 and stats["bios"] >= 16


def test_lost_records_are_reported_and_never_exposed(bpf_variant, make_loop, tmp_path):
    """A 1 MiB ring buffer under 1 MiB writes overflows: the tracer says so, the LOG
    records the loss, no restorable interval reaches into a gap window, and the
    resync makes `latest` equal the device again."""
    loop = make_loop(size_mb=256, fill=None, dio=True)
    log, store = tmp_path / "log", tmp_path / "store"
    r = cli("trace", "--device", loop.path, "--log", log, "--ring-mb", "1",
            "--", "fio", "--name=w", f"--filename={loop.path}", "--rw=write", "--bs=1m",
            "--direct=1", "--ioengine=libaio", "--iodepth=32", "--size=256m", "--numjobs=2",
            "--output=/dev/null", check=False)
    assert r.returncode == 0, r.stderr
    assert "WARNING:" in r.stderr and "records lost" in r.stderr, r.stderr
    cli("ingest", "--log", log, "--store", store)
    loss = json.loads(cli("sql", "--store", store, "SELECT * FROM loss", "--format", "json").stdout)
    assert loss and max(x["drops"] for x in loss) > 0
    gaps = json.loads(cli("sql", "--store", store, "SELECT * FROM gaps", "--format", "json").stdout)
    rs = json.loads(cli("sql", "--store", store, "SELECT * FROM restorable WHERE from_stamp "
                        "IS NOT NULL", "--format", "json").stdout)
    assert gaps and rs
    for g in gaps:
        end = g["resumed"] - 1 if g["resumed"] is not None else float("inf")
        for iv in rs:
            assert iv["to_stamp"] < g["stamp"] or iv["from_stamp"] > end, (g, iv)
    out = tmp_path / "x.img"
    restore(store, loop.path, "latest", out)
    assert same_file(out, loop.path), first_difference(out, loop.path)


def test_odd_bio_shapes_are_captured_exactly(bpf_variant, make_loop, tmp_path):
    """O_DIRECT from buffers that straddle pages (bvecs of a few hundred bytes),
    from a THP-backed buffer (multi-page bvecs), 512-byte writes, 4 MiB writes."""
    import ctypes
    import mmap
    loop = make_loop(size_mb=64, fill="random")
    dev = loop.path
    log, store = tmp_path / "log", tmp_path / "store"
    rng = random.Random(5)
    with TraceProc([dev], log) as t:
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        try:
            big = mmap.mmap(-1, 8 << 20)
            addr = ctypes.addressof(ctypes.c_char.from_buffer(big))
            big.madvise(mmap.MADV_HUGEPAGE)
            huge = (-addr) % (2 << 20)
            view = memoryview(big)
            for k in range(40):
                start = rng.choice([512, 1024, 3584, 4096 - 512, huge])
                n = rng.choice([512, 1536, 8192, 65536 + 512, 300 * 512, 4 << 20])
                view[start:start + n] = rng.randbytes(n)
                os.pwrite(fd, view[start:start + n], rng.randrange(0, (60 << 20) // 512) * 512)
            view.release()
            big.close()
        finally:
            os.close(fd)
        final = tmp_path / "final.img"
        cli("mark", "end", "--log", log)
        copy_device(dev, final)
        assert t.stop() == 0
    cli("ingest", "--log", log, "--store", store)
    out = tmp_path / "out.img"
    restore(store, dev, "end", out)
    assert same_file(out, final), first_difference(out, final)


def test_a_partition_and_a_disk_traced_together(bpf_variant, make_loop, tmp_path):
    """One session, two devices: partition 2 of one loop disk and another whole
    loop disk. Writes to partition 1 are not traced; each restore equals its device."""
    disk = make_loop(size_mb=64)
    sh("sh", "-c", f"printf 'label: dos\\n,24MiB\\n,\\n' | sfdisk -q {disk.path}")
    sh("partx", "-u", disk.path, check=False)
    part = f"{disk.path}p2"
    deadline = time.monotonic() + 10
    while not os.path.exists(part) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.path.exists(part), f"{part} did not appear"
    other = make_loop(size_mb=32, fill="random")
    log, store = tmp_path / "log", tmp_path / "store"
    with TraceProc([part, other.path], log) as t:
        for dev, seek in ((part, 3), (other.path, 7), (f"{disk.path}p1", 2)):
            sh("dd", "if=/dev/urandom", f"of={dev}", "bs=64k", "count=40", f"seek={seek * 16}",
               "oflag=direct", "status=none")
        cli("mark", "both", "--log", log)
        copies = {}
        for dev in (part, other.path):
            copies[dev] = tmp_path / f"copy-{os.path.basename(dev)}.img"
            copy_device(dev, copies[dev])
        assert t.stop() == 0, t.stderr
    cli("ingest", "--log", log, "--store", store)
    for dev, copy in copies.items():
        out = tmp_path / f"restored-{os.path.basename(dev)}.img"
        restore(store, dev, "both", out)
        assert same_file(out, copy), f"{dev}: {first_difference(out, copy)}"
    devs = json.loads(cli("sql", "--store", store, "SELECT name, size_bytes FROM devices",
                          "--format", "json").stdout)
    names = {d["name"]: d["size_bytes"] for d in devs}
    assert names == {os.path.basename(part): int(sh("blockdev", "--getsize64", part)),
                     os.path.basename(other.path): 32 << 20}
