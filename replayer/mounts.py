"""`blkrewind mount`: a point's file system, mounted in one command, and torn down again.

The chain, each link its own process or kernel object:

    nbdkit (python plugin, replayer/image.py; + cow filter with --writable)
      -> Unix socket -> nbdfuse (the export as one file, RUN/fuse/image)
      -> loop device (direct I/O on that file) -> the file system at MOUNTPOINT

Read-only mounts use `ro,noload` (ext4) or `ro,norecovery` (xfs): the journal is not replayed,
the image is exactly the point. --writable mounts read-write on the overlay, so the kernel
replays the journal of a crash-consistent point (the overlay is dropped at umount; the store
never sees a write).

The loop-over-FUSE hazard (a loop device writing back dirty pages to a FUSE file whose server
needs memory to make progress, while reclaim waits for that writeback) is designed away: the
loop device uses direct I/O (`losetup --direct-io=on`: its I/O bypasses the FUSE file's page
cache, so no dirty FUSE pages exist to be written back under pressure), nbdfuse and nbdkit are
separate processes from each other and from the caller, a read-only mount writes nothing, and
the writable overlay is nbdkit's cow filter's file on a local file system (TMPDIR of the
export), not behind FUSE. tests/test_mount.py writes through a writable mount inside a memory
cgroup of 160 MiB.

Every step is written to the mount's registry file (REG_DIR/<id>.json) before it is taken, so
a failure or SIGINT at any step undoes exactly what was done (in reverse), and `blkrewind
umount` can also tear down what a killed `mount` left.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

from blkrewind.errors import UserError
from blkrewind.osutil import load_json_dir, save_json

REG_DIR = "/run/blkrewind/mounts"


def _reg_path(mountpoint: str) -> str:
    key = os.path.realpath(mountpoint).strip("/").replace("/", "_") or "_root"
    return os.path.join(REG_DIR, key + ".json")


def _save(reg: dict) -> None:
    save_json(_reg_path(reg["mountpoint"]), reg)


def registry() -> list[dict]:
    return [reg for _, reg in load_json_dir(REG_DIR) if isinstance(reg, dict)]


def lookup(mountpoint: str) -> dict | None:
    try:
        with open(_reg_path(mountpoint)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _run(argv: list[str], what: str, timeout: float = 60) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise UserError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: {argv[0]} did not finish within {timeout:.0f} s") from None
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise UserError(f"{what}: {why}")
    return p.stdout.strip()


PR_SET_IO_FLUSHER = 57


def _io_flusher() -> None:
    """preexec_fn of nbdkit and nbdfuse: they are in the I/O path of the mounted file system.
    PR_SET_IO_FLUSHER (kept across exec, inherited by their threads) makes their allocations
    GFP_NOIO: reclaim never waits on the writeback of pages whose writeback waits on them (a
    memory cgroup of the writer deadlocked nbdfuse in unix_stream_sendmsg -> memcg reclaim ->
    folio_wait_writeback without it). They also leave the caller's memory cgroup for the root
    one (the servers of a mount are not the writer's workload)."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    for procs in ("/sys/fs/cgroup/memory/cgroup.procs", "/sys/fs/cgroup/unified/cgroup.procs",
                  "/sys/fs/cgroup/cgroup.procs"):
        try:
            with open(procs, "w") as f:
                f.write("0")
        except OSError:
            pass


