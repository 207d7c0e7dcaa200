"""Show how far behind the protected copy is (RPO), per host and device.

On the replayer host:  blkrewind status --store DIR
  per host (from the tracers' STATUS messages while `serve` runs): connections, capture rate,
  LOG size, LOG bytes not yet acknowledged and the age of the oldest unacknowledged frame,
  kernel drops, LOG full; per device (from the store): the consistent watermark (stamp and
  time), lag = now - watermark time, write rate over the last minute of its history, gaps.
On a tracer host:      blkrewind status
  asks the running tracer(s) over their control socket: the same numbers from the tracer's
  side (capture, LOG, shipping).
Both list `blkrewind mount`'s mounts and the points other processes read (diff, files, bisect,
serve's ransomware detector): STALE when that process is gone (killed; `blkrewind umount
--stale` removes what it left, the next `serve` on its store does too).

--watch refreshes (a live view on a terminal; with --format json one object per line), every
--interval seconds. --format json gives one object for monitoring (sizes in bytes, times in
ns since the epoch and ISO 8601, ages in seconds).
"""
from __future__ import annotations

import datetime as _dt
import json
import time
from typing import Any

from blkrewind.errors import UserError
from blkrewind.formats import record

RATE_WINDOW_S = 60


EXAMPLES = """\
  blkrewind status                                  # the tracers on this host
  blkrewind status --store /srv/blkrewind --watch   # the replayer's view, live
  blkrewind status --store /srv/blkrewind --format json | jq '.hosts[].devices[].lag_s'
"""


def add_arguments(p):
    p.add_argument("--store", metavar="DIR",
                   help="the replayer's store (through the running server when there is one); "
                        "without it: the tracers running on this host")
    p.add_argument("--log", metavar="DIR",
                   help="without --store: only the tracer writing this LOG directory")
    p.add_argument("--all", action="store_true",
                   help="without --store: every tracer on this host (needed when several run)")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="output: table (default) or json (one object; sizes in bytes, ages "
                        "in seconds)")
    p.add_argument("--watch", action="store_true", help="refresh every --interval seconds until interrupted")
    p.add_argument("--interval", type=float, default=2.0, metavar="SEC",
                   help="seconds between refreshes with --watch (default 2)")


