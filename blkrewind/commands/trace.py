"""Capture every write to block devices, with its data, into a durable LOG.

Runs as root until SIGINT/SIGTERM, then flushes and exits 0; or, with
`-- COMMAND [ARGS]`, traces while COMMAND runs (started once the baseline is
read, so all it does is restorable) and returns its exit status.

When tracing starts, the devices' current content is read into the LOG as the
baseline while writes continue; points become restorable once it is done.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading

from blkrewind.errors import UserError

EXAMPLES = """\
  # protect /dev/sdb, shipping to a replayer over mutual TLS (the usual deployment)
  blkrewind trace --device /dev/sdb --log /var/lib/blkrewind/log \\
      --ship replayer.example:7420 --tls /etc/blkrewind/tls --metrics 127.0.0.1:9741
  # two devices, a local LOG only (ingest it later with `blkrewind ingest`)
  blkrewind trace --device /dev/sdb --device /dev/sdc --log /var/lib/blkrewind/log
  # trace while a command runs; its exit status is trace's
  blkrewind trace --device /dev/loop0 --log /tmp/log -- fio job.fio
"""
EXIT_STATUS = {1: 'the tracer failed (it says why: LOG not writable, capture broken, ...)',
               0: "stopped by SIGINT/SIGTERM after a clean flush; with -- COMMAND: COMMAND's exit "
                  "status (128+N when signal N ended it)"}


def add_arguments(p):
    p.add_argument("--device", action="append", required=True, metavar="DEV",
                   help="block device to trace (repeat for several; disks, partitions, loop devices)")
    p.add_argument("--log", required=True, metavar="DIR", help="LOG directory (created 0700)")
    p.add_argument("--ring-mb", type=int, default=128, metavar="MIB",
                   help="BPF ring buffer size in MiB, a power of two (default 128)")
    p.add_argument("--segment-mb", type=int, default=64, metavar="MIB",
                   help="rotate LOG segments at this size in MiB (default 64)")
    p.add_argument("--fsync", choices=["interval", "always", "never"], default="interval",
                   help="when the LOG is fsynced: interval (default: every --fsync-interval seconds and "
                        "on stop), always (after every append), never (on stop only)")
    p.add_argument("--fsync-interval", type=float, default=1.0, metavar="SEC",
                   help="seconds between fsyncs of the LOG with --fsync interval (default 1)")
    p.add_argument("--log-mode", choices=["buffered", "prealloc", "direct", "auto"],
                   default="buffered",
                   help="how LOG segments are written: buffered (default: through the page "
                        "cache, segments grow as written), prealloc (segments preallocated, or "
                        "recycled spares), direct (preallocated and written with O_DIRECT: the "
                        "LOG does not evict the server's page cache), auto (direct; on a tmpfs "
                        "prealloc with --ship, else buffered). With --ship, retention keeps "
                        "shipped segments as spares for prealloc and direct to reuse")
    p.add_argument("--lz4-level", type=int, default=-10, metavar="N",
                   help="LOG compression: lz4 level (0..16: higher compresses more, slower; "
                        "negative = lz4's acceleration, faster; default -10). Spans whose "
                        "sample hardly compresses use -100 whatever this is")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not read the devices' current content (the history is then not "
                        "restorable on its own)")
    p.add_argument("--dirtier", action="store_true",
                   help="also record which process dirtied the pages of buffered writes "
                        "(writes.dirty_*, blame); off by default: it costs ~1 us per page going "
                        "clean to dirty on a traced device, about a fifth more CPU for a "
                        "random 4 KiB buffered writer (README, Costs)")
    p.add_argument("--settle", type=float, default=1.0, metavar="SEC",
                   help="baseline: seconds a write queued before capture started may still be "
                        "completing (default 1)")
    p.add_argument("--stats-json", metavar="FILE",
                   help="write capture statistics (JSON) to FILE on exit (default: none)")
    g = p.add_argument_group("shipping to a replayer (`blkrewind serve`; docs/protocol.md)")
    g.add_argument("--ship", metavar="ADDR:PORT",
                   help="stream the LOG to the replayer listening there (the LOG stays the "
                        "durable buffer: nothing is lost while the replayer is away)")
    g.add_argument("--tls", metavar="DIR", help="this host's TLS directory (ca.pem, cert.pem, "
                   "key.pem from `blkrewind tls init`); the host name is the certificate's CN")
    g.add_argument("--insecure", action="store_true",
                   help="plain TCP instead of TLS (only to a loopback or private address)")
    g.add_argument("--host", metavar="NAME", help="host name in the records without --tls "
                   "(default: this machine's hostname)")
    g.add_argument("--ship-conns", type=int, default=2, metavar="N",
                   help="parallel connections to the replayer, 1..64 (default 2)")
    g.add_argument("--log-max-mb", type=int, metavar="MIB",
                   help="LOG size limit in MiB: the oldest segments the replayer acknowledged are "
                        "deleted; when nothing can be, new records are dropped (counted, said "
                        "loudly). Default: 50%% of the LOG's file system, at most 64 GiB")
    g.add_argument("--ship-drain", type=float, default=30.0, metavar="SEC",
                   help="on stop, wait up to SEC seconds for the last acknowledgements (default 30)")
    g.add_argument("--ship-timeout", type=float, default=30.0, metavar="SEC",
                   help="a connection whose replayer does not answer for SEC seconds is dropped "
                        "and made again (default 30)")
    from blkrewind import metrics
    metrics.add_argument(p, "tracer")
    p.add_argument("child", nargs=argparse.REMAINDER, metavar="-- COMMAND",
                   help="-- COMMAND [ARGS]: start COMMAND once the baseline is read, trace while it runs, "
                        "stop when it exits and return its exit status (default: trace until "
                        "SIGINT/SIGTERM)")





def _ship_host(args) -> str | None:
    """Check the shipping options; the tracer's host name (None: the machine's hostname)."""
    if not args.ship:
        for name, given in (("--tls", args.tls), ("--insecure", args.insecure),
                            ("--log-max-mb", args.log_max_mb is not None)):
            if given:
                raise UserError(f"{name} only goes with --ship ADDR:PORT")
    if args.ship_conns < 1 or args.ship_conns > 64:
        raise UserError(f"--ship-conns must be 1..64, not {args.ship_conns}")
    if args.log_max_mb is not None and args.log_max_mb < 1:
        raise UserError(f"--log-max-mb must be at least 1, not {args.log_max_mb}")
    if args.ship_drain < 0:
        raise UserError("--ship-drain must not be negative")
    if not 1 <= args.ship_timeout <= 3600:
        raise UserError(f"--ship-timeout must be 1..3600 seconds, not {args.ship_timeout}")
    if args.host is not None:
        from blkrewind.formats.wire import HOST_RE
        if not HOST_RE.fullmatch(args.host):
            raise UserError(f"--host {args.host!r}: use letters, digits, '.', '_' and '-'")
    if args.tls:
        if args.insecure:
            raise UserError("--tls and --insecure exclude each other")
        from blkrewind import tlsconf
        tlsconf.check_dir(args.tls)
        cn = tlsconf.own_host(args.tls)
        if args.host is not None and args.host != cn:
            raise UserError(f"--host {args.host} differs from the certificate's name {cn} "
                            f"(with --tls the host name is the certificate's CN)")
        return cn
    if args.ship and not args.insecure:
        raise UserError("--ship needs --tls DIR (or --insecure, for a loopback or private "
                        "address only)")
    if args.ship:
        from blkrewind import tlsconf
        tlsconf.check_insecure_addr(tlsconf.parse_addr(args.ship)[0])
    return args.host


_TTY = sys.stderr.isatty()


def say(msg: str) -> None:
    # on a terminal: over the progress line (redrawn at its next tick)
    print(f"{chr(13) + chr(27) + '[K' if _TTY else ''}blkrewind trace: {msg}", file=sys.stderr,
          flush=True)


def progress_line(line: str | None) -> None:
    """The baseline's / a resync's progress, rewritten in place on a terminal."""
    sys.stderr.write("\r\x1b[K" + (f"blkrewind trace: {line}" if line else ""))
    sys.stderr.flush()


def check_options(args) -> None:
    """Refuse option values that make no sense, before anything starts."""
    import math

    if not 1 <= args.segment_mb <= 4096:
        raise UserError(f"--segment-mb must be 1..4096 (MiB), not {args.segment_mb}")
    if not (math.isfinite(args.fsync_interval) and args.fsync_interval > 0):
        raise UserError(f"--fsync-interval must be a positive number of seconds, not "
                        f"{args.fsync_interval:g}")
    if not (math.isfinite(args.settle) and args.settle >= 0):
        raise UserError(f"--settle must be a number of seconds, 0 or more, not {args.settle:g}")


def _check_command(cmd: list[str]) -> None:
    """`trace -- COMMAND`: fail now, not after the whole baseline, if COMMAND cannot run."""
    import shutil

    if not cmd:
        return
    exe = cmd[0]
    if os.sep in exe:
        if not os.path.isfile(exe):
            raise UserError(f"cannot run {exe}: "
                            f"{'a directory' if os.path.isdir(exe) else 'no such file'}")
        if not os.access(exe, os.X_OK):
            raise UserError(f"cannot run {exe}: not executable")
    elif shutil.which(exe) is None:
        raise UserError(f"cannot run {exe}: no such command in $PATH")


def _already_traced(paths: list[str]) -> None:
    """Refuse a device another running tracer on this host traces already."""
    from blkrewind.tracer.control import ask, find_tracers

    def rdev(p):
        try:
            return os.stat(p).st_rdev
        except OSError:
            return None

    want = {rdev(p): p for p in paths}
    want.pop(None, None)
    for sock in find_tracers():
        try:
            st = ask(sock, {"op": "status"}, timeout=5)
        except (OSError, ValueError):
            continue
        for d in st.get("devices") or []:
            r = rdev(d)
            if r in want:
                raise UserError(f"{want[r]} is traced already by the tracer pid {st.get('pid')} "
                                f"(LOG {st.get('log')}); stop it first, or add no second tracer")


def run(args) -> int:
    check_options(args)
    if os.geteuid() != 0:
        raise UserError("must run as root (it loads BPF programs and reads block devices)")
    from blkrewind.tracer.features import (
        missing_feature,  # only the libbpf binding: an old kernel is
    )
    missing = missing_feature()                  # refused before the tracer's heavy imports
    if missing:
        raise UserError(missing)
    from blkrewind.tracer.session import TraceOptions, Tracer

    cmd = list(args.child)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    ring = args.ring_mb << 20
    if args.ring_mb <= 0 or ring & (ring - 1):
        raise UserError(f"--ring-mb must be a power of two, not {args.ring_mb}")
    host = _ship_host(args)
    _check_command(cmd)
    _already_traced(args.device)
    opts = TraceOptions(devices=args.device, log_dir=args.log, ring_bytes=ring,
                        segment_bytes=args.segment_mb << 20, fsync=args.fsync,
                        fsync_interval=args.fsync_interval, baseline=not args.no_baseline,
                        dirtier=args.dirtier, log_mode=args.log_mode,
                        settle=args.settle, lz4_level=args.lz4_level, host=host,
                        ship=args.ship, tls_dir=args.tls, insecure=args.insecure,
                        ship_conns=args.ship_conns,
                        log_max_bytes=None if args.log_max_mb is None else args.log_max_mb << 20,
                        ship_drain=args.ship_drain, ship_timeout=args.ship_timeout)
    stop = threading.Event()
    child: subprocess.Popen | None = None

    def on_signal(signum, _frame):
        if child is not None and child.poll() is None:
            child.send_signal(signum)  # the command decides; we stop when it exits
        else:
            stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    tracer = Tracer(opts, say=say)
    if _TTY:
        tracer.progress_tty = progress_line
    rc = 0
    endpoint = None
    try:
        from blkrewind import metrics  # bound first: a taken port fails before any capture
        endpoint = metrics.start(args.metrics, metrics.TracerCollector(tracer, say), say)
        tracer.start()
        if not args.ship and not cmd:  # a LOG nothing trims: say how to (issue 13)
            say(f"note: without --ship nothing deletes the LOG: it grows until its file system "
                f"is full; `blkrewind ingest --log {args.log} --store DIR --delete-ingested` "
                f"(blkrewind-ingest@.timer) deletes what a store holds (docs/operations.md)")
        tracer.run_baseline(stop)
        if cmd and not stop.is_set():
            try:
                child = subprocess.Popen(cmd)
            except OSError as e:
                raise UserError(f"cannot run {cmd[0]}: {e.strerror}") from None
            while child.poll() is None:
                try:
                    child.wait(0.2)
                except subprocess.TimeoutExpired:
                    pass
            rc = child.returncode if child.returncode >= 0 else 128 - child.returncode
        else:
            while not stop.wait(0.2):
                if tracer.failure:
                    break
    finally:
        if endpoint is not None:
            endpoint.close()
        stats = tracer.stop()
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump(stats, f, indent=1)
    say(f"stopped: {stats.get('bios', 0)} bios, {stats.get('bytes', 0) >> 20} MiB captured, "
        f"{stats.get('drops', 0)} records lost, LOG {stats.get('log_bytes', 0) >> 20} MiB"
        + (f", {stats['log_full_records']} records dropped because the LOG was full"
           if stats.get("log_full_records") else "")
        + (f", {stats['missed_runs']} BPF program runs skipped by the kernel (resynced)"
           if stats.get("missed_runs") else ""))
    if tracer.failure:
        raise UserError(tracer.failure, exit_code=rc or 1)
    return rc
