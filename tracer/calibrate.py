"""Find where the kernel's direct map and struct page array start, and prove it.

The capture program reads a bio's payload through the direct map:
    va(page) = page_offset_base + (page - vmemmap_base) / sizeof(struct page) * 4096
Both bases are randomised (KASLR) and are not BTF variables. Tried in order
(docs/design.md, "Reading the payload"):
  1. ksym        the kallsyms data symbols, when the kernel exports them
                 (CONFIG_KALLSYMS_ALL), read with bpf_probe_read_kernel;
  2. vmcoreinfo  /sys/kernel/vmcoreinfo gives the physical address of the
                 VMCOREINFO note; page_offset_base is 1 GiB aligned and at most
                 max-RAM below any direct-map address (the current task), so
                 probe those candidates for the note whose OSRELEASE is ours;
                 the note also gives SYMBOL(vmemmap) and SIZE(page);
  3. pagemap     an O_DIRECT *read* of the traced device into a page of random
                 bytes: the program reports its struct page *, /proc/self/pagemap
                 its PFN, and page_offset_base is the candidate at which that PFN
                 holds the pattern.
Every result is verified the same way before capture starts: an O_DIRECT read
into a fresh random page must be captured with exactly that page's pointer and
exactly the pattern as payload. Nothing is ever guessed: if no method passes,
tracing is refused.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass, field
from typing import Callable

from blkrewind.errors import UserError
from blkrewind.formats import record
from blkrewind.tracer.capture import Capture
from blkrewind.tracer.ringbuf import RingConsumer

GiB = 1 << 30
PAGE = 4096


@dataclass
class Bases:
    method: str
    page_offset_base: int
    vmemmap_base: int
    page_struct_size: int
    details: dict = field(default_factory=dict)


def _max_phys_end() -> int:
    end = 0
    with open("/proc/iomem") as f:
        for line in f:
            m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : System RAM", line)
            if m:
                end = max(end, int(m.group(2), 16) + 1)
    if end == 0:  # /proc/iomem hides addresses from non-root; fall back to MemTotal
        with open("/proc/meminfo") as f:
            end = int(f.readline().split()[1]) * 1024 * 2
    return end


def _candidates(cap: Capture) -> list[int]:
    top = cap.current_task() & ~(GiB - 1)
    k = (_max_phys_end() + GiB - 1) // GiB + 1
    return [top - i * GiB for i in range(k + 1)]


def by_ksym(cap: Capture, _dev: str) -> Bases | None:
    a_pob, a_vmb, szpage, _ = cap.ksym_info()
    if not a_pob or not a_vmb:
        return None
    pob, vmb = cap.kread_u64(a_pob), cap.kread_u64(a_vmb)
    if pob is None or vmb is None:
        return None
    return Bases("ksym", pob, vmb, szpage or 64)


def by_vmcoreinfo(cap: Capture, _dev: str) -> Bases | None:
    try:
        phys_s, size_s = open("/sys/kernel/vmcoreinfo").read().split()[:2]
    except (OSError, ValueError):
        return None
    phys, size = int(phys_s, 16), int(size_s)
    release = os.uname().release.encode()
    hits = []
    for base in _candidates(cap):
        d = cap.kread(base + phys, min(size, 4096))
        if not d:
            continue
        namesz, descsz, _typ = struct.unpack_from("<3I", d, 0)
        if namesz == 11 and d[12:22] == b"VMCOREINFO":
            text = d[24:24 + descsz]
            m = re.search(rb"OSRELEASE=(\S+)", text)
            if m and m.group(1) == release:
                hits.append((base, text))
    if len(hits) != 1:
        return None
    base, text = hits[0]
    kv = dict(re.findall(rb"^([A-Z_]+(?:\([^)]*\))?)=(\S+)$", text, re.M))
    if b"SYMBOL(vmemmap)" not in kv:
        return None
    return Bases("vmcoreinfo", base, int(kv[b"SYMBOL(vmemmap)"], 16),
                 int(kv.get(b"SIZE(page)", b"64")))


class _PatternPage:
    """One locked anonymous page of random bytes, with its PFN."""

    def __init__(self):
        self.buf = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.pattern = os.urandom(PAGE)
        self.buf.write(self.pattern)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        ctypes.CDLL(None).mlock(ctypes.c_void_p(addr), PAGE)
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(addr // PAGE * 8)
            entry = struct.unpack("<Q", f.read(8))[0]
        self.pfn = entry & ((1 << 55) - 1)
        if not entry >> 63 or self.pfn == 0:
            raise UserError("cannot read page frame numbers from /proc/self/pagemap (needs root)")


def _captured_read(cap: Capture, dev: str) -> tuple[_PatternPage, list[tuple[record.Header, bytes]]]:
    """O_DIRECT read of the first page of dev into a pattern page while the
    program captures this process's bios as R_CALIB."""
    page = _PatternPage()
    ring = RingConsumer(cap.fd["rb"], cap.ring_bytes)
    try:
        while ring.take()[1]:
            pass
        cap.cfg.calib_tgid = os.getpid()
        cap.enable(True)
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [memoryview(page.buf)], 0)
        finally:
            os.close(fd)
            cap.cfg.calib_tgid = 0
            cap.enable(False)
        recs: list[tuple[record.Header, bytes]] = []
        deadline = time.monotonic() + 2
        while not recs and time.monotonic() < deadline:
            span, _ = ring.take()
            for h, p in record.iter_records(span):
                if h.rtype == record.R_CALIB and h.tgid == os.getpid():
                    recs.append((h, bytes(p)))
            if not recs:
                ring.wait(0.05)
        return page, recs
    finally:
        ring.close()


