"""nbdkit Python plugin: serves the image of a device at a point (replayer/image.py).

Run by nbdkit's python plugin in Debian's system python3 (not the project's venv), started by
replayer/export.py:

    nbdkit ... python replayer/nbd_plugin.py index=INDEX.npz pypath=DIR[:DIR...] [cache_mib=N]

`cache_mib` bounds the decoded row groups kept (0: image.auto_cache_bytes). `pypath` puts the
venv's site-packages and the checkout first on sys.path (numpy, pyarrow and this project import
from there; both Pythons are 3.11). The index is the point's visible data
pieces (export.py wrote it with image.save_index after resolving the point against the store),
so this process never opens the store's database: it reads payload files only, mapped at start.
Read-only: writes, if allowed, are nbdkit's cow filter's (they never reach this plugin).
"""
import os
import sys

import nbdkit

API_VERSION = 2

_cfg = {"cache_mib": "0"}
_image = None


def config(key, value):
    if key not in ("index", "pypath", "cache_mib"):
        raise RuntimeError(f"unknown parameter {key!r}")
    _cfg[key] = value


def config_complete():
    global _image
    if "index" not in _cfg:
        raise RuntimeError("index=PATH is required")
    for p in reversed([p for p in _cfg.get("pypath", "").split(":") if p]):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1: every thread's stack
    from blkrewind.replayer.image import load_index
    _wait_index(_cfg["index"])
    mib = int(_cfg["cache_mib"])
    _image = load_index(_cfg["index"], cache_bytes=(mib << 20) if mib > 0 else None)


def _wait_index(path):
    """`blkrewind mount` starts nbdkit before the point's index is written (this start-up --
    numpy, pyarrow -- overlaps the CLI resolving the point): wait for it, as long as the
    process that started nbdkit lives (it kills nbdkit if it fails; this is for a SIGKILL)."""
    import time
    parent = os.getppid()
    deadline = time.monotonic() + 600
    while not os.path.exists(path):
        if os.getppid() != parent or time.monotonic() > deadline:
            raise RuntimeError(f"the index {path} never came")
        time.sleep(0.005)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    assert _image is not None, "config_complete loads the image"
    return _image.size


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def can_extents(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


def is_rotational(h):
    return False


def pread(h, buf, offset, flags):
    assert _image is not None, "config_complete loads the image"
    _image.read_into(buf, offset)


def extents(h, count, offset, flags):
    assert _image is not None, "config_complete loads the image"
    one = bool(flags & nbdkit.FLAG_REQ_ONE)
    out = []
    for off, n, data in _image.extents(offset, count, limit=1 if one else 4096):
        out.append((off, n, 0 if data else nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO))
        if one:
            break
    return out
