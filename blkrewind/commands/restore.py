"""Rebuild a device as it was at a point, onto an image file or a loop device.

POINT is `latest` (the newest consistent state), a stamp (N or stamp:N), a
time (ISO 8601, e.g. 2026-11-25T11:40:00; local time unless it names a zone;
or time:...), or a mark name (NAME or mark:NAME). DEV is the device as the
store names it: host:name, its kernel name (loop3) or the path it was traced
as (/dev/loop3); `blkrewind sql --store S "SELECT * FROM devices"` lists them.

--to PATH writes a new image file (or, with --force, overwrites an existing
file or an unmounted block device at least as large as the device). --loop
writes an image under STORE/restores/ and attaches it to a free loop device:
stdout gets the loop device's path, stderr the image's.

The rebuild writes each byte of the device once (cost follows the device
size, not the length of the history) and fsyncs the target at the end.

Interrupted restores. An image file is written under a temporary name beside
the target (.NAME.blkrewind-PID.tmp), fsynced and renamed: the final path only
ever holds a complete image (an existing file replaced with --force stays as it
was until the rename). SIGINT, SIGTERM and SIGHUP remove the temporary file; a
SIGKILL leaves it, and the next restore into that directory removes it. A block
device is written in place: its first 4 KiB first get a marker ("BLKREWIND
INCOMPLETE RESTORE" and what was being restored) and are written last, so an
interrupted restore leaves a device that no file system mounts and that
`verify --live DEV` and `status --store STORE` call incomplete (the store keeps
a note under STORE/restores/ until the restore finishes).
"""
from __future__ import annotations

import glob
import json
import os
import stat
import subprocess
import sys
import time

from blkrewind.errors import UserError

MARK_BYTES = 4096
MARKER = b"BLKREWIND INCOMPLETE RESTORE\n"
TMP_SUFFIX = ".tmp"


EXAMPLES = """\
  blkrewind restore --store /srv/blkrewind --device db1:sdb --at latest --to /tmp/sdb.img
  blkrewind restore --store S --device loop3 --at 2026-11-25T11:40:00Z --loop
  blkrewind restore --store S --device db1:sdb --at before-upgrade --to /dev/sdz --force
"""


def add_arguments(p):
    p.add_argument("--store", required=True, metavar="DIR",
                   help="the store (through `serve` while it runs)")
    p.add_argument("--device", required=True, metavar="DEV",
                   help="host:name, name (loop3) or traced path (/dev/loop3)")
    p.add_argument("--at", required=True, metavar="POINT",
                   help="latest | STAMP | ISO-8601 time (local unless it names a zone) | mark name "
                        "(prefixes stamp:, time:, mark: make it explicit)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--to", metavar="PATH",
                   help="write the device's image to this new file (or, with --force, an existing "
                        "file or an unmounted block device at least as large)")
    g.add_argument("--loop", action="store_true",
                   help="write an image under STORE/restores and attach it to a loop device")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing file or an unmounted block device")
    p.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="threads reading payload (default 2)")