def _wait_pidfile(proc: subprocess.Popen, pidfile: str, what: str, logf: str,
                  timeout: float = 60, daemon: bool = False) -> int:
    """The pid in `pidfile` once the program wrote it (it is ready). daemon: the program
    forks into the background, the process started exits 0 meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(pidfile) as f:
                t = f.read().strip()
            if t.isdigit():
                return int(t)
        except FileNotFoundError:
            pass
        rc = proc.poll()
        if rc is not None and not (rc == 0 and daemon):
            try:
                with open(logf, errors="replace") as f:
                    lines = [ln.strip() for ln in f if ln.strip()]
            except OSError:
                lines = []
            from blkrewind.replayer.export import _nbdkit_error
            raise UserError(f"{what} failed: {_nbdkit_error(chr(10).join(lines))}")
        if time.monotonic() > deadline:
            raise UserError(f"{what} did not start within {timeout:.0f} s")
        time.sleep(0.01)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def check_mountpoint(mp: str) -> str:
    mp = os.path.abspath(mp)
    if not os.path.isdir(mp):
        raise UserError(f"{mp} is not a directory")
    if os.path.ismount(mp):
        raise UserError(f"{mp} is busy: something is mounted there already")
    if lookup(mp) is not None:
        raise UserError(f"{mp} is busy: 'blkrewind mount' set it up already "
                        f"('blkrewind umount {mp}' tears it down)")
    if os.listdir(mp):
        raise UserError(f"{mp} is not empty; mount on an empty directory")
    return mp


def mount(store: str, device: str, at: str, mountpoint: str, *, writable: bool = False,
          fstype: str | None = None, options: str | None = None, warn=None,
          step_hook=None) -> dict:
    """Set the chain up; returns the registry entry. On any failure (or KeyboardInterrupt)
    what was set up is torn down before the exception goes on. `step_hook(name)` (tests) is
    called before each step."""
    from blkrewind.replayer import export

    mp = check_mountpoint(mountpoint)
    hook = step_hook or (lambda name: None)
    reg: dict = {"mountpoint": mp, "store": os.path.abspath(store), "device": device, "at": at,
                 "writable": writable, "pid": os.getpid(), "started_ns": time.time_ns(),
                 "steps": []}
    _save(reg)
    early = None
    try:
        hook("prepare")
        run_dir = export._run_dir(f"mount-{os.getpid()}-{time.time_ns()}")
        reg.update(run_dir=run_dir)
        reg["steps"].append("run_dir")
        _save(reg)
        # nbdkit first: its Python plugin's start-up (numpy, pyarrow) overlaps this process
        # resolving the point and writing its index, which the plugin waits for
        hook("nbdkit")
        early = _start_nbdkit(reg, run_dir, os.path.join(run_dir, "index.npz"),
                              writable=writable, save=_save)
        prep = export.prepare(store, device, at, warn=warn, run_dir=run_dir)
        r = prep.resolved
        reg.update(device=prep.device.device, stamp=r.stamp, session=r.session, how=r.how,
                   size=r.size_bytes)
        _save(reg)
        _nbdkit_ready(reg, early, run_dir, save=_save)
        early = None
        img = _nbdfuse(reg, run_dir, writable=writable, hook=hook, save=_save)

        hook("loop")
        loop = _run(["losetup", "--find", "--show", "--direct-io=on",
                     *([] if writable else ["--read-only"]), img], "losetup")
        reg["loop"] = loop
        reg["steps"].append("loop")
        _save(reg)

        hook("mount")
        fs = fstype or _run(["blkid", "-p", "-o", "value", "-s", "TYPE", loop],
                            "blkid (which file system?)") or None
        if not fs:
            raise UserError(f"no file system found on {reg['device']} at {r.how}")
        opts = []
        if not writable:
            opts.append("ro")
            if fs in ("ext4", "ext3"):
                opts.append("noload")
            elif fs == "xfs":
                opts.append("norecovery")
        if fs == "xfs":
            opts.append("nouuid")  # the original (or another point) may be mounted too
        if options:
            opts.append(options)
        reg["fstype"] = fs
        reg["steps"].append("mount")
        _save(reg)
        _run(["mount", "-t", fs, *(["-o", ",".join(opts)] if opts else []), loop, mp],
             f"mount {fs}")
        reg["mounted"] = True
        reg["pid"] = None
        _save(reg)
        return reg
    except BaseException:
        if early is not None and early.poll() is None:   # still waiting for the index
            early.kill()
            early.wait()
        try:
            teardown(reg, quiet=True)
        except Exception:
            pass
        raise


def serve_file(reg: dict, prep, *, writable: bool, hook=lambda name: None,
               save=lambda reg: None, owned: bool = False) -> str:
    """The nbdkit and nbdfuse steps: the prepared point as one image file (returned), each
    step recorded in `reg` (and `save`d) before it is taken, for `teardown`. Used by `mount`
    and by replayer/pointimage.py (forensics commands reading a point). owned: nbdkit and
    nbdfuse die with this process (parent-death signal; `mount`'s outlive it)."""
    hook("nbdkit")
    p = _start_nbdkit(reg, prep.run_dir, prep.index, writable=writable, save=save, owned=owned)
    _nbdkit_ready(reg, p, prep.run_dir, save=save, owned=owned)
    return _nbdfuse(reg, prep.run_dir, writable=writable, hook=hook, save=save, owned=owned)


PR_SET_PDEATHSIG = 1
_spawn_q: queue.Queue | None = None
_spawn_lock = threading.Lock()


def _spawn(argv: list[str], **kw) -> subprocess.Popen:
    """subprocess.Popen from a thread that lives as long as this process. The parent-death
    signal (PR_SET_PDEATHSIG, _owned_preexec) is sent when the *thread* that started the
    child ends, not the process: serve's detector mounts a point from a thread that ends
    right after, which would kill the point's nbdkit with it."""
    global _spawn_q
    with _spawn_lock:
        if _spawn_q is None:
            _spawn_q = queue.Queue()
            threading.Thread(target=_spawner, args=(_spawn_q,), name="blkrewind-spawner",
                             daemon=True).start()
        q = _spawn_q
    fut: concurrent.futures.Future = concurrent.futures.Future()
    q.put((fut, argv, kw))
    return fut.result()


def _spawner(q: queue.Queue) -> None:
    while True:
        fut, argv, kw = q.get()
        try:
            fut.set_result(subprocess.Popen(argv, **kw))
        except BaseException as e:   # handed to the caller
            fut.set_exception(e)


def _owned_preexec(parent: int, sig: int):
    """preexec_fn of the helpers of a point owned by this process: _io_flusher, and `sig`
    when this process dies (a SIGKILLed serve: its detector's point must not keep running)."""
    def pre() -> None:
        _io_flusher()
        import ctypes
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent:   # it died before the prctl
            os._exit(1)
    return pre


def _start_nbdkit(reg: dict, run_dir: str, index: str, *, writable: bool,
                  save=lambda reg: None, owned: bool = False) -> subprocess.Popen:
    """Start nbdkit serving `index` on run_dir/nbd.sock (the index may come later: the plugin
    waits for it, see nbd_plugin._wait_index). owned: in the foreground, exiting with this
    process (--exit-with-parent); else daemonized (`mount`: it outlives this command)."""

    from blkrewind.replayer import export

    where = SimpleNamespace(run_dir=run_dir, index=index)
    sock = os.path.join(run_dir, "nbd.sock")
    argv = export.nbdkit_argv(where, socket_path=sock, listen=None,  # type: ignore[arg-type]
                              writable=writable, tls_dir=None, foreground=owned)
    if os.environ.get("BLKREWIND_NBDKIT_VERBOSE"):
        argv.insert(1, "--verbose")
    logf = os.path.join(run_dir, "nbdkit.log")
    with open(logf, "wb") as lf:
        kw: dict = dict(stdin=subprocess.DEVNULL, stdout=lf, stderr=lf,
                        env=export.env_for(where),  # type: ignore[arg-type]
                        start_new_session=True)
        if owned:
            p = _spawn(argv, preexec_fn=_owned_preexec(os.getpid(), signal.SIGKILL), **kw)
            reg["nbdkit_pid"] = p.pid   # (in the foreground: it is nbdkit; teardown stops it
                                        # if it never gets ready)
        else:
            p = subprocess.Popen(argv, preexec_fn=_io_flusher, **kw)
    reg["steps"].append("nbdkit")
    save(reg)
    return p


def _nbdkit_ready(reg: dict, p: subprocess.Popen, run_dir: str, *, save=lambda reg: None,
                  owned: bool = False) -> None:
    reg["nbdkit_pid"] = _wait_pidfile(p, os.path.join(run_dir, "nbdkit.pid"), "nbdkit",
                                      os.path.join(run_dir, "nbdkit.log"), daemon=not owned)
    if not owned:
        p.wait()
    save(reg)


def _nbdfuse(reg: dict, run_dir: str, *, writable: bool, hook=lambda name: None,
             save=lambda reg: None, owned: bool = False) -> str:
    """nbdfuse showing the export on run_dir/nbd.sock as run_dir/fuse/image (returned)."""
    sock = os.path.join(run_dir, "nbd.sock")
    hook("nbdfuse")
    fdir = os.path.join(run_dir, "fuse")
    os.mkdir(fdir, 0o700)
    img = os.path.join(fdir, "image")
    exe = shutil.which("nbdfuse")
    if exe is None:
        raise UserError("nbdfuse is not installed (apt-get install nbdfuse)")
    flog = os.path.join(run_dir, "nbdfuse.log")
    fpid = os.path.join(run_dir, "nbdfuse.pid")
    with open(flog, "wb") as lf:
        argv = [exe, "-P", fpid, *([] if writable else ["-r"]), img, "--unix", sock]
        kw: dict = dict(stdin=subprocess.DEVNULL, stdout=lf, stderr=lf, start_new_session=True)
        if owned:
            q = _spawn(argv, preexec_fn=_owned_preexec(os.getpid(), signal.SIGKILL), **kw)
        else:
            q = subprocess.Popen(argv, preexec_fn=_io_flusher, **kw)
    reg["nbdfuse_pid"] = q.pid
    reg["fuse_dir"] = fdir
    reg["steps"].append("nbdfuse")
    save(reg)
    _wait_pidfile(q, fpid, "nbdfuse", flog)

    return img


STEPS = ("prepare", "nbdkit", "nbdfuse", "loop", "mount")


def test_hook(spec: str | None):
    """For tests ($BLKREWIND_MOUNT_TEST_HOOK): "fail:STEP" raises a UserError before STEP,
    "pause:STEP" says "paused before STEP" on stderr and sleeps (a test sends SIGINT)."""
    if not spec:
        return None
    how, _, step = spec.partition(":")
    if how not in ("fail", "pause") or step not in STEPS:
        raise UserError(f"BLKREWIND_MOUNT_TEST_HOOK={spec!r}: fail:STEP or pause:STEP, STEP one "
                        f"of {', '.join(STEPS)}")

    def hook(name: str) -> None:
        if name != step:
            return
        if how == "fail":
            raise UserError(f"failing before {name} (test hook)")
        import sys
        print(f"paused before {name}", file=sys.stderr, flush=True)
        time.sleep(3600)
    return hook


def teardown(reg: dict, *, quiet: bool = False) -> list[str]:
    """Undo the steps of a registry entry, newest first. A mounted file system that is busy
    stops it (UserError: nothing else is touched). Returns notes."""
    notes: list[str] = []
    steps = reg.get("steps", [])
    mp = reg.get("mountpoint")
    if mp and "mount" in steps and os.path.ismount(mp):
        p = subprocess.run(["umount", mp], capture_output=True, text=True)
        if p.returncode != 0 and os.path.ismount(mp):
            why = (p.stderr.strip().splitlines() or ["failed"])[-1]
            raise UserError(f"cannot unmount {mp}: {why} (close what uses it and try again)")
    if reg.get("loop"):
        _detach_loop(reg["loop"], os.path.join(reg.get("fuse_dir", ""), "image"), notes)
    if reg.get("fuse_dir"):
        fdir = reg["fuse_dir"]
        if os.path.ismount(fdir):
            subprocess.run(["fusermount3", "-u", fdir], capture_output=True)
            if os.path.ismount(fdir):
                subprocess.run(["umount", "-l", fdir], capture_output=True)
        _wait_gone(reg.get("nbdfuse_pid"), 10)
    from blkrewind.replayer.export import remove_run_dir, stop_pid
    if reg.get("nbdfuse_pid") and _alive(reg["nbdfuse_pid"]) \
            and _is_ours(reg["nbdfuse_pid"], "nbdfuse"):
        stop_pid(reg["nbdfuse_pid"])
    if reg.get("nbdkit_pid"):
        if _alive(reg["nbdkit_pid"]) and _is_ours(reg["nbdkit_pid"], "nbdkit"):
            stop_pid(reg["nbdkit_pid"])
    if reg.get("run_dir"):
        # a helper whose pid was never recorded (a daemon nbdkit not ready yet) still writes
        # into the directory: stopped first
        for pid, _ in _helpers_of(reg["run_dir"]):
            stop_pid(pid)
        kept = remove_run_dir(reg["run_dir"])
        if kept:
            notes.append(kept)
    if mp:
        try:
            os.unlink(_reg_path(mp))
        except FileNotFoundError:
            pass
    return notes


def _is_ours(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == name
    except OSError:
        return False


def _wait_gone(pid: int | None, timeout: float) -> None:
    if not pid:
        return
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        try:  # our child, if this process started it: reap it
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)


def _detach_loop(loop: str, backing: str, notes: list) -> None:
    name = os.path.basename(loop)
    bf = f"/sys/block/{name}/loop/backing_file"
    try:
        with open(bf) as f:
            cur = f.read().strip()
    except OSError:
        return  # detached already
    if os.path.realpath(cur) != os.path.realpath(backing) and cur != backing:
        notes.append(f"{loop} backs {cur} now, not ours: left alone")
        return
    for _ in range(50):
        p = subprocess.run(["losetup", "-d", loop], capture_output=True, text=True)
        if p.returncode == 0 or not os.path.exists(bf):
            return
        time.sleep(0.1)
    raise UserError(f"cannot detach {loop}: {p.stderr.strip()}")


# ------------------------------------------------------------------ points of dead processes
def _mountinfo() -> list[tuple[str, str]]:
    """(source, mount point) of this mount namespace's mounts, in mount order."""
    out: list[tuple[str, str]] = []

    def unesc(x: str) -> str:
        return x.encode().decode("unicode_escape") if "\\" in x else x
    try:
        with open("/proc/self/mountinfo") as f:
            for ln in f:
                a, _, b = ln.partition(" - ")
                fields = a.split()
                if len(fields) > 4:
                    out.append((unesc(b.split()[1]) if b.split()[1:] else "", unesc(fields[4])))
    except OSError:
        pass
    return out


def _loops_under(d: str) -> list[str]:
    """Loop devices whose backing file is under directory d."""
    out: list[str] = []
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return out
    for n in names:
        if not n.startswith("loop"):
            continue
        try:
            with open(f"/sys/block/{n}/loop/backing_file") as f:
                b = f.read().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue
        if b.startswith(d + "/"):
            out.append(f"/dev/{n}")
    return sorted(out)


def _helpers_of(d: str) -> list[tuple[int, str]]:
    """(pid, comm) of the nbdkit and nbdfuse processes serving from directory d."""
    out: list[tuple[int, str]] = []
    key = (d + "/").encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            if comm not in ("nbdkit", "nbdfuse"):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if key in f.read():
                    out.append((int(pid), comm))
        except OSError:
            continue
    return out


def owned_points() -> list[dict]:
    """The points read by a process of their own (runtime directories with export.OWNER_FILE:
    diff, files, bisect, suspects --files, serve's detector, export), each with `stale`
    (its process is gone) and what it still holds: mounts, loops, helpers (nbdkit, nbdfuse)."""
    from blkrewind.replayer import export

    out: list[dict] = []
    try:
        names = sorted(os.listdir(export.RUN_DIR))
    except OSError:   # none yet, or not root
        return out
    mi = None
    for n in names:
        if n.startswith((export.UNBORN, export.GONE)):   # being made or removed (reap_stale
            continue                                     # removes a dead process's)
        d = os.path.join(export.RUN_DIR, n)
        try:
            with open(os.path.join(d, export.OWNER_FILE)) as f:
                rec = json.load(f)
            pid = int(rec["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if mi is None:
            mi = _mountinfo()
        start = export.proc_start(pid)
        alive = start is not None and (rec.get("start") is None or start == rec["start"])
        out.append({**rec, "run_dir": d, "stale": not alive,
                    "mounts": [mp for _, mp in mi if mp == d or mp.startswith(d + "/")],
                    "loops": _loops_under(d), "helpers": _helpers_of(d)})
    return out


def reap(pt: dict) -> list[str]:
    """Tear down what a point of a dead process (owned_points) holds: its file system mounts,
    loop devices, FUSE mount, nbdkit and nbdfuse, its runtime directory. Returns what was
    done (and what could not be)."""
    from blkrewind.replayer import export

    d = pt["run_dir"]
    done: list[str] = []
    start = export.proc_start(int(pt["pid"]))
    if start is not None and pt.get("start") in (None, start):   # its process is alive
        return done
    fdir = os.path.join(d, "fuse")
    # the file systems (on the loop devices), deepest first, then the loop devices
    fs = [mp for _, mp in _mountinfo() if mp.startswith(d + "/") and mp != fdir]
    for mp in sorted(set(fs), key=len, reverse=True):
        p = subprocess.run(["umount", mp], capture_output=True, text=True)
        if p.returncode != 0:
            p = subprocess.run(["umount", "-l", mp], capture_output=True, text=True)
        done.append(f"unmounted {mp}" if p.returncode == 0 else
                    f"cannot unmount {mp}: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
    for lo in _loops_under(d):
        for _ in range(50):
            p = subprocess.run(["losetup", "-d", lo], capture_output=True, text=True)
            if p.returncode == 0 or not any(x == lo for x in _loops_under(d)):
                break
            time.sleep(0.1)
        done.append(f"detached {lo}" if p.returncode == 0 else
                    f"cannot detach {lo}: {p.stderr.strip()}")
    if any(mp == fdir for _, mp in _mountinfo()):
        subprocess.run(["fusermount3", "-u", fdir], capture_output=True)
        if os.path.ismount(fdir):
            subprocess.run(["umount", "-l", fdir], capture_output=True)
        done.append(f"unmounted {fdir}" if not os.path.ismount(fdir)
                    else f"cannot unmount {fdir}")
    for pid, comm in _helpers_of(d):
        export.stop_pid(pid)
        done.append(f"stopped {comm} (pid {pid})")
    left = [mp for _, mp in _mountinfo() if mp == d or mp.startswith(d + "/")]
    if left:
        done.append(f"{d} kept: {', '.join(left)} still mounted")
    else:
        done.append(export.remove_run_dir(d) or f"removed {d}")
    return done


def reap_stale(store: str | None = None) -> list[tuple[dict, list[str]]]:
    """reap() every point whose process is gone (of `store` only, when given); the
    directories a process died making or removing (export.UNBORN, export.GONE: they hold
    nothing mounted or served) go too."""
    from blkrewind.replayer import export

    out = []
    with contextlib.suppress(OSError):
        for n in sorted(os.listdir(export.RUN_DIR)):
            prefix = next((x for x in (export.UNBORN, export.GONE) if n.startswith(x)), None)
            pid = n[len(prefix):].split("-")[0] if prefix else ""
            if pid.isdigit() and export.proc_start(int(pid)) is None:
                d = os.path.join(export.RUN_DIR, n)
                shutil.rmtree(d, ignore_errors=True)
                if os.path.lexists(d):
                    try:
                        held = ", ".join(sorted(os.listdir(d)))
                    except OSError as e:
                        held = str(e)
                    out.append(({"run_dir": d, "pid": int(pid)},
                                [f"cannot remove {d}: it holds {held}"]))
    for pt in owned_points():
        if not pt["stale"]:
            continue
        if store is not None and pt.get("store") != os.path.abspath(store):
            continue
        out.append((pt, reap(pt)))
    return out


def describe_point(pt: dict) -> str:
    if "device" not in pt:   # a directory being made or removed (reap_stale)
        return f"the directory {pt['run_dir']} of pid {pt['pid']}"
    return (f"{pt.get('device')} at stamp {pt.get('stamp')} of {pt.get('store')}, read by "
            f"{pt.get('command')} (pid {pt.get('pid')})")
