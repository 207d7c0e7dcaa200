"""Check a replica against the live device, or the store's payload files.

verify --store DIR --device DEV [--at POINT] [--live PATH]
  Rebuilds DEV as it was at POINT (default `latest`) in memory, streaming the
  planned extents (no image is written), reads the live device in parallel
  (O_DIRECT), and compares them per 1 MiB chunk (BLAKE2b). Prints the differing
  byte ranges (merged) and exits 1 when there is any difference, 0 when the
  replica equals the device.
  Only meaningful when the device does not change while it is read and the point
  is its current state: a quiet (unmounted, idle) device at `latest`, or a mark
  taken while the file system was frozen (fsfreeze) and still frozen -- a device
  in use differs from any replica by the writes of the last moments.
  The live device is the path DEV was traced as (--live PATH reads another one).

verify --store DIR
  Checks every stored payload file against its recorded checksum; prints one
  line per damaged or missing file and exits 1 on damage.

Errors (unknown device, point not restorable, unreadable device) exit 2 or more.
"""
from __future__ import annotations

import sys

MAX_SHOWN = 50


EXAMPLES = """\
  # after `umount /srv`: is the replica exact?
  blkrewind verify --store /srv/blkrewind --device db1:sdb
  # a frozen file system, checked at the mark taken while frozen
  blkrewind verify --store S --device db1:sdb --at frozen-1 --live /dev/sdb
  blkrewind verify --store /srv/blkrewind          # payload files against their checksums
"""
EXIT_STATUS = {1: 'the replica differs from the device (the ranges are printed), or a payload '
                  'file is damaged or missing'}


def add_arguments(p):
    p.add_argument("--store", required=True, metavar="DIR",
                   help="the store (through `serve` while it runs)")
    p.add_argument("--device", metavar="DEV",
                   help="host:name, name (loop3) or traced path; without it: check the "
                        "store's payload files")
    p.add_argument("--at", metavar="POINT", default="latest",
                   help="latest (default) | STAMP | ISO-8601 time | mark name; see above for "
                        "when a comparison means something")
    p.add_argument("--live", metavar="PATH",
                   help="the live device to read (default: the path DEV was traced as)")
    p.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="threads reading payload (default 2)")


def _open(path):
    try:
        from blkrewind.replayer.query import open_for_reading
    except ImportError:  # no server support in this build
        from blkrewind.replayer.store import Store
        return Store.open(path)
    return open_for_reading(path)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def run(args) -> int:
    from blkrewind.errors import UserError
    from blkrewind.replayer import points, rebuild

    if not 1 <= args.jobs <= 64:
        raise UserError(f"--jobs must be 1..64, not {args.jobs}")

    if args.device is None:
        if args.live or args.at != "latest":
            raise UserError("--at and --live need --device")
        from blkrewind.replayer.integrity import verify_store
        with _open(args.store) as store:
            nfiles = store.payload_file_count()
            damage = verify_store(store)
        for line in damage:
            print(line)
        if damage:
            print(f"{len(damage)} of {nfiles} payload file(s) damaged or missing", file=sys.stderr)
            return 1
        print(f"{nfiles} payload file(s) checked: all match their checksums", file=sys.stderr)
        return 0

    from blkrewind.replayer.verify import compare

    point = points.parse_point(args.at)
    with _open(args.store) as store:
        device = store.find_device(args.device)
        r = points.resolve(store, device, point)
        plan = rebuild.plan(store, r.session, r.dev, r.stamp, r.size_bytes)
    live = args.live or device.path
    from blkrewind.commands.restore import read_marker
    left = read_marker(live)
    if left is not None:  # an interrupted restore: its first 4 KiB say so
        print(f"incomplete: {live} holds an interrupted restore of {left.get('device', '?')} "
              f"at {left.get('at', '?')} (started {points.fmt_time(left.get('started_ns'))} by "
              f"pid {left.get('pid', '?')}): restore it again")
        return 1
    res = compare(plan, live, jobs=max(1, args.jobs))
    what = f"{device.device} at {r.how} ({points.fmt_time(r.time_ns)})"
    rate = res.size / max(res.seconds, 1e-9) / 1e6
    if res.equal:
        print(f"equal: {what} matches {live}: {_mib(res.size)} compared in {res.seconds:.2f} s "
              f"({rate:.0f} MB/s)")
        return 0
    print(f"differs: {what} vs {live}: {len(res.ranges)} range(s), {res.differing_bytes} bytes")
    if res.device_size != plan.size:
        print(f"  sizes differ: the replica has {plan.size} bytes, {live} {res.device_size}")
    for a, e in res.ranges[:MAX_SHOWN]:
        print(f"  bytes {a}..{e - 1} ({e - a} bytes)")
    if len(res.ranges) > MAX_SHOWN:
        print(f"  ... {len(res.ranges) - MAX_SHOWN} more")
    return 1
