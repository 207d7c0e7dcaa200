"""Prometheus metrics of `trace` and `serve` (`--metrics ADDR:PORT`), CLI layer.

Built on the official client library (prometheus-client). Every value is read at scrape time
by a custom collector from the state the tracer (tracer/session.py, tracer/shipper.py,
tracer/resync.py) or the server (replayer/server.py and its store) keeps anyway: the capture
path counts nothing for the metrics, and a scrape costs a few syscalls (the kernel's counters,
the LOG's segments) or, on `serve`, two small store queries. The names follow Prometheus'
conventions: a `blkrewind_` prefix, base units (bytes, seconds; times as Unix seconds),
`_total` for counters; labels are bounded (host, device, cause, reason).

The list of metrics with their meaning is docs/operations.md, "Metrics"; the alerting rules
are deploy/prometheus/blkrewind-alerts.yml.
"""
from __future__ import annotations

import time

from blkrewind import __version__
from blkrewind.errors import UserError


def cause_label(cause: str) -> str:
    """A loss cause of tracer/resync.py ("ring full", "BPF run skipped") as a label value
    ("ring_full", "bpf_run_skipped"): new causes get theirs without a table here."""
    return "_".join(cause.lower().split())


def _families():
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    return CounterMetricFamily, GaugeMetricFamily


class _Out:
    """Builds metric families of one scrape; skips values that are unknown (None)."""

    def __init__(self, common: dict[str, str]):
        self.C, self.G = _families()
        self.common = common
        self.fams: dict[str, object] = {}

    def _fam(self, kind, name: str, doc: str, labels: tuple[str, ...]):
        f = self.fams.get(name)
        if f is None:
            f = self.fams[name] = kind(name, doc, labels=[*self.common, *labels])
        return f

    def counter(self, name: str, doc: str, value, **labels) -> None:
        f = self._fam(self.C, name, doc, tuple(labels))  # name without _total: the client adds it
        if value is not None:
            f.add_metric([*self.common.values(), *labels.values()], float(value))

    def gauge(self, name: str, doc: str, value, **labels) -> None:
        f = self._fam(self.G, name, doc, tuple(labels))
        if value is not None:
            f.add_metric([*self.common.values(), *labels.values()], float(value))

    def families(self):
        return list(self.fams.values())


def _guarded(collector):
    """A collector's families; if reading the state fails (a tracer stopping meanwhile, a
    store error), blkrewind_metrics_error 1 instead and one line in the log per new error
    (a traceback from the HTTP thread would say nothing more, and an error page would only
    turn the target down)."""
    _, G = _families()
    try:
        fams = list(collector._collect())
    except Exception as e:
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]
        if collector.say is not None and why not in collector._said and len(collector._said) < 100:
            collector._said.add(why)
            collector.say(f"metrics: cannot read the state: {why}")
        g = G("blkrewind_metrics_error", "1 when this scrape could not read the state "
              "(the log says why).")
        g.add_metric([], 1.0)
        yield g
        return
    yield from fams
    g = G("blkrewind_metrics_error", "1 when this scrape could not read the state "
          "(the log says why).")
    g.add_metric([], 0.0)
    yield g


