"""Fold history older than a duration into the base: frees the space old writes take.

prune --store DIR --device DEV --keep DURATION [--keep-marks]

The prune point K is the newest restorable stamp of DEV at or before now - DURATION.
The device's image at K becomes its new base (written as new payload first); then one
transaction drops the older base chunks and every record of DEV up to K (whole older
sessions of DEV included), and the payload files nothing refers to any more are deleted.
Every point after K restores exactly as before; K itself stays restorable; a point before
it is refused ("pruned: the oldest restorable point of DEV is ...").

--keep-marks keeps each restorable mark older than K restorable: the base is then the
image at the oldest kept mark, plus, for each later kept mark (and K), only the bytes
that changed since the previous one (what a snapshot chain stores). The writes between
marks are still folded away: only the marks themselves (and K) stay restorable.

DURATION: a number with a unit, s m h d w (e.g. 90m, 12h, 7d), or ISO-8601-ish 1d12h.
Interrupting prune (even kill -9) leaves the store as it was or as pruned, never in between.
While `blkrewind serve` holds the store, the server runs the prune itself (asked through
its query socket) and keeps storing frames meanwhile; otherwise prune opens the store, which
must then not be held by another writer (an ingest).
"""
from __future__ import annotations

import os
import re
import sys
import time

from blkrewind.errors import UserError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """'7d', '12h30m', '90s', '1.5h' -> nanoseconds."""
    t = text.strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhdw])", t)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhdw])", "", t).strip():
        raise UserError(f"{text!r} is not a duration (e.g. 90m, 12h, 7d, 1d12h)")
    return int(sum(float(n) * _UNITS[u] for n, u in parts) * 1e9)


EXAMPLES = """\
  blkrewind prune --store /srv/blkrewind --device db1:sdb --keep 7d
  blkrewind prune --store S --device db1:sdb --keep 30d --keep-marks
"""


def add_arguments(p):
    p.add_argument("--store", required=True, metavar="DIR",
                   help="the store (through `serve` while it runs)")
    p.add_argument("--device", required=True, metavar="DEV",
                   help="host:name, name (loop3) or traced path (/dev/loop3)")
    p.add_argument("--keep", required=True, metavar="DURATION",
                   help="how much history stays restorable point by point: a duration with a unit "
                        "s m h d w (e.g. 90m, 12h, 7d, 1d12h)")
    p.add_argument("--keep-marks", action="store_true",
                   help="keep older marks restorable (the image at each, stored as changes; default: "
                        "fold them away too)")
    p.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="threads reading payload (default 2)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be pruned (the point, records, sessions), change nothing")


def run(args) -> int:
    from blkrewind.replayer.points import fmt_time
    from blkrewind.replayer.prune import Result, prune
    from blkrewind.replayer.query import RemoteConnection, server_running
    from blkrewind.replayer.store import Store

    keep = parse_duration(args.keep)
    asked_ns = time.time_ns()  # "the last DURATION" as of now, however long the store's lock takes
    if not 1 <= args.jobs <= 64:
        raise UserError(f"--jobs must be 1..64, not {args.jobs}")
    jobs = args.jobs
    if args.dry_run:
        from blkrewind.replayer.prune import dry_run
        from blkrewind.replayer.query import open_for_reading

        with open_for_reading(args.store) as store:
            device = store.find_device(args.device)
            res = dry_run(store, device, keep_ns=keep, keep_marks=args.keep_marks)
        if res.point is None:
            print(f"nothing to prune: {res.note}", file=sys.stderr)
            return 0
        kept = f", {len(res.kept_marks)} older mark(s) kept" if res.kept_marks else ""
        print(f"dry run: would prune {device.device} up to stamp {res.point} "
              f"({fmt_time(res.point_ns)}){kept}: {res.records} record(s) and "
              f"{res.chunks_dropped} base chunk(s) folded into a new base, "
              f"{res.sessions_dropped} older session(s) folded away; points before stamp "
              f"{res.point} would no longer be restorable. Nothing was changed.",
              file=sys.stderr)
        return 0
    sock = server_running(os.path.abspath(args.store))
    if sock is not None:  # a running server holds the store: it prunes, and goes on serving
        name, r = RemoteConnection(sock).prune(args.device, keep, args.keep_marks, jobs,
                                               now_ns=asked_ns)
        res = Result(**r)
    else:
        with Store.open(args.store, write=True) as store:
            device = store.find_device(args.device)
            name = device.device
            res = prune(store, device, keep_ns=keep, keep_marks=args.keep_marks, jobs=jobs,
                        now_ns=asked_ns)
    if res.point is None:
        print(f"nothing to prune: {res.note}", file=sys.stderr)
        return 0
    kept = f", {len(res.kept_marks)} older mark(s) kept" if res.kept_marks else ""
    print(f"pruned {name} up to stamp {res.point} ({fmt_time(res.point_ns)}){kept}: "
          f"{res.records} record(s) and {res.chunks_dropped} base chunk(s) dropped, "
          f"{res.sessions_dropped} older session(s) folded away, {res.files_deleted} payload "
          f"file(s) deleted ({res.freed_bytes / (1 << 20):.1f} MiB freed, "
          f"{res.written_bytes / (1 << 20):.1f} MiB of new base written)", file=sys.stderr)
    return 0
