"""Capture that outlives its tracer: BPF state pinned in bpffs (docs/internals.md, "Tracer restart").

While a tracer runs, its maps, its two on-demand programs and its links are pinned under
PIN_ROOT/<session>/, and a small record of the session sits in REG_DIR/<session>.json (tmpfs:
it lives exactly as long as the pins, until the next boot):

    {"session", "log_dir", "host", "boot_id", "pid", "devices": [{"path", "kdev", "size",
     "part_start"}], "regions": [[kdev, base, shift, count]], "ring_bytes", "dirty_regions",
     "baseline_done", "safe", "full", "useq"}

`safe` is written after every checkpoint (tracer/resync.py): every stamp below it is in the
LOG (written, so it survives the death of the process; not a reboot, which takes the pins
too) or covered by a finished resync; `full` says a pending resync must read everything.

If the tracer dies (SIGKILL, crash, OOM), the pinned links keep the programs attached: every
write still marks the dirty map, still takes its stamp, and still goes into the ring buffer
until it is full (then it is counted as dropped). The next `blkrewind trace` on the same LOG
and devices adopts that state (`find_adoptable`), continues the same session and resyncs only
the regions written since `safe`. Anything else (other devices, a clean stop, a death before
the baseline was done, another boot) releases the pins and starts a new session, as before.
`blkrewind detach` releases a dead tracer's capture by hand.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field

from blkrewind.osutil import load_json_dir, mount_of, save_json

PIN_ROOT = "/sys/fs/bpf/blkrewind"
REG_DIR = "/run/blkrewind/pinned"
BPFFS = "/sys/fs/bpf"


@dataclass
class Pinned:
    session: str
    log_dir: str
    host: str
    boot_id: str
    pid: int
    devices: list[dict]
    regions: list[list[int]]
    ring_bytes: int
    dirty_regions: int
    baseline_done: bool = False
    safe: int = 0
    full: bool = False
    useq: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def pin_dir(self) -> str:
        return os.path.join(PIN_ROOT, self.session)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def bpffs_problem() -> str | None:
    """None when BPFFS is a mounted bpf file system (mounted here if it was not)."""
    def mounted() -> bool:
        return mount_of(BPFFS)[0] == "bpf"  # only a bpffs mounted on BPFFS itself has this type
    if mounted():
        return None
    try:
        r = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot mount bpffs on {BPFFS}: {e}"
    if r.returncode != 0 or not mounted():
        return f"cannot mount bpffs on {BPFFS}: {r.stderr.strip() or 'mount failed'}"
    return None


def _reg_path(session: str) -> str:
    return os.path.join(REG_DIR, session + ".json")


def save(p: Pinned) -> None:
    """Write (atomically) the record of a pinned session."""
    save_json(_reg_path(p.session), asdict(p))


def load_all() -> list[Pinned]:
    out: list[Pinned] = []
    for path, rec in load_json_dir(REG_DIR):
        try:
            out.append(Pinned(**rec))   # type: ignore[arg-type]
        except TypeError:   # a torn record (None) or not a Pinned: the pins go with pin dirs
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return out


def pin_dirs() -> list[str]:
    try:
        return sorted(os.listdir(PIN_ROOT))
    except FileNotFoundError:
        return []


def release_dir(session: str) -> None:
    """Remove the pins of session: links first (the programs detach as soon as no process
    holds them), then maps and programs, then its record."""
    d = os.path.join(PIN_ROOT, session)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        names = []
    for n in sorted(names, key=lambda x: not x.startswith("link_")):
        try:
            os.unlink(os.path.join(d, n))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(d)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(d, ignore_errors=True)
    try:
        os.unlink(_reg_path(session))
    except FileNotFoundError:
        pass


def owner_alive(p: Pinned) -> bool:
    """A tracer still holds p's LOG (its lock): p is not left behind."""
    from blkrewind.tracer.log import log_in_use
    try:
        pid = log_in_use(p.log_dir)
    except OSError:
        return False
    return pid is not None and pid != os.getpid()


def orphans() -> list[Pinned]:
    """Sessions whose tracer is gone but whose capture is still pinned (this boot)."""
    bid = boot_id()
    return [p for p in load_all() if p.boot_id == bid and os.path.isdir(p.pin_dir)
            and not owner_alive(p)]


def sweep(say) -> None:
    """Forget records without pins and release pins without records (a tracer that died
    between the two), of this boot."""
    regs = {p.session: p for p in load_all()}
    for s, p in regs.items():
        if p.boot_id != boot_id() or not os.path.isdir(p.pin_dir):
            release_dir(s)
        elif not os.path.isdir(p.log_dir):
            release_dir(s)
            say(f"released the capture left attached by session {s}: its LOG {p.log_dir} "
                f"is gone")
    for s in pin_dirs():
        if s not in regs:
            release_dir(s)
            say(f"released the capture pinned by session {s} (left by a tracer that died "
                f"while starting)")


def _same_devices(p: Pinned, devs) -> bool:
    want = sorted((d.kdev, d.size_bytes, d.part_start) for d in devs)
    have = sorted((x["kdev"], x["size"], x["part_start"]) for x in p.devices)
    return want == have


def find_adoptable(log_dir: str, devs, host: str, last_session: str | None, say) -> Pinned | None:
    """The capture a dead tracer of this LOG left pinned, if this tracer can continue it.
    Releases (and says why) any other dead tracer's capture of these devices or this LOG."""
    sweep(say)
    real = os.path.realpath(log_dir)
    kdevs = {d.kdev for d in devs}
    found = None
    for p in orphans():
        mine = os.path.realpath(p.log_dir) == real
        overlap = kdevs & {x["kdev"] for x in p.devices}
        if not mine and not overlap:
            continue
        why = None
        if not mine:
            why = f"its devices are traced again from another LOG ({log_dir})"
        elif p.session != last_session:
            why = "its session is no longer the LOG's newest"
        elif not _same_devices(p, devs):
            why = "the devices differ"
        elif p.host != host:
            why = f"the host name differs ({p.host})"
        elif not p.baseline_done:
            why = "it died before its baseline was done"
        if why is None and found is None:
            found = p
            continue
        release_dir(p.session)
        say(f"released the capture left attached by session {p.session} (LOG {p.log_dir}): "
            f"{why or 'another one is continued'}; a new session reads the devices whole")
    return found
