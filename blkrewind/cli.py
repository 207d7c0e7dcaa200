"""The `blkrewind` command: one module per subcommand in blkrewind/commands/."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from blkrewind import __version__
from blkrewind.errors import UserError
from blkrewind.osutil import TERMINATION, ignore_termination, tune_malloc

# numpy's BLAS threads only steal CPU from the tracer (we do no linear algebra)
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

if len(sys.argv) > 1 and sys.argv[1] == "serve":
    # `serve` stores frames from many threads: one malloc arena, set before any thread exists
    tune_malloc(one_arena=True)

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
    "suspects": "List ransomware-like episodes (compressible data overwritten with random data).",
    "report": "Write an HTML page with figures and tables about a device's history.",
    "diff": "List the byte ranges and the files (ext4, xfs) changed between two points.",
    "files": "Copy files out of a device as it was at a point (ext4, xfs).",
    "blame": "Which processes wrote a file or byte range between two points, and when.",
    "bisect": "Find the first bad point of a history by running a check on candidate points.",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `only` (a command's name) just that command's options are
    built, the others listed by name (importing every command module and building every
    subparser was a large part of each command's start-up)."""
    # the help format (defaults, examples, exit status) is blkrewind/helpdoc.py's, which
    # also makes the man page and the bash completion from this parser
    from blkrewind import helpdoc

    p = argparse.ArgumentParser(prog="blkrewind", description=helpdoc.TOP_DESCRIPTION,
                                epilog=helpdoc.top_epilog(),
                                formatter_class=helpdoc.HelpFormatter)
    p.add_argument("--version", action="version", version=f"blkrewind {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for name, help_ in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_)
            continue
        mod = importlib.import_module(f"blkrewind.commands.{name}")
        sp = sub.add_parser(name, help=help_, description=getattr(mod, "__doc__", None) or help_,
                            epilog=helpdoc.epilog(mod), formatter_class=helpdoc.HelpFormatter)
        mod.add_arguments(sp)
        helpdoc.dress(sp, mod)   # nested actions (tls init) get the same format
        sp.set_defaults(_run=mod.run)
    return p


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like SIGINT: the command unwinds (its `finally` blocks
    remove half-results) and exits 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []  # the signals that interrupted the command


def _raise_interrupted(signum, _frame) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def _handle_termination() -> dict:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread (a command that wants
    another behaviour, trace and serve, installs its own handlers over these). Returns
    the three handlers found (to restore after an in-process call)."""
    import signal

    old = {}
    for s in TERMINATION:
        try:
            h = old[s] = signal.getsignal(s)  # all three: ignore_termination() may set them
            if h in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(s, _raise_interrupted)
        except ValueError:  # not the main thread (main() called from a test's thread)
            old.pop(s, None)
    return old


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(words[0] if words and words[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if argv is None:   # a process of its own: `kill -USR1 PID` prints every thread's stack
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR1, all_threads=True)
    old = _handle_termination()
    try:
        return _main(args)
    finally:
        import signal

        if argv is None:
            # the process's own command is over, its exit status decided: a signal while the
            # interpreter shuts down (unmapping big mappings takes a while) must not turn it
            # into a death by signal (nor a traceback from the handler above)
            ignore_termination()
            # and its shutdown need not examine every object numpy, duckdb and the command
            # made: they are frozen out of the interpreter's last collections (0.1-0.3 s of
            # a restore's exit)
            import gc

            gc.freeze()
        else:  # called in-process (tests): the caller's handlers again
            for s, h in old.items():
                signal.signal(s, h)


def _interrupted(command: str, signum: int) -> int:
    import signal

    print(f"blkrewind {command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
    return 128 + signum  # helpdoc.INTERRUPTED + signum


def _main(args) -> int:
    del _received[:]
    try:
        rc = args._run(args)
    except UserError as e:
        if _received and e.exit_code != 128 + _received[0]:  # a signal made a call fail
            return _interrupted(args.command, _received[0])
        print(f"blkrewind {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        import signal

        return _interrupted(args.command, getattr(e, "signum", signal.SIGINT))
    except BrokenPipeError:
        return 0
    except Exception as e:  # never a traceback for the user, unless asked
        if _received:  # (DuckDB turns a signal into "Query interrupted")
            return _interrupted(args.command, _received[0])
        if os.environ.get("BLKREWIND_DEBUG"):
            raise
        print(f"blkrewind {args.command}: internal error: {type(e).__name__}: {e} "
              f"(BLKREWIND_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 70
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
