"""Read LOG segments into a store.

Reads every segment of the LOG directory (in any order; several at once with
--jobs), only the frames not yet in the store, and writes their metadata to
STORE/meta.duckdb and their payload to Parquet files under STORE/payload.
Ingesting the same LOG again, a part of it, or its segments in another order
gives the same store. Afterwards it reports, per device, what is restorable
(stamps and times), the first gap in the history and the records the kernel
lost. A torn tail (a tracer still writing, or killed) is a note; a corrupt
frame stops its segment after everything good before it is stored, and the
command exits non-zero.
"""
from __future__ import annotations

import os
import sys

from blkrewind.errors import CorruptLog, UserError


EXAMPLES = """\
  blkrewind ingest --log /var/lib/blkrewind/log --store /srv/blkrewind
  # a LOG copied from another host, 2 segments at a time
  blkrewind ingest --log /mnt/usb/log --store /srv/blkrewind --jobs 2
"""


def add_arguments(p):
    p.add_argument("--log", required=True, metavar="DIR", help="the LOG directory to read (`trace --log`)")
    p.add_argument("--store", required=True, metavar="DIR",
                   help="the store (created, mode 0700, if missing)")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 2), metavar="N",
                   help="segments ingested in parallel (default: the number of CPUs, at most 4: "
                        "%(default)s here)")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def report(store, res, out=None) -> None:
    from replayer.points import fmt_time

    out = out or sys.stdout
    done = [s for s in res.segments if not s.skipped]
    skipped = len(res.segments) - len(done)
    rate = res.payload_bytes / max(res.seconds, 1e-9) / 1e6
    print(f"ingested {len(done)} segment{'s' if len(done) != 1 else ''}"
          + (f" ({skipped} already in the store)" if skipped else "")
          + f": {res.frames} frames, {res.records} records, {_mib(res.payload_bytes)} payload "
            f"in {res.seconds:.1f} s ({rate:.0f} MB/s, {res.cpu_seconds:.1f} s CPU)", file=out)
    if res.orphans:
        print(f"note: removed {res.orphans} payload file(s) an interrupted ingest left behind",
              file=out)
    for s in res.segments:
        if s.torn_bytes:
            print(f"note: {os.path.basename(s.path)} ends in {s.torn_bytes} bytes of an "
                  f"incomplete frame (a torn tail, or a tracer still writing); not ingested",
                  file=out)
    if not res.sessions:
        return
    marks = ", ".join("?" * len(res.sessions))
    rows = store.query(
        f"SELECT sd.device, sd.session, sd.restorable_from, sd.restorable_to, sd.from_ns, sd.to_ns, "
        f"sd.baseline_end, s.stamp_base, s.first_gap, s.gap_reason, s.after_gap, "
        f"(SELECT max(drops) FROM loss l WHERE l.session = s.session), "
        f"(SELECT max(drop_bytes) FROM loss l WHERE l.session = s.session) "
        f"FROM session_devices sd JOIN sessions s USING (session) "
        f"WHERE sd.session IN ({marks}) ORDER BY sd.device, sd.session", res.sessions)
    for (device, session, rf, rt, fns, tns, be, base, gap, why, after, drops, dbytes) in rows:
        ivs = store.query(
            "SELECT r.from_stamp, r.to_stamp, r.from_ns, r.to_ns FROM restorable r "
            "JOIN session_devices sd ON sd.session = r.session AND sd.dev = r.dev "
            "WHERE r.session = ? AND sd.device = ? ORDER BY r.from_stamp", [session, device])
        if ivs:
            state = "restorable stamps " + ", ".join(
                f"{a}..{b} ({fmt_time(fa)} .. {fmt_time(fb)})" for a, b, fa, fb in ivs)
        elif base is None:
            state = "not restorable yet: the session's first segment is not ingested"
        elif be is None:
            state = "not restorable: its baseline has not finished"
        else:
            state = "not restorable: the history stops before its baseline finished"
        print(f"{device} session {session}: {state}", file=out)
        wins = store.query(
            "SELECT w.from_stamp, w.resumed, w.cause, w.reason FROM gap_windows w "
            "JOIN session_devices sd ON sd.session = w.session AND sd.dev = w.dev "
            "WHERE w.session = ? AND sd.device = ? ORDER BY w.from_stamp", [session, device])
        for a, resumed, cause, reason in wins:
            tail = f"restorable again from stamp {resumed}" if resumed is not None else \
                "not restorable after it (yet)"
            print(f"  gap from stamp {a} ({cause or reason or 'records lost'}): {tail}", file=out)
        if not wins and gap is not None:
            more = f"; {after} later stamp(s) in the store are not exposed" if after else ""
            print(f"  gap at stamp {gap}: {why}{more}", file=out)
        if drops:
            print(f"  lost in the kernel: {drops} record(s), {dbytes or 0} payload bytes", file=out)
    seen = {r[1] for r in rows}
    for s in res.sessions:
        if s not in seen:
            print(f"session {s}: not restorable yet: its first segment (the session and device "
                  f"records) is not ingested", file=out)


def run(args) -> int:
    from replayer.ingest import ingest
    from replayer.store import Store

    if args.jobs < 1:
        raise UserError("--jobs must be at least 1")
    if not os.path.isdir(args.log):
        raise UserError(f"no LOG directory at {args.log}")
    with Store.open(args.store, write=True, create=True) as store:
        res = ingest(store, args.log, jobs=args.jobs)
        report(store, res)
    errs = res.errors
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise CorruptLog(f"{errs[0]}{more}; every good frame was ingested")
    return 0
