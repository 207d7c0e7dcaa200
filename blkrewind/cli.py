"""The `blkrewind` command: one module per subcommand in blkrewind/commands/."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# numpy's BLAS threads only steal CPU from the tracer (we do no linear algebra)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _one_malloc_arena() -> None:
    """`serve` stores frames from many threads: glibc gives each its own malloc arena, whose
    heaps are unmapped when empty and faulted in again for the next batch (~200k page faults
    per GB stored). One arena (as MALLOC_ARENA_MAX=1 would), set before any thread exists,
    measured 230-280 -> 290-310 MB/s (bench/bench_ship.py)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


if len(sys.argv) > 1 and sys.argv[1] == "serve":
    _one_malloc_arena()

from blkrewind import __version__
from blkrewind.errors import UserError

# subcommand -> module in blkrewind.commands; each module has add_arguments(parser) and run(args)
COMMANDS = {
    "trace": "Capture every write to block devices into a LOG (root).",
    "detach": "Show or detach the capture a dead tracer left attached (root).",
    "mark": "Insert a named point into the history of the running tracer(s).",
    "ingest": "Read LOG segments into a store.",
    "restore": "Rebuild a device as it was at a point, onto an image file or loop device.",
    "sql": "Query the write history with SQL.",
    "serve": "Receive LOG frames from tracers over the network and store them (replayer service).",
    "status": "Show shipping lag (RPO), watermarks, LOG size and losses per host and device.",
    "demo": "Show the whole cycle on a scratch ext4 loop device (root).",
    "verify": "Compare a replica with the live device, or check the store's payload files.",
    "prune": "Fold history older than a duration into the base (frees space).",
    "export": "Serve a device at a point over NBD at once, without restoring it (nbdkit).",
    "mount": "Mount the file system of a device at a point, in one command (root).",
    "umount": "Unmount what `blkrewind mount` mounted and tear it all down (root).",
    "rewind": "Roll a device back (or forward) to a point by writing only what changed (root).",
    "tls": "Make a CA and per-host certificates for shipping (tls init DIR --hosts ...).",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blkrewind", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"blkrewind {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_ in COMMANDS.items():
        mod = importlib.import_module(f"blkrewind.commands.{name}")
        sp = sub.add_parser(name, help=help_, description=getattr(mod, "__doc__", None) or help_,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args._run(args)
    except UserError as e:
        print(f"blkrewind {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"blkrewind {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback for the user, unless asked
        if os.environ.get("BLKREWIND_DEBUG"):
            raise
        print(f"blkrewind {args.command}: internal error: {type(e).__name__}: {e} "
              f"(BLKREWIND_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 70
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
