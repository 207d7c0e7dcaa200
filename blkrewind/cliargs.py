"""Options that many subcommands share, defined once: which store, which device, which points."""
from __future__ import annotations

import re

DEVICE_HELP = "host:name, name (loop3) or traced path (/dev/loop3) (required)"
POINT_HELP = "latest | STAMP | ISO-8601 time | mark name (required)"
# a date, valid or not: such a point is a time (replayer/points.py), never a mark's name
# (`mark` refuses it; here, not in replayer/points.py, so that `mark`, which runs while a file
# system may be frozen, does not import the store and DuckDB: ~0.3 s here, ~1 min in a guest
# under software emulation)
LOOKS_LIKE_TIME = re.compile(r"\d{4}-\d{1,2}-\d{1,2}([T ]|$)")


def store_and_device(p) -> None:
    """--store DIR and --device DEV, both required."""
    p.add_argument("--store", required=True, metavar="DIR", help="the store (required)")
    p.add_argument("--device", required=True, metavar="DEV", help=DEVICE_HELP)


def at(p, help: str = POINT_HELP) -> None:
    """--at POINT, required."""
    p.add_argument("--at", required=True, metavar="POINT", help=help)


def between(p) -> None:
    """--from A --to B (args.a, args.b), both required."""
    p.add_argument("--from", dest="a", required=True, metavar="POINT",
                   help="the earlier point (required)")
    p.add_argument("--to", dest="b", required=True, metavar="POINT",
                   help="the later point (required)")
