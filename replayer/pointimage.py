"""Reading a device's file system as it was at a point: the ONE place that makes a point
readable (diff, files, blame, bisect, suspects --files use it).

`open_point_image(store, device, point)` is a context manager yielding the path of a readable
image of the device at the point. It is the instant-access read path of `blkrewind mount`
(replayer/mounts.py `serve_file`): the point's index (replayer/export.py `prepare_resolved`,
metadata only: its cost follows the history's extent count, not the device's size), nbdkit
with the Python plugin (replayer/image.py) on a Unix socket, nbdfuse showing the export as one
file. Nothing is rebuilt: a 4 GiB device opens as fast as a 64 MiB one, and only the blocks
the file system reads are ever read from the store. The export carries nbdkit's cow filter:
the journal replay of the read-only mount below (a crash-consistent point needs it to show
the files of its last commits) lands in nbdkit's sparse overlay in the export's runtime
directory (never behind FUSE, never in the store). Every step is torn down on exit, failure
or SIGINT with mounts.py's `teardown`. The point was resolved by the caller in the store it
has open (through `serve`'s query socket if a server holds it); nbdkit only reads payload
files. The point belongs to this process: its runtime directory names it (export.OWNER_FILE),
nbdkit and nbdfuse get a parent-death signal, and `mounted` mounts it inside that directory,
so that what a killed process left is found and reaped (mounts.reap_stale: the next `serve`
on the store, `blkrewind umount --stale`; `status` lists it).

Without nbdkit or nbdfuse (or /dev/fuse) it says so in one line and falls back to restoring
into a sparse temporary file with the rebuild API (cost follows the device's size) in
$BLKREWIND_TMP or the system's temp directory, removed on exit whatever happens.

`mounted(image)` attaches an image to a loop device (direct I/O for an image behind FUSE: its
I/O bypasses the FUSE file's page cache, see replayer/mounts.py on the loop-over-FUSE hazard)
and mounts it read-only; it yields (mount path, loop device) and detaches both on exit,
always. A writable private image gets its journal replayed (ext4: ro replays it; xfs: ro
recovers the log); `replay=False` (or a read-only image) mounts with noload (ext4) /
norecovery (xfs) and changes nothing.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from blkrewind.errors import UserError


def _tmpdir() -> str:
    return os.environ.get("BLKREWIND_TMP") or tempfile.gettempdir()


_FUSE_IMAGES: dict[str, str] = {}   # image files open_point_image serves through nbdfuse:
                                    # their runtime directories


def _instant_missing() -> str | None:
    """Why the instant-access path cannot be used here (None: it can)."""
    for exe in ("nbdkit", "nbdfuse"):
        if shutil.which(exe) is None:
            return f"{exe} is not installed"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


@contextlib.contextmanager
def open_point_image(store, device, point, *, jobs: int = 2):
    """Yield (image path, Resolved) of `device` (a StoreDevice) at `point` (a points.Point or
    Resolved). The store stays usable by the caller."""
    from blkrewind.replayer import points

    r = point if isinstance(point, points.Resolved) else points.resolve(store, device, point)
    why = _instant_missing()
    if why is None:
        with _served(store, device, r) as path:
            yield path, r
        return
    print(f"blkrewind: {why}: rebuilding {device.name} at {r.stamp} into a sparse temporary "
          f"file instead (cost follows the device size)", file=sys.stderr, flush=True)
    with _rebuilt(store, device, r, jobs) as path:
        yield path, r


@contextlib.contextmanager
def _served(store, device, r):
    from blkrewind.replayer import export, mounts

    reg: dict = {"steps": []}
    path = None
    try:
        prep = export.prepare_resolved(store, device, r)
        reg.update(run_dir=prep.run_dir, steps=["run_dir"])
        path = mounts.serve_file(reg, prep, writable=True, owned=True)
        _FUSE_IMAGES[path] = prep.run_dir
        yield path
    finally:
        if path is not None:
            _FUSE_IMAGES.pop(path, None)
        for note in mounts.teardown(reg, quiet=True):   # what could not be undone
            print(f"blkrewind: {note}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _rebuilt(store, device, r, jobs: int):
    from blkrewind.replayer import rebuild

    plan = rebuild.plan(store, r.session, r.dev, r.stamp, r.size_bytes)
    d = tempfile.mkdtemp(prefix="blkrewind-point-", dir=_tmpdir())
    path = os.path.join(d, f"{device.name}-{r.stamp}.img")
    try:
        rebuild.write_plan(plan, path, r.size_bytes, jobs=jobs, progress=False,
                           label=f"{device.name} @ {r.stamp}")
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fs_type(image: str) -> str | None:
    p = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", image],
                       capture_output=True, text=True)
    t = p.stdout.strip()
    return t or None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} is missing (install util-linux)") from None


@contextlib.contextmanager
def mounted(image: str, *, replay: bool = True, fstype: str | None = None):
    """Yield (mount path, loop device) of `image` mounted read-only; cleaned up always."""
    fstype = fstype or fs_type(image)
    if fstype not in ("ext4", "ext3", "ext2", "xfs"):
        raise UserError(f"the image holds {fstype or 'no known file system'}; reading files "
                        f"needs ext4 or xfs")
    writable = replay and os.access(image, os.W_OK)
    run_dir = _FUSE_IMAGES.get(image)
    lo = _run(["losetup", "--find", "--show", *(["--direct-io=on"] if run_dir else []),
               *([] if writable else ["--read-only"]), image])
    if lo.returncode != 0:
        raise UserError(f"losetup: {(lo.stderr.strip().splitlines() or ['failed'])[-1]}")
    loop = lo.stdout.strip()
    # a served point is mounted inside its runtime directory: all it holds (the loop device
    # on its FUSE file, this mount) is found from there if this process is killed
    # (mounts.reap_stale)
    mnt = tempfile.mkdtemp(prefix="mnt-", dir=run_dir) if run_dir else \
        tempfile.mkdtemp(prefix="blkrewind-mnt-", dir=_tmpdir())
    mounted_ok = False
    try:
        opts = "ro"
        if not writable:
            opts += ",noload" if fstype.startswith("ext") else ",norecovery"
        if fstype == "xfs":
            opts += ",nouuid"   # the live file system may be mounted with the same UUID
        m = _run(["mount", "-t", fstype, "-o", opts, loop, mnt])
        if m.returncode != 0:
            raise UserError(f"cannot mount the image at this point ({fstype}, {opts}): "
                            f"{(m.stderr.strip().splitlines() or ['failed'])[-1]}")
        mounted_ok = True
        yield mnt, loop
    finally:
        if mounted_ok:
            for _ in range(50):
                if _run(["umount", mnt]).returncode == 0:
                    break
                time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
        for _ in range(50):
            if _run(["losetup", "-d", loop]).returncode == 0:
                break
            time.sleep(0.1)
