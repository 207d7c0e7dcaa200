"""What the capture programs need of the running kernel, checked before anything heavy loads.

`trace` asks this first (it imports only the libbpf binding), so a kernel that cannot run
the capture is refused in one line within the first second instead of after the tracer's
imports and set-up.

Two variants of the programs (bpf/build.py builds both): the modern one uses BPF atomic
fetch-and-add (5.12), `bpf_loop` (5.17) and ring buffer dynptrs (5.19); the legacy one
(bpf/legacy.h) does without them and is loaded where any is missing. What the legacy one
still needs is the BPF ring buffer (5.8): an older kernel is refused.
"""
from __future__ import annotations

import os
import re

from blkrewind.tracer import libbpf as L

# what the modern programs use: (helper id or None for the atomic, name, what, first kernel)
MODERN_FEATURES = [
    (None, "BPF_ATOMIC | BPF_FETCH", "BPF atomic fetch-and-add", "5.12"),
    (181, "bpf_loop", "the BPF loop helper", "5.17"),
    (198, "bpf_ringbuf_reserve_dynptr", "BPF ring buffer dynptrs", "5.19"),
]
# BPF helpers no variant can do without: (helper id, name, what it is, first kernel)
REQUIRED_HELPERS = [
    (131, "bpf_ringbuf_reserve", "the BPF ring buffer", "5.8"),
]
VARIANT_ENV = "BLKREWIND_BPF_VARIANT"  # "legacy" or "modern": forced (tests, CI)


def _has(hid: int | None) -> bool:
    return L.has_atomic_fetch() if hid is None else L.has_helper(hid)


def modern_missing() -> list[tuple[str, str, str]]:
    """(what, name, since) of every feature of the modern programs the kernel lacks."""
    return [(what, name, since) for hid, name, what, since in MODERN_FEATURES if not _has(hid)]


def variant() -> tuple[str, str]:
    """("modern" | "legacy", why): the program variant to load. BLKREWIND_BPF_VARIANT forces
    one (a forced modern variant on a kernel without its features fails at load)."""
    forced = os.environ.get(VARIANT_ENV, "")
    if forced in ("legacy", "modern"):
        return forced, f"{VARIANT_ENV}={forced}"
    missing = modern_missing()
    if not missing:
        return "modern", ""
    return "legacy", "the kernel lacks " + _join([f"{what} ({since})" for what, _, since in missing])


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def missing_feature() -> str | None:
    """One line naming the kernel, what it lacks and the oldest kernel that has it all, or
    None when nothing is missing."""
    missing = [(what, name, since) for hid, name, what, since in REQUIRED_HELPERS
               if not L.has_helper(hid)]
    if not missing:
        return None
    oldest = max((since for _, _, since in missing), key=lambda v: tuple(map(int, v.split("."))))
    lacks = _join([f"{what} ({name}, {since})" for what, name, since in missing])
    return (f"kernel {os.uname().release} lacks {lacks}, which the capture programs need: "
            f"the oldest kernel that has {'them' if len(missing) > 1 else 'it'} is {oldest}")


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def partition_refusal(path: str, disk: str) -> str | None:
    """One line when the kernel cannot trace the partition path (of disk), else None. Before
    5.12 (bio->bi_bdev replaced bio->bi_disk) a partition's bios reach block_bio_queue
    already remapped onto their disk: the capture does not tell them from the disk's."""
    if kernel_version() >= (5, 12):
        return None
    return (f"kernel {os.uname().release} cannot trace the partition {path}: its bios reach "
            f"the capture remapped onto /dev/{disk} (bio->bi_bdev, which tells them apart, "
            f"came with 5.12): trace /dev/{disk} whole, or run 5.12 or newer")
