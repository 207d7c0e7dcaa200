"""Small OS helpers both sides use."""
from __future__ import annotations

import ctypes
import json
import os
import signal
from pathlib import Path

# the CRC-32 of zlib (same values), computed by zlib-ng's SIMD code, several times faster;
# wire message bodies and payload files are checksummed with it
from zlib_ng.zlib_ng import crc32  # noqa: F401

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
_trim_threshold = 0


def _mallopt(param: int, value: int) -> None:
    try:
        ctypes.CDLL(None).mallopt(param, value)
    except (OSError, AttributeError):  # not glibc
        pass


def tune_malloc(trim_threshold: int = 0, *, one_arena: bool = False) -> None:
    """Tune glibc's malloc, process-wide, for multi-MiB buffers (spans, frames, columns).

    trim_threshold: keep up to this many freed bytes at the top of the heap for reuse, and
    take buffers of up to 32 MiB (glibc's maximum mmap threshold) from the heap. With glibc's
    defaults each freed buffer goes back to the kernel and is faulted in again on the next
    allocation. Only ever raised: the largest threshold asked for in the process holds.

    one_arena: one malloc arena for every thread (as MALLOC_ARENA_MAX=1 does), unless the
    environment sets MALLOC_ARENA_MAX: per-thread arenas' heaps are unmapped when empty and
    faulted in again. Call it before any thread exists."""
    global _trim_threshold
    if one_arena and "MALLOC_ARENA_MAX" not in os.environ:
        _mallopt(_M_ARENA_MAX, 1)
    if trim_threshold > _trim_threshold:
        _trim_threshold = trim_threshold
        _mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        _mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def file_crc32(path: str, bufsize: int = 8 << 20) -> tuple[int, int]:
    """(zlib.crc32, size) of a file's bytes."""
    crc = n = 0
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(buf):
            crc = crc32(mv[:k], crc)
            n += k
    return crc, n


TERMINATION = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignore_termination() -> None:
    """The command's result is committed (renamed into place, written whole): from here on
    SIGINT, SIGTERM and SIGHUP cannot turn it into a failure -- the process is finishing
    anyway. SIGKILL still ends it, which the commit point is made to survive."""
    for s in TERMINATION:
        try:
            signal.signal(s, signal.SIG_IGN)
        except ValueError:  # not the main thread (a command run from a test's thread)
            pass


def save_json(path: str, obj) -> None:
    """Write obj as JSON to path whole or not at all (a temporary file, fsynced, renamed over
    it; the directory made 0700 if missing): the records of /run/blkrewind's registries."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_json_dir(directory: str) -> list[tuple[str, object]]:
    """(path, its JSON value, or None when it cannot be read or parsed) of every *.json file
    of a registry directory (save_json), by name; none when the directory does not exist."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out: list[tuple[str, object]] = []
    for n in names:
        if not n.endswith(".json"):
            continue
        path = os.path.join(directory, n)
        try:
            with open(path) as f:
                out.append((path, json.load(f)))
        except (OSError, ValueError):
            out.append((path, None))
    return out


def fsync_dir(path) -> None:
    """fsync a directory: makes a rename or a new file in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mount_of(path: str) -> tuple[str, str]:
    """(file system type, mount source) of the mount holding path, an absolute path (taken as
    it is: symlinks are not resolved), from /proc/self/mountinfo; ("", "") if unreadable."""
    best, found = "", ("", "")
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].encode().decode("unicode_escape")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    fstype, source = right.split()[:2]
                    best, found = mnt, (fstype, source.encode().decode("unicode_escape"))
    except (OSError, IndexError, ValueError):
        return "", ""
    return found


def build_c_library(clang: str, source: Path, out: Path, lib_name: str,
                    flags: tuple[str, ...] = (), force: bool = False) -> Path:
    """Compile one C file into the shared library out/lib_name, only when the source or the
    flags changed (a sha256 beside it says what it was built from); written under a
    temporary name and renamed. The native hot loops of the tracer and the replayer
    (tracer/native.py, replayer/native.py; bpf/build.py calls them with its clang)."""
    import hashlib
    import subprocess

    lib = out / lib_name
    h = hashlib.sha256(source.read_bytes())
    if flags:
        h.update(" ".join(flags).encode())
    stamp = out / (lib_name + ".sha256")
    if not force and lib.exists() and stamp.exists() and stamp.read_text().strip() == h.hexdigest():
        return lib
    tmp = out / (lib_name + ".tmp")
    r = subprocess.run([clang, "-O2", "-Wall", "-shared", "-fPIC", *flags, str(source),
                        "-o", str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"clang failed on {source.parent.name}/{source.name}:\n{r.stderr}")
    os.replace(tmp, lib)
    stamp.write_text(h.hexdigest() + "\n")
    return lib
