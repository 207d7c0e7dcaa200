"""Receive LOG frames from tracers (`trace --ship`) and store them: the replayer service.

  blkrewind serve --store /srv/blkrewind --listen 0.0.0.0:7420 --tls /etc/blkrewind/tls/replayer

Runs in the foreground and logs to stderr, one line per event (connections, authentication,
protocol violations with their reason, damage found, store errors). TLS 1.3 with mutual
authentication is the default (--tls DIR holds ca.pem, cert.pem, key.pem; `blkrewind tls
init` makes them): only hosts with a certificate of the CA can send, and a host can only send
its own sessions. --insecure (no TLS) is refused unless ADDR is loopback or private.

While it runs, `blkrewind sql/restore/status --store DIR` read the store through its local
query socket DIR/serve.sock. SIGTERM / SIGINT: stop accepting, finish the frames being
stored, close the store.
"""
from __future__ import annotations

import signal

from blkrewind.errors import UserError
from blkrewind.formats import wire

EXAMPLES = """\
  blkrewind serve --store /srv/blkrewind --listen 0.0.0.0:7420 \\
      --tls /etc/blkrewind/tls/replayer --metrics 127.0.0.1:9742
  # a test on one machine, no TLS (loopback only)
  blkrewind serve --store /tmp/store --listen 127.0.0.1:7420 --insecure
"""


def add_arguments(p):
    p.add_argument("--store", required=True, metavar="DIR",
                   help="the store (created, mode 0700, if missing)")
    p.add_argument("--listen", required=True, metavar="ADDR:PORT",
                   help="address to listen on, e.g. 0.0.0.0:7420 or [::]:7420 (port 0: any "
                        "free port, logged)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--tls", metavar="DIR",
                   help="this server's TLS directory: ca.pem, cert.pem, key.pem (`blkrewind tls init`)")
    g.add_argument("--insecure", action="store_true",
                   help="no TLS (only on loopback / private addresses; hosts are not "
                        "authenticated)")
    p.add_argument("--max-conns", type=int, default=wire.MAX_CONNS, metavar="N",
                   help=f"most tracer connections at once (default {wire.MAX_CONNS})")
    p.add_argument("--idle-timeout", type=float, default=wire.IDLE_TIMEOUT, metavar="SEC",
                   help=f"close a connection silent for SEC seconds (default {wire.IDLE_TIMEOUT:g})")
    p.add_argument("--message-timeout", type=float, default=wire.MESSAGE_TIMEOUT, metavar="SEC",
                   help=f"a started message must be complete within SEC seconds "
                        f"(default {wire.MESSAGE_TIMEOUT:g})")
    p.add_argument("--hello-timeout", type=float, default=wire.HELLO_TIMEOUT, metavar="SEC",
                   help=f"TLS handshake and HELLO, each within SEC seconds "
                        f"(default {wire.HELLO_TIMEOUT:g})")
    from blkrewind import metrics
    metrics.add_argument(p, "server")
    p.add_argument("--store-retry", type=float, default=5.0, metavar="SEC",
                   help="after a store failure (e.g. full), refuse frames for SEC seconds "
                        "before trying again (default 5)")


def run(args) -> int:
    from blkrewind import tlsconf
    from blkrewind.replayer.server import Limits, Server

    # port 0: any free port (the log says which); parse_addr wants 1..65535
    any_port = args.listen.strip().endswith(":0")
    host, port = tlsconf.parse_addr(args.listen.strip()[:-1] + "1" if any_port else args.listen)
    port = 0 if any_port else port
    if args.insecure:
        tlsconf.check_insecure_addr(host)
    for name in ("max_conns", "idle_timeout", "message_timeout", "hello_timeout"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    limits = Limits(max_conns=args.max_conns, idle_timeout=args.idle_timeout,
                    message_timeout=args.message_timeout, hello_timeout=args.hello_timeout,
                    handshake_timeout=args.hello_timeout, store_retry=max(0.0, args.store_retry))
    from blkrewind.analytics.views import define_views
    srv = Server(args.store, (host, port), tls_dir=None if args.insecure else args.tls,
                 limits=limits, views=define_views)

    def on_signal(signum, frame):
        srv.request_stop()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    endpoint = None
    try:
        from blkrewind import metrics  # bound first: a taken port fails before the store opens
        endpoint = metrics.start(args.metrics, metrics.ServerCollector(srv, srv.log), srv.log)
        srv.start()
        while not srv.wait(1.0):
            pass
    finally:
        if endpoint is not None:
            endpoint.close()
        srv.close()
        for s, h in old.items():
            signal.signal(s, h)
    return 0
