"""bench_ship.py's shipping run, in this process or in a child that imports another checkout.

    python bench/ship_child.py TREE LOG_DIR PORT TLS_DIR|- SERVER_PID|0 CONNS HOST

As a script (bench_ship.py --before): imports TREE's Shipper (a checkout from before the
packages moved under blkrewind has it as a top-level `tracer`), ships LOG_DIR to 127.0.0.1:PORT
until everything is acked and prints ship()'s result as one JSON line. Only the standard
library at module level, so that bench_ship.py imports ship() without importing a checkout.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK   # utime, stime


def faults_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])   # minflt


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def shipper_of_tree(tree: str | None) -> tuple[type, str]:
    """The Shipper class and the name of its state file, from tree (first on sys.path) or,
    without one, from the checkout this process imports."""
    if tree is not None and not os.path.isdir(os.path.join(tree, "blkrewind", "tracer")):
        # before the packages moved under blkrewind (0aa95ed): a top-level tracer. (Asking
        # for blkrewind.tracer there would find the editable install's copy instead.)
        shipper = state = importlib.import_module("tracer.shipper")
    else:
        shipper = importlib.import_module("blkrewind.tracer.shipper")
        state = importlib.import_module("blkrewind.tracer.shipstate")
    return shipper.Shipper, state.SHIPPED_JSON


def ship(log_dir: str, port: int, tls: str | None, server_pid: int | None, conns: int,
         host: str, tree: str | None = None) -> dict:
    """Ship LOG_DIR until everything is acked: seconds, bytes acked and sent, this process's
    CPU seconds and the server's (CPU seconds and minor faults)."""
    shipper_cls, shipped_json = shipper_of_tree(tree)
    try:
        os.unlink(os.path.join(log_dir, shipped_json))
    except FileNotFoundError:
        pass
    msgs: list[str] = []
    sh = shipper_cls(log_dir, f"127.0.0.1:{port}", tls_dir=tls, insecure=tls is None,
                     host=host, conns=conns, say=msgs.append)
    c0, s0 = self_cpu(), cpu_of(server_pid) if server_pid else 0.0
    f0 = faults_of(server_pid) if server_pid else 0
    t0 = time.monotonic()
    sh.start()
    while True:
        st = sh.status()
        if st["frames_unacked"] == 0 and st["frames_acked"]:
            break
        if time.monotonic() - t0 > 3600:
            sys.exit("shipping did not finish in an hour: " + " | ".join(msgs))
        time.sleep(0.02)
    dt = time.monotonic() - t0
    c1, s1 = self_cpu(), cpu_of(server_pid) if server_pid else 0.0
    f1 = faults_of(server_pid) if server_pid else 0
    sh.stop(0)
    return {"s": dt, "log_bytes": st["bytes_acked"], "shipper_cpu": c1 - c0,
            "server_cpu": s1 - s0, "server_faults": f1 - f0, "sent": st["bytes_sent"]}


if __name__ == "__main__":
    tree, log_dir, port, tls, pid, conns, host = sys.argv[1:8]
    tree = os.path.abspath(tree)
    sys.path.insert(0, tree)
    print(json.dumps(ship(log_dir, int(port), None if tls == "-" else tls, int(pid) or None,
                          int(conns), host, tree)), flush=True)
