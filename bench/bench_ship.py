"""Benchmark of shipping (tracer/shipper.py -> `blkrewind serve`): throughput and RPO.

    sudo .venv/bin/python bench/bench_ship.py --mode throughput [--gib 2] [--dir DIR]
    sudo .venv/bin/python bench/bench_ship.py --mode rpo [--rate-mb 100] [--seconds 20]
    sudo .venv/bin/python bench/bench_ship.py --mode all
    .venv/bin/python bench/bench_ship.py --mode throughput --before OLD [--before OLDER]

throughput: a pre-made LOG of --gib GiB of payload (a valid session: baseline + writes of
  4 KiB..1 MiB; half the writes random bytes, half compressible text-like bytes, in 4 MiB
  frames and 64 MiB segments, as the tracer writes them) is shipped by a Shipper in this
  process to `blkrewind serve` on 127.0.0.1 (a fresh store each run), once over TLS (certs from
  `blkrewind tls init`) and once with --insecure, then (for the shipper's own ceiling) to a
  receiver that only reads, checks (wire.read_message + unpack_frames) and ACKs. Reported:
  MB/s of LOG bytes and of payload from start until everything is acked, the shipper's CPU
  seconds (this process) and the replayer's (/proc/PID/stat), per MB. --before TREE (another
  checkout): every round ships with each checkout in turn, its shipper in a child process
  (bench/ship_child.py) and its own `serve`; medians and ratios at the end.

rpo: a loop device (backing file under --dir) traced by `blkrewind trace --ship` over TLS to a
  `serve` on 127.0.0.1 while fio writes at --rate-mb MB/s (O_DIRECT, 1 MiB random writes)
  for --seconds. The tracer's status is sampled every 0.1 s over its control socket: the age
  of the oldest unacked frame (the RPO at that instant); at the end the shipper's per-frame
  lag (ACK time - the frame's real_ns, i.e. when its records were taken from the ring).
  Reported: p50/p99/max of both.

MB = 10^6 bytes. Needs root (rpo: loop device, BPF).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench_store  # noqa: E402  (its LOG generator)
import ship_child  # noqa: E402

from blkrewind.formats import record, wire  # noqa: E402

DEV = record.kdev(7, 98)
HOST = "bench"
SESSION = "20261125T130000Z-bench0ship"
CLI = [sys.executable, "-m", "blkrewind.cli"]


# ------------------------------------------------------------------------------ the LOG
def _text_pool(n: int, rng: random.Random) -> bytes:
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    out = bytearray()
    while len(out) < n:
        line = b" ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        out += line + b"\n" + bytes(rng.randrange(0, 64))  # text with runs of zeroes
    return bytes(out[:n])


def make_log(log_dir: str, payload_bytes: int, seed: int = 1) -> dict:
    """bench_store.make_log with half random, half text-like payload: a quarter of it as the
    baseline of a 1 GiB device (at most the device), the rest as writes."""
    rng = random.Random(seed)
    rand_pool = os.urandom(48 << 20)
    text_pool = _text_pool(48 << 20, rng)
    device_bytes = 1 << 30
    baseline = min(device_bytes, payload_bytes // 4) & ~((1 << 20) - 1)

    def data(rng, n: int) -> memoryview:
        pool = rand_pool if rng.random() < 0.5 else text_pool
        off = rng.randrange(0, len(pool) - n)
        return memoryview(pool)[off:off + n]

    return bench_store.make_log(log_dir, device_bytes, payload_bytes - baseline, seed,
                                session=SESSION, host=HOST, dev=DEV, baseline_bytes=baseline,
                                data=data, compression_level=-10)


# ------------------------------------------------------------------------------ processes
def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Serve:
    def __init__(self, store: str, port: int, tls: str | None, tree: str = ROOT):
        args = [*CLI, "serve", "--store", store, "--listen", f"127.0.0.1:{port}"]
        args += ["--tls", tls] if tls else ["--insecure"]
        self.lines: list[str] = []
        self.p = subprocess.Popen(args, cwd=tree, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self.p.poll() is not None or time.monotonic() > deadline:
                    sys.exit("serve did not start:\n" + "".join(self.lines))
                time.sleep(0.05)

    def _read(self):
        assert self.p.stderr is not None, "started with stderr=PIPE"
        for ln in self.p.stderr:
            self.lines.append(ln)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class DiscardReceiver:
    """Reads and checks FRAMES (wire.read_message, unpack_frames) and ACKs; stores nothing.
    The shipper's ceiling, not a replayer."""

    def __init__(self, ctx=None):
        self.ctx = ctx
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.port = self.ls.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            if self.ctx is not None:
                c = self.ctx.wrap_socket(c, server_side=True)
            hello = wire.read_message(c, accept=wire.CLIENT_TO_SERVER)
            if hello is None:   # closed before its HELLO
                return
            h = wire.parse_json(hello)
            wire.send_buffers(c, wire.encode_json(wire.T_WELCOME, {
                "proto": 1, "host": h["host"], "server": "discard", "max_body": wire.MAX_BODY}))
            while (m := wire.read_message(c, accept=wire.CLIENT_TO_SERVER)) is not None:
                if m.mtype == wire.T_INVENTORY:
                    d = wire.parse_json(m)
                    wire.send_buffers(c, wire.encode_json(wire.T_LACKS, {"segments": [
                        {"session": s["session"], "segno": s["segno"],
                         "ranges": [[0, s["frames"]]]} for s in d["segments"]],
                        "more": d["more"]}))
                elif m.mtype == wire.T_FRAMES:
                    meta, _ = wire.unpack_frames(m.body)
                    wire.send_buffers(c, wire.encode_json(wire.T_ACK, {
                        "id": meta["id"], "session": meta["session"], "segno": meta["segno"],
                        "first": meta["first"], "end": meta["first"] + meta["n"]}))
                elif m.mtype == wire.T_PING:
                    wire.send_buffers(c, wire.encode(wire.T_PONG, [bytes(m.body)]))
        except (wire.ProtocolError, OSError):  # ssl.SSLError is an OSError
            pass
        finally:
            c.close()

    def close(self):
        self.ls.close()


