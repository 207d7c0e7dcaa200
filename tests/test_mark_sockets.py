"""`blkrewind mark --log DIR` beside a tracer whose control socket does not answer (a stopped,
hung or dying tracer of another LOG): the mark goes to the tracer of DIR and succeeds. The
power-cut test (tests/test_powercut.py) hit it on a shared machine: the mark was set, and
`mark` exited 2 for the other tracer's "Connection refused"."""
from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from blkrewind import cli
from blkrewind.tracer import control


def _fake_tracer(path: str, log: str, got: list) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                req = json.loads(c.makefile("rb").readline())
                got.append(req)
                ans = {"op": "status", "log": log, "pid": os.getpid()} if req["op"] == "status" \
                    else {"ok": True, "stamp": 7, "session": "s", "log": log, "baseline_done": True}
                c.sendall(json.dumps(ans).encode() + b"\n")
    threading.Thread(target=serve, daemon=True).start()
    return srv


@pytest.mark.skipif(os.geteuid() != 0, reason="mark runs as root")
def test_mark_log_beside_a_tracer_that_does_not_answer(tmp_path, monkeypatch, capsys):
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    monkeypatch.setattr(control, "CONTROL_DIR", str(ctl))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(ctl / f"trace-{os.getppid()}.sock"))  # bound, not listening: refused
    got: list = []
    srv = _fake_tracer(str(ctl / f"trace-{os.getpid()}.sock"), str(tmp_path / "log"), got)
    try:
        assert cli.main(["mark", "m1", "--log", str(tmp_path / "log")]) == 0
        assert [r["op"] for r in got] == ["status", "mark"]
        assert "mark 'm1': stamp 7" in capsys.readouterr().out
        # the LOG of no tracer that answered: the error names the one that did not
        assert cli.main(["mark", "m2", "--log", str(tmp_path / "other")]) != 0
        err = capsys.readouterr().err
        assert "no running tracer writes the LOG" in err and "no answer from" in err, err
    finally:
        srv.close()
        dead.close()