# ------------------------------------------------------------------------------ trace
class TracerCollector:
    """The metrics of one running `blkrewind trace` (tracer.session.Tracer)."""

    def __init__(self, tracer, say=None):
        self.t = tracer
        self.say = say
        self.started = time.time()
        self._said: set[str] = set()

    def describe(self):
        return []   # unchecked collector: names vary with the tracer's configuration

    def collect(self):
        yield from _guarded(self)

    def _collect(self):
        from blkrewind.formats.logframe import list_segments
        from blkrewind.tracer import pins
        from blkrewind.tracer.resync import _LOSS_COUNTERS  # counter -> cause, as R_LOSS names them

        t = self.t
        st = t.status()
        k = st.get("kernel") or {}
        sh = st.get("shipper") or {}
        o = _Out({"host": str(st.get("host") or "")})
        o.gauge("blkrewind_tracer_info", "Always 1: the tracer's session and version.", 1,
                session=str(st.get("session")), version=__version__)
        o.gauge("blkrewind_tracer_start_time_seconds", "When this tracer started (Unix time).",
                self.started)
        o.gauge("blkrewind_tracer_failed", "1 when the tracer has failed (it stops).",
                int(st.get("failure") is not None))
        o.gauge("blkrewind_traced_devices", "Devices this tracer captures.",
                len(st.get("devices") or []))
        o.gauge("blkrewind_baseline_done", "1 once every device's baseline is in the LOG "
                "(points are restorable from then on).", int(bool(st.get("baseline_done"))))
        o.counter("blkrewind_baseline_bytes", "Bytes read from the devices for the baseline.",
                  t.baseline.bytes)
        o.counter("blkrewind_capture_bytes", "Bytes of writes captured by the kernel side.",
                  k.get("bytes"))
        o.counter("blkrewind_capture_bios", "Write bios captured by the kernel side.",
                  k.get("bios"))
        for key, cause in _LOSS_COUNTERS.items():
            o.counter("blkrewind_records_dropped", "Captures lost, by cause (ring full, "
                      "payload read error, truncated bio, ...: bios; log_full: records). Each "
                      "loss is repaired by a resync, until then nothing after it is "
                      "restorable.", k.get(key), cause=cause_label(cause))
        o.counter("blkrewind_records_dropped", "", st.get("log_full_records"),
                  cause=cause_label("log full"))
        o.counter("blkrewind_dropped_bytes", "Bytes of captures lost, by cause.",
                  k.get("drop_bytes"), cause=cause_label("ring full"))
        o.counter("blkrewind_dropped_bytes", "", st.get("log_full_bytes"),
                  cause=cause_label("log full"))
        o.counter("blkrewind_log_written_bytes", "Bytes written to the LOG's segment files.",
                  st.get("log_bytes"))
        if sh:
            log_bytes, segments = sh.get("log_bytes"), sh.get("segments")
        else:
            segs = list_segments(t.opts.log_dir)
            log_bytes, segments = sum(s.size for s in segs), len(segs)
        o.gauge("blkrewind_log_bytes", "Bytes the LOG's segments take now.", log_bytes)
        o.gauge("blkrewind_log_segments", "Segments in the LOG now.", segments)
        rs = t.resync.status() if getattr(t, "resync", None) is not None else {}
        o.counter("blkrewind_resyncs", "Resyncs completed (regions read again after a loss).",
                  rs.get("resyncs"))
        o.counter("blkrewind_resync_bytes", "Bytes read from the devices by resyncs.",
                  rs.get("resync_bytes"))
        o.gauge("blkrewind_gap_open", "1 while a loss is not yet repaired by a resync (nothing "
                "after it is restorable meanwhile).",
                int(bool(rs.get("pending")) or bool(rs.get("running"))) if rs else None)
        o.gauge("blkrewind_orphaned_captures", "Captures left pinned in the kernel by a dead "
                "tracer on this host (`blkrewind status`; restart trace on that LOG or "
                "`blkrewind detach`).",
                len([p for p in pins.orphans() if p.session != t.session]))
        if sh:
            o.gauge("blkrewind_log_max_bytes", "The LOG's size limit (--log-max-mb).",
                    sh.get("log_max_bytes"))
            o.gauge("blkrewind_log_full", "1 while the LOG is full (new captures are dropped).",
                    int(bool(sh.get("log_full"))))
            o.gauge("blkrewind_unacked_bytes", "LOG bytes not yet acknowledged by the replayer.",
                    sh.get("bytes_unacked"))
            o.gauge("blkrewind_unacked_frames", "LOG frames not yet acknowledged.",
                    sh.get("frames_unacked"))
            o.gauge("blkrewind_oldest_unacked_age_seconds", "Age of the oldest LOG frame the "
                    "replayer has not acknowledged: the RPO (0 when all is acknowledged).",
                    sh.get("oldest_unacked_age_s"))
            o.gauge("blkrewind_ship_connections", "Connections to the replayer configured.",
                    sh.get("connections"))
            o.gauge("blkrewind_ship_connections_up", "Connections to the replayer up now.",
                    sh.get("connections_up"))
            o.counter("blkrewind_ship_sent_bytes", "Bytes of LOG frames sent to the replayer.",
                      sh.get("bytes_sent"))
            o.counter("blkrewind_ship_reconnects", "Connections to the replayer made again.",
                      sh.get("reconnects"))
            o.counter("blkrewind_log_segments_deleted", "Acknowledged segments deleted by "
                      "retention.", sh.get("segments_deleted"))
        yield from o.families()


