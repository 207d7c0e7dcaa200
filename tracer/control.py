"""The control socket of a running tracer: /run/blkrewind/trace-PID.sock (CONTROL_DIR).

One JSON request per connection, one JSON line answered: {"op": "mark", "name", "pid",
"comm"} sets a mark (`blkrewind mark`), {"op": "status"} returns the tracer's status
(`blkrewind status`, `trace` refusing a device traced already). The client's side is ask();
find_tracers() lists the sockets of the tracers running on this host.
"""
from __future__ import annotations

import json
import os
import socket
import threading
from typing import Callable

from blkrewind.errors import UserError

CONTROL_DIR = "/run/blkrewind"


class ControlSocket:
    """Serves one tracer's control socket on a thread. mark(name, pid, comm) and status()
    answer the requests (a UserError is answered as {"ok": false, "error"})."""

    def __init__(self, mark: Callable[[str, int, str], dict], status: Callable[[], dict]):
        self.mark = mark
        self.status = status
        self.path = os.path.join(CONTROL_DIR, f"trace-{os.getpid()}.sock")
        self._sock: socket.socket | None = None

    def start(self) -> None:
        os.makedirs(CONTROL_DIR, mode=0o700, exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        os.chmod(self.path, 0o600)
        s.listen(16)
        self._sock = s
        t = threading.Thread(target=self._serve, args=(s,), name="control", daemon=True)
        t.start()

    def close(self) -> None:
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(30)
                    req = json.loads(conn.makefile("rb").readline(4096) or b"{}")
                    if req.get("op") == "mark":
                        resp = self.mark(str(req["name"]), int(req.get("pid", 0)),
                                         str(req.get("comm", "")))
                    elif req.get("op") == "status":
                        resp = {"ok": True, **self.status()}
                    else:
                        resp = {"ok": False, "error": f"unknown request {req.get('op')!r}"}
                except UserError as e:
                    resp = {"ok": False, "error": str(e)}
                except Exception as e:
                    resp = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                try:
                    conn.sendall(json.dumps(resp).encode() + b"\n")
                except OSError:
                    pass


def find_tracers() -> list[str]:
    try:
        names = sorted(os.listdir(CONTROL_DIR))
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if not (n.startswith("trace-") and n.endswith(".sock")):
            continue
        path = os.path.join(CONTROL_DIR, n)
        pid = n[len("trace-"):-len(".sock")]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            try:  # left behind by a tracer that was killed
                os.unlink(path)
            except OSError:
                pass
            continue
        out.append(path)
    return out


def ask(path: str, req: dict, timeout: float = 60.0) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        line = s.makefile("rb").readline(1 << 20)
    finally:
        s.close()
    if not line:
        raise OSError("no answer")
    return json.loads(line)
