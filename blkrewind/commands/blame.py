"""Which processes wrote a file (or a byte range of the device) between two points, and when.

--path FILE: the file's extents are read from the file system at --to (at --from when it was
deleted by then; ext4 or xfs, through a temporary image as `diff` does); --range START+LEN:
device byte offsets, no image needed. Then the history's writes into those bytes with stamps
in (--from, --to] are grouped by process: first and last write, writes, bytes.

comm/pid is the process that submitted the bios. Buffered writes are submitted by the
kernel's flusher threads (kworker/*) or by an fsync; dirty_comm/dirty_pid is then the process
that dirtied the pages in the page cache: the real writer (empty when not known: O_DIRECT
writes, where the submitter is the writer; journal writes of jbd2/*; pages dirtied before
tracing began; a kernel without the writeback_dirty_folio tracepoint). A bio gets its first
page's dirtier, a page the first process that dirtied it since its last writeback.
"""
from __future__ import annotations

from blkrewind import cliargs
from blkrewind.errors import UserError

EXAMPLES = """\
  blkrewind blame --store /srv/cdp --device db1:sdb --from m1 --to latest --path var/lib/app.db
  blkrewind blame --store S --device loop3 --from 100 --to 2000 --range 1048576+65536 --format json
"""
EXIT_STATUS = {
    0: 'listed (also when nobody wrote there)',
    2: ('bad usage or input: a wrong option or value, an unknown device or point, no such'
        ' file at either point (one line on stderr)'),
}


def add_arguments(p):
    from blkrewind.analytics.output import FORMATS

    cliargs.store_and_device(p)
    cliargs.between(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--path", metavar="FILE",
                   help="a file, relative to the file system's root (this or --range is required)")
    g.add_argument("--range", metavar="START+LEN",
                   help="device bytes: offset and length, in bytes or with K, M, G (KiB, MiB, "
                        "GiB) (this or --path is required)")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table, csv or json (default: table)")


def _bytes(s: str) -> int:
    s = s.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
    try:
        return int(s[:-1] if mult > 1 else s) * mult
    except ValueError:
        raise UserError(f"{s!r} is not a byte count") from None


def run(args) -> int:
    from blkrewind.analytics.output import write_rows
    from blkrewind.commands.diff import resolve_pair
    from blkrewind.replayer import fsmap, points
    from blkrewind.replayer.pointimage import mounted, open_point_image
    from blkrewind.replayer.query import open_for_reading

    with open_for_reading(args.store) as store:
        device = store.find_device(args.device)
        ra, rb = resolve_pair(store, device, args.a, args.b)
        if args.range:
            a, sep, n = args.range.partition("+")
            if not sep:
                raise UserError("--range is START+LEN, e.g. 1048576+4096 or 1M+64K")
            ranges = [[_bytes(a), _bytes(a) + _bytes(n)]]
        else:
            ext = None
            for r in (rb, ra):
                with open_point_image(store, device, r) as (img, _), mounted(img) as (mnt, _):
                    m = fsmap.file_map(mnt)
                    f = m.get(args.path.strip("/"))
                    if f is not None:
                        ext = f["extents"]
                        break
            if ext is None:
                raise UserError(f"{args.path}: no such regular file at {rb.how} nor {ra.how}")
            ranges = fsmap.merge_extents(ext)
        rows = fsmap.writers(store, ra.session, ra.dev, ra.stamp, rb.stamp, ranges)
    write_rows(["comm", "pid", "dirty_comm", "dirty_pid", "first_write", "last_write", "writes",
                "bytes"],
               [(c, p, dc, dp, points.fmt_time(t0), points.fmt_time(t1), w, int(n))
                for c, p, dc, dp, t0, t1, w, n in rows], args.format)
    return 0
