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
