"""Load the capture programs, configure them, attach them, and talk to them.

`Capture` owns one loaded copy of bpf/build/blkrewind.bpf.o: its maps
(configuration, counters, traced devices, ring buffer), its links, and the
two programs the tracer runs on demand through BPF_PROG_TEST_RUN: `point`
(a mark or internal point stamped from the same counter as the writes) and
`reader` (kernel memory reads for the direct-map discovery).
"""
from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

from blkrewind import record
from blkrewind.errors import UserError
from tracer import btfcheck
from tracer import libbpf as L

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OBJECT = ROOT / "bpf" / "build" / "blkrewind.bpf.o"


def object_path() -> Path:
    return Path(os.environ.get("BLKREWIND_BPF_OBJECT", DEFAULT_OBJECT))


class Cfg(ctypes.Structure):
    _fields_ = [("page_offset_base", ctypes.c_uint64), ("vmemmap_base", ctypes.c_uint64),
                ("enabled_ktime", ctypes.c_uint64), ("page_struct_size", ctypes.c_uint32),
                ("enabled", ctypes.c_uint32), ("calib_tgid", ctypes.c_uint32),
                ("piece", ctypes.c_uint32)]


STATE_FIELDS = ("stamp", "seq", "drops", "drop_bytes", "bios", "bytes", "read_errs", "truncs",
                "completes", "old_bios")


class State(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in STATE_FIELDS]

    def as_dict(self) -> dict[str, int]:
        return {n: int(getattr(self, n)) for n in STATE_FIELDS}


class Dev(ctypes.Structure):
    _fields_ = [("part_start", ctypes.c_uint64), ("traced", ctypes.c_uint32),
                ("traced_dev", ctypes.c_uint32)]


