"""Write a self-contained HTML page about a device's history: DIR/report.html.

Figures (PNG inside the page; nothing is fetched when it is opened): the write rate over time
by process, where the writes went (LBA x time heatmap), the randomness of the data written
over time; marks, gaps and suspect episodes are drawn on the time axis. Tables: top writers,
most written regions, suspect episodes (`blkrewind suspects`), marks, gaps. Made with
matplotlib (Agg backend); aggregated in the database, so long histories cost bins, not rows.

--from / --to take a stamp, an ISO 8601 time, a mark name or latest (as `restore --at`; the
point need not be restorable) and limit the time axis.
"""
from __future__ import annotations

from blkrewind import cliargs
from blkrewind.errors import UserError

EXAMPLES = """\
  blkrewind report --store /srv/cdp --device db1:sdb --out /tmp/sdb-report
  blkrewind report --store S --device loop3 --from before-upgrade --to latest --out DIR
"""
EXIT_STATUS = {
    0: 'the page is written (its path on stdout)',
}


def add_arguments(p):
    cliargs.store_and_device(p)
    p.add_argument("--from", dest="t_from", metavar="POINT",
                   help="start of the time axis (default: the first write)")
    p.add_argument("--to", dest="t_to", metavar="POINT",
                   help="end of the time axis (default: the last write)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="directory for report.html (made if missing; required)")


def point_time(store, device, text: str | None) -> int | None:
    """Wall time (ns) of a point of the device's history, restorable or not."""
    from blkrewind.replayer import points

    if text is None:
        return None
    pt = points.parse_point(text)
    sess = store.sessions_of_device(device.device)
    if pt.kind == "latest":
        return None
    if pt.kind == "time":
        return pt.number()
    if pt.kind == "mark":
        t = store.mark_time(str(pt.value), sess)
        if t is None:
            raise UserError(f"no mark {pt.value!r} in the history of {device.device}")
        return t
    t = store.stamp_time(pt.number(), sess)
    if t is None:
        raise UserError(f"stamp {pt.value} is not in the history of {device.device}")
    return t


def run(args) -> int:
    from blkrewind.analytics import report
    from blkrewind.replayer.query import open_for_reading

    with open_for_reading(args.store) as store:
        device = store.find_device(args.device)
        lo, hi = point_time(store, device, args.t_from), point_time(store, device, args.t_to)
        if lo is not None and hi is not None and hi < lo:
            raise UserError("--to is before --from")
        page = report.render(store, device, lo, hi)
    try:
        path = report.write(args.out, page)
    except OSError as e:
        raise UserError(f"cannot write {args.out}/report.html: {e.strerror}") from None
    print(path)
    return 0
