"""The tracer's small native hot loops (tracer/ringwalk.c), built and loaded here.

bpf/build.py calls build() after the BPF object (same clang, same output directory); the
record-prefix constants are passed from blkrewind/formats/record.py (one definition of the format).
ring_walk() is None when the library is not built: callers then use their Python loop.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from blkrewind import osutil
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
    return osutil.build_c_library(clang, SOURCE, out, LIB_NAME, tuple(defines()), force=force)


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
