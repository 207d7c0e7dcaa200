"""Insert a named point into the history of the running tracer(s).

The mark takes its stamp from the same counter as the writes, so it sits
exactly between the writes submitted before and after it. Returns once the
mark is durable in the LOG. With several tracers running, each gets the mark
(or name one with --log DIR).
"""
from __future__ import annotations

import os
import sys
from datetime import datetime

from blkrewind.errors import UserError

RESERVED = ("latest",)


EXAMPLES = """\
  fsfreeze -f /srv && blkrewind mark before-upgrade; fsfreeze -u /srv
  blkrewind mark nightly-$(date +%F) --log /var/lib/blkrewind/log
  blkrewind restore --store S --device db1:sdb --at before-upgrade --to /tmp/sdb.img
"""


def add_arguments(p):
    p.add_argument("name", metavar="NAME", help="the mark's name, 1..128 bytes, not `latest`, "
                   "a number, a time or a stamp:/time:/mark: prefix (restore --at NAME)")
    p.add_argument("--log", metavar="DIR", help="only the tracer writing this LOG directory")
    p.add_argument("--all", action="store_true",
                   help="every tracer on this host (needed when more than one runs)")


def check_name(name: str) -> None:
    b = name.encode()
    if not name or len(b) > 128:
        raise UserError("a mark name has 1 to 128 bytes")
    if any(ord(c) < 32 for c in name) or name.strip() != name:
        raise UserError("a mark name has no control characters and no surrounding spaces")
    if name in RESERVED or name.isdigit() or name.split(":", 1)[0] in ("stamp", "time", "mark"):
        raise UserError(f"{name!r} would read as another kind of point; pick another name")
    from blkrewind.formats.pointname import LOOKS_LIKE_TIME
    try:
        datetime.fromisoformat(name)
    except ValueError:
        if not LOOKS_LIKE_TIME.match(name):
            return
    raise UserError(f"{name!r} reads as a time; pick another name")


def several_need_all(socks: list[str], all_: bool, ask) -> list[str]:
    """Without --log: one tracer, or all of them with --all; several without it: UserError
    naming their LOGs."""
    if len(socks) <= 1 or all_:
        return socks
    logs = []
    for path in socks:
        try:
            st = ask(path, {"op": "status"}, timeout=5)
            logs.append(f"pid {st.get('pid')}: --log {st.get('log')}")
        except (OSError, ValueError):
            logs.append(path)
    raise UserError(f"{len(socks)} tracers are running ({'; '.join(logs)}): name one with "
                    f"--log DIR, or all of them with --all")


def run(args) -> int:
    from blkrewind.tracer.control import ask, find_tracers

    check_name(args.name)
    if os.geteuid() != 0:
        raise UserError("must run as root (the tracers' control sockets are root's, mode 0600)")
    socks = find_tracers()
    if not socks:
        raise UserError("no tracer is running (start one with 'blkrewind trace')")
    if args.log and args.all:
        raise UserError("--log and --all exclude each other")
    if not args.log:
        socks = several_need_all(socks, args.all, ask)
    comm = os.path.basename(sys.argv[0])[:15] if sys.argv else "blkrewind"
    done = 0
    errors = []
    unasked = []  # --log: tracers that did not answer, so not known to write that LOG
    for path in socks:
        if args.log:
            try:
                st = ask(path, {"op": "status"}, timeout=10)
            except (OSError, ValueError) as e:
                # a tracer that is stopped, hung or dying (its socket refuses): not an error
                # of this mark if the tracer of the LOG named is another one
                unasked.append(f"{path}: {e}")
                continue
            if os.path.realpath(st.get("log", "")) != os.path.realpath(args.log):
                continue
        try:
            r = ask(path, {"op": "mark", "name": args.name, "pid": os.getpid(), "comm": comm})
        except (OSError, ValueError) as e:
            errors.append(f"{path}: {e}")
            continue
        if not r.get("ok"):
            errors.append(r.get("error", "refused"))
            continue
        done += 1
        note = "" if r.get("baseline_done") else " (baseline still running: not restorable)"
        if r.get("again") is not None:
            note += (f" (note: {args.name!r} was set before in this session, at stamp "
                     f"{r['again']}: --at {args.name} means the newest)")
        print(f"mark {args.name!r}: stamp {r['stamp']} in session {r['session']} (LOG {r['log']}){note}")
    if errors:
        raise UserError("; ".join(errors))
    if not done:
        raise UserError(f"no running tracer writes the LOG {args.log}"
                        + (f" (no answer from {'; '.join(unasked)})" if unasked else ""))
    return 0
