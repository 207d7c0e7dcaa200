"""The tracer's small native hot loops (tracer/ringwalk.c), built and loaded here.

bpf/build.py calls build() after the BPF object (same clang, same output directory); the
record-prefix constants are passed from blkrewind/formats/record.py (one definition of the format).
ring_walk() is None when the library is not built: callers then use their Python loop.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from pathlib import Path

from blkrewind.formats import record

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(__file__).resolve().parent / "ringwalk.c"
LIB_NAME = "libblkrewind-native.so"
DEFAULT_LIB = ROOT / "bpf" / "build" / LIB_NAME


def defines() -> list[str]:
    return [f"-DBR_RB_BUSY={record.RB_BUSY}U", f"-DBR_RB_DISCARD={record.RB_DISCARD}U",
            f"-DBR_RB_LEN_MASK={record.RB_LEN_MASK}U",
            f"-DBR_RB_PREFIX={record.FRAME_PREFIX_SIZE}"]


def build(clang: str, out: Path, force: bool = False) -> Path:
    """Compile tracer/ringwalk.c into out/LIB_NAME (only when the source or constants
    changed)."""
    lib = out / LIB_NAME
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(defines()).encode())
    stamp = out / (LIB_NAME + ".sha256")
    if not force and lib.exists() and stamp.exists() and stamp.read_text().strip() == h.hexdigest():
        return lib
    tmp = out / (LIB_NAME + ".tmp")
    r = subprocess.run([clang, "-O2", "-Wall", "-shared", "-fPIC", *defines(), str(SOURCE),
                        "-o", str(tmp)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("clang failed on tracer/ringwalk.c:\n" + r.stderr)
    os.replace(tmp, lib)
    stamp.write_text(h.hexdigest() + "\n")
    return lib


def _load():
    path = os.environ.get("BLKREWIND_NATIVE_LIB", str(DEFAULT_LIB))
    if path == "" or not os.path.exists(path):
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None
    f = lib.br_ring_walk
    f.restype = ctypes.c_uint64
    f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
                  ctypes.POINTER(ctypes.c_uint64)]
    return f


ring_walk = _load()
