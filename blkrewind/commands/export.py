"""Serve a device as it was at a point over NBD, at once, without restoring it.

The image is read straight from the store (replayer/image.py): time to the first byte does not
grow with the device's size. The server is nbdkit (its Python plugin); any NBD client reads it:
nbdinfo, nbdcopy, nbdfuse, qemu-img/qemu-io, qemu (file=nbd:...), nbd-client. Works while
`blkrewind serve` runs and stores (reads through its query socket) and on a store that is only
read; several exports of different points can run at once. Read-only unless --writable, which
puts a copy-on-write overlay in front (nbdkit's cow filter): writes go to a temporary overlay
and are dropped when the export stops; they never reach the store.

Once the server accepts connections, its NBD URI goes to stdout (one line); the export runs
until SIGINT or SIGTERM (Ctrl-C), then stops nbdkit and removes its runtime directory
(/run/blkrewind/exports/...).

Options (defaults and units):
  --store DIR         the store (required)
  --device DEV        host:name, name (loop3) or traced path (required)
  --at POINT          latest | STAMP | ISO-8601 time | mark name (required)
  --socket PATH       serve on a Unix socket at PATH (default: a socket in the export's runtime
                      directory, when --listen is not given)
  --listen ADDR:PORT  serve on TCP (default port 10809); an address that is not loopback
                      needs --tls
  --tls DIR           TLS 1.3 with client certificates: a host directory made by
                      `blkrewind tls init` (ca.pem, cert.pem, key.pem); clients need a
                      certificate from the same CA (default: no TLS)
  --writable          copy-on-write overlay: clients may write; nothing reaches the store
                      (default: read-only)
  --cache-mib N       decoded payload row groups kept in memory, MiB (default 0: room for
                      every row group the point refers to, at most 1/8 of RAM, at least 256)
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

from blkrewind import cliargs
from blkrewind.errors import UserError

EXAMPLES = """\
  blkrewind export --store /srv/store --device db1:sdb --at before-upgrade
  blkrewind export --store /srv/store --device sdb --at 2026-11-25T11:40:00 --listen 127.0.0.1:10810
  nbdinfo 'nbd+unix:///?socket=/run/blkrewind/exports/db1_sdb-1764...-4242/nbd.sock'
  nbdcopy nbd://127.0.0.1:10810 /tmp/sdb-at-1140.img
"""
EXIT_STATUS = {
    0: "stopped by SIGINT/SIGTERM after serving",
    2: ("bad usage or input: an unknown device or point, a non-loopback address without TLS, "
        "nbdkit failing to start (its message is shown; one line on stderr)"),
}


def add_arguments(p):
    cliargs.store_and_device(p)
    cliargs.at(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--socket", metavar="PATH",
                   help="Unix socket to serve on (default: RUNDIR/nbd.sock unless --listen)")
    g.add_argument("--listen", metavar="ADDR:PORT",
                   help="TCP address to serve on (default port 10809; non-loopback needs --tls)")
    p.add_argument("--tls", metavar="DIR", help="host TLS directory from 'blkrewind tls init' "
                                                "(default: none)")
    p.add_argument("--writable", action="store_true",
                   help="copy-on-write overlay; writes never reach the store (default: read-only)")
    p.add_argument("--cache-mib", type=int, default=0, metavar="N",
                   help="decoded payload cache, MiB (default 0: automatic, see above)")


def check_listen(args):
    from blkrewind.replayer.export import is_loopback, parse_listen
    if args.listen is None:
        return None
    host, port = parse_listen(args.listen)
    if not is_loopback(host) and not args.tls:
        raise UserError(f"--listen {args.listen}: not a loopback address; serving beyond "
                        f"loopback needs --tls DIR (or use --socket)")
    return host, port


def run(args) -> int:
    from blkrewind.replayer import export, points

    listen = check_listen(args)
    if args.tls and not os.path.isdir(args.tls):
        raise UserError(f"--tls {args.tls}: no such directory")
    if args.cache_mib != 0 and args.cache_mib < 16:
        raise UserError("--cache-mib must be 0 (automatic) or at least 16")
    if args.socket is not None:
        parent = os.path.dirname(os.path.abspath(args.socket))
        if not os.path.isdir(parent):
            raise UserError(f"--socket {args.socket}: directory {parent} does not exist")
        if os.path.exists(args.socket):
            raise UserError(f"--socket {args.socket} exists; remove it or choose another path")
    prep = export.prepare(args.store, args.device, args.at)
    proc = None
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        if proc is not None and proc.poll() is None:
            proc.terminate()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    sock = None if listen else (args.socket or os.path.join(prep.run_dir, "nbd.sock"))
    try:
        argv = export.nbdkit_argv(prep, socket_path=sock, listen=listen, writable=args.writable,
                                  tls_dir=args.tls, foreground=True, cache_mib=args.cache_mib)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=export.env_for(prep))
        if stopping:
            proc.terminate()
        export.wait_ready(proc, os.path.join(prep.run_dir, "nbdkit.pid"))
        r = prep.resolved
        print(export.uri(sock, listen, bool(args.tls)), flush=True)
        print(f"exporting {prep.device.device} at {r.how}, session {r.session}, "
              f"{points.fmt_time(r.time_ns)}: {r.size_bytes} bytes, "
              f"{'writable (overlay)' if args.writable else 'read-only'}; Ctrl-C stops it",
              file=sys.stderr, flush=True)
        # nbdkit's stderr: pass it on (errors of clients, TLS failures)
        assert proc.stderr is not None, "started with stderr=PIPE"
        for line in proc.stderr:
            sys.stderr.write(line.decode(errors="replace"))
        rc = proc.wait()
        if rc != 0 and not stopping:
            raise UserError(f"nbdkit exited with status {rc}")
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for s, h in old.items():
            signal.signal(s, h)
        why = export.remove_run_dir(prep.run_dir)
        if why:
            print(f"blkrewind: {why}", file=sys.stderr, flush=True)
        if args.socket and os.path.exists(args.socket):
            try:
                os.unlink(args.socket)
            except OSError:
                pass
