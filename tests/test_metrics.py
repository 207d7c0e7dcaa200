"""Metrics (blkrewind/metrics.py) as an operator gets them: a real Prometheus server (Debian's
binary) scrapes a running `blkrewind serve` and a running `blkrewind trace` (real BPF on a loop
device, shipping over mutual TLS on loopback), the values are read back through Prometheus'
HTTP API; the alerting rules are checked with promtool and evaluated by that Prometheus."""
from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tracerproc import BLKREWIND, ROOT, TraceProc, cli, direct_writes

RULES = ROOT / "deploy" / "prometheus" / "blkrewind-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "blkrewind-alerts.test.yml"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing (Debian's prometheus package; bootstrap.sh installs it)")
    return path


def test_promtool_checks_the_alerting_rules():
    r = subprocess.run([_tool("promtool"), "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr
    # the rules' unit tests: each alert fires when it should and not before
    r = subprocess.run([_tool("promtool"), "test", "rules", RULE_TESTS.name],
                       capture_output=True, text=True, timeout=60, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Proc:
    """A process whose stderr is kept; killed at the end whatever happens."""

    def __init__(self, args, **kw):
        import threading
        self.lines: list[str] = []
        self.p = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                                  **kw)
        err = self.p.stderr
        assert err is not None, "started with stderr=PIPE"
        self._t = threading.Thread(target=lambda: self.lines.extend(err), daemon=True)
        self._t.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, what: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for ln in list(self.lines):
                if what in ln:
                    return ln
            if self.p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {what!r} (exit {self.p.poll()}):\n{self.text}")
            time.sleep(0.05)

    def stop(self, sig=None, timeout: float = 30) -> int:
        import signal
        if self.p.poll() is None:
            self.p.send_signal(sig or signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)
        self._t.join(5)
        return self.p.returncode


def _query(prom: str, q: str) -> list[dict]:
    url = f"http://{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait_value(prom: str, q: str, ok, timeout: float = 60) -> list[dict]:
    """Poll Prometheus until the query's result satisfies ok(result)."""
    deadline = time.monotonic() + timeout
    res: list[dict] = []
    while time.monotonic() < deadline:
        try:
            res = _query(prom, q)
        except OSError:
            res = []
        if res and ok(res):
            return res
        time.sleep(0.5)
    raise AssertionError(f"Prometheus: {q} -> {res} did not become as expected")


def _v(res: list[dict]) -> float:
    assert len(res) == 1, res
    return float(res[0]["value"][1])


@pytest.mark.bpf
def test_prometheus_scrapes_serve_and_trace(make_loop, tmp_path):
    prometheus = _tool("prometheus")
    dev = make_loop(32)
    tls = tmp_path / "tls"
    cli("tls", "init", tls, "--hosts", "replayer=127.0.0.1,hosta")
    m_serve, m_trace, p_prom = _free_port(), _free_port(), _free_port()
    procs: list[_Proc] = []
    tracer = None
    try:
        srv = _Proc([*BLKREWIND, "serve", "--store", tmp_path / "store", "--listen",
                     "127.0.0.1:0", "--tls", tls / "replayer",
                     "--metrics", f"127.0.0.1:{m_serve}"], cwd=ROOT)
        procs.append(srv)
        port = srv.wait_for("listening on").split("listening on ")[1].split()[0]
        assert f"metrics on http://127.0.0.1:{m_serve}/metrics" in srv.text
        tracer = TraceProc([dev.path], tmp_path / "log", "--tls", tls / "hosta",
                           "--ship", port, "--metrics", f"127.0.0.1:{m_trace}")
        assert f"metrics on http://127.0.0.1:{m_trace}/metrics" in tracer.stderr

        cfg = tmp_path / "prometheus.yml"
        shutil.copy(RULES, tmp_path / RULES.name)
        cfg.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"rule_files: [{RULES.name}]\n"
            "scrape_configs:\n"
            f"  - job_name: blkrewind-serve\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{m_serve}']}}]\n"
            f"  - job_name: blkrewind-trace\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{m_trace}']}}]\n")
        prom = f"127.0.0.1:{p_prom}"
        pp = _Proc([prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address={prom}", "--log.level=warn"], cwd=tmp_path)
        procs.append(pp)

        # both targets up
        _wait_value(prom, 'up{job=~"blkrewind-.*"}',
                    lambda r: len(r) == 2 and all(x["value"][1] == "1" for x in r))
        written = 0
        rng = random.Random(13)
        direct_writes(dev.path, rng, 48, slots=256)          # 48 x 64 KiB, O_DIRECT
        written += 48 * (64 << 10)
        # what the tracer captured and what it shipped
        res = _wait_value(prom, 'blkrewind_capture_bytes_total{job="blkrewind-trace"}',
                          lambda r: _v(r) >= written)
        assert res[0]["metric"]["host"] == "hosta"
        assert _v(_wait_value(prom, "blkrewind_capture_bios_total",
                              lambda r: _v(r) >= 48)) >= 48
        assert _v(_query(prom, "sum(blkrewind_records_dropped_total)")) == 0
        causes = {x["metric"]["cause"] for x in _query(prom, "blkrewind_records_dropped_total")}
        assert {"ring_full", "log_full", "payload_read_error"} <= causes
        assert _v(_query(prom, "blkrewind_baseline_done")) == 1
        assert _v(_query(prom, "blkrewind_baseline_bytes_total")) >= dev.size
        assert _v(_query(prom, "blkrewind_log_segments")) >= 1
        # everything acknowledged: RPO 0, and the replayer stored at least what was written
        # (in one scrape: the tracer's own records keep making new frames now and then)
        _wait_value(prom, "blkrewind_unacked_bytes + blkrewind_oldest_unacked_age_seconds",
                    lambda r: _v(r) == 0)
        assert _v(_query(prom, "blkrewind_ship_connections_up")) >= 1
        log_bytes = _v(_query(prom, "blkrewind_log_written_bytes_total"))
        assert log_bytes > written   # the writes are random bytes: lz4 cannot shrink them
        _wait_value(prom, 'blkrewind_ingest_bytes_total{host="hosta"}',
                    lambda r: _v(r) >= written)
        sent = _v(_query(prom, "blkrewind_ship_sent_bytes_total"))
        assert sent >= written
        # the replayer's view of the host and of the device
        assert _v(_query(prom, 'blkrewind_host_connections{host="hosta"}')) >= 1
        assert _v(_wait_value(prom, 'blkrewind_host_status_age_seconds{host="hosta"}',
                              lambda r: True)) < 30
        name = Path(dev.path).name
        lag = _wait_value(prom, f'blkrewind_watermark_lag_seconds{{device="hosta:{name}"}}',
                          lambda r: _v(r) < 30)
        assert lag[0]["metric"]["host"] == "hosta"
        wm = _v(_query(prom, f'blkrewind_watermark_timestamp_seconds{{device="hosta:{name}"}}'))
        assert abs(wm - time.time()) < 60
        # a stamp whose frame is not stored yet is a gap for a moment (seen once under load,
        # with nothing dropped): it must close
        _wait_value(prom, f'blkrewind_gap_open{{device="hosta:{name}"}}', lambda r: _v(r) == 0)
        assert _v(_query(prom, "blkrewind_integrity_problems_total")) == 0
        assert _v(_query(prom, "blkrewind_serve_connections")) >= 1
        assert [x["value"][1] for x in _query(prom, "blkrewind_metrics_error")] == ["0", "0"]
        # the client library's process metrics of both (the tracer's CPU, say)
        assert len(_query(prom, "process_cpu_seconds_total")) == 2

        # a restore through the running server is counted by it
        cli("restore", "--store", tmp_path / "store", "--device", f"hosta:{name}", "--at",
            "latest", "--to", tmp_path / "restored.img")
        assert (tmp_path / "restored.img").stat().st_size == dev.size
        _wait_value(prom, f'blkrewind_restore_bytes_total{{device="hosta:{name}"}}',
                    lambda r: _v(r) == dev.size)
        assert _v(_query(prom, f'blkrewind_restores_total{{device="hosta:{name}"}}')) == 1

        # a refused connection, counted by reason: a plain TCP peer at the TLS port
        with socket.create_connection(("127.0.0.1", int(port.rsplit(":", 1)[1]))) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            s.settimeout(10)
            try:
                while s.recv(4096):
                    pass
            except OSError:
                pass
        _wait_value(prom, 'blkrewind_serve_refused_connections_total{reason="tls_handshake"}',
                    lambda r: _v(r) == 1)

        # the rules load and evaluate against the real metrics; none fires here
        with urllib.request.urlopen(f"http://{prom}/api/v1/rules", timeout=10) as r:
            groups = json.load(r)["data"]["groups"]
        rules = [x for g in groups for x in g["rules"]]
        assert len(rules) >= 10 and all(x["health"] == "ok" for x in rules), rules
        firing = [x["name"] for x in rules if x["state"] == "firing"]
        assert not firing, firing

        # the tracer stops: the metrics endpoint goes with it (up 0), the session ends
        assert tracer.stop() == 0
        _wait_value(prom, 'up{job="blkrewind-trace"}', lambda r: _v(r) == 0)
        _wait_value(prom, f'blkrewind_session_ended{{device="hosta:{name}"}}',
                    lambda r: _v(r) == 1)
    finally:
        if tracer is not None:
            tracer.__exit__(None, None, None)
        for p in reversed(procs):
            p.stop()
    assert procs[0].p.returncode == 0, procs[0].text


def test_metrics_address_in_use_is_one_line(tmp_path, run_cli, assert_one_line_error):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        cp = run_cli("serve", "--store", tmp_path / "st", "--listen", "127.0.0.1:0",
                     "--insecure", "--metrics", f"127.0.0.1:{port}", check=False, timeout=60)
    assert_one_line_error(cp, "--metrics", "in use")
    assert not (tmp_path / "st").exists()   # refused before the store was made




def _drain(s: socket.socket) -> None:
    """Read until the server closes the connection (or resets it)."""
    s.settimeout(10)
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass


def _scrape(url: str) -> dict[str, float]:
    """The endpoint's samples, parsed by prometheus-client's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_serve_metrics_count_damage_and_refusals(tmp_path, capsys):
    """No BPF: a store ingested from a synthetic LOG, one payload file deleted; `serve` finds
    it at start (integrity problems 1) and counts the connections it refuses, by reason."""
    import os

    from synth import history
    from test_store import ingest

    from blkrewind.replayer.store import Store

    history(tmp_path / "log", seed=7, nbios=120, segment_bytes=128 << 10)
    store = tmp_path / "store"
    ingest(capsys, tmp_path / "log", store)
    st = Store.open(store)
    (path,) = st.query_one("SELECT path FROM payload_files ORDER BY id DESC LIMIT 1")
    st.close()
    os.unlink(store / path)
    mport = _free_port()
    srv = _Proc([*BLKREWIND, "serve", "--store", store, "--listen", "127.0.0.1:0",
                 "--insecure", "--max-conns", "1", "--hello-timeout", "4",
                 "--metrics", f"127.0.0.1:{mport}"], cwd=ROOT)
    try:
        port = int(srv.wait_for("listening on").split("listening on ")[1].split()[0]
                   .rsplit(":", 1)[1])
        url = f"http://127.0.0.1:{mport}/metrics"
        m = _scrape(url)
        assert m["blkrewind_integrity_problems_total"] == 1
        assert m["blkrewind_metrics_error"] == 0
        assert m['blkrewind_serve_refused_connections_total{reason="too_many_connections"}'] == 0
        # the device of the synthetic history: its watermark and its (closed) session
        wm = [v for k, v in m.items() if k.startswith("blkrewind_watermark_timestamp_seconds{")
              and 'host="synth"' in k]
        assert len(wm) == 1 and wm[0] > 0, m
        assert [v for k, v in m.items() if k.startswith("blkrewind_session_ended{")] == [1]
        # one connection that says nothing (held), a second one is refused: too many (the
        # server accepts in order; the first is cut only after --hello-timeout)
        held = socket.create_connection(("127.0.0.1", port))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.settimeout(10)
            assert s.recv(100) == b""
        # the silent one is cut after --hello-timeout
        _drain(held)
        held.close()
        # garbage instead of HELLO: a protocol violation
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"\xff" * 64)
            _drain(s)
        deadline = time.monotonic() + 20
        while True:
            m = _scrape(url)
            got = {r: m[f'blkrewind_serve_refused_connections_total{{reason="{r}"}}']
                   for r in ("too_many_connections", "timeout", "protocol_violation")}
            if got == {"too_many_connections": 1, "timeout": 1, "protocol_violation": 1} \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got == {"too_many_connections": 1, "timeout": 1, "protocol_violation": 1}, \
            (got, srv.text)
    finally:
        assert srv.stop() == 0, srv.text


def test_a_failing_collector_gives_an_error_metric_and_one_log_line():
    """Reading the state fails (here: not a server at all): the endpoint still answers, with
    blkrewind_metrics_error 1, and the reason is logged once, not per scrape."""
    from blkrewind import metrics

    said: list[str] = []
    ep = metrics.start("127.0.0.1:0", metrics.ServerCollector(object(), said.append),
                       said.append)
    assert ep is not None, "an address was given"
    try:
        url = ep.url
        for _ in range(3):
            m = {k: v for k, v in _scrape(url).items() if k.startswith("blkrewind_")}
            assert m == {"blkrewind_metrics_error": 1.0}, m
    finally:
        ep.close()
    assert said[0] == f"metrics on {url}"
    assert len(said) == 2 and said[1].startswith("metrics: cannot read the state: "
                                                 "AttributeError"), said
