"""List what changed on a device between two points: the byte ranges written (from the
metadata alone) and, for ext4 and xfs, the files they belong to.

A and B are points as `restore --at` takes them (stamp, time, mark, latest), A before B, in
the same session. The ranges come from the history's metadata (no payload read: fast on long
histories). The files come from the file systems themselves: both points are served as
images at once (nbdkit over the store, shown as a file by nbdfuse: nothing is rebuilt; without
nbdkit/nbdfuse/FUSE, rebuilt into sparse temporary images in $BLKREWIND_TMP or /tmp), mounted
read-only (journal replayed into a copy-on-write overlay, never into the store), their regular files listed with their
extents (FIEMAP), and compared: created, deleted, modified (appended, truncated or rewritten),
with the bytes of each file the history wrote between A and B.

--ranges-only lists the ranges and reads no image.
"""
from __future__ import annotations

import sys

from blkrewind import cliargs
from blkrewind.errors import UserError

EXAMPLES = """\
  blkrewind diff --store /srv/cdp --device db1:sdb --from before-upgrade --to latest
  blkrewind diff --store S --device loop3 --from 2026-12-04T01:00 --to 2026-12-04T01:30 --format csv
  blkrewind diff --store S --device loop3 --from m1 --to m2 --ranges-only --format json
"""
EXIT_STATUS = {
    0: 'listed (also when nothing changed)',
    2: ('bad usage or input: a wrong option or value, an unknown device or point, points '
        'in different sessions, a file system other than ext4/xfs (one line on stderr)'),
}


def add_arguments(p):
    from blkrewind.analytics.output import FORMATS

    cliargs.store_and_device(p)
    cliargs.between(p)
    p.add_argument("--ranges-only", action="store_true",
                   help="only the byte ranges, no file system read (default: off)")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table, csv or json (default: table)")


def resolve_pair(store, device, a: str, b: str):
    """Resolved points A and B of one session, A <= B."""
    from blkrewind.replayer import points

    ra = points.resolve(store, device, points.parse_point(a))
    rb = points.resolve(store, device, points.parse_point(b))
    if ra.session != rb.session:
        raise UserError(f"{a} and {b} are in different sessions ({ra.session}, {rb.session}); "
                        f"compare points of one session")
    if rb.stamp < ra.stamp:
        raise UserError(f"--to {b} (stamp {rb.stamp}) is before --from {a} (stamp {ra.stamp})")
    return ra, rb


def file_changes(store, device, ra, rb, ranges) -> list[dict]:
    from blkrewind.replayer import fsmap
    from blkrewind.replayer.pointimage import mounted, open_point_image

    with open_point_image(store, device, ra) as (img_a, _), \
            open_point_image(store, device, rb) as (img_b, _):
        with mounted(img_a) as (mnt_a, _), mounted(img_b) as (mnt_b, _):
            return fsmap.diff_files(fsmap.file_map(mnt_a), mnt_a, fsmap.file_map(mnt_b), mnt_b,
                                    ranges)


def run(args) -> int:
    from blkrewind.analytics.output import write_rows
    from blkrewind.replayer import fsmap
    from blkrewind.replayer.query import open_for_reading

    with open_for_reading(args.store) as store:
        device = store.find_device(args.device)
        ra, rb = resolve_pair(store, device, args.a, args.b)
        ranges = fsmap.written_ranges(store, ra.session, ra.dev, ra.stamp, rb.stamp)
        if args.ranges_only:
            write_rows(["start", "end", "bytes"], [(s, e, e - s) for s, e in ranges], args.format)
            return 0
        changes = file_changes(store, device, ra, rb, ranges)
    cols = ["path", "inode", "change", "how", "bytes", "size_from", "size_to", "written"]
    write_rows(cols, [tuple(c[k] for k in cols) for c in changes], args.format)
    if args.format == "table":
        print(f"{device.device} from {ra.how} to {rb.how}: {len(ranges)} byte ranges, "
              f"{sum(e - s for s, e in ranges)} bytes written; {len(changes)} files changed",
              file=sys.stderr)
    return 0