def _tmp_name(target: str, pid: int) -> str:
    d, b = os.path.split(os.path.abspath(target))
    return os.path.join(d, f".{b}.blkrewind-{pid}{TMP_SUFFIX}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(target: str) -> None:
    """Temporary images a killed restore of this target left (its pid is gone)."""
    d, b = os.path.split(os.path.abspath(target))
    pattern = os.path.join(glob.escape(d), f".{glob.escape(b)}.blkrewind-*{TMP_SUFFIX}")
    for path in glob.glob(pattern):
        try:
            pid = int(path[:-len(TMP_SUFFIX)].rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            try:
                os.unlink(path)
                print(f"note: removed {path}, the half image of a restore that was killed",
                      file=sys.stderr)
            except OSError:
                pass


def marker_block(info: dict) -> bytes:
    return (MARKER + json.dumps(info).encode() + b"\n").ljust(MARK_BYTES, b"\0")


def read_marker(path: str) -> dict | None:
    """The marker an interrupted restore left at the start of path (None if there is none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, MARK_BYTES, 0)
    finally:
        os.close(fd)
    if not head.startswith(MARKER):
        return None
    try:
        return json.loads(head[len(MARKER):].split(b"\n", 1)[0])
    except ValueError:
        return {}


def unfinished(store_path: str) -> list[dict]:
    """Restores onto block devices that started and did not finish (their notes under
    STORE/restores/), each with "running": whether its process is still alive."""
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(store_path), "restores",
                                              "unfinished-*.json"))):
        try:
            with open(path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        info["running"] = _pid_alive(int(info.get("pid", 0))) if info.get("pid") else False
        info["note"] = path
        out.append(info)
    return out


def _write_file(plan, target: str, size: int, args, label: str) -> dict:
    """Temp name beside the target, fsync, rename, fsync the directory."""
    from blkrewind.osutil import fsync_dir, ignore_termination
    from blkrewind.replayer import rebuild

    _remove_stale_temps(target)
    tmp = _tmp_name(target, os.getpid())
    done = False
    try:
        stats = rebuild.write_plan(plan, tmp, size, force=False, jobs=args.jobs, label=label)
        ignore_termination()  # complete and fsynced: a signal now must not undo the rename
        os.rename(tmp, target)
        done = True
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_dir(os.path.dirname(os.path.abspath(target)))
    return stats


def _write_device(plan, target: str, size: int, args, label: str, info: dict) -> dict:
    """In place, its first MARK_BYTES holding a marker until everything else is durable."""
    from blkrewind.osutil import ignore_termination
    from blkrewind.replayer import rebuild

    head_n = min(MARK_BYTES, size)
    head, body = rebuild.split_plan(plan, head_n)
    t = rebuild.open_target(target, size, True)  # refusals (in use, too small) come first
    path = os.path.join(args.store, "restores",
                        f"unfinished-{os.getpid()}-{time.time_ns()}.json")
    note: str | None = path   # None: no note kept
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(path + ".tmp", path)
    except OSError as e:
        print(f"note: cannot keep a note of this restore in the store ({e.strerror})",
              file=sys.stderr)
        note = None
    ok = False

    def flush() -> None:  # what was written stays (the marker too), not dirty in the cache
        try:
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass

    try:
        try:
            os.pwrite(t.fd, marker_block(info)[:head_n], 0)
            os.fsync(t.fd)
        finally:
            os.close(t.fd)
        stats = rebuild.write_plan(body, target, size, force=True, jobs=args.jobs, label=label)
        hs = rebuild.write_plan(head, target, size, force=True, jobs=1, progress=False)
        ignore_termination()  # the marker is gone: the device is complete
        stats["data_bytes"] += hs["data_bytes"]
        ok = True
    except KeyboardInterrupt as e:
        import signal
        flush()
        signum = getattr(e, "signum", signal.SIGINT)
        raise UserError(f"interrupted ({signal.Signals(signum).name}): {target} is INCOMPLETE "
                        f"(marked as such in its first {head_n} bytes); restore it again before "
                        f"using it", exit_code=128 + signum) from None
    except UserError as e:
        flush()
        raise UserError(f"{e}; {target} is INCOMPLETE (marked as such in its first {head_n} "
                        f"bytes)", exit_code=e.exit_code) from None
    except OSError as e:
        raise UserError(f"{target}: {e.strerror}; the device is INCOMPLETE (marked as such in "
                        f"its first {head_n} bytes)") from None
    finally:
        if ok:  # this note, and those of earlier interrupted restores onto this target
            for u in unfinished(args.store):
                if u["note"] == note or (u.get("target") == target and not u["running"]):
                    try:
                        os.unlink(u["note"])
                    except OSError:
                        pass
    return stats


def _image_path(store, device: str, stamp: int) -> str:
    base = os.path.join(store.restores_dir, f"{device.replace(':', '_').replace('/', '_')}-{stamp}")
    path, k = base + ".img", 1
    while os.path.exists(path):
        path, k = f"{base}.{k}.img", k + 1
    return path


def run(args) -> int:
    from blkrewind.replayer import points, rebuild
    from blkrewind.replayer.query import open_for_reading

    if args.jobs < 1 or args.jobs > 64:
        raise UserError(f"--jobs must be 1..64, not {args.jobs}")
    point = points.parse_point(args.at)
    with open_for_reading(args.store) as store:  # through the server while one holds it
        device = store.find_device(args.device)
        r = points.resolve(store, device, point)
        if args.loop:
            os.makedirs(store.restores_dir, mode=0o700, exist_ok=True)
            target = _image_path(store, device.device, r.stamp)
        else:
            target = args.to
        rebuild.check_target(target, r.size_bytes, args.force)
        plan = rebuild.plan(store, r.session, r.dev, r.stamp, r.size_bytes)
    # the store is closed: an ingest may run while the payload is written
    t0 = time.monotonic()
    label = f"{device.name} @ {r.stamp}"
    try:
        is_block = stat.S_ISBLK(os.stat(target).st_mode)
    except FileNotFoundError:
        is_block = False
    if is_block:
        info = {"device": device.device, "at": r.how, "stamp": r.stamp, "session": r.session,
                "store": os.path.abspath(args.store), "target": target, "pid": os.getpid(),
                "started_ns": time.time_ns()}
        stats = _write_device(plan, target, r.size_bytes, args, label, info)
    else:
        stats = _write_file(plan, target, r.size_bytes, args, label)
    dt = time.monotonic() - t0
    when = points.fmt_time(r.time_ns)
    print(f"restored {device.device} at {r.how}, session {r.session}, {when}: "
          f"{r.size_bytes / (1 << 20):.1f} MiB ({stats['data_bytes'] / (1 << 20):.1f} MiB of data) "
          f"in {dt:.2f} s ({r.size_bytes / max(dt, 1e-9) / (1 << 20):.0f} MiB/s) -> {target}",
          file=sys.stderr)
    from blkrewind.replayer.query import note_restored
    note_restored(args.store, device.device, r.size_bytes, dt)   # for serve's metrics
    if args.loop:
        try:
            p = subprocess.run(["losetup", "--find", "--show", target], capture_output=True,
                               text=True)
        except FileNotFoundError:
            raise UserError(f"losetup is missing; the image is {target}") from None
        if p.returncode != 0:
            why = (p.stderr.strip().splitlines() or ["failed"])[-1]
            raise UserError(f"losetup: {why}; the image is {target}")
        print(p.stdout.strip())
        print(f"image: {target}", file=sys.stderr)
    return 0
