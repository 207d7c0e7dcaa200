"""Unmount what `blkrewind mount` mounted and tear the chain down (root).

Unmounts the file system, detaches its loop device, unmounts the nbdfuse file, stops nbdkit
and removes the mount's runtime directory and registry entry (/run/blkrewind/mounts/). Also
cleans up what a killed `blkrewind mount` left half set up. A file system still in use is left
mounted, and nothing else is touched (close what uses it and run umount again).

--stale removes the points that killed processes left: a point that diff, files, bisect,
suspects --files or serve's ransomware detector read (a mount and a loop device in its runtime
directory under /run/blkrewind/exports/, nbdkit, nbdfuse) whose process is gone (`status`
lists them as stale; the next `serve` on their store removes its store's).

Options (defaults and units):
  MOUNTPOINT   where `blkrewind mount` mounted (required unless --all or --stale)
  --all        every mount `blkrewind status` lists, and the stale points (default: off)
  --stale      only the points of processes that are gone (default: off)
"""
from __future__ import annotations

import sys

EXAMPLES = """\
  blkrewind umount /mnt/then
  blkrewind umount --all
  blkrewind umount --stale
"""
EXIT_STATUS = {
    0: 'torn down',
    2: 'not a blkrewind mount, or the file system is busy (nothing was changed)',
}


def add_arguments(p):
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                   help="where blkrewind mount mounted (required unless --all)")
    p.add_argument("--all", action="store_true",
                   help="every blkrewind mount, and the stale points (default: off)")
    p.add_argument("--stale", action="store_true",
                   help="the points that killed processes left (diff, files, serve's detector..."
                        "; default: off)")


def run(args) -> int:
    import os

    from blkrewind.errors import UserError
    from blkrewind.replayer import mounts

    if os.geteuid() != 0:
        raise UserError("umount needs root")
    if args.mountpoint and (args.all or args.stale):
        raise UserError("give MOUNTPOINT, --all or --stale, not several")
    if args.all or args.stale:
        for pt, done in mounts.reap_stale():
            print(f"removed a stale point: {mounts.describe_point(pt)}: {'; '.join(done)}",
                  file=sys.stderr)
    if args.stale:
        return 0
    if args.all:
        regs = mounts.registry()
    else:
        if not args.mountpoint:
            raise UserError("give MOUNTPOINT (or --all, or --stale)")
        reg = mounts.lookup(args.mountpoint)
        if reg is None:
            raise UserError(f"{os.path.abspath(args.mountpoint)} is not a blkrewind mount "
                            f"('blkrewind status' lists them)")
        regs = [reg]
    for reg in regs:
        if reg.get("pid") and reg["pid"] != os.getpid() and mounts._alive(reg["pid"]):
            raise UserError(f"{reg['mountpoint']}: 'blkrewind mount' (pid {reg['pid']}) is still "
                            f"setting it up")
        for note in mounts.teardown(reg):
            print(note, file=sys.stderr)
        print(f"unmounted {reg['mountpoint']} ({reg.get('device')} at {reg.get('how', reg.get('at'))})",
              file=sys.stderr)
    return 0
