"""What the capture programs need of the running kernel, checked before anything heavy loads.

`trace` asks this first (it imports only the libbpf binding), so an old kernel is refused in
one line within the first second instead of after the tracer's imports and set-up.
"""
from __future__ import annotations

import os

from tracer import libbpf as L

# BPF helpers the programs cannot do without: (helper id, name, what it is, first kernel)
REQUIRED_HELPERS = [
    (181, "bpf_loop", "the BPF loop helper", "5.17"),
    (198, "bpf_ringbuf_reserve_dynptr", "BPF ring buffer dynptrs", "5.19"),
]


def missing_feature() -> str | None:
    """One line naming the kernel, what it lacks and the oldest kernel that has it all, or
    None when nothing is missing."""
    missing = [] if L.has_atomic_fetch() else [
        # every stamp comes from one counter: without a fetch-and-add there is no order
        ("BPF atomic fetch-and-add", "BPF_ATOMIC | BPF_FETCH", "5.12")]
    missing += [(what, name, since) for hid, name, what, since in REQUIRED_HELPERS
                if not L.has_helper(hid)]
    if not missing:
        return None
    oldest = max((since for _, _, since in missing), key=lambda v: tuple(map(int, v.split("."))))
    parts = [f"{what} ({name}, {since})" for what, name, since in missing]
    lacks = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return (f"kernel {os.uname().release} lacks {lacks}, which the capture programs need: "
            f"the oldest kernel that has {'them' if len(missing) > 1 else 'it'} is {oldest}")
