"""List episodes that look like ransomware: a process group replacing compressible data
(text, databases, documents) with random-looking data, at a rate, over many places.

Each write's payload has a randomness (the fraction of sampled 128-byte segments that look
random, computed at ingest: `writes.randomness`). Random data alone does not alarm (media,
archives, encrypted volumes, fio); a write alarms when it replaces blocks whose previous
content -- known from the history: the baseline or an earlier write -- was compressible. An
episode starts when one process (the one that dirtied the pages of a buffered write when the
tracer ran with --dirtier, else the submitter; the flushers of a cgroup as one) did so for at
least 128 KiB in 4 writes at 3 places within 10 s, or the processes of one name in one cgroup
(a parent's workers, `xargs -P`) for twice that, spread over 3 or more of them, none with
more than half, or all the processes of one cgroup (a systemd unit, a container) for twice
that, spread so and over 2 or more names, when at least half of the random data the cgroup
wrote then replaced compressible data (a script running openssl, dd and python by turns).
On ext4 and xfs such an episode is listed only when the file system, read before it and at
the write that opened it, shows at least half of the replaced blocks held by the same file at
both (new files written over the freed blocks of deleted ones are not in place; two mounts).
Encryption into new files (the originals deleted, renamed over, or truncated and rewritten)
is found by reading the file system (ext4, xfs) before and after a process's run of random
writes into new places: compressible files gone or changed, paired with random files of
their sizes it wrote (each such check mounts two points, 2-3 s each). replayer/detector.py
has the rules and what they cannot see.

For each episode: when it started and was detected, the processes (comm[pid]) and their
bytes, the byte ranges (and, where `blkrewind diff` can read the file system, the files),
the last clean point before it and the command that restores it; with --files, the files it
overwrote, read from the file system at the clean point.
"""
from __future__ import annotations

import sys

from blkrewind import cliargs
from blkrewind.errors import UserError  # noqa: F401  (raised by the store layer)

EXAMPLES = """\
  blkrewind suspects --store /srv/cdp --device db1:sdb
  blkrewind suspects --store /srv/cdp --device sdb --files --format json
"""
EXIT_STATUS = {
    0: 'no episode',
    1: 'at least one episode listed',
}


def add_arguments(p):
    from blkrewind.analytics.output import FORMATS

    cliargs.store_and_device(p)
    p.add_argument("--files", action="store_true",
                   help="also name the files (ext4, xfs) each episode overwrote, read from the "
                        "file system at its clean point (served per episode like "
                        "`files` does; default: off, byte ranges only)")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="table, csv or json (default: table)")


def episodes(store, device) -> list[dict]:
    """Every episode of a store device with its clean point and restore command."""
    from blkrewind.replayer import detector, points

    out = []
    for ep in detector.scan_device(store, device.device):
        stamp, t_ns, mark = detector.clean_point(store, ep)
        at = f"stamp:{stamp}" if stamp is not None else None
        rng = ep.merged_ranges()
        out.append({
            "started": points.fmt_time(ep.first_ns), "first_stamp": ep.first_stamp,
            "detected": points.fmt_time(ep.detect_ns),
            "after_s": round((ep.detect_ns - ep.first_ns) / 1e9, 3),
            "last": points.fmt_time(ep.last_ns),
            "processes": ", ".join(f"{k} {v >> 10} KiB" for k, v in ep.procs.most_common(4)),
            "kind": ep.kind, "encrypted_files": "; ".join(ep.files[:6])
                                                 + (f" (+{len(ep.files) - 6} more)"
                                                    if len(ep.files) > 6 else ""),
            "group": detector.group_kind(ep.group),
            "cgroup": ep.group[0], "replaced_bytes": ep.bytes, "writes": ep.writes,
            "ranges": " ".join(f"{a}+{e - a}" for a, e in rng[:6])
                      + (f" (+{len(rng) - 6} more)" if len(rng) > 6 else ""),
            "session": ep.session,
            "clean_stamp": stamp, "clean_time": points.fmt_time(t_ns) if t_ns else None,
            "clean_mark": mark,
            "restore": (f"blkrewind restore --store {store.path} --device {device.device} "
                        f"--at {at} --to IMAGE") if at else "no restorable point before it",
            "_episode": ep,
        })
    return out


def episode_files(store, device, row: dict) -> str:
    """The files at the episode's clean point whose blocks it overwrote."""
    from blkrewind.replayer import fsmap, points
    from blkrewind.replayer.pointimage import mounted, open_point_image

    ep = row["_episode"]
    if row["clean_stamp"] is None:
        return ""
    pt = points.Point("stamp", row["clean_stamp"], f"stamp:{row['clean_stamp']}")
    with open_point_image(store, device, pt) as (img, _), mounted(img) as (mnt, _):
        m = fsmap.file_map(mnt)
    ranges = ep.merged_ranges()
    return " ".join(sorted(p for p, f in m.items() if fsmap.overlap(f["extents"], ranges)))


def run(args) -> int:
    from blkrewind.analytics.output import write_rows
    from blkrewind.replayer.query import open_for_reading

    with open_for_reading(args.store) as store:
        device = store.find_device(args.device)
        rows = episodes(store, device)
        if args.files:
            for r in rows:
                r["files"] = episode_files(store, device, r)
    cols = [c for c in rows[0] if not c.startswith("_")] if rows else [
              "started", "first_stamp", "detected", "after_s", "last", "processes", "group", "cgroup",
              "replaced_bytes", "writes", "ranges", "session", "clean_stamp", "clean_time",
              "clean_mark", "restore"]
    write_rows(cols, [tuple(r[c] for c in cols) for r in rows], args.format)
    if not rows and args.format == "table":
        print(f"no suspect episode on {device.device}", file=sys.stderr)
    return 1 if rows else 0
