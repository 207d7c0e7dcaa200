"""Unmount what `blkrewind mount` mounted and tear the chain down (root).

Unmounts the file system, detaches its loop device, unmounts the nbdfuse file, stops nbdkit
and removes the mount's runtime directory and registry entry (/run/blkrewind/mounts/). Also
cleans up what a killed `blkrewind mount` left half set up. A file system still in use is left
mounted, and nothing else is touched (close what uses it and run umount again).

Options (defaults and units):
  MOUNTPOINT   where `blkrewind mount` mounted (required)
  --all        every mount `blkrewind status` lists (default: off)

Examples:
  blkrewind umount /mnt/then
  blkrewind umount --all

Exit status:
  0  torn down
  2  not a blkrewind mount, or the file system is busy (nothing was changed)
"""
from __future__ import annotations

import sys


def add_arguments(p):
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                   help="where blkrewind mount mounted (required unless --all)")
    p.add_argument("--all", action="store_true", help="every blkrewind mount (default: off)")


def run(args) -> int:
    import os

    from blkrewind.errors import UserError
    from blkrewind.replayer import mounts

    if os.geteuid() != 0:
        raise UserError("umount needs root")
    if args.all:
        regs = mounts.registry()
    else:
        if not args.mountpoint:
            raise UserError("give MOUNTPOINT (or --all)")
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
