"""Roll a device back (or forward) to a point, writing only the blocks that differ (root).

The device at --to holds a later (or earlier) point of the same history: --from, by default
`latest`. Between two points only the extents written in between can differ, so rewind writes
the image at --at over exactly those ranges: its cost follows what changed, not the device's
size. Before writing it checks, by sampled blocks compared with the store, that the device
really is at --from, and refuses a device that is mounted or held open (O_EXCL). A device still
traced has the rewind's writes captured like any other write: its history stays exact.
Afterwards `blkrewind verify --device DEV --at POINT --live /dev/X` passes.

Options (defaults and units):
  --store DIR      the store (required)
  --device DEV     host:name, name (loop3) or traced path, as the store names it (required)
  --at POINT       the point to go to: latest | STAMP | ISO-8601 time | mark name (required)
  --to PATH        the block device (or image file) to roll (required)
  --from POINT     the point the device holds now (default: latest)
  --samples N      blocks of 64 KiB compared before writing (default 64)
  --check          only check that the device is at --from and say what would be written
                   (default: off)
"""
from __future__ import annotations

import sys

from blkrewind import cliargs

EXAMPLES = """\
  blkrewind rewind --store /srv/store --device db1:sdb --at before-upgrade --to /dev/sdb
  blkrewind rewind --store /srv/store --device sdb --at after-fix --from before-upgrade --to /dev/sdb
"""
EXIT_STATUS = {
    0: 'the device is at --at (or, with --check, it is at --from)',
    2: ('bad usage or input: an unknown device or point, the device is in use, of another'
        ' size, or not at --from (one line on stderr)'),
}


def add_arguments(p):
    cliargs.store_and_device(p)
    p.add_argument("--at", required=True, metavar="POINT", help="the point to go to (required)")
    p.add_argument("--to", required=True, metavar="PATH", help="the device to roll (required)")
    p.add_argument("--from", dest="from_", default="latest", metavar="POINT",
                   help="the point the device holds now (default: latest)")
    p.add_argument("--samples", type=int, default=64, metavar="N",
                   help="64 KiB blocks compared before writing (default 64)")
    p.add_argument("--check", action="store_true",
                   help="only check the device and say what would be written (default: off)")


def run(args) -> int:
    from blkrewind.errors import UserError
    from blkrewind.replayer import points, rewind
    from blkrewind.replayer.query import open_for_reading

    if args.samples < 1:
        raise UserError("--samples must be at least 1")
    with open_for_reading(args.store) as store:
        device = store.find_device(args.device)
        r_to, r_from = points.resolve_each(store, device, [points.parse_point(args.at),
                                                           points.parse_point(args.from_)])
        res = rewind.run(store, device, r_to, r_from, args.to, samples=args.samples,
                         check_only=args.check)
    pct = 100.0 * res.bytes_written / max(1, r_to.size_bytes)
    if args.check:
        print(f"{args.to} is at {r_from.how} ({res.samples} blocks compared); rewinding to "
              f"{r_to.how} would write {res.ranges} range(s)", file=sys.stderr)
        return 0
    print(f"rewound {args.to} ({device.device}) from {r_from.how} to {r_to.how}: "
          f"{res.ranges} range(s), {res.bytes_written} bytes written ({pct:.2f} % of the device), "
          f"{res.samples} blocks checked first, in {res.seconds:.2f} s", file=sys.stderr)
    return 0
