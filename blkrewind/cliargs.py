"""Options that many subcommands share, defined once: which store, which device, which points."""
from __future__ import annotations

DEVICE_HELP = "host:name, name (loop3) or traced path (/dev/loop3) (required)"
POINT_HELP = "latest | STAMP | ISO-8601 time | mark name (required)"


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