def by_pagemap(cap: Capture, dev: str, page_struct_size: int = 64) -> Bases | None:
    cap.set_bases(0, 0, page_struct_size)  # payload reads fail; the page pointer is what we want
    page, recs = _captured_read(cap, dev)
    if not recs:
        return None
    vmb = recs[0][0].aux - page.pfn * page_struct_size
    probe = _PatternPage()
    hits = [b for b in _candidates(cap) if cap.kread(b + probe.pfn * PAGE, 64) == probe.pattern[:64]]
    if len(hits) != 1:
        return None
    return Bases("pagemap", hits[0], vmb, page_struct_size)


def verify(cap: Capture, dev: str, b: Bases) -> tuple[bool, str]:
    cap.set_bases(b.page_offset_base, b.vmemmap_base, b.page_struct_size)
    page, recs = _captured_read(cap, dev)
    if not recs:
        return False, "the calibration read was not captured"
    h, payload = recs[0]
    want_page = b.vmemmap_base + page.pfn * b.page_struct_size
    ok_page = h.aux == want_page
    ok_data = not h.flags & record.F_READERR and payload == page.pattern[:len(payload)] \
        and len(payload) == PAGE
    return ok_page and ok_data, f"page pointer {'ok' if ok_page else 'WRONG'}, payload " \
                                f"{'equals' if ok_data else 'DIFFERS from'} the pattern"


METHODS: dict[str, Callable[[Capture, str], Bases | None]] = {
    "ksym": by_ksym, "vmcoreinfo": by_vmcoreinfo, "pagemap": by_pagemap}


def calibrate(cap: Capture, dev: str, methods=("ksym", "vmcoreinfo", "pagemap")) -> Bases:
    """Find and verify the bases; configure cap with them; raise UserError if none passes."""
    tried = []
    for name in methods:
        t0 = time.perf_counter()
        b = METHODS[name](cap, dev)
        if b is None:
            tried.append(f"{name}: not available")
            continue
        ok, why = verify(cap, dev, b)
        b.details = {"seconds": round(time.perf_counter() - t0, 4), "verify": why}
        if ok:
            cap.set_bases(b.page_offset_base, b.vmemmap_base, b.page_struct_size)
            return b
        tried.append(f"{name}: verification failed ({why})")
    raise UserError("cannot locate the kernel direct map, refusing to trace: " + "; ".join(tried))
