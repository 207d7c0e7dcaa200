"""Serving the image of a device at a point over NBD, with nbdkit.

The NBD server is Debian's nbdkit (well kept, speaks every NBD client's protocol: qemu,
nbd-client, nbdcopy/nbdinfo/nbdfuse, hypervisors) with its Python plugin running
replayer/nbd_plugin.py, which reads through replayer/image.py. The point is resolved and its
index (the visible data pieces, image.save_index) computed in the calling process, which reads
the store as every reader does (`open_for_reading`: read-only, or through `serve`'s query
socket while a server holds the database); nbdkit then only maps and reads payload files. So
an export works while `serve` stores, on a store only read, and several exports of different
points run side by side (one nbdkit each).

--writable adds nbdkit's cow filter: writes land in a sparse overlay nbdkit keeps in a
deleted temporary file (in the export's runtime directory), never in the plugin or the store.

Anything beyond loopback needs TLS (nbdkit --tls=require --tls-verify-peer with the
certificates `blkrewind tls init` makes: the CA signs both ends) or a Unix socket.

Each export has a runtime directory RUN_DIR/<id>/ (index, pid file, socket, TLS links,
overlay) removed when it stops. A directory made for the process that makes it (`export`, and
every point replayer/pointimage.py reads: diff, files, bisect, serve's detector...) holds
OWNER_FILE from its first moment: that process's pid and start time, so that what a killed
process left (its mounts, loop devices, nbdkit and nbdfuse) is known as stale and reaped
(replayer/mounts.py `reap_stale`: serve's start, `blkrewind umount --stale`, listed by `status`).
It keeps OWNER_FILE to its last moment too (`remove_run_dir`: the rest first, then a rename to
GONE<pid>, removed by reap_stale if that process is killed in the middle).
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blkrewind.errors import UserError

if TYPE_CHECKING:
    from blkrewind.replayer.points import Resolved
    from blkrewind.replayer.store import StoreDevice

RUN_DIR = "/run/blkrewind/exports"
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
PLUGIN = os.path.join(ROOT, "replayer", "nbd_plugin.py")
DEFAULT_PORT = 10809
OWNER_FILE = "owner.json"
UNBORN = ".new-"    # a point's runtime directory being made: UNBORN<pid>-<random>
GONE = ".gone-"     # a runtime directory being removed: GONE<pid>-<stamp>-<its name>


@dataclass
class Prepared:
    device: StoreDevice
    resolved: Resolved
    run_dir: str
    index: str
    data_bytes: int


def proc_start(pid: int) -> int | None:
    """A process's start time (clock ticks after boot, /proc/PID/stat field 22): it tells the
    process from a later one given the same pid. None: no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        return int(s.rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _run_dir(name: str, owner: dict | None = None) -> str:
    """A new runtime directory. owner: it belongs to this process (it goes when the process
    does): it appears under its name with OWNER_FILE in it already (this process's pid and
    start time, its command and `owner`'s items), made as UNBORN + pid and renamed, so that a
    process killed at any moment leaves no point unknown to mounts.reap_stale (an UNBORN
    directory of a dead pid holds nothing and is removed)."""
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    base = os.path.join(RUN_DIR, name)
    if owner is None:
        path, k = base, 1
        while True:
            try:
                os.mkdir(path, 0o700)
                return path
            except FileExistsError:
                path, k = f"{base}.{k}", k + 1
    pid = os.getpid()
    tmp = tempfile.mkdtemp(prefix=f"{UNBORN}{pid}-", dir=RUN_DIR)
    try:
        prog = os.path.basename(sys.argv[0]) if sys.argv else ""
        command = (f"blkrewind {sys.argv[1]}" if prog in ("cli.py", "blkrewind")
                   and len(sys.argv) > 1 else prog or "python")
        rec = {"pid": pid, "start": proc_start(pid), "command": command, **owner}
        with open(os.path.join(tmp, OWNER_FILE), "w") as f:
            json.dump(rec, f)
        path, k = base, 1
        while True:
            try:   # onto a name that exists: ENOTEMPTY (every point's directory holds a file)
                os.rename(tmp, path)
                return path
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                path, k = f"{base}.{k}", k + 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_run_dir(d: str, *, tries: int = 50) -> str | None:
    """Remove a runtime directory so that a process killed at any moment of it leaves the
    directory with its OWNER_FILE (a point mounts.reap_stale and `status` find) or a GONE
    directory of its pid (reap_stale removes it once that process is gone), never a directory
    no one can place: what it holds but OWNER_FILE first, then a rename to GONE, then the rest
    (a plain rmtree removed OWNER_FILE among the first: a server SIGKILLed in it left a point's
    directory for good). What cannot be removed (a helper still exiting, something still
    mounted) is tried again every 0.1 s, `tries` times. None: removed (or none was there);
    else why not (the directory is kept under its name, with its OWNER_FILE)."""
    why = ""
    for k in range(tries):
        if k:
            time.sleep(0.1)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            return None
        except OSError as e:
            why = str(e)
            continue
        for n in names:
            if n == OWNER_FILE:
                continue
            p = os.path.join(d, n)
            try:
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                    if os.path.lexists(p):
                        os.rmdir(p)   # (raises why rmtree could not)
                else:
                    os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                why = str(e)
        try:
            if [n for n in os.listdir(d) if n != OWNER_FILE]:
                continue
            tomb = os.path.join(os.path.dirname(d),
                                f"{GONE}{os.getpid()}-{time.time_ns()}-{os.path.basename(d)}")
            os.rename(d, tomb)
        except FileNotFoundError:
            return None
        except OSError as e:
            why = str(e)
            continue
        shutil.rmtree(tomb, ignore_errors=True)
        if not os.path.lexists(tomb):
            return None
        try:
            held = sorted(os.listdir(tomb))
        except OSError as e:
            held = [str(e)]
        return f"cannot remove {tomb} (was {d}): it holds {', '.join(held) or 'nothing'}"
    try:
        held = sorted(os.listdir(d))
    except OSError as e:
        held = [str(e)]
    return f"cannot remove {d}: {why or 'it is not empty'}; it holds {', '.join(held)}"


def prepare(store_path: str, device_spec: str, at: str, *, warn=None,
            run_dir: str | None = None) -> Prepared:
    """Resolve the point and write its index into a new runtime directory (or into
    `run_dir`, made by the caller: replayer/mounts.py starts nbdkit there first)."""
    from blkrewind.replayer import points
    from blkrewind.replayer.query import open_for_reading

    point = points.parse_point(at)
    with open_for_reading(store_path) as store:
        device = store.find_device(device_spec)
        r = points.resolve(store, device, point, warn=warn)
        return prepare_resolved(store, device, r, run_dir=run_dir)


def prepare_resolved(store, device, r, *, run_dir: str | None = None) -> Prepared:
    """`prepare` for a point already resolved (points.Resolved) in a store the caller has
    open (replayer/pointimage.py)."""
    from blkrewind.replayer import image, rebuild

    pl = rebuild.plan(store, r.session, r.dev, r.stamp, r.size_bytes)
    d = run_dir or _run_dir(f"{device.device.replace(':', '_').replace('/', '_')}-{r.stamp}-"
                            f"{os.getpid()}",
                            owner={"store": os.path.abspath(getattr(store, "path", "") or "."),
                                   "device": device.device, "stamp": int(r.stamp)})
    try:
        idx = os.path.join(d, "index.npz")
        image.save_index(idx, pl)
    except BaseException:
        if run_dir is None:
            remove_run_dir(d)
        raise
    return Prepared(device, r, d, idx, pl.data_bytes)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UserError(f"--listen {text!r}: give an IP address and a port, e.g. "
                        f"127.0.0.1:{DEFAULT_PORT}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--listen {text!r}: the port must be 1-65535")
    return host, int(port)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def tls_links(run_dir: str, tls_dir: str) -> str:
    """nbdkit wants ca-cert.pem, server-cert.pem, server-key.pem: link them to the host
    directory `blkrewind tls init` made (ca.pem, cert.pem, key.pem)."""
    from blkrewind.tlsconf import HOST_FILES
    for f in HOST_FILES:
        if not os.path.isfile(os.path.join(tls_dir, f)):
            raise UserError(f"--tls {tls_dir}: no {f} (give a host directory made by "
                            f"'blkrewind tls init')")
    d = os.path.join(run_dir, "tls")
    os.mkdir(d, 0o700)
    for src, dst in zip(HOST_FILES, ("ca-cert.pem", "server-cert.pem", "server-key.pem")):
        os.symlink(os.path.abspath(os.path.join(tls_dir, src)), os.path.join(d, dst))
    return d


def pypath() -> str:
    """The venv's site-packages and the checkout, for the plugin's sys.path."""
    paths = [ROOT, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    out: list[str] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return ":".join(out)


def nbdkit_argv(prep: Prepared, *, socket_path: str | None, listen: tuple | None,
                writable: bool, tls_dir: str | None, foreground: bool, cache_mib: int = 0,
                threads: int = 16) -> list[str]:
    exe = shutil.which("nbdkit")
    if exe is None:
        raise UserError("nbdkit is not installed (apt-get install nbdkit nbdkit-plugin-python)")
    argv = [exe, "--pidfile", os.path.join(prep.run_dir, "nbdkit.pid"), "--threads", str(threads)]
    if foreground:
        argv += ["--foreground", "--exit-with-parent"]
    else:
        argv += ["--log=stderr"]  # (a daemon nbdkit logs to syslog otherwise)
    if writable:
        argv += ["--filter=cow"]
    else:
        argv += ["--readonly"]
    if socket_path is not None:
        argv += ["--unix", socket_path]
    else:
        if listen is None:
            raise ValueError("nbdkit_argv: neither socket_path nor listen")
        host, port = listen
        argv += ["--ipaddr", host, "--port", str(port)]
    if tls_dir is not None:
        argv += ["--tls=require", f"--tls-certificates={tls_links(prep.run_dir, tls_dir)}",
                 "--tls-verify-peer"]
    argv += ["python", PLUGIN, f"index={prep.index}", f"pypath={pypath()}",
             f"cache_mib={cache_mib}"]
    return argv


def env_for(prep: Prepared) -> dict:
    env = dict(os.environ)
    env["TMPDIR"] = prep.run_dir if not os.environ.get("BLKREWIND_OVERLAY_DIR") \
        else os.environ["BLKREWIND_OVERLAY_DIR"]  # where the cow filter keeps its overlay
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    return env


def wait_ready(proc: subprocess.Popen | None, pidfile: str, timeout: float = 60) -> int:
    """nbdkit writes its pid file once it accepts connections: its pid."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(pidfile) as f:
                txt = f.read().strip()
            if txt.isdigit():
                return int(txt)
        except FileNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise UserError(f"nbdkit failed: {_nbdkit_error(err)}")
        if time.monotonic() > deadline:
            raise UserError("nbdkit did not start within a minute")
        time.sleep(0.01)


def _nbdkit_error(err: str) -> str:
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    for ln in reversed(lines):  # the plugin's own message, if it raised one
        for key in ("UserError: ", "StoreError: ", "NotRestorable: "):
            if key in ln:
                return ln.split(key, 1)[1]
    return lines[-1] if lines else "exited"


def stop_pid(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:  # our child (a failed mount's own nbdkit): reap it
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def uri(socket_path: str | None, listen: tuple | None, tls: bool) -> str:
    if socket_path is not None:
        return f"nbd{'s' if tls else ''}+unix:///?socket={socket_path}"
    if listen is None:
        raise ValueError("uri: neither socket_path nor listen")
    host, port = listen
    h = f"[{host}]" if ":" in host else host
    return f"nbd{'s' if tls else ''}://{h}:{port}"
