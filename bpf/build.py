#!/usr/bin/env python3
"""Build the BPF object: bpf/build/blkrewind.bpf.o.

CO-RE: vmlinux.h is dumped from the running kernel's BTF with bpftool (never
committed), record.h is generated from blkrewind/record.py (the one
definition of the record layout), then clang compiles blkrewind.bpf.c.
Rebuilds only when an input changed (a hash of the sources, the generated
header and the kernel BTF is kept next to the object).

usage: python bpf/build.py [--force] [--out DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from blkrewind.record import CLayout  # noqa: E402

SOURCES = [HERE / "blkrewind.bpf.c"]
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
DEFAULT_OUT = HERE / "build"
OBJECT_NAME = "blkrewind.bpf.o"


class BuildError(Exception):
    pass


def find_tool(*names: str) -> str:
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    raise BuildError(f"none of {', '.join(names)} found: install clang, llvm and bpftool "
                     f"(./bootstrap.sh does)")


def build(out: Path = DEFAULT_OUT, force: bool = False, quiet: bool = False) -> Path:
    if not VMLINUX_BTF.exists():
        raise BuildError(f"{VMLINUX_BTF} is missing: the kernel needs CONFIG_DEBUG_INFO_BTF")
    out.mkdir(parents=True, exist_ok=True)
    obj = out / OBJECT_NAME
    header = CLayout.header_text()
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(header.encode())
    h.update(VMLINUX_BTF.read_bytes())
    digest = h.hexdigest()
    stamp = out / "inputs.sha256"
    if not force and obj.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        if not quiet:
            print(f"bpf: {obj.relative_to(ROOT)} is up to date")
        build_native(out, None, quiet)
        return obj

    bpftool = find_tool("bpftool", "/usr/sbin/bpftool")
    # The newest clang first: clang 14 (Debian 12's and Ubuntu 22.04's default) compiles
    # capture_btf into a program the verifier gives up on (over 1M instructions processed).
    clang = find_tool(*(f"clang-{v}" for v in range(21, 13, -1)), "clang")
    vmlinux_h = out / "vmlinux.h"
    with open(vmlinux_h, "w") as f:
        subprocess.run([bpftool, "btf", "dump", "file", str(VMLINUX_BTF), "format", "c"],
                       stdout=f, check=True)
    (out / "record.h").write_text(header)
    tmp = out / (OBJECT_NAME + ".tmp")
    cmd = [clang, "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86",
           "-Wall", "-Wno-unused-function", "-I", str(out), "-c", str(SOURCES[0]), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError("clang failed:\n" + r.stderr)
    os.replace(tmp, obj)
    stamp.write_text(digest + "\n")
    build_native(out, clang, quiet)
    if not quiet:
        print(f"bpf: built {obj.relative_to(ROOT)}")
    return obj


def build_native(out: Path, clang: str | None, quiet: bool = False) -> None:
    """The tracer's native hot loop (tracer/native.py) with the same clang."""
    from tracer import native
    clang = clang or find_tool(*(f"clang-{v}" for v in range(21, 13, -1)), "clang")
    try:
        lib = native.build(clang, out)
    except RuntimeError as e:
        raise BuildError(str(e)) from None
    if not quiet:
        print(f"native: {lib.relative_to(ROOT)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    try:
        build(a.out, a.force)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"bpf build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
