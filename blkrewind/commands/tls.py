"""Make the certificates for shipping over mutual TLS.

  blkrewind tls init DIR --hosts NAME[=IP[+IP...]],...

makes DIR (0700) with a CA (ca.pem, ca-key.pem; the key stays in DIR) and, per host,
DIR/NAME/{ca.pem,cert.pem,key.pem}: copy DIR/NAME to that host and give it to
`serve --tls` or `trace --tls`. The host's name is its certificate's CN (the tracer's
device keys are NAME:DEVICE). SANs: DNS:NAME and IP:each IP given; the tracer checks the
name or IP it dials (--ship ADDR:PORT) against them. Running it again with more hosts adds
certificates for the new hosts, signed by the same CA.
"""
from __future__ import annotations

import sys

EXAMPLES = """\
  blkrewind tls init /root/blkrewind-ca --hosts replayer=10.0.0.5,db1,db2=10.0.0.7
  scp -r /root/blkrewind-ca/db1 db1:/etc/blkrewind/tls     # each host gets its directory
  blkrewind tls init /root/blkrewind-ca --hosts db3          # later: one more host
"""


def add_arguments(p):
    sub = p.add_subparsers(dest="tls_command", metavar="ACTION")
    sub.required = True
    i = sub.add_parser("init", help="make a CA and per-host certificates (or add hosts)",
                       description=__doc__)
    i.add_argument("dir", metavar="DIR", help="directory of the CA (created 0700; existing: "
                   "hosts are added)")
    i.add_argument("--hosts", required=True, metavar="NAME[=IP[+IP...]],...",
                   help="comma-separated hosts: the replayer's and every tracer's, e.g. "
                        "replayer=10.0.0.5,db1,db2=10.0.0.7+fd00::7")


def run(args) -> int:
    from blkrewind import tlsconf

    hosts = [h for h in args.hosts.split(",") if h.strip()]
    new = tlsconf.init(args.dir, hosts)
    for name in new:
        print(f"{args.dir.rstrip('/')}/{name}")
    print(f"blkrewind tls: {len(new)} host certificate(s) made in {args.dir} "
          f"(copy DIR/NAME to each host; {args.dir}/ca-key.pem stays here)", file=sys.stderr)
    return 0
