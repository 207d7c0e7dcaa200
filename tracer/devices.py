"""What the tracer needs to know about a block device, read from sysfs."""
from __future__ import annotations

import os
import socket
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

from blkrewind import record
from blkrewind.errors import UserError


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


def write_inflight(dev: BlockDevice) -> int | None:
    """Writes in flight on the device's disk (sysfs 'inflight'), None if unknown."""
    try:
        return int(_read(Path(f"/sys/block/{dev.disk}/inflight")).split()[1])
    except (OSError, IndexError, ValueError):
        return None