class Point(ctypes.Structure):
    _fields_ = [("stamp", ctypes.c_uint64), ("ok", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("h", ctypes.c_uint8 * record.HEADER_SIZE),
                ("data", ctypes.c_uint8 * record.MAX_POINT_PAYLOAD)]


class RdBuf(ctypes.Structure):
    _fields_ = [("v", ctypes.c_uint64 * 4), ("data", ctypes.c_uint8 * 4096)]


_CHECKED_STRUCTS = {"br_cfg": Cfg, "br_state": State, "br_dev": Dev, "br_point": Point,
                    "br_rdbuf": RdBuf}

ATTACH = {  # what: [(program, where), ...] in order of preference
    "queue": [("capture_btf", "tp_btf/block_bio_queue"), ("capture_raw", "raw_tp/block_bio_queue")],
    "rq_complete": [("rqdone_btf", "tp_btf/block_rq_complete"),
                    ("rqdone_raw", "raw_tp/block_rq_complete")],
    "bio_complete": [("biodone_btf", "tp_btf/block_bio_complete")],
}
K0 = ctypes.c_uint32(0)


def check_layouts(path: str) -> None:
    """Refuse an object whose record or control structs differ from what Python uses."""
    btfcheck.check_record_layout(path)
    btf = btfcheck.object_btf(path)
    for name, cls in _CHECKED_STRUCTS.items():
        got = [(m[0], m[1], m[2]) for m in btf.struct_members(name)]
        want = [(f[0], getattr(cls, f[0]).offset, getattr(cls, f[0]).size) for f in cls._fields_]
        if got != want or ctypes.sizeof(cls) != btf.sizeof_struct(name):
            raise btfcheck.LayoutMismatch(
                f"the BPF object's struct {name} does not match tracer/capture.py "
                f"(rebuild with: python bpf/build.py --force)")


class Capture:
    def __init__(self, ring_bytes: int = 64 << 20, obj_path: str | None = None):
        path = str(obj_path or object_path())
        if not os.path.exists(path):
            raise UserError(f"BPF object {path} is missing: build it with 'python bpf/build.py' "
                            f"(./bootstrap.sh does)")
        if ring_bytes & (ring_bytes - 1) or ring_bytes < 4096:
            raise UserError(f"ring buffer size must be a power of two >= 4096, not {ring_bytes}")
        try:
            check_layouts(path)
        except btfcheck.LayoutMismatch as e:
            raise UserError(str(e)) from None
        programs = {p for opts in ATTACH.values() for p, _ in opts} | {"point", "reader"}
        try:
            self.obj = L.BpfObject(path, autoload=programs, max_entries={"rb": ring_bytes})
        except L.BpfError as e:
            raise UserError(f"cannot load the BPF programs: {e.strerror or e} "
                            f"({_load_hint(e)})") from None
        self.ring_bytes = ring_bytes
        self.path = path
        self.cfg = Cfg(piece=record.MAX_PIECE, page_struct_size=64)
        self.fd = {m: self.obj.map_fd(m) for m in
                   ("cfg_map", "state_map", "dev_map", "point_map", "rd_map", "rb", "inflight_map")}
        self.attached: dict[str, str] = {}

    # -- attach -------------------------------------------------------------
    def attach(self, required=("queue", "rq_complete"), optional=("bio_complete",)) -> dict[str, str]:
        for what in list(required) + list(optional):
            errors = []
            for prog, where in ATTACH[what]:
                try:
                    self.obj.attach(prog)
                    self.attached[what] = where
                    break
                except L.BpfError as e:
                    errors.append(f"{where}: {e.strerror}")
            else:
                if what in required:
                    raise UserError(f"cannot attach to the block layer ({'; '.join(errors)})")
        return self.attached

    # -- configuration ------------------------------------------------------
    def push_cfg(self) -> None:
        L.map_update(self.fd["cfg_map"], K0, self.cfg)

    def set_bases(self, page_offset_base: int, vmemmap_base: int, page_struct_size: int) -> None:
        self.cfg.page_offset_base = page_offset_base
        self.cfg.vmemmap_base = vmemmap_base
        self.cfg.page_struct_size = page_struct_size
        self.push_cfg()

    def add_device(self, kdev: int, part_start: int) -> None:
        L.map_update(self.fd["dev_map"], ctypes.c_uint32(kdev), Dev(part_start=part_start, traced=1))

    def init_counters(self, stamp_base: int, seq_base: int = 1) -> None:
        L.map_update(self.fd["state_map"], K0, State(stamp=stamp_base, seq=seq_base))

    def enable(self, on: bool = True) -> None:
        self.cfg.enabled = int(on)
        if on:
            self.cfg.enabled_ktime = time_ns_monotonic()
        self.push_cfg()

    def state(self) -> State:
        return L.map_lookup(self.fd["state_map"], K0, State())

    # -- points and marks ---------------------------------------------------
    def point(self, rtype: int, payload: bytes, tgid: int = 0, tid: int = 0,
              comm: bytes = b"") -> tuple[int, bool]:
        """Emit a stamped R_MARK / R_POINT; returns (stamp, reached the ring buffer)."""
        if len(payload) > record.MAX_POINT_PAYLOAD:
            raise UserError(f"point payload longer than {record.MAX_POINT_PAYLOAD} bytes")
        p = Point()
        hdr = record.pack_header(rtype=rtype, len=len(payload), tgid=tgid or os.getpid(),
                                 tid=tid or os.getpid(), comm=(comm or b"blkrewind")[:15])
        ctypes.memmove(p.h, hdr, len(hdr))
        ctypes.memmove(p.data, payload, len(payload))
        L.map_update(self.fd["point_map"], K0, p)
        L.test_run(self.obj.prog_fd("point"))
        out = L.map_lookup(self.fd["point_map"], K0, Point())
        return int(out.stamp), bool(out.ok)

    # -- kernel memory reads (calibration) ------------------------------------
    def _reader(self, op: int, addr: int = 0, length: int = 0) -> tuple[int, RdBuf]:
        ret = L.test_run(self.obj.prog_fd("reader"), struct.pack("<3Q", op, addr, length))
        return ret, L.map_lookup(self.fd["rd_map"], K0, RdBuf())

    def kread(self, addr: int, length: int) -> bytes | None:
        ret, b = self._reader(0, addr, length)
        return None if ret != 0 else bytes(b.data)[:length]

    def kread_u64(self, addr: int) -> int | None:
        d = self.kread(addr, 8)
        return None if d is None else struct.unpack("<Q", d)[0]

    def current_task(self) -> int:
        return int(self._reader(1)[1].v[0])

    def ksym_info(self) -> tuple[int, int, int, int]:
        """(&page_offset_base, &vmemmap_base, sizeof(struct page), sizeof(struct bio_vec))"""
        v = self._reader(2)[1].v
        return int(v[0]), int(v[1]), int(v[2]), int(v[3])

    def close(self) -> None:
        if getattr(self, "obj", None):
            try:
                self.cfg.enabled = 0
                self.push_cfg()
            except Exception:
                pass
            self.obj.close()
            self.obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def time_ns_monotonic() -> int:
    import time
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _load_hint(e: OSError) -> str:
    if e.errno == 1:  # EPERM
        return "needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)"
    if e.errno == 22:
        return "the verifier or the kernel refused it; needs a >= 6.1 kernel with BTF"
    return "see the kernel log"
