"""Reading a device's file system as it was at a point: the ONE place that makes a point
readable (diff, files, blame, bisect use it).

`open_point_image(store, device, point)` is a context manager yielding the path of a readable
image of the device at the point. For now it restores into a sparse temporary file with the
rebuild API (replayer/rebuild.py; cost follows the device's size) in $BLKREWIND_TMP or the
system's temp directory, removed on exit whatever happens. (An NBD export of the point,
issue 11, can replace the body of this function without its callers changing.)

`mounted(image)` attaches an image to a loop device and mounts it read-only; it yields
(mount path, loop device) and detaches both on exit, always. A writable private image gets
its journal replayed (ext4: ro replays it; xfs: ro recovers the log), which a crash-consistent
point needs to show the files of the last commits; `replay=False` (or a read-only image)
mounts with noload (ext4) / norecovery (xfs) and changes nothing.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time

from blkrewind.errors import UserError


def _tmpdir() -> str:
    return os.environ.get("BLKREWIND_TMP") or tempfile.gettempdir()


@contextlib.contextmanager
def open_point_image(store, device, point, *, jobs: int = 2):
    """Yield (image path, Resolved) of `device` (a StoreDevice) at `point` (a points.Point or
    Resolved). The store stays usable by the caller."""
    from replayer import points, rebuild

    r = point if isinstance(point, points.Resolved) else points.resolve(store, device, point)
    plan = rebuild.plan(store, r.session, r.dev, r.stamp, r.size_bytes)
    d = tempfile.mkdtemp(prefix="blkrewind-point-", dir=_tmpdir())
    path = os.path.join(d, f"{device.name}-{r.stamp}.img")
    try:
        rebuild.write_plan(plan, path, r.size_bytes, jobs=jobs, progress=False,
                           label=f"{device.name} @ {r.stamp}")
        yield path, r
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
    lo = _run(["losetup", "--find", "--show", *([] if writable else ["--read-only"]), image])
    if lo.returncode != 0:
        raise UserError(f"losetup: {(lo.stderr.strip().splitlines() or ['failed'])[-1]}")
    loop = lo.stdout.strip()
    mnt = tempfile.mkdtemp(prefix="blkrewind-mnt-", dir=_tmpdir())
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