# ------------------------------------------------------------------------------ serve
class ServerCollector:
    """The metrics of one running `blkrewind serve` (replayer.server.Server)."""

    def __init__(self, server, say=None):
        self.s = server
        self.say = say
        self._said: set[str] = set()

    def describe(self):
        return []

    def collect(self):
        yield from _guarded(self)

    def _collect(self):
        from blkrewind.commands.status import _host_summary, store_hosts

        srv = self.s
        st = srv.status()
        now_ns = time.time_ns()
        o = _Out({})
        o.gauge("blkrewind_serve_info", "Always 1: the server's id and version.", 1,
                server=str(st.get("server")), version=__version__)
        o.gauge("blkrewind_serve_start_time_seconds", "When this server started (Unix time).",
                st["started_ns"] / 1e9)
        o.gauge("blkrewind_serve_connections", "Tracer connections open now.",
                len(st.get("connections") or []))
        o.counter("blkrewind_serve_accepted_connections", "Connections accepted.",
                  st["totals"].get("connections"))
        with srv._totals_lock:
            refused = dict(srv.refused)
            ingested = {h: list(v) for h, v in srv.ingested.items()}
            restores = {d: list(v) for d, v in srv.restores.items()}
        for why in ("too_many_connections", "tls_handshake", "protocol_violation", "timeout",
                    "store_unavailable", "internal_error"):
            o.counter("blkrewind_serve_refused_connections", "Connections refused or cut by "
                      "the server, by reason.", refused.get(why, 0), reason=why)
        o.counter("blkrewind_store_errors", "Failures of the store while storing frames "
                  "(frames are refused for --store-retry seconds after each).", srv.store_errors)
        o.gauge("blkrewind_store_error", "1 while the store refuses frames after a failure.",
                int(st.get("store_error") is not None))
        o.counter("blkrewind_integrity_problems", "Problems found by the store's integrity "
                  "checks (quick check at start, full check after).", srv.integrity_problems)
        for host, (frames, nbytes) in sorted(ingested.items()):
            o.counter("blkrewind_ingest_frames", "LOG frames received and stored, per host.",
                      frames, host=host)
            o.counter("blkrewind_ingest_bytes", "Bytes of LOG frames received and stored.",
                      nbytes, host=host)
        for device, (n, nbytes, secs) in sorted(restores.items()):
            o.counter("blkrewind_restores", "Restores of the device from this store while "
                      "the server ran (`blkrewind restore` tells it when done).", n,
                      device=device)
            o.counter("blkrewind_restore_bytes", "Bytes of device images restored.", nbytes,
                      device=device)
            o.counter("blkrewind_restore_seconds", "Seconds spent restoring.", secs,
                      device=device)
        # the tracers' own view, from their STATUS messages (also without scraping them)
        conns: dict[str, int] = {}
        for c in st.get("connections") or []:
            if c.get("host"):
                conns[c["host"]] = conns.get(c["host"], 0) + 1
        for host, v in sorted((st.get("hosts") or {}).items()):
            h = _host_summary(host, v.get("status") or {}, v.get("received_ns"), now_ns)
            o.gauge("blkrewind_host_connections", "Connections of the host now.",
                    conns.get(host, 0), host=host)
            o.gauge("blkrewind_host_status_age_seconds", "Seconds since the host's tracer last "
                    "reported its status (grows when it died or cannot connect).",
                    h["status_age_s"], host=host)
            o.gauge("blkrewind_host_unacked_bytes", "LOG bytes of the host not yet "
                    "acknowledged (as its tracer last reported).", h["unacked_bytes"], host=host)
            o.gauge("blkrewind_host_oldest_unacked_age_seconds", "Age of the host's oldest "
                    "unacknowledged frame when its tracer last reported (its RPO).",
                    h["oldest_unacked_age_s"], host=host)
            o.gauge("blkrewind_host_log_full", "1 when the host's LOG is full.",
                    int(bool(h["log_full"])), host=host)
            o.counter("blkrewind_host_records_dropped", "Captures the host's kernel side "
                      "dropped (ring full), as its tracer last reported.", h["drops"], host=host)
        store = srv.store
        if store is None:
            yield from o.families()
            return
        hosts = store_hosts(store, now_ns, rates=False)
        gw = store.gap_window_counts()
        for host, h in sorted(hosts.items()):
            for d in h["devices"]:
                lab = {"host": host, "device": str(d["device"])}
                o.gauge("blkrewind_watermark_lag_seconds", "Now minus the time of the "
                        "device's consistent watermark (everything before it is stored and "
                        "complete); absent once the session ended.", d["lag_s"], **lab)
                o.gauge("blkrewind_watermark_timestamp_seconds", "Time of the device's "
                        "consistent watermark (Unix time).",
                        None if d["watermark_ns"] is None else d["watermark_ns"] / 1e9, **lab)
                o.gauge("blkrewind_restorable_to_timestamp_seconds", "Time of the newest "
                        "restorable point of the device (Unix time).",
                        None if not d.get("restorable_to_ns") else d["restorable_to_ns"] / 1e9,
                        **lab)
                n, open_ = gw.get((d["session"], d.get("dev")), (0, 0))
                o.gauge("blkrewind_gap_windows", "Gap windows in the device's newest session "
                        "(closed by a resync or still open).", n, **lab)
                o.gauge("blkrewind_gap_open", "1 while the device's stored history has a "
                        "gap not closed yet (nothing after it is restorable): a loss until "
                        "its resync is stored, or for a moment a frame not stored yet.",
                        int(open_ > 0), **lab)
                o.gauge("blkrewind_session_ended", "1 when the device's newest session has "
                        "ended (its tracer stopped).", int(d["ended"] is not None), **lab)
        yield from o.families()