def tls_dirs(base: str) -> tuple[str, str]:
    d = os.path.join(base, "tls")
    if not os.path.exists(os.path.join(d, "ca.pem")):
        from blkrewind import tlsconf
        tlsconf.init(d, ["replayer=127.0.0.1", HOST])
    return os.path.join(d, "replayer"), os.path.join(d, HOST)


# ------------------------------------------------------------------------------ throughput
def ship_once(log_dir: str, port: int, tls: str | None, server_pid: int | None,
              conns: int, tree: str | None = None) -> dict:
    """ship_child.ship in this process, or with tree, in a child that imports that checkout."""
    if tree is None:
        return ship_child.ship(log_dir, port, tls, server_pid, conns, HOST)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "ship_child.py"), tree,
                        log_dir, str(port), tls or "-", str(server_pid or 0), str(conns), HOST],
                       cwd=tree, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"the shipper of {tree} failed ({p.returncode}):\n{p.stderr}")
    return json.loads(p.stdout.splitlines()[-1])


def throughput(args, base: str) -> list[dict]:
    log_dir = os.path.join(base, "log")
    if not os.path.exists(log_dir):
        t0 = time.monotonic()
        info = make_log(log_dir, int(args.gib * (1 << 30)))
        print(f"made a LOG of {info['log_bytes'] / 1e6:.0f} MB ({info['payload'] / 1e6:.0f} MB "
              f"payload) in {time.monotonic() - t0:.0f} s", flush=True)
        with open(os.path.join(base, "log.json"), "w") as f:
            json.dump(info, f)
    with open(os.path.join(base, "log.json")) as f:
        info = json.load(f)
    # warm the page cache: the tracer ships what it just wrote
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name), "rb") as f:
            while f.read(8 << 20):
                pass
    srv_tls, cli_tls = tls_dirs(base)
    rows: list[dict] = []
    kinds = (("tls", "TLS 1.3", "tls"), ("plain", "plain TCP (--insecure)", None),
             ("discard-tls", "discard receiver, TLS (shipper ceiling)", "discard-tls"),
             ("discard", "discard receiver, plain (shipper ceiling)", "discard"))
    wanted = args.transports.split(",")
    trees: list[tuple[str, str | None]] = [("now", None)]
    if args.before:   # each named by its directory
        trees = [("now", ROOT)] + [(os.path.basename(os.path.abspath(b)), os.path.abspath(b))
                                   for b in args.before]
    for key, label, tls in kinds:
        if key not in wanted:
            continue
        for r in range(args.rounds):
            # with --before: every checkout's shipper in a child process, in turns (who goes
            # first moves on each round)
            order = trees[r % len(trees):] + trees[:r % len(trees)]
            for tname, tree in order:
                if tls and tls.startswith("discard"):
                    from blkrewind import tlsconf
                    ctx = tlsconf.server_context(srv_tls) if tls == "discard-tls" else None
                    recv = DiscardReceiver(ctx)
                    res = ship_once(log_dir, recv.port, cli_tls if ctx else None, None,
                                    args.conns, tree)
                    recv.close()
                else:
                    store = os.path.join(base, f"store-{len(rows)}")
                    shutil.rmtree(store, ignore_errors=True)
                    port = free_port()
                    srv = Serve(store, port, srv_tls if tls else None, tree or ROOT)
                    spy = None
                    if args.profile:   # py-spy on serve (it costs CPU of its own: not for numbers)
                        spy = subprocess.Popen(
                            [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record",
                             "-p", str(srv.p.pid), "-f", "raw", "-r", "50",
                             *(["--native"] if args.native else []), "-o",
                             f"{args.profile}.{key}.{tname}.{r + 1}.txt"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        res = ship_once(log_dir, port, cli_tls if tls else None, srv.p.pid,
                                        args.conns, tree)
                    finally:
                        if spy is not None:
                            spy.send_signal(signal.SIGINT)
                            spy.wait(60)
                        srv.stop()
                    if args.verbose:
                        sys.stderr.write("".join(srv.lines))
                    shutil.rmtree(store, ignore_errors=True)
                mb = res["log_bytes"] / 1e6
                row = {"transport": label, "tree": tname, "round": r + 1,
                       "seconds": round(res["s"], 2), "log_MBps": round(mb / res["s"]),
                       "payload_MBps": round(info["payload"] / 1e6 / res["s"]),
                       "shipper_cpu_pct": round(100 * res["shipper_cpu"] / res["s"]),
                       "server_cpu_pct": round(100 * res["server_cpu"] / res["s"]),
                       "shipper_cpu_s_per_GB": round(res["shipper_cpu"] / mb * 1000, 2),
                       "server_cpu_s_per_GB": round(res["server_cpu"] / mb * 1000, 2),
                       "server_minflt_per_GB": round(res["server_faults"] / mb * 1000),
                       "resent": res["sent"] - res["log_bytes"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.before:
        compare(rows, [t for t, _ in trees])
    return rows


def compare(rows: list[dict], trees: list[str]) -> None:
    """Per transport, each checkout's medians, and now / each other checkout."""
    cols = ("payload_MBps", "shipper_cpu_s_per_GB", "server_cpu_s_per_GB")
    for label in dict.fromkeys(r["transport"] for r in rows):
        med = {}
        for tname in trees:
            got = [r for r in rows if r["transport"] == label and r["tree"] == tname]
            med[tname] = {c: sorted(r[c] for r in got)[len(got) // 2] for c in cols}
        print(f"{label}, medians of {len(got)}:", flush=True)
        for c in cols:
            print(f"  {c}: " + ", ".join(f"{t} {med[t][c]}" for t in trees) + "; now / " +
                  ", ".join(f"{t} {med['now'][c] / med[t][c]:.2f}" for t in trees[1:]
                            if med[t][c]), flush=True)


# ------------------------------------------------------------------------------ RPO
def rpo(args, base: str) -> dict:
    from blkrewind.tracer.control import ask
    srv_tls, cli_tls = tls_dirs(base)
    img = os.path.join(base, "rpo.img")
    with open(img, "wb") as f:
        f.truncate(args.device_mb << 20)
    loop = subprocess.run(["losetup", "--find", "--show", "--direct-io=on", img],
                          capture_output=True, text=True, check=True).stdout.strip()
    store, log_dir = os.path.join(base, "rpo-store"), os.path.join(base, "rpo-log")
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(log_dir, ignore_errors=True)
    port = free_port()
    srv = Serve(store, port, srv_tls)
    stats_json = os.path.join(base, "rpo-stats.json")
    tr = None
    try:
        tr = subprocess.Popen([*CLI, "trace", "--device", loop, "--log", log_dir,
                               "--ship", f"127.0.0.1:{port}", "--tls", cli_tls,
                               "--stats-json", stats_json], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        tr_err = tr.stderr
        assert tr_err is not None, "started with stderr=PIPE"
        threading.Thread(target=lambda: lines.extend(tr_err), daemon=True).start()
        deadline = time.monotonic() + 120
        while not any("baseline of" in ln for ln in lines):
            if tr.poll() is not None or time.monotonic() > deadline:
                sys.exit("trace did not start:\n" + "".join(lines))
            time.sleep(0.05)
        ctl = f"/run/blkrewind/trace-{tr.pid}.sock"
        # let the baseline drain first
        while ask(ctl, {"op": "status"})["shipper"]["frames_unacked"] > 2:
            time.sleep(0.1)
        fio = subprocess.Popen(["fio", "--name=rpo", f"--filename={loop}", "--rw=randwrite",
                                "--bs=1m", "--direct=1", "--ioengine=libaio", "--iodepth=4",
                                f"--rate={args.rate_mb}m", "--time_based",
                                f"--runtime={args.seconds}", "--output-format=json"],
                               stdout=subprocess.PIPE, text=True)
        ages = []
        t0 = time.monotonic()
        while fio.poll() is None:
            st = ask(ctl, {"op": "status"})["shipper"]
            if time.monotonic() - t0 > 1.0:   # skip fio's start-up
                ages.append(st["oldest_unacked_age_s"])
            time.sleep(0.1)
        assert fio.stdout is not None, "started with stdout=PIPE"
        out = json.loads(fio.stdout.read())
        wrote = out["jobs"][0]["write"]["io_bytes"]
        final = ask(ctl, {"op": "status"})
        tr.send_signal(signal.SIGINT)
        tr.wait(120)
    finally:
        if tr is not None and tr.poll() is None:
            tr.kill()
            tr.wait()
        srv.stop()
        subprocess.run(["losetup", "-d", loop])
    with open(stats_json) as sf:
        stats = json.load(sf)
    ages.sort()
    lag = final["shipper"]

    def pct(v, q):
        return v[min(len(v) - 1, int(q * len(v)))] if v else None
    res = {"rate_MBps_offered": args.rate_mb, "fio_MBps": round(wrote / 1e6 / args.seconds),
           "seconds": args.seconds, "samples": len(ages),
           "oldest_unacked_age_p50_s": pct(ages, 0.5), "oldest_unacked_age_p99_s": pct(ages, 0.99),
           "oldest_unacked_age_max_s": ages[-1] if ages else None,
           "frame_lag_p50_s": lag["lag_p50_s"], "frame_lag_p99_s": lag["lag_p99_s"],
           "frame_lag_max_s": lag["lag_max_s"], "frame_lag_samples": lag["lag_samples"],
           "drops": stats.get("drops"), "reconnects": lag["reconnects"],
           "unacked_at_end": stats.get("shipper", {}).get("frames_unacked")}
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["throughput", "rpo", "all"], default="all")
    ap.add_argument("--dir", default=None, help="work directory (default: a new one in /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--gib", type=float, default=2.0, help="payload of the throughput LOG")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--conns", type=int, default=2)
    ap.add_argument("--transports", default="tls,plain,discard-tls,discard",
                    help="throughput: which of tls,plain,discard-tls,discard to run")
    ap.add_argument("--profile", default=None, metavar="PREFIX",
                    help="throughput: py-spy (raw) profile of serve to PREFIX.KIND.ROUND.txt")
    ap.add_argument("--native", action="store_true", help="--profile: with native frames")
    ap.add_argument("--verbose", action="store_true", help="throughput: print serve's log")
    ap.add_argument("--before", metavar="TREE", action="append",
                    help="throughput: another checkout (e.g. git archive COMMIT | tar -x -C "
                         "DIR; may be given again) shipping and serving in turns with this "
                         "one, each shipper in a child process that imports its checkout")
    ap.add_argument("--rate-mb", type=int, default=100)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--device-mb", type=int, default=1024)
    args = ap.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="bench-ship-", dir="/var/tmp")
    os.makedirs(base, exist_ok=True)
    try:
        if args.mode in ("throughput", "all"):
            throughput(args, base)
        if args.mode in ("rpo", "all"):
            rpo(args, base)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
