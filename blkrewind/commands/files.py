"""Copy files out of a device as it was at a point, without restoring the device.

The point is served as an image at once (nbdkit over the store, shown as a file by nbdfuse:
nothing is rebuilt; without them, rebuilt into a sparse temporary image in $BLKREWIND_TMP or
/tmp), mounted read-only (ext4 or xfs), and each PATH (relative to the file system's root;
a directory is copied whole) is copied to DIR/PATH with its mode and times. DIR must not hold
the files already.
"""
from __future__ import annotations

import os
import shutil
import sys

from blkrewind import cliargs
from blkrewind.errors import UserError

EXAMPLES = """\
  blkrewind files --store /srv/cdp --device db1:sdb --at before-upgrade etc/app.conf --out /tmp/x
  blkrewind files --store S --device loop3 --at 2026-12-04T01:00 home/alice/docs --out ./old
"""
EXIT_STATUS = {
    0: 'every PATH copied',
    1: 'some PATH did not exist at the point (the others are copied; one line each on stderr)',
    2: ('bad usage or input: a wrong option or value, an unknown device or point, not '
        'ext4/xfs (one line on stderr)'),
}


def add_arguments(p):
    cliargs.store_and_device(p)
    cliargs.at(p)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="files or directories, relative to the file system's root")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where the copies go (made if missing; required)")


def _inside(root: str, rel: str) -> str:
    p = os.path.normpath(os.path.join(root, rel.lstrip("/")))
    if p != root and not p.startswith(root + os.sep):
        raise UserError(f"{rel}: outside the file system")
    return p


def run(args) -> int:
    from blkrewind.replayer import points
    from blkrewind.replayer.pointimage import mounted, open_point_image
    from blkrewind.replayer.query import open_for_reading

    out = os.path.abspath(args.out)
    for rel in args.paths:
        dst = _inside(out, rel)
        if os.path.lexists(dst):
            raise UserError(f"{dst} exists; give another --out")
    missing = 0
    with open_for_reading(args.store) as store:
        device = store.find_device(args.device)
        r = points.resolve(store, device, points.parse_point(args.at))
        with open_point_image(store, device, r) as (img, _), mounted(img) as (mnt, _):
            for rel in args.paths:
                src, dst = _inside(mnt, rel), _inside(out, rel)
                if not os.path.lexists(src):
                    print(f"blkrewind files: {rel}: no such file at {r.how}", file=sys.stderr)
                    missing += 1
                    continue
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    if os.path.isdir(src) and not os.path.islink(src):
                        shutil.copytree(src, dst, symlinks=True)
                    else:
                        shutil.copy2(src, dst, follow_symlinks=False)
                except OSError as e:
                    raise UserError(f"copying {rel} to {dst}: {e.strerror}") from None
                print(dst)
    return 1 if missing else 0