# ------------------------------------------------------------------------------ endpoint
class Endpoint:
    """The HTTP endpoint (/metrics) of one collector, in a thread of its own."""

    def __init__(self, addr: str, collector):
        from prometheus_client import start_http_server
        from prometheus_client.registry import CollectorRegistry

        host, port = _parse(addr)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        # the client's process_* metrics (CPU seconds, memory, open fds) from /proc/self
        from prometheus_client import ProcessCollector
        ProcessCollector(registry=self.registry)
        try:
            self.httpd, self.thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise UserError(f"--metrics {addr}: {e.strerror or e}") from None
        a = self.httpd.server_address
        self.address = (a[0], a[1])
        self.url = f"http://{_fmt(str(a[0]), a[1])}/metrics"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse(addr: str) -> tuple[str, int]:
    """ADDR:PORT ([v6]:PORT) for --metrics; port 0: any free port."""
    from blkrewind import tlsconf

    a = addr.strip()
    if a.endswith(":0"):
        host, _ = tlsconf.parse_addr(a[:-1] + "1")
        return host, 0
    return tlsconf.parse_addr(a)


def add_argument(p, what: str) -> None:
    """The --metrics option of `trace` and `serve`."""
    port = 9741 if what == "tracer" else 9742   # the ports docs/operations.md uses
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help=f"serve Prometheus metrics of this {what} on http://ADDR:PORT/metrics "
                        f"(plain HTTP: bind to loopback or a management network; e.g. "
                        f"127.0.0.1:{port}; port 0: any free port, logged). Default: off; "
                        f"docs/operations.md lists the metrics")


def start(addr: str | None, collector, say) -> Endpoint | None:
    if not addr:
        return None
    ep = Endpoint(addr, collector)
    say(f"metrics on {ep.url}")
    return ep


