"""Mount the file system of a device as it was at a point, in one command (root).

The point is served by nbdkit (as `blkrewind export` does), made a file by nbdfuse, attached to
a loop device (direct I/O) and mounted at MOUNTPOINT -- without restoring anything: the time to
a mounted file system does not grow with the device's size. Read-only by default, without
journal replay (ext4: ro,noload; xfs: ro,norecovery), so what you see is exactly the point.
--writable mounts read-write on a copy-on-write overlay: the kernel replays the journal of a
crash-consistent point, and you may change files; every change is dropped at `blkrewind
umount` and never reaches the store. A failure or SIGINT at any step leaves nothing behind.
`blkrewind status` lists what is mounted; `blkrewind umount MOUNTPOINT` tears it all down.

Options (defaults and units):
  --store DIR       the store (required)
  --device DEV      host:name, name (loop3) or traced path (required)
  --at POINT        latest | STAMP | ISO-8601 time | mark name (required)
  MOUNTPOINT        an empty directory, nothing mounted on it (required)
  --writable        read-write on a throw-away overlay, journal replayed (default: read-only,
                    no journal replay)
  --type FSTYPE     the file system type (default: detected with blkid)
  --options OPTS    more mount options, comma-separated (default: none)
"""
from __future__ import annotations

import sys

from blkrewind import cliargs

EXAMPLES = """\
  blkrewind mount --store /srv/store --device db1:sdb --at before-upgrade /mnt/then
  blkrewind mount --store /srv/store --device sdb --at 2026-11-25T11:40:00 --writable /mnt/then
  blkrewind umount /mnt/then
"""
EXIT_STATUS = {
    0: 'mounted (the mount point is printed on stdout)',
    2: ('bad usage or input: an unknown device or point, a busy or non-empty mount point,'
        ' no file system, ... (one line on stderr)'),
    130: ('interrupted by SIGINT (129 SIGHUP, 143 SIGTERM: 128 + the signal): nothing is '
          'left attached'),
}


def add_arguments(p):
    cliargs.store_and_device(p)
    cliargs.at(p)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory (required)")
    p.add_argument("--writable", action="store_true",
                   help="read-write on a throw-away overlay (default: read-only)")
    p.add_argument("--type", dest="fstype", metavar="FSTYPE",
                   help="file system type (default: detected)")
    p.add_argument("--options", metavar="OPTS", help="more mount options (default: none)")


def run(args) -> int:
    import os
    import time

    from blkrewind.errors import UserError
    from blkrewind.replayer import mounts

    if os.geteuid() != 0:
        raise UserError("mount needs root (loop devices and mounts)")
    t0 = time.monotonic()
    reg = mounts.mount(args.store, args.device, args.at, args.mountpoint,
                       writable=args.writable, fstype=args.fstype, options=args.options,
                       step_hook=mounts.test_hook(os.environ.get("BLKREWIND_MOUNT_TEST_HOOK")))
    dt = time.monotonic() - t0
    print(reg["mountpoint"])
    print(f"mounted {reg['device']} at {reg['how']} (session {reg['session']}): {reg['fstype']} "
          f"on {reg['loop']}, {'writable (overlay, dropped at umount)' if reg['writable'] else 'read-only'}"
          f", in {dt:.2f} s; 'blkrewind umount {reg['mountpoint']}' tears it down",
          file=sys.stderr)
    return 0
