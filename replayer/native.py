"""The replayer's small native hot loops (replayer/pieces.c: the per-piece copy of a restore
and of the read path, the walk over a row group's alike pages, and the reading of a payload
file's footer), built and loaded here.

bpf/build.py calls build() after the BPF object (same clang, same output directory). The
library is optional: copy_pieces, walk_pages and parquet_chunks are None when it is not built
(or BLKREWIND_NATIVE_LIB is ""), and replayer/payload.py then does the same in Python.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

from blkrewind import osutil

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(__file__).resolve().parent / "pieces.c"
LIB_NAME = "libblkrewind-pieces.so"
DEFAULT_LIB = ROOT / "bpf" / "build" / LIB_NAME


def build(clang: str, out: Path, force: bool = False) -> Path:
    """Compile replayer/pieces.c into out/LIB_NAME (only when the source changed)."""
    return osutil.build_c_library(clang, SOURCE, out, LIB_NAME, force=force)


def _lib():
    path = os.environ.get("BLKREWIND_NATIVE_PIECES", str(DEFAULT_LIB))
    if os.environ.get("BLKREWIND_NATIVE_LIB") == "" or path == "" or not os.path.exists(path):
        return None
    try:
        lib = ctypes.CDLL(path)    # CDLL: the GIL is released while it copies
    except OSError:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    try:
        f, w, c = lib.br_copy_pieces, lib.br_walk_pages, lib.br_parquet_chunks
    except AttributeError:   # a library built from an older pieces.c: bpf/build.py rebuilds it
        return None
    f.restype = None
    f.argtypes = [p, p, p, p, p, p, i64]
    w.restype = i64
    w.argtypes = [p, i64, i64, i64, ctypes.c_char_p, i64, ctypes.c_char_p, i64, i64, i64, i64,
                  i64, p, p, p]
    c.restype = i64
    c.argtypes = [p, i64, i64, ctypes.c_char_p, i64, i64, p]
    return f, w, c


copy_pieces, walk_pages, parquet_chunks = _lib() or (None, None, None)
