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
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

from blkrewind.errors import UserError


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
    g.add_argument("--to", metavar="PATH", help="write the device's image to this new file (or, with --force, an existing file "
                        "or an unmounted block device at least as large)")
    g.add_argument("--loop", action="store_true",
                   help="write an image under STORE/restores and attach it to a loop device")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing file or an unmounted block device")
    p.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="threads reading payload (default 2)")


def _image_path(store, device: str, stamp: int) -> str:
    base = os.path.join(store.restores_dir, f"{device.replace(':', '_').replace('/', '_')}-{stamp}")
    path, k = base + ".img", 1
    while os.path.exists(path):
        path, k = f"{base}.{k}.img", k + 1
    return path


def run(args) -> int:
    from replayer import points, rebuild
    from replayer.query import open_for_reading

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
    stats = rebuild.write_plan(plan, target, r.size_bytes, force=args.force,
                               jobs=max(1, args.jobs), label=f"{device.name} @ {r.stamp}")
    dt = time.monotonic() - t0
    when = points.fmt_time(r.time_ns)
    print(f"restored {device.device} at {r.how}, session {r.session}, {when}: "
          f"{r.size_bytes / (1 << 20):.1f} MiB ({stats['data_bytes'] / (1 << 20):.1f} MiB of data) "
          f"in {dt:.2f} s ({r.size_bytes / max(dt, 1e-9) / 1e6:.0f} MB/s) -> {target}",
          file=sys.stderr)
    from replayer.query import note_restored
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
