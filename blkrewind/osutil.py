"""Small OS helpers both sides use."""
from __future__ import annotations

import os

# the CRC-32 of zlib (same values), computed by zlib-ng's SIMD code: ~5x zlib's speed here;
# wire message bodies and payload files are checksummed with it
from zlib_ng.zlib_ng import crc32  # noqa: F401


def fsync_dir(path) -> None:
    """fsync a directory: makes a rename or a new file in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mount_of(path: str) -> tuple[str, str]:
    """(file system type, mount source) of the mount holding path, an absolute path (taken as
    it is: symlinks are not resolved), from /proc/self/mountinfo; ("", "") if unreadable."""
    best, found = "", ("", "")
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].encode().decode("unicode_escape")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    fstype, source = right.split()[:2]
                    best, found = mnt, (fstype, source.encode().decode("unicode_escape"))
    except (OSError, IndexError, ValueError):
        return "", ""
    return found