# ------------------------------------------------------------------------------ helpers
def _iso(ns) -> str | None:
    if not ns:
        return None
    return _dt.datetime.fromtimestamp(ns / 1e9, _dt.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def _size(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _rate(n) -> str:
    return "-" if n is None else f"{_size(n)}/s"


def _age(s) -> str:
    if s is None:
        return "-"
    s = float(s)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _tracer_part(st: dict) -> tuple[dict, dict]:
    """(tracer status, shipper status) from a STATUS body or a control-socket answer."""
    t, s = st.get("tracer"), st.get("shipper")
    tr = t if isinstance(t, dict) else st
    ts = tr.get("shipper")
    sh = s if isinstance(s, dict) else (ts if isinstance(ts, dict) else {})
    return tr, sh


def _capture_rate(kernel: dict | None, prev: dict | None, dt_ns: int | None) -> float | None:
    if not kernel or not prev or not dt_ns or dt_ns <= 0:
        return None
    try:
        return max(0.0, (int(kernel["bytes"]) - int(prev["bytes"])) * 1e9 / dt_ns)
    except (KeyError, TypeError, ValueError):
        return None


def _host_summary(host: str, st: dict, received_ns: int | None, now_ns: int,
                  prev_kernel: dict | None = None, prev_ns: int | None = None) -> dict:
    tr, sh = _tracer_part(st)
    kernel = tr.get("kernel")
    k = kernel if isinstance(kernel, dict) else {}
    return {
        "host": host,
        "session": tr.get("session"),
        "status_age_s": None if not received_ns else round((now_ns - received_ns) / 1e9, 3),
        "capture_rate_Bps": _capture_rate(k, prev_kernel,
                                          None if prev_ns is None or not received_ns
                                          else received_ns - prev_ns),
        "captured_bytes": k.get("bytes"),
        "drops": k.get("drops"),
        "drop_bytes": k.get("drop_bytes"),
        "log_bytes": sh.get("log_bytes", tr.get("log_bytes")),
        "log_max_bytes": sh.get("log_max_bytes"),
        "log_full": bool(sh.get("log_full")),
        "unacked_bytes": sh.get("bytes_unacked"),
        "unacked_frames": sh.get("frames_unacked"),
        "oldest_unacked_age_s": sh.get("oldest_unacked_age_s"),
        "ship_connections_up": sh.get("connections_up"),
        "ship_to": sh.get("ship_to"),
        "ship_error": sh.get("last_error"),
        "failure": tr.get("failure"),
    }


# ------------------------------------------------------------------------------ collect
def collect_store(path) -> dict:
    from blkrewind.replayer.query import open_for_reading

    now_ns = time.time_ns()
    with open_for_reading(path) as store:
        server = store.server_status() if getattr(store, "remote", False) else None
        hosts = store_hosts(store, now_ns)
    return _with_server(path, hosts, server, now_ns)


def store_hosts(store, now_ns: int, rates: bool = True) -> dict[str, dict]:
    """Per host, its devices' watermark, lag, gaps (the newest session of each device) from a
    store (Store or RemoteStore); rates: the write rate over the last RATE_WINDOW_S (a scan of
    the newest records). Also the metrics of `serve` (blkrewind/metrics.py)."""
    rows = store.latest_device_states()
    since = now_ns - RATE_WINDOW_S * 10**9
    rate = store.write_rates(since, record.OP_WRITE) if rates else {}
    gaps = store.gap_counts()
    hosts: dict[str, dict] = {}
    for (host, device, name, session, dev, wm, wm_ns, end_ns, clean, first_gap, gap_reason,
         after_gap, r_to, to_ns, drops) in rows:
        h = hosts.setdefault(host, {"host": host, "devices": []})
        h["devices"].append({
            "device": device, "name": name, "session": session, "dev": dev,
            "watermark": wm, "watermark_ns": wm_ns, "watermark_time": _iso(wm_ns),
            "lag_s": None if wm_ns is None or end_ns is not None
            else round(max(0, now_ns - wm_ns) / 1e9, 3),
            "ended": _iso(end_ns), "clean": clean,
            "restorable_to": r_to, "restorable_to_ns": to_ns, "restorable_to_time": _iso(to_ns),
            "write_rate_Bps": rate.get((session, dev), 0) / RATE_WINDOW_S,
            "gap": first_gap, "gap_reason": gap_reason, "gaps": gaps.get(session, 0),
            "stamps_after_gap": after_gap or 0,
            "drops": drops,
        })
    return hosts


def _with_server(path, hosts: dict, server: dict | None, now_ns: int) -> dict:
    conns: dict[str, int] = {}
    if server is not None:
        for c in server.get("connections", []):
            if c.get("host"):
                conns[c["host"]] = conns.get(c["host"], 0) + 1
        for host, v in (server.get("hosts") or {}).items():
            prev = v.get("prev") or {}
            h = hosts.setdefault(host, {"host": host, "devices": []})
            h["tracer"] = _host_summary(host, v.get("status") or {}, v.get("received_ns"), now_ns,
                                        prev.get("kernel"), prev.get("received_ns"))
    for host, h in hosts.items():
        h["connections"] = conns.get(host, 0) if server is not None else None
    from blkrewind.commands.restore import unfinished
    out: dict[str, Any] = {"store": str(path), "now_ns": now_ns, "now": _iso(now_ns),
           "served": server is not None, "hosts": [hosts[h] for h in sorted(hosts)],
           "unfinished_restores": unfinished(str(path))}
    if server is not None:
        out["server"] = {k: server.get(k) for k in ("server", "pid", "listen", "tls",
                                                     "store_error", "integrity_check",
                                                     "started_ns", "totals")}
        out["server"]["connections"] = len(server.get("connections", []))
        # episodes the server's ransomware detector found (replayer/detector.py)
        out["suspects"] = [{**e, "first_time": _iso(e.get("first_ns")),
                            "detect_time": _iso(e.get("detect_ns")),
                            "last_time": _iso(e.get("last_ns"))}
                           for e in server.get("suspects") or []]
    return out


def collect_tracers(prev: dict | None = None, log: str | None = None,
                    all_: bool = True) -> dict:
    import os

    from blkrewind.commands.mark import several_need_all
    from blkrewind.tracer.control import ask, find_tracers

    now_ns = time.time_ns()
    tracers: list[dict] = []
    socks = find_tracers()
    if log is None:
        socks = several_need_all(socks, all_, ask)
    for path in socks:
        try:
            st = ask(path, {"op": "status"}, timeout=5)
        except (OSError, ValueError) as e:
            tracers.append({"control": path, "error": f"no answer ({e})"})
            continue
        if log is not None and os.path.realpath(str(st.get("log", ""))) != \
                os.path.realpath(log):
            continue
        if not st.get("ok", True):
            tracers.append({"control": path, "error": st.get("error")})
            continue
        tr, _ = _tracer_part(st)
        key = path
        p = (prev or {}).get(key)
        s = _host_summary(str(tr.get("host") or "?"), st, now_ns, now_ns,
                          p and p["kernel"], p and p["ns"])
        s.update({"control": path, "pid": tr.get("pid"), "log": tr.get("log"),
                  "devices": tr.get("devices"), "baseline_done": tr.get("baseline_done"),
                  "progress": tr.get("progress"),
                  "_kernel": tr.get("kernel")})
        tracers.append(s)
    from blkrewind.tracer import pins
    left = [{"session": p.session, "log": p.log_dir, "devices": [x["path"] for x in p.devices],
             "dead_pid": p.pid, "baseline_done": p.baseline_done, "resume_from_stamp": p.safe}
            for p in pins.orphans()]
    return {"now_ns": now_ns, "now": _iso(now_ns), "tracers": tracers, "left_attached": left}


# ------------------------------------------------------------------------------ render
def _store_tables(d: dict):
    from rich.table import Table

    title = f"store {d['store']} at {d['now']}"
    if d.get("served"):
        sv = d["server"]
        title += (f" -- served by pid {sv.get('pid')} on {sv.get('listen')} "
                  f"({'TLS' if sv.get('tls') else 'insecure'}), {sv.get('connections')} "
                  f"connection(s)")
        if sv.get("store_error"):
            title += f" -- STORE ERROR: {sv['store_error']}"
    else:
        title += " -- no server running (store only)"
    hosts = Table(title=title, title_justify="left")
    for col in ("host", "conns", "capture", "LOG", "unacked", "oldest unacked", "drops",
                "status age", "state"):
        wide: dict[str, Any] = {"max_width": 60, "overflow": "fold"} if col == "state" else {}
        hosts.add_column(col, justify="left" if col in ("host", "state") else "right", **wide)
    devs = Table(title="devices", title_justify="left")
    note_width: dict[str, Any] = {"min_width": 30, "max_width": 70, "overflow": "fold"}
    for col in ("device", "session", "watermark", "watermark time", "lag", "rate (1 min)",
                "gaps", "note"):
        devs.add_column(col, justify="left" if col in ("device", "session", "watermark time",
                                                        "note") else "right",
                        **(note_width if col == "note" else {}))
    for h in d["hosts"]:
        t = h.get("tracer")
        if t is not None:
            state = "LOG FULL" if t["log_full"] else (t.get("failure") or t.get("ship_error")
                                                      or "ok")
            hosts.add_row(h["host"], str(h.get("connections") or 0), _rate(t["capture_rate_Bps"]),
                          _size(t["log_bytes"]), _size(t["unacked_bytes"]),
                          _age(t["oldest_unacked_age_s"]), str(t["drops"] or 0),
                          _age(t["status_age_s"]), str(state))
        elif d.get("served"):
            hosts.add_row(h["host"], str(h.get("connections") or 0), "-", "-", "-", "-", "-",
                          "-", "no status received")
        for v in h["devices"]:
            note = ""
            if v["ended"]:
                note = "session ended" + ("" if v["clean"] else " (not clean)")
            if v["gap"] is not None:
                note = (note + "; " if note else "") + f"gap: {v['gap_reason'] or v['gap']}"
                if v.get("stamps_after_gap"):
                    note += (f"; the history goes on past it ({v['stamps_after_gap']} later "
                             f"stamp(s) stored, not restorable)")
            devs.add_row(v["device"], v["session"], str(v["watermark"] or "-"),
                         v["watermark_time"] or "-", _age(v["lag_s"]),
                         _rate(v["write_rate_Bps"]), str(v["gaps"]), note)
    out: list[Any] = [hosts, devs] if (d.get("served") or any(h.get("tracer") for h in d["hosts"])) \
        else [devs]
    for e in d.get("suspects") or []:
        procs = ", ".join(f"{k} {v >> 10} KiB" for k, v in list(e["procs"].items())[:3])
        out.append(f"ALERT: possible ransomware on {e['device']} since {e['first_time']} "
                   f"(detected {e['detect_time']}, last write {e['last_time']}): {procs} "
                   + (f"replaced {e['bytes'] >> 10} KiB of compressible data with random data"
                      if not e.get("files") else
                      f"encrypted {len(e['files'])} files ({e['bytes'] >> 10} KiB) into new "
                      f"files, the originals deleted or rewritten")
                   + f"; last clean point before stamp "
                   f"{(e['before'] + 1) if e.get('before') is not None else e['first_stamp']}: "
                   f"blkrewind suspects "
                   f"--store {d['store']} --device {e['device']}")
    for u in d.get("unfinished_restores") or []:
        state = "in progress" if u["running"] else "INTERRUPTED: the device is INCOMPLETE"
        out.append(f"restore onto {u.get('target')} of {u.get('device')} at {u.get('at')} "
                   f"(pid {u.get('pid')}, started {_iso(u.get('started_ns'))}): {state}")
    return out


def _tracer_table(d: dict):
    from rich.table import Table

    t = Table(title=f"tracers on this host at {d['now']}", title_justify="left")
    for col in ("pid", "host", "session", "devices", "capture", "LOG", "unacked",
                "oldest unacked", "ship conns", "drops", "state"):
        wide: dict[str, Any] = {"max_width": 60, "overflow": "fold"} if col == "state" else {}
        t.add_column(col, **wide)
    for s in d["tracers"]:
        if "error" in s:
            t.add_row("?", "-", "-", s["control"], "-", "-", "-", "-", "-", "-", str(s["error"]))
            continue
        state = "LOG FULL" if s["log_full"] else (s.get("failure") or s.get("ship_error") or "ok")
        pr = s.get("progress")
        if pr:
            from blkrewind.tracer.progress import _eta
            pct = "?" if pr.get("percent") is None else f"{pr['percent']:.0f}%"
            rate = "?" if not pr.get("rate_Bps") else _rate(pr["rate_Bps"])
            state = (f"{pr.get('what')} of {pr.get('device')}: {pct} at {rate}, ETA "
                     f"{_eta(pr.get('eta_s'))}" + ("" if state == "ok" else f"; {state}"))
        t.add_row(str(s.get("pid")), str(s.get("host")), str(s.get("session")),
                  ", ".join(s.get("devices") or []),
                  _rate(s["capture_rate_Bps"]), _size(s["log_bytes"]),
                  _size(s["unacked_bytes"]) if s["ship_to"] else "not shipping",
                  _age(s["oldest_unacked_age_s"]) if s["ship_to"] else "-",
                  str(s.get("ship_connections_up") if s["ship_to"] else "-"),
                  str(s["drops"] or 0), str(state))
    out: list[Any] = [t] if d["tracers"] else []
    for x in d.get("left_attached", []):
        out.append(f"capture left attached by a dead tracer (pid {x['dead_pid']}): session "
                   f"{x['session']}, {', '.join(x['devices'])}, LOG {x['log']}: start `blkrewind "
                   f"trace` on that LOG again to continue it, or `blkrewind detach --log "
                   f"{x['log']}`")
    return out


def _public(d: dict) -> dict:
    if "tracers" in d:
        d = dict(d, tracers=[{k: v for k, v in s.items() if not k.startswith("_")}
                             for s in d["tracers"]])
    return d


def _instant_mounts() -> list:
    from blkrewind.replayer.mounts import registry
    return [{k: m.get(k) for k in ("mountpoint", "device", "how", "at", "fstype", "loop",
                                   "writable", "mounted", "store")} for m in registry()]


def _points() -> list:
    """Points read by processes of their own (diff, files, serve's detector...), stale ones
    (their process is gone) included: replayer/mounts.py owned_points."""
    from blkrewind.replayer.mounts import owned_points
    return [{k: p.get(k) for k in ("run_dir", "command", "pid", "store", "device", "stamp",
                                   "stale", "mounts", "loops")}
            | {"helpers": [f"{c}[{pid}]" for pid, c in p.get("helpers", [])]}
            for p in owned_points()]


def _points_table(ps: list):
    from rich.table import Table
    t = Table(title="points read by processes (diff, files, bisect, serve's detector ...)")
    for c in ("state", "process", "device", "stamp", "store", "holds"):
        t.add_column(c)
    for p in ps:
        holds = [*p["mounts"], *p["loops"], *p["helpers"]]
        t.add_row("STALE: its process is gone (blkrewind umount --stale removes it)"
                  if p["stale"] else "in use",
                  f"{p['command']} (pid {p['pid']})", str(p["device"]), str(p["stamp"]),
                  str(p["store"]), ", ".join(holds) or p["run_dir"])
    return t


def _mounts_table(ms: list):
    from rich.table import Table
    t = Table(title="mounted points (blkrewind mount)")
    for c in ("mount point", "device", "point", "fs", "loop", "mode", "store"):
        t.add_column(c)
    for m in ms:
        t.add_row(m["mountpoint"], str(m["device"]), str(m["how"] or m["at"]),
                  str(m["fstype"] or "-"), str(m["loop"] or "-"),
                  ("writable" if m["writable"] else "read-only")
                  + ("" if m["mounted"] else " (incomplete: blkrewind umount cleans up)"),
                  str(m["store"]))
    return t


def run(args) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:   # the way out of --watch
        if args.watch:
            return 0
        raise


def _run(args) -> int:
    if not args.interval > 0:
        raise UserError("--interval must be positive")
    if args.store and (args.log or args.all):
        raise UserError("--log and --all are for the tracers on this host, not with --store")
    if args.log and args.all:
        raise UserError("--log and --all exclude each other")
    prev: dict = {}

    def collect() -> dict:
        if args.store:
            d = collect_store(args.store)
        else:
            d = collect_tracers(prev, args.log, args.all)
            for s in d["tracers"]:
                if s.get("_kernel"):
                    prev[s["control"]] = {"kernel": s["_kernel"], "ns": d["now_ns"]}
        d["mounts"] = _instant_mounts()  # blkrewind mount (replayer/mounts.py)
        d["points"] = _points()
        return d

    def renderables(d):
        out = _store_tables(d) if args.store else _tracer_table(d)
        if d["mounts"]:
            out = [*(out if isinstance(out, (list, tuple)) else [out]), _mounts_table(d["mounts"])]
        if d["points"]:
            out = [*(out if isinstance(out, (list, tuple)) else [out]), _points_table(d["points"])]
        return out

    if not args.store:
        import os
        if os.geteuid() != 0:
            raise UserError("must run as root to ask the tracers on this host (their control "
                            "sockets are root's); on the replayer host give --store DIR")
        d = collect()
        if not d["tracers"] and not d["left_attached"] and (d["mounts"] or d["points"]) \
                and not args.log:
            args.watch = False
        elif not d["tracers"] and not d["left_attached"]:
            if args.log:
                raise UserError(f"no running tracer writes the LOG {args.log}")
            raise UserError("no tracer is running on this host (give --store DIR on the "
                            "replayer host)")
        if not args.watch:  # a second sample for the capture rate
            time.sleep(min(args.interval, 0.5))
            d = collect()
    else:
        d = collect()
    if args.format == "json":
        print(json.dumps(_public(d), default=str), flush=True)
        while args.watch:
            time.sleep(args.interval)
            print(json.dumps(_public(collect()), default=str), flush=True)
        return 0

    from rich.console import Console, Group

    console = Console()
    if not console.is_terminal:  # pipes and files: no wrapping of the wide tables
        console = Console(width=220)
    if args.watch and console.is_terminal:
        from rich.live import Live

        with Live(Group(*renderables(d)), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(Group(*renderables(collect())), refresh=True)
    for r in renderables(d):
        console.print(r)
    while args.watch:
        time.sleep(args.interval)
        for r in renderables(collect()):
            console.print(r)
    return 0

