"""Show or detach the capture a dead tracer left attached.

A running tracer pins its BPF programs and maps in bpffs. If it dies (SIGKILL, a crash,
the OOM killer), capture goes on without it: every write still marks the dirty map, so the
next `blkrewind trace` on the same LOG and devices continues the session and reads again
only the regions written meanwhile. Until then the programs cost a little on every write
to those devices. Without options this lists what is left attached; --log DIR or --all
detaches it (the next tracer on that LOG then starts a new session that reads the devices
whole). A reboot detaches everything.
"""
from __future__ import annotations

import os

from blkrewind.errors import UserError

EXAMPLES = """\
  blkrewind detach                                  # list captures left attached
  blkrewind detach --log /var/lib/blkrewind/log     # give that one up
  blkrewind detach --all
"""


def add_arguments(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--log", metavar="DIR",
                   help="detach the capture left by the dead tracer of this LOG directory "
                        "(default: only list)")
    g.add_argument("--all", action="store_true", help="detach every capture left attached on this host")


def run(args) -> int:
    from blkrewind.tracer import pins

    if os.geteuid() != 0:
        raise UserError("must run as root (it reads and removes pins in /sys/fs/bpf)")
    left = pins.orphans()
    if args.log:
        real = os.path.realpath(args.log)
        left = [p for p in left if os.path.realpath(p.log_dir) == real]
        if not left:
            raise UserError(f"no capture is left attached for LOG {args.log}")
    if not args.log and not args.all:
        if not left:
            print("no capture is left attached by a dead tracer")
        for p in left:
            print(f"session {p.session}: LOG {p.log_dir}, devices "
                  f"{', '.join(d['path'] for d in p.devices)} (tracer pid {p.pid} is gone); "
                  f"resumable from stamp {p.safe}" if p.baseline_done else
                  f"session {p.session}: LOG {p.log_dir} (died before its baseline was done)")
        return 0
    for p in left:
        pins.release_dir(p.session)
        print(f"detached session {p.session} (LOG {p.log_dir}, devices "
              f"{', '.join(d['path'] for d in p.devices)})")
    return 0
