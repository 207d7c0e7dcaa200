"""Read LOG segments into a store.

Reads every segment of the LOG directory (in any order; several at once with
--jobs), only the frames not yet in the store, and writes their metadata to
STORE/meta.duckdb and their payload to Parquet files under STORE/payload.
Ingesting the same LOG again, a part of it, or its segments in another order
gives the same store. Afterwards it reports, per device, what is restorable
(stamps and times), the first gap in the history and the records the kernel
lost. A torn tail (a tracer still writing, or killed) is a note, and only at
the end of the LOG's newest segment; a corrupt frame, or a segment that is not
the newest and ends in an incomplete frame or without its SEAL (cut or
damaged), stops that segment after everything good before it is stored, and
the command exits 3.
"""
from __future__ import annotations

import os
import stat
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
    p.add_argument("--delete-ingested", action="store_true",
                   help="LOG retention without shipping: afterwards, delete the LOG segments "
                        "the store holds whole and durably (never the newest, never one with "
                        "damage); not with a tracer that ships this LOG")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def report(store, res, out=None, log_dir: str | None = None) -> None:
    from blkrewind.replayer.points import fmt_time

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
    holder = None
    if any(s.torn_bytes and not s.error for s in res.segments):
        from blkrewind.tracer.log import log_in_use
        holder = log_in_use(log_dir) if log_dir else None
    for s in res.segments:
        if s.torn_bytes and not s.error:
            why = (f"the tracer (pid {holder}) is still writing it" if holder is not None else
                   "a torn tail: the tracer stopped in the middle of writing it")
            print(f"note: {os.path.basename(s.path)} ends in {s.torn_bytes} bytes of an "
                  f"incomplete frame ({why}); not ingested", file=out)
    if not res.sessions:
        return
    rows = store.session_states(res.sessions)
    for (device, session, rf, rt, fns, tns, be, base, gap, why, after, drops, dbytes) in rows:
        ivs = store.restorable_intervals(session, device)
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
        wins = store.gap_windows(session, device)
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


def _refuse_if_shipped(log_dir: str) -> None:
    """--delete-ingested beside a tracer that ships this LOG would delete segments its
    replayer may still lack: refused (the shipper has its own retention, --log-max-mb)."""
    from blkrewind.tracer.control import CONTROL_DIR, ask
    from blkrewind.tracer.log import log_in_use

    pid = log_in_use(log_dir)
    if pid is None:
        return
    try:
        st = ask(os.path.join(CONTROL_DIR, f"trace-{pid}.sock"), {"op": "status"}, timeout=5)
    except (OSError, ValueError):
        st = {}
    s = st.get("shipper")
    sh = s if isinstance(s, dict) else {}
    if sh.get("ship_to"):
        raise UserError(f"the tracer (pid {pid}) writing {log_dir} ships it to "
                        f"{sh['ship_to']}: its segments go when that replayer has them "
                        f"(--log-max-mb), not with --delete-ingested")


def _owner(path: str) -> str:
    import pwd

    try:
        return pwd.getpwuid(os.stat(path).st_uid).pw_name
    except (OSError, KeyError):
        return "another user"


def run(args) -> int:
    from blkrewind.replayer.ingest import ingest
    from blkrewind.replayer.store import Store

    if not 1 <= args.jobs <= 64:
        raise UserError(f"--jobs must be 1..64, not {args.jobs}")
    try:
        is_dir = stat.S_ISDIR(os.stat(args.log).st_mode)
    except PermissionError:
        raise UserError(f"{args.log}: permission denied (run as the LOG's owner or root)") \
            from None
    except OSError:
        is_dir = False
    if not is_dir:
        raise UserError(f"no LOG directory at {args.log}")
    from blkrewind.formats.logframe import list_segments
    try:
        segs = list_segments(args.log)
    except PermissionError:
        raise UserError(f"{args.log}: permission denied: the LOG belongs to "
                        f"{_owner(args.log)}; run as root") from None
    if not segs:
        raise UserError(f"{args.log} holds no LOG segments (*.brlog)")
    if args.delete_ingested:
        _refuse_if_shipped(args.log)
    new = not os.path.exists(args.store)
    try:
        with Store.open(args.store, write=True, create=True) as store:
            res = ingest(store, args.log, jobs=args.jobs)
            report(store, res, log_dir=args.log)
            if args.delete_ingested:
                from blkrewind.replayer.ingest import delete_ingested
                gone, freed = delete_ingested(store, args.log)
                print(f"deleted {len(gone)} LOG segment(s) the store holds whole "
                      f"({_mib(freed)} freed)", file=sys.stdout)
    except BaseException:
        if new:  # a store this ingest made: nothing half-made stays behind (the LOG has it all)
            import shutil
            shutil.rmtree(args.store, ignore_errors=True)
        raise
    errs = res.errors
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise CorruptLog(f"{errs[0]}{more}; every good frame was ingested")
    return 0
