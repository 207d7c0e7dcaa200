"""The one definition of a blkrewind record.

Every record -- written by the BPF programs into the ring buffer, or by the
tracer itself (baseline chunks, session and device descriptions, loss
reports) -- is a fixed 112-byte header followed by ``len`` bytes of payload.

This module is the single source of truth for that layout:

* ``bpf/build.py`` generates ``record.h`` (the C struct and constants the BPF
  programs include) from ``FIELDS`` and the constants below;
* the loader (``tracer/btfcheck.py``) reads the compiled object's BTF and
  refuses to run unless ``struct br_rec`` there has exactly these fields at
  exactly these offsets;
* the tracer, the LOG, the replayer and the tests decode with ``HEADER`` /
  ``DTYPE``.

Framing (in the ring buffer and, unchanged, inside LOG frames): each record is
preceded by an 8-byte little-endian prefix ``u32 len_and_bits, u32 unused``
-- the BPF ring buffer's own record header. The low 30 bits are the length of
header + payload, bit 31 (BUSY) marks a record still being written and bit 30
(DISCARD) a record to skip. Records are padded to 8 bytes. Records the tracer
writes itself use the same framing, so one decoder reads everything.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

# (name, C type, count). Order, types and counts are the layout.
FIELDS: list[tuple[str, str, int]] = [
    ("stamp", "u64", 1),       # order stamp: one global counter, one value per bio / point
    ("seq", "u64", 1),         # kernel records: per-record sequence (a gap == a lost record);
                               # tracer records: the tracer's own running number
    ("ktime_ns", "u64", 1),    # CLOCK_MONOTONIC at the event (bpf_ktime_get_ns)
    ("sector", "u64", 1),      # first 512-byte sector, relative to the traced device
    ("part_start", "u64", 1),  # start sector of the partition on its disk (0 for a disk)
    ("cgroup_id", "u64", 1),   # cgroup v2 id of the submitter
    ("aux", "u64", 1),         # per type: BIO page pointer, COMPLETE request start ns, BASE order
    ("dev", "u32", 1),         # traced device, kernel dev_t encoding (major << 20 | minor)
    ("opf", "u32", 1),         # raw bi_opf (kernel specific; op/flags below are normalised)
    ("bio_size", "u32", 1),    # bytes of the whole bio (COMPLETE: bytes completed)
    ("offset", "u32", 1),      # byte offset of this record's payload within the bio
    ("len", "u32", 1),         # payload bytes that follow the header
    ("flags", "u32", 1),       # F_* below
    ("tgid", "u32", 1),        # process id of the submitter
    ("tid", "u32", 1),         # thread id of the submitter
    ("rtype", "u16", 1),       # R_* below
    ("error", "u16", 1),       # COMPLETE: blk_status_t (0 = success)
    ("op", "u8", 1),           # OP_* below (normalised from the kernel's enum req_op)
    ("pad", "u8", 3),
    ("comm", "char", 16),      # submitter's command name
]

_STRUCT_CODES = {"u64": "Q", "u32": "I", "u16": "H", "u8": "B", "char": "s"}
_SIZES = {"u64": 8, "u32": 4, "u16": 2, "u8": 1, "char": 1}


def _struct_format() -> str:
    out = "<"
    for _name, ctype, count in FIELDS:
        code = _STRUCT_CODES[ctype]
        if ctype == "char":
            out += f"{count}s"
        elif count == 1:
            out += code
        else:
            out += f"{count}{code}" if ctype != "u8" else f"{count}s"
    return out


HEADER = struct.Struct(_struct_format())
HEADER_SIZE = HEADER.size  # 112

# Offsets of each field, as the BTF check compares them.
OFFSETS: dict[str, int] = {}
_off = 0
for _name, _ctype, _count in FIELDS:
    OFFSETS[_name] = _off
    _off += _SIZES[_ctype] * _count
assert _off == HEADER_SIZE, (_off, HEADER_SIZE)
del _off

DTYPE = np.dtype({
    "names": [n for n, _, _ in FIELDS],
    "formats": [
        {"u64": "<u8", "u32": "<u4", "u16": "<u2", "u8": "u1"}[t] if c == 1 and t != "char"
        else f"S{c}" if t == "char" else (np.uint8, (c,))
        for n, t, c in FIELDS
    ],
    "offsets": [OFFSETS[n] for n, _, _ in FIELDS],
    "itemsize": HEADER_SIZE,
})

# ---- record types (rtype) -------------------------------------------------
# written by BPF programs (each consumes one kernel sequence number)
R_BIO = 1        # a write-class bio, or one piece of its payload
R_COMPLETE = 2   # a request (blk-mq) or bio (bio-based) completed; payload: u64 stamps of its bios
R_MARK = 3       # a user's named point; payload: the name (utf-8)
R_POINT = 4      # an internal stamped point; payload: JSON {"what": ..., ...}
R_CALIB = 5      # calibration read (never written to the LOG)
R_DIRTY = 6      # who dirtied the first page of a bio another task submitted (writeback):
                 # the bio's stamp, dev and sector; tgid/tid/comm/cgroup_id of the dirtier,
                 # ktime_ns when the page went dirty, aux its folio index; no payload
# written by the tracer (seq is the tracer's own running number)
R_SESSION = 16   # payload JSON: the session (host, stamp base, tracer version, ...)
R_DEVICE = 17    # payload JSON: one traced device (path, name, dev, size, ...)
R_BASE = 18      # baseline chunk: sector, len; payload = the bytes, or none with F_ZERO;
                 # stamp 0, or (F_RESYNC) the stamp Rs of the resync that read it
R_LOSS = 19      # payload JSON: loss counters as the kernel reported them
R_END = 20       # payload JSON: the session ended cleanly (last stamp, last seq, counters)

RTYPE_NAMES = {R_BIO: "bio", R_COMPLETE: "complete", R_MARK: "mark", R_POINT: "point",
               R_CALIB: "calib", R_DIRTY: "dirty", R_SESSION: "session", R_DEVICE: "device", R_BASE: "base",
               R_LOSS: "loss", R_END: "end"}

# ---- flags ---------------------------------------------------------------
F_FIRST = 1 << 0      # first record of this bio
F_LAST = 1 << 1       # last record of this bio
F_NODATA = 1 << 2     # no payload by nature (flush, discard, write-zeroes, empty PREFLUSH)
F_READERR = 1 << 3    # reading the payload from kernel memory failed: payload invalid
F_CALIB = 1 << 4      # calibration bio
F_TRUNC = 1 << 5      # the bio was not captured to its end (walk bound)
F_ZERO = 1 << 6       # BASE: the chunk reads as zeroes (no payload stored)
F_OLD = 1 << 7        # COMPLETE: the request held bios queued before capture began
F_FUA = 1 << 8        # the bio had REQ_FUA
F_PREFLUSH = 1 << 9   # the bio had REQ_PREFLUSH
F_SYNC = 1 << 10      # the bio had REQ_SYNC
F_META = 1 << 11      # the bio had REQ_META
F_RESYNC = 1 << 12    # BASE: a resync chunk (stamp = the resync's Rs, docs/internals.md)
F_DIRTYSELF = 1 << 13 # BIO: the submitter itself dirtied the bio's first page (no R_DIRTY)

FLAG_NAMES = [(F_FUA, "FUA"), (F_PREFLUSH, "PREFLUSH"), (F_SYNC, "SYNC"), (F_META, "META"),
              (F_NODATA, "NODATA"), (F_READERR, "READERR"), (F_TRUNC, "TRUNC"),
              (F_ZERO, "ZERO"), (F_OLD, "OLD"), (F_FIRST, "FIRST"), (F_LAST, "LAST"),
              (F_RESYNC, "RESYNC"), (F_DIRTYSELF, "DIRTYSELF")]

# ---- normalised operations (op) ---------------------------------------------
# Numbered as Linux numbers enum req_op; the BPF side maps the running kernel's
# values (CO-RE enum relocations) onto these.
OP_NONE = 0
OP_WRITE = 1
OP_FLUSH = 2
OP_DISCARD = 3
OP_SECURE_ERASE = 5
OP_WRITE_ZEROES = 9
OP_NAMES = {OP_NONE: "", OP_WRITE: "write", OP_FLUSH: "flush", OP_DISCARD: "discard",
            OP_SECURE_ERASE: "secure_erase", OP_WRITE_ZEROES: "write_zeroes"}
# ops whose range reads back as zeroes afterwards (a rebuild writes zeroes there)
ZEROING_OPS = (OP_DISCARD, OP_SECURE_ERASE, OP_WRITE_ZEROES)

# ---- framing --------------------------------------------------------------
RB_BUSY = 1 << 31
RB_DISCARD = 1 << 30
RB_LEN_MASK = RB_DISCARD - 1
FRAME_PREFIX = struct.Struct("<II")
FRAME_PREFIX_SIZE = 8

# Capture limits shared by BPF and Python.
MAX_PIECE = 64 * 1024          # payload bytes in one BIO record (larger bios: several records)
MAX_MARK_NAME = 128            # bytes of a mark's name
MAX_POINT_PAYLOAD = 256        # bytes of an R_POINT payload
MAX_COMPLETE_BIOS = 16         # bio stamps carried by one R_COMPLETE record
SECTOR = 512


class Header(NamedTuple):
    stamp: int
    seq: int
    ktime_ns: int
    sector: int
    part_start: int
    cgroup_id: int
    aux: int
    dev: int
    opf: int
    bio_size: int
    offset: int
    len: int
    flags: int
    tgid: int
    tid: int
    rtype: int
    error: int
    op: int
    pad: bytes
    comm: bytes

    @property
    def comm_str(self) -> str:
        return self.comm.split(b"\0", 1)[0].decode("utf-8", "replace")


def unpack_header(buf, offset: int = 0) -> Header:
    return Header._make(HEADER.unpack_from(buf, offset))


def pack_header(**fields) -> bytes:
    """Header bytes for a record the tracer writes itself; unnamed fields are 0."""
    values = []
    for name, ctype, count in FIELDS:
        v = fields.pop(name, None)
        if v is None:
            v = b"" if (ctype == "char" or (ctype == "u8" and count > 1)) else 0
        values.append(v)
    if fields:
        raise TypeError(f"unknown record fields: {sorted(fields)}")
    return HEADER.pack(*values)


def frame_record(header: bytes, payload: bytes | memoryview = b"") -> bytes:
    """One framed record (8-byte prefix, header, payload, padding to 8)."""
    n = len(header) + len(payload)
    pad = (-n) & 7
    return b"".join((FRAME_PREFIX.pack(n, 0), header, payload, b"\0" * pad))


def make_record(payload: bytes | memoryview = b"", **fields) -> bytes:
    fields["len"] = len(payload)
    return frame_record(pack_header(**fields), payload)


def json_record(rtype: int, obj, **fields) -> bytes:
    return make_record(json.dumps(obj, sort_keys=True).encode(), rtype=rtype, **fields)


class CorruptRecords(ValueError):
    """A span of framed records does not parse."""


def iter_framed(buf) -> Iterator[tuple[int, int]]:
    """Yield (header_offset, record_length) for each live record in a span of
    framed records; skips discarded ones. Raises CorruptRecords on a record
    that does not fit or is shorter than a header."""
    mv = memoryview(buf)
    n = len(mv)
    pos = 0
    prefix = FRAME_PREFIX.unpack_from
    while pos < n:
        if pos + FRAME_PREFIX_SIZE > n:
            raise CorruptRecords(f"truncated record prefix at {pos}")
        word, _ = prefix(mv, pos)
        if word & RB_BUSY:
            raise CorruptRecords(f"busy record at {pos}")
        rl = word & RB_LEN_MASK
        end = pos + FRAME_PREFIX_SIZE + rl
        if end > n:
            raise CorruptRecords(f"record at {pos} runs past the span ({rl} bytes)")
        if not word & RB_DISCARD:
            if rl < HEADER_SIZE:
                raise CorruptRecords(f"record at {pos} is shorter than a header ({rl} bytes)")
            yield pos + FRAME_PREFIX_SIZE, rl
        pos = (end + 7) & ~7


def iter_records(buf) -> Iterator[tuple[Header, memoryview]]:
    """Decode every live record of a span: (Header, payload view)."""
    mv = memoryview(buf)
    for off, rl in iter_framed(mv):
        h = unpack_header(mv, off)
        if HEADER_SIZE + h.len > rl:
            raise CorruptRecords(f"record at {off}: payload length {h.len} exceeds record {rl}")
        yield h, mv[off + HEADER_SIZE: off + HEADER_SIZE + h.len]


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES if flags & bit]


def kdev(major: int, minor: int) -> int:
    """Kernel-internal dev_t encoding, as bio->bi_bdev->bd_dev holds it."""
    return (major << 20) | minor


def kdev_split(dev: int) -> tuple[int, int]:
    return dev >> 20, dev & 0xFFFFF


@dataclass(frozen=True)
class CLayout:
    """What bpf/build.py writes into record.h."""

    @staticmethod
    def header_text() -> str:
        ctypes_ = {"u64": "__u64", "u32": "__u32", "u16": "__u16", "u8": "__u8", "char": "char"}
        lines = ["/* Generated by bpf/build.py from blkrewind/formats/record.py. Do not edit. */",
                 "#pragma once", "", "struct br_rec {"]
        for name, ctype, count in FIELDS:
            arr = f"[{count}]" if count > 1 else ""
            lines.append(f"\t{ctypes_[ctype]} {name}{arr};")
        lines.append("};")
        lines.append("")
        consts = {k: v for k, v in globals().items()
                  if k.isupper() and isinstance(v, int) and k.split("_")[0] in
                  ("R", "F", "OP", "MAX", "SECTOR")}
        for k in sorted(consts):
            lines.append(f"#define BR_{k} {consts[k]}ULL" if consts[k] > 0xFFFFFFFF
                         else f"#define BR_{k} {consts[k]}")
        lines.append(f"#define BR_HEADER_SIZE {HEADER_SIZE}")
        return "\n".join(lines) + "\n"
