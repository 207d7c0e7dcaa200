"""Progress of the baseline (issue 13): `trace` says percent, rate and ETA in its log while it
reads a device whole, and `status` shows the baseline's progress meanwhile (BPF)."""
from __future__ import annotations

import json
import re
import time

import pytest
from tracerproc import TraceProc, cli

LINE = re.compile(r"baseline progress (\S+): (\d+)% \((\d+) MiB of (\d+) MiB\) at (\d+) MiB/s, "
                  r"ETA (\S+ (s|min|h)|\?)")


@pytest.mark.bpf
def test_baseline_progress_in_the_log_and_in_status(make_loop, tmp_path, monkeypatch):
    dev = make_loop(384, fill="random")
    monkeypatch.setenv("BLKREWIND_PROGRESS_S", "0.1")
    log = tmp_path / "log"
    from blkrewind.tracer.control import ask
    seen: list[dict] = []
    table: list[str] = []
    with TraceProc([dev], log, wait_for="live") as tr:
        sock = f"/run/blkrewind/trace-{tr.p.pid}.sock"
        deadline = time.monotonic() + 120
        while not any("baseline of" in ln for ln in tr.lines) and time.monotonic() < deadline:
            pr = ask(sock, {"op": "status"}, timeout=10).get("progress")
            if pr:
                seen.append(pr)
                if not table and pr["done_bytes"]:  # what a user sees in `status` meanwhile
                    table.append(cli("status", "--log", log).stdout)
            time.sleep(0.05)
        assert any("baseline of" in ln for ln in tr.lines), tr.stderr
        st = json.loads(cli("status", "--log", log, "--format", "json").stdout)
        assert st["tracers"][0]["progress"] is None   # done: nothing in progress
        lines = [m for m in map(LINE.search, tr.lines) if m]
        assert tr.stop() == 0, tr.stderr
    assert lines, tr.stderr
    for m in lines:
        assert m[1] == str(dev) and m[4] == "384" and 0 <= int(m[2]) <= 100
    assert seen
    if not table:  # every sample said 0 bytes (on a loaded machine the baseline may be
        pass       # done before the next one): the log lines below show it advance
    elif "baseline of" not in table[0]:  # finished before that status' second sample
        assert "ok" in table[0]
    else:
        assert re.search(r"baseline of \S+: \d+% at [\d.]+ MiB/s, ETA", table[0]), table[0]
    for pr in seen:
        assert pr["what"] == "baseline" and pr["device"] == str(dev)
        assert pr["total_bytes"] == 384 << 20 and 0 <= pr["done_bytes"] <= pr["total_bytes"]
        if pr["done_bytes"]:  # (a sample taken before the first chunk was read says 0)
            assert pr["rate_Bps"] > 0 and pr["eta_s"] is not None
    # and it advances
    assert [pr["done_bytes"] for pr in seen] == sorted(pr["done_bytes"] for pr in seen)
    assert seen[-1]["done_bytes"] > 0 or (not table and any(int(m[3]) > 0 for m in lines)), \
        (seen, tr.stderr)


@pytest.mark.bpf
def test_baseline_progress_on_a_terminal_is_one_line_rewritten(make_loop, tmp_path):
    """On a terminal the progress line is rewritten in place (CR, erase line) every second,
    and cleared before the next message."""
    import os

    from tracerproc import run_on_pty

    dev = make_loop(384, fill="random", dio=True)  # read from the disk: a few seconds
    text = run_on_pty(["trace", "--device", dev, "--log", tmp_path / "log", "--", "true"],
                      env=dict(os.environ, BLKREWIND_PROGRESS_S="100"))
    assert "baseline of" in text, text
    ticks = re.findall(r"\r\x1b\[Kblkrewind trace: baseline progress \S+: \d+%", text)
    if "in 0." not in text.split("baseline of", 1)[1][:80]:  # it took a second or more
        assert ticks, text
    # no progress line is left behind a later message: each message starts on a clean line
    assert "\r\x1b[Kblkrewind trace: baseline of" in text
