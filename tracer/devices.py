"""What the tracer needs to know about a block device, read from sysfs."""
from __future__ import annotations

import os
import socket
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from blkrewind.errors import UserError
from blkrewind.formats import record
from blkrewind.osutil import mount_of


@dataclass
class BlockDevice:
    path: str               # as the user named it
    name: str               # kernel name: loop3, sdb1, nvme0n1p2
    major: int
    minor: int
    size_bytes: int
    logical_block_size: int
    physical_block_size: int
    part_start: int         # sectors; 0 for a whole disk
    disk: str               # the whole disk's kernel name (== name for a disk)
    host: str

    @property
    def kdev(self) -> int:
        return record.kdev(self.major, self.minor)

    @property
    def is_partition(self) -> bool:
        return self.disk != self.name

    def info(self) -> dict:
        d = asdict(self)
        d["dev"] = self.kdev
        return d


def all_zero(buf: memoryview) -> bool:
    """Whether a chunk read from a device holds only zero bytes. Not `view == bytes(n)`: a
    memoryview compares element by element through its format, which made the baseline of
    an empty device run at a fraction of the device's speed; numpy tests 64-bit words."""
    n = len(buf)
    words = np.frombuffer(buf, dtype=np.uint64, count=n // 8)
    return not words.any() and not any(buf[n - n % 8:])


def _read(p: Path, default: str | None = None) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        if default is None:
            raise
        return default


def inspect(path: str) -> BlockDevice:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such device") from None
    except OSError as e:
        raise UserError(f"{path}: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise UserError(f"{path} is not a block device")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    sysdir = Path(f"/sys/dev/block/{major}:{minor}").resolve()
    if not sysdir.exists():
        raise UserError(f"{path}: the kernel does not know block device {major}:{minor}")
    is_part = (sysdir / "partition").exists()
    diskdir = sysdir.parent if is_part else sysdir
    size_sectors = int(_read(sysdir / "size"))
    if size_sectors == 0:
        raise UserError(f"{path} has size 0 (a loop device with no backing file?)")
    queue = diskdir / "queue"
    zoned = _read(queue / "zoned", "none")
    if zoned != "none":
        raise UserError(f"{path} is a zoned device ({zoned}): zone append is not supported")
    return BlockDevice(
        path=path, name=sysdir.name, major=major, minor=minor,
        size_bytes=size_sectors * 512,
        logical_block_size=int(_read(queue / "logical_block_size", "512")),
        physical_block_size=int(_read(queue / "physical_block_size", "512")),
        part_start=int(_read(sysdir / "start", "0")) if is_part else 0,
        disk=diskdir.name, host=socket.gethostname())


def check_no_overlap(devs: list[BlockDevice]) -> None:
    seen: dict[int, BlockDevice] = {}
    for d in devs:
        if d.kdev in seen:
            raise UserError(f"{d.path} is named twice (also as {seen[d.kdev].path})")
        seen[d.kdev] = d
    disks = {d.name for d in devs if not d.is_partition}
    for d in devs:
        if d.is_partition and d.disk in disks:
            raise UserError(f"{d.path} is a partition of {d.disk}, which is traced too: "
                            f"trace either the disk or its partitions")


def _underlying(major: int, minor: int, depth: int = 0) -> list[tuple[str, str]]:
    """(kernel name, whole disk's kernel name) of the block device major:minor and of every
    device its writes end up on: a loop device's backing file's device, a device mapper or
    md device's members (sysfs 'slaves'), recursively."""
    sysdir = Path(f"/sys/dev/block/{major}:{minor}")
    if depth > 16 or not sysdir.exists():
        return []
    sysdir = sysdir.resolve()
    disk = sysdir.parent if (sysdir / "partition").exists() else sysdir
    out = [(sysdir.name, disk.name)]
    backing = _read(disk / "loop" / "backing_file", "").removesuffix(" (deleted)")
    if backing:
        try:
            st = os.stat(backing)
        except OSError:
            st = None
        if st is not None:
            out += _underlying(os.major(st.st_dev), os.minor(st.st_dev), depth + 1)
    for slave in (disk / "slaves").glob("*") if (disk / "slaves").is_dir() else ():
        try:
            mj, mn = _read(slave / "dev").split(":")
        except (OSError, ValueError):
            continue
        out += _underlying(int(mj), int(mn), depth + 1)
    return out


def check_log_location(log_dir: str, devs: list[BlockDevice]) -> str | None:
    """Refuse a LOG whose writes would be captured: every LOG write would come back as
    records to write into the LOG, without end. Returns a warning for a LOG in memory."""
    path = os.path.abspath(log_dir)
    while not os.path.exists(path):  # the LOG directory is created later
        path = os.path.dirname(path)
    st = os.stat(path)
    names = {d.name: d for d in devs}
    fstype, source = mount_of(path)
    chain = _underlying(os.major(st.st_dev), os.minor(st.st_dev))
    if not chain and source.startswith("/"):  # btrfs and others: an anonymous st_dev
        try:
            src = os.stat(source)
        except OSError:
            src = None
        if src is not None and stat.S_ISBLK(src.st_mode):
            chain = _underlying(os.major(src.st_rdev), os.minor(src.st_rdev))
    for name, disk in chain:
        d = names.get(name) or (names.get(disk) if disk != name else None)
        if d is not None:
            how = "" if chain[0][0] == d.name else f" (through {chain[0][0]})"
            raise UserError(f"the LOG {log_dir} is on {d.path}{how}, which is traced: its own "
                            f"writes would be captured into it without end; put the LOG on "
                            f"another device")
    if fstype in ("tmpfs", "ramfs"):
        return (f"the LOG {log_dir} is on a {fstype}: it lives in memory, is lost at reboot, "
                f"and a LOG outgrowing the memory invokes the OOM killer")
    return None


def write_inflight(dev: BlockDevice) -> int | None:
    """Writes in flight on the device's disk (sysfs 'inflight'), None if unknown."""
    try:
        return int(_read(Path(f"/sys/block/{dev.disk}/inflight")).split()[1])
    except (OSError, IndexError, ValueError):
        return None
