"""Find the first bad point of a device's history, like `git bisect run`.

  blkrewind bisect --store S --device D --good A --bad B -- CHECK [ARGS...]

A must be good and B bad (points as `restore --at` takes them, in one session). Candidate
points in between are served one at a time as an image (nbdkit over the store, shown as a
file by nbdfuse; without them, rebuilt into a sparse temporary image in $BLKREWIND_TMP or
/tmp), attached to a loop device and mounted read-only (ext4: noload, xfs:
norecovery, so nothing is written; --replay-journal replays the journal into the image's
copy-on-write overlay instead), and CHECK runs with, in its environment:
  BLKREWIND_MOUNT   the mount path        BLKREWIND_DEVICE  the loop device (read-only)
  BLKREWIND_POINT   stamp:N               BLKREWIND_IMAGE   the image file
Its exit status says: 0 good, 1-124 bad, 125 cannot tell (skip the point); anything else
(126, 127, a signal) stops the bisection. The image, loop device and mount are removed after
each check, whatever happens.

Candidates are the marks between A and B; then, between the last good and the first bad
mark, the flush points (flush bios and FUA / PREFLUSH writes: where file systems commit, so
crash-consistent); then every write's stamp between those. --level marks|flush|any stops at
that level (default: flush). Each level takes at most ceil(log2(n + 1)) checks over its n
candidates (plus one per skip). A file system whose CHECK needs a consistent state is best
served by marks (taken while frozen: fsfreeze, mark, unfreeze) and flush points.

Prints each check on stderr, then the last good point, the first bad one, and the command
that restores the last good point.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from blkrewind import cliargs
from blkrewind.errors import UserError

EXAMPLES = """\
  blkrewind bisect --store /srv/cdp --device db1:sdb --good before-upgrade --bad latest -- \\
      sh -c 'test -s "$BLKREWIND_MOUNT/etc/app.conf"'
  blkrewind bisect --store S --device loop3 --good m1 --bad m30 --level marks -- ./check.sh
"""
EXIT_STATUS = {
    0: 'a last good point was found (printed)',
    1: 'all candidates between A and B were skipped: the first bad point is not known',
    2: ('bad usage or input: a wrong option or value, an unknown device or point, CHECK '
        'could not run or stopped the bisection (one line on stderr)'),
}


def add_arguments(p):
    cliargs.store_and_device(p)
    p.add_argument("--good", required=True, metavar="POINT",
                   help="a point known good (required)")
    p.add_argument("--bad", required=True, metavar="POINT",
                   help="a later point known bad (required)")
    p.add_argument("--level", choices=("marks", "flush", "any"), default="flush",
                   help="the finest candidates: marks, flush points or any stamp "
                        "(default: flush)")
    p.add_argument("--replay-journal", action="store_true",
                   help="replay the file system's journal on the private image before CHECK "
                        "(default: off: mounted with noload / norecovery)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="seconds one CHECK may run before the bisection stops (default: 600)")
    p.add_argument("check", nargs=argparse.REMAINDER, metavar="-- CHECK [ARGS]",
                   help="the command that tells a good point (exit 0) from a bad one")


def run(args) -> int:
    from blkrewind.commands.diff import resolve_pair
    from blkrewind.replayer import bisect, points
    from blkrewind.replayer.pointimage import mounted, open_point_image
    from blkrewind.replayer.query import open_for_reading

    cmd = args.check[1:] if args.check[:1] == ["--"] else args.check
    if not cmd:
        raise UserError("give the CHECK command after --, e.g. -- sh -c 'test -f "
                        "\"$BLKREWIND_MOUNT/etc/passwd\"'")
    log = lambda msg: print(f"bisect: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with open_for_reading(args.store) as store:
        device = store.find_device(args.device)
        ra, rb = resolve_pair(store, device, args.good, args.bad)
        if ra.stamp == rb.stamp:
            raise UserError("--good and --bad are the same point")
        n_checks = 0

        def check(stamp: int) -> str:
            nonlocal n_checks
            n_checks += 1
            pt = points.Point("stamp", stamp, f"stamp:{stamp}")
            with open_point_image(store, device, pt) as (img, _):
                with mounted(img, replay=args.replay_journal) as (mnt, loop):
                    env = dict(os.environ, BLKREWIND_MOUNT=mnt, BLKREWIND_DEVICE=loop,
                               BLKREWIND_POINT=f"stamp:{stamp}", BLKREWIND_IMAGE=img)
                    try:
                        rc = subprocess.run(cmd, env=env, timeout=args.timeout).returncode
                    except FileNotFoundError:
                        raise UserError(f"{cmd[0]}: command not found") from None
                    except subprocess.TimeoutExpired:
                        raise UserError(f"CHECK ran longer than {args.timeout:g} s at stamp "
                                        f"{stamp}; bisection stopped") from None
            if rc == 0:
                v = "good"
            elif 1 <= rc <= 124:
                v = "bad"
            elif rc == 125:
                v = "skip"
            else:
                raise UserError(f"CHECK exited {rc} at stamp {stamp} (126, 127 or a signal "
                                f"stop the bisection)")
            log(f"check {n_checks}: stamp {stamp} ({labels.get(stamp, '')}): {v} "
                f"(exit {rc})")
            return v

        good, good_lbl = ra.stamp, f"--good {args.good}"
        bad, bad_lbl = rb.stamp, f"--bad {args.bad}"
        labels: dict[int, str] = {}
        unknown = False
        for level in bisect.LEVELS[:bisect.LEVELS.index(args.level) + 1]:
            cands = bisect.candidates(store, ra.session, ra.dev, good, bad, level)
            log(f"{level}: {len(cands)} candidate(s) between stamp {good} and {bad}")
            if not cands:
                continue
            labels.update(dict(cands))
            lo, hi, _, skipped = bisect.search(cands, check)
            if lo >= 0:
                good, good_lbl = cands[lo][0], cands[lo][1]
            if hi < len(cands):
                bad, bad_lbl = cands[hi][0], cands[hi][1]
            if hi - lo > 1:   # everything in between was skipped
                unknown = True
                log(f"{hi - lo - 1} candidate(s) between stamp {good} and {bad} were skipped: "
                    f"the first bad point is one of them or {bad}")
                break
        t_good = points.resolve(store, device, points.Point("stamp", good, str(good))).time_ns
    print(f"last good: stamp {good} ({good_lbl}, {points.fmt_time(t_good)})")
    print(f"first bad: stamp {bad} ({bad_lbl})")
    print(f"checks: {n_checks}")
    print(f"restore the last good point: blkrewind restore --store {args.store} --device "
          f"{device.device} --at stamp:{good} --to IMAGE")
    return 1 if unknown else 0
