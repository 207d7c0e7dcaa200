#!/usr/bin/env python3
"""Build the BPF objects: bpf/build/blkrewind.bpf.o and its legacy variant
bpf/build/blkrewind-legacy.bpf.o (the same source with -DBR_LEGACY: bpf/legacy.h, for
kernels without fetch-and-add, bpf_loop or ring buffer dynptrs; tracer/capture.py picks).

CO-RE: vmlinux.h is dumped from the running kernel's BTF with bpftool (never
committed), record.h is generated from blkrewind/formats/record.py (the one
definition of the record layout), then clang compiles blkrewind.bpf.c.
Rebuilds only when an input changed (a hash of the sources, the generated
header and the kernel BTF is kept next to the object).

usage: python bpf/build.py [--force] [--out DIR] [--clang CLANG]

The newest clang found is used unless --clang (or BLKREWIND_CLANG) names one; the
programs verify when built by clang 14 to 19.
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

from blkrewind.formats.record import CLayout  # noqa: E402

SOURCES = [HERE / "blkrewind.bpf.c", HERE / "legacy.h"]
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
DEFAULT_OUT = HERE / "build"
OBJECT_NAME = "blkrewind.bpf.o"
LEGACY_NAME = "blkrewind-legacy.bpf.o"


class BuildError(Exception):
    pass


def find_tool(*names: str) -> str:
    for n in names:
        p = shutil.which(n)
        if p:
            return p
    raise BuildError(f"none of {', '.join(names)} found: install clang, llvm and bpftool "
                     f"(./bootstrap.sh does)")


def _shown(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def build(out: Path = DEFAULT_OUT, force: bool = False, quiet: bool = False,
          clang: str | None = None) -> Path:
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
    # The newest clang first (any from 14 on builds programs that verify: tests/test_kernels.py);
    # --clang or BLKREWIND_CLANG picks one.
    clang = clang or os.environ.get("BLKREWIND_CLANG") or None
    clang = find_tool(clang) if clang else find_tool(*(f"clang-{v}" for v in range(21, 13, -1)),
                                                     "clang")
    # Another compiler (path, or `--version` first line) is another input: rebuild.
    ver = subprocess.run([clang, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    h.update(f"{clang}\n{ver}".encode())
    digest = h.hexdigest()
    stamp = out / "inputs.sha256"
    legacy = out / LEGACY_NAME
    if (not force and obj.exists() and legacy.exists() and stamp.exists()
            and stamp.read_text().strip() == digest):
        build_native(out, None, quiet)
        if not quiet:  # last: bootstrap shows the last line
            print(f"bpf: {_shown(obj)} is up to date")
        return obj

    bpftool = find_tool("bpftool", "/usr/sbin/bpftool")
    vmlinux_h = out / "vmlinux.h"
    with open(vmlinux_h, "w") as f:
        subprocess.run([bpftool, "btf", "dump", "file", str(VMLINUX_BTF), "format", "c"],
                       stdout=f, check=True)
    (out / "record.h").write_text(header)
    for target, extra in ((obj, []), (legacy, ["-DBR_LEGACY"])):
        tmp = out / (target.name + ".tmp")
        cmd = [clang, "-O2", "-g", "-target", "bpf", "-mcpu=v3", "-D__TARGET_ARCH_x86", *extra,
               "-Wall", "-Wno-unused-function", "-I", str(out), "-c", str(SOURCES[0]),
               "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError("clang failed:\n" + r.stderr)
        os.replace(tmp, target)
    stamp.write_text(digest + "\n")
    build_native(out, clang, quiet)
    if not quiet:
        print(f"bpf: built {_shown(obj)}")
    return obj


def build_native(out: Path, clang: str | None, quiet: bool = False) -> None:
    """The native hot loops (tracer/native.py, replayer/native.py) with the same clang."""
    from blkrewind.replayer import native as replayer_native
    from blkrewind.tracer import native
    clang = clang or find_tool(*(f"clang-{v}" for v in range(21, 13, -1)), "clang")
    for mod in (native, replayer_native):
        try:
            lib = mod.build(clang, out)
        except RuntimeError as e:
            raise BuildError(str(e)) from None
        if not quiet:
            print(f"native: {lib.relative_to(ROOT)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--clang", help="the compiler (default: the newest clang-N found)")
    a = ap.parse_args()
    try:
        build(a.out, a.force, clang=a.clang)
    except (BuildError, subprocess.CalledProcessError) as e:
        print(f"bpf build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
