"""Small OS helpers both sides use."""
from __future__ import annotations

import os


def fsync_dir(path) -> None:
    """fsync a directory: makes a rename or a new file in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
