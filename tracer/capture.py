"""Load the capture programs, configure them, attach them, and talk to them.

`Capture` owns one loaded copy of bpf/build/blkrewind.bpf.o: its maps
(configuration, counters, traced devices, ring buffer, dirty map), its links,
and the two programs the tracer runs on demand through BPF_PROG_TEST_RUN:
`point` (a mark or internal point stamped from the same counter as the writes)
and `reader` (kernel memory reads for the direct-map discovery).

The dirty map (docs/internals.md, "Gaps and resync") is sized before load from
the traced devices (`region_layout`), read through a shared mapping
(`dirty()`, zero copy), and `grace()` waits until every bio program that took
a stamp before the call has finished.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blkrewind.errors import UserError
from blkrewind.formats import record
from blkrewind.tracer import btfcheck, features
from blkrewind.tracer import libbpf as L

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OBJECT = ROOT / "bpf" / "build" / "blkrewind.bpf.o"
LEGACY_OBJECT = ROOT / "bpf" / "build" / "blkrewind-legacy.bpf.o"


# the dirtier (trace --dirtier) is kept per range of 2^DIRTIER_SHIFT pages of a file: a writer
# dirtying more of a range it dirtied already costs dirtier_btf a lookup and a store, no new
# LRU node (bench/bench_dirtier.py --shift measures it)
DIRTIER_SHIFT = 4


def object_path(legacy: bool = False) -> Path:
    if legacy:
        return Path(os.environ.get("BLKREWIND_BPF_LEGACY_OBJECT", LEGACY_OBJECT))
    return Path(os.environ.get("BLKREWIND_BPF_OBJECT", DEFAULT_OBJECT))


class Cfg(ctypes.Structure):
    _fields_ = [("page_offset_base", ctypes.c_uint64), ("vmemmap_base", ctypes.c_uint64),
                ("enabled_ktime", ctypes.c_uint64), ("page_struct_size", ctypes.c_uint32),
                ("enabled", ctypes.c_uint32), ("calib_tgid", ctypes.c_uint32),
                ("piece", ctypes.c_uint32), ("dirty", ctypes.c_uint32),
                ("wake_bytes", ctypes.c_uint32),
                ("dev_bloom", ctypes.c_uint64), ("dirtier", ctypes.c_uint32),
                ("dirtier_shift", ctypes.c_uint32), ("dirtier_owner", ctypes.c_uint32),
                ("pad2", ctypes.c_uint32)]


def dev_bit(kdev: int) -> int:
    """The bit of a dev_t in cfg.dev_bloom (bpf/blkrewind.bpf.c dev_bit)."""
    return 1 << (((kdev * 0x9E3779B1) & 0xFFFFFFFF) >> 26)


STATE_FIELDS = ("stamp", "seq", "drops", "drop_bytes", "bios", "bytes", "read_errs", "truncs",
                "completes", "old_bios", "write_errs", "dirty_races", "unstamped")


class State(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in STATE_FIELDS]

    def as_dict(self) -> dict[str, int]:
        return {n: int(getattr(self, n)) for n in STATE_FIELDS}


class Dev(ctypes.Structure):
    _fields_ = [("part_start", ctypes.c_uint64), ("traced", ctypes.c_uint32),
                ("region_shift", ctypes.c_uint32), ("region_base", ctypes.c_uint32),
                ("nregions", ctypes.c_uint32)]


class Grace(ctypes.Structure):
    _fields_ = [("active", ctypes.c_uint64), ("quiet", ctypes.c_uint64)]


class Err(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint64), ("sector", ctypes.c_uint64), ("ktime_ns", ctypes.c_uint64),
                ("dev", ctypes.c_uint32), ("bytes", ctypes.c_uint32), ("error", ctypes.c_uint32),
                ("pad", ctypes.c_uint32)]


ERR_SLOTS = 64               # BR_ERR_SLOTS in the BPF source
MIN_REGION_SHIFT = 16        # 64 KiB
MAX_REGIONS_SHIFT = 20       # at most 2^20 regions per device


@dataclass(frozen=True)
class Regions:
    """One traced device's part of the dirty map."""
    kdev: int
    base: int                # index of its first region in dirty_map
    shift: int               # region size = 1 << shift bytes
    count: int

    @property
    def region_bytes(self) -> int:
        return 1 << self.shift


def region_shift(size_bytes: int) -> int:
    """The smallest power of two >= 64 KiB that splits size_bytes in <= 2^20 regions."""
    shift = MIN_REGION_SHIFT
    while (size_bytes + (1 << shift) - 1) >> shift > 1 << MAX_REGIONS_SHIFT:
        shift += 1
    return shift


def region_layout(devs) -> list[Regions]:
    """Dirty-map ranges for devices given as (kdev, size_bytes) pairs, in order."""
    out, base = [], 0
    for kdev, size in devs:
        shift = region_shift(size)
        n = max(1, (size + (1 << shift) - 1) >> shift)
        out.append(Regions(kdev, base, shift, n))
        base += n
    return out


def _possible_cpus() -> int:
    """Number of possible CPUs (per-CPU map values come one per possible CPU)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            spec = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n = max(n, int(hi or lo) + 1)
    return n


class Point(ctypes.Structure):
    _fields_ = [("stamp", ctypes.c_uint64), ("ok", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("h", ctypes.c_uint8 * record.HEADER_SIZE),
                ("data", ctypes.c_uint8 * record.MAX_POINT_PAYLOAD)]


class RdBuf(ctypes.Structure):
    _fields_ = [("v", ctypes.c_uint64 * 4), ("data", ctypes.c_uint8 * 4096)]


_CHECKED_STRUCTS = {"br_cfg": Cfg, "br_state": State, "br_dev": Dev, "br_point": Point,
                    "br_rdbuf": RdBuf, "br_grace": Grace, "br_err": Err}

MAPS = ("cfg_map", "state_map", "dev_map", "point_map", "rd_map", "rb", "inflight_map",
        "dirty_map", "grace_map", "err_map")
LEGACY_MAPS = ("claim_map",)  # the legacy variant's claims (bpf/legacy.h)
PROGS = ("point", "reader")
ATTACH = {  # what: [(program, where), ...] in order of preference (those loaded)
    # capture_raw_q (legacy: block_bio_queue(q, bio) before 5.11) cannot attach where the
    # tracepoint has one argument, so it goes before capture_raw
    "queue": [("capture_btf", "tp_btf/block_bio_queue"), ("capture_raw_q", "raw_tp/block_bio_queue"),
              ("capture_raw", "raw_tp/block_bio_queue")],
    "rq_complete": [("rqdone_btf", "tp_btf/block_rq_complete"),
                    ("rqdone_raw", "raw_tp/block_rq_complete")],
    "bio_complete": [("biodone_btf", "tp_btf/block_bio_complete"),
                     ("biodone_raw", "raw_tp/block_bio_complete")],
    "dirtier": [("dirtier_btf", "tp_btf/writeback_dirty_folio"),
                ("dirtier_folio_raw", "raw_tp/writeback_dirty_folio"),
                ("dirtier_page_raw", "raw_tp/writeback_dirty_page")],
}
# Loaded and attached when the kernel takes them, else left out (the capture works without):
# dirtier_btf records who dirtied page-cache folios (R_DIRTY). A kernel without the
# tracepoint (before 5.17: writeback_dirty_page) or whose verifier refuses it loads the rest.
OPTIONAL_PROGS = ("dirtier_btf",)
LEGACY_OPTIONAL_PROGS = ("dirtier_folio_raw", "dirtier_page_raw")
# attached programs whose skipped runs lose nothing a resync must repair (missed_runs)
NOT_MISSABLE = ("dirtier_btf", "dirtier_folio_raw", "dirtier_page_raw")
K0 = ctypes.c_uint32(0)
# The program variants loaded: the tp_btf ones first (plain BTF loads, cheaper); when the
# kernel refuses one of them, the raw_tp ones (bpf_program__set_autoload picks at load).
VARIANTS = [("capture_btf", "rqdone_btf", "biodone_btf"), ("capture_raw", "rqdone_raw")]
# the legacy object (bpf/legacy.h): raw_tp programs only, both arities of block_bio_queue
LEGACY_VARIANTS = [("capture_raw_q", "capture_raw", "rqdone_raw", "biodone_raw")]


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
    def __init__(self, ring_bytes: int = 64 << 20, obj_path: str | None = None,
                 dirty_regions: int = 1, dirtier: bool = True):
        """dirtier=False: dirtier_btf is not loaded and its LRU map (15.7 MB of kernel
        memory, preallocated) is created with one entry: a tracer without --dirtier pays
        neither the verifier's time nor the memory.

        The programs are the modern variant where the kernel has what they use, else the
        legacy one (tracer/features.py variant(); BLKREWIND_BPF_VARIANT forces one)."""
        self.variant, self.variant_why = features.variant()
        legacy = self.variant == "legacy"
        path = str(obj_path or object_path(legacy))
        if not os.path.exists(path):
            raise UserError(f"BPF object {path} is missing: build it with 'python bpf/build.py' "
                            f"(./bootstrap.sh does)")
        if ring_bytes & (ring_bytes - 1) or ring_bytes < 4096:
            raise UserError(f"ring buffer size must be a power of two >= 4096, not {ring_bytes}")
        try:
            check_layouts(path)
        except btfcheck.LayoutMismatch as e:
            raise UserError(str(e)) from None
        missing = features.missing_feature()
        if missing:
            raise UserError(missing)
        sizes = {"rb": ring_bytes, "dirty_map": max(1, dirty_regions)}
        if not dirtier:
            sizes["dirtier_map"] = 1
            sizes["owner_map"] = 1
        self.optional_error: str | None = None  # why the optional programs are not loaded
        optional = LEGACY_OPTIONAL_PROGS if legacy else OPTIONAL_PROGS
        variants = LEGACY_VARIANTS if legacy else VARIANTS
        self.obj: L.BpfObject | None = None   # None: adopted (adopt()) or closed
        loaded = False
        for i, variant in enumerate(variants):
            opt = list(optional) if dirtier else []
            while not loaded:
                try:
                    self.obj = L.BpfObject(path, autoload={*variant, *PROGS, *opt},
                                           max_entries=sizes)
                    self.loaded = set(variant) | set(PROGS) | set(opt)
                    loaded = True
                except L.BpfError as e:
                    rejected = e.verifier[0] if e.verifier else None
                    if opt:  # the same variant without that optional program (or all) next
                        self.optional_error = load_error(e)
                        opt = [p for p in opt if p != rejected] if rejected in opt else []
                        continue
                    if i + 1 == len(variants) or (rejected is not None and rejected not in variant):
                        raise UserError(load_error(e)) from None
                    break
            if loaded:
                break
        self.ring_bytes = ring_bytes
        self.path = path
        self.cfg = Cfg(piece=record.MAX_PIECE, page_struct_size=64, dirty=1,
                       dirtier=int(dirtier), dirtier_shift=DIRTIER_SHIFT,
                       dirtier_owner=2)
        self.maps = MAPS + LEGACY_MAPS if legacy else MAPS
        obj = self._bpf()   # the loop above loaded a variant or raised
        self.fd = {m: obj.map_fd(m) for m in self.maps}
        self._progs = {p: obj.prog_fd(p) for p in PROGS}
        self._owned_fds: list[int] = []
        self.attached: dict[str, str] = {}
        self.attached_progs: dict[str, str] = {}  # what: the program attached there
        self._run_fds: list[int] = []  # the attached programs (missed_runs)
        self.dirty_regions = max(1, dirty_regions)
        self._ncpu = _possible_cpus()
        self._dirty_mm: mmap.mmap | None = None
        # point() and _reader() pass their input and output through one map slot: one caller
        # at a time (a mark and the resync's points come from different threads)
        self._run_lock = threading.Lock()
        self.pin_dir: str | None = None

    @classmethod
    def adopt(cls, pin_dir: str, ring_bytes: int, dirty_regions: int) -> "Capture":
        """The capture a dead tracer left pinned in pin_dir (tracer/pins.py): its maps and
        programs, still attached through their pinned links. Nothing is loaded."""
        self = cls.__new__(cls)
        self.obj = None
        self.loaded = set()
        self.path = pin_dir
        self.ring_bytes = ring_bytes
        self.dirty_regions = max(1, dirty_regions)
        self._ncpu = _possible_cpus()
        self._dirty_mm = None
        self._run_lock = threading.Lock()
        self._owned_fds = []
        self.attached = {}
        self.attached_progs = {}
        self.pin_dir = pin_dir
        legacy = os.path.exists(os.path.join(pin_dir, LEGACY_MAPS[0]))
        self.variant, self.variant_why = ("legacy" if legacy else "modern"), "pinned"
        self.maps = MAPS + LEGACY_MAPS if legacy else MAPS
        try:
            self.fd = {}
            for m in self.maps:
                self.fd[m] = L.obj_get(os.path.join(pin_dir, m))
                self._owned_fds.append(self.fd[m])
            self._progs = {}
            for p in PROGS:
                self._progs[p] = L.obj_get(os.path.join(pin_dir, p))
                self._owned_fds.append(self._progs[p])
            self._run_fds = []
            for name in sorted(os.listdir(pin_dir)):
                if name.startswith("link_"):
                    link = L.obj_get(os.path.join(pin_dir, name))
                    try:
                        fd = L.link_prog_fd(link)
                        self._owned_fds.append(fd)
                        if L.prog_name(fd) not in NOT_MISSABLE:
                            self._run_fds.append(fd)
                    finally:
                        os.close(link)
        except L.BpfError as e:
            self._close_fds()
            raise UserError(f"cannot open the pinned capture in {pin_dir}: {e.strerror}") from None
        self.cfg = L.map_lookup(self.fd["cfg_map"], K0, Cfg())
        return self

    def pin(self, pin_dir: str) -> None:
        """Pin maps, programs and links in pin_dir (a new directory on a bpffs)."""
        obj = self._bpf()
        os.makedirs(pin_dir, mode=0o700)
        obj.pin(pin_dir, list(self.maps), list(PROGS))
        self.pin_dir = pin_dir

    def _bpf(self) -> L.BpfObject:
        """The loaded BPF object (an adopted capture has none: its programs stay attached
        through their pinned links)."""
        if self.obj is None:
            raise ValueError("no BPF object: the capture was adopted from its pins, or closed")
        return self.obj

    def prog_fd(self, name: str) -> int:
        if name not in self._progs and self.obj is not None:
            return self.obj.prog_fd(name)
        return self._progs[name]

    def _close_fds(self) -> None:
        for fd in self._owned_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._owned_fds = []

    # -- attach -------------------------------------------------------------
    def attach(self, required=("queue", "rq_complete"),
               optional=("bio_complete", "dirtier")) -> dict[str, str]:
        for what in list(required) + list(optional):
            errors = []
            for prog, where in ATTACH[what]:
                if prog not in self.loaded:
                    continue
                try:
                    self._bpf().attach(prog)
                    self.attached[what] = where
                    self.attached_progs[what] = prog
                    if prog not in NOT_MISSABLE:
                        self._run_fds.append(self._bpf().prog_fd(prog))
                    break
                except L.BpfError as e:
                    errors.append(f"{where}: {e.strerror}")
            else:
                if what in required:
                    raise UserError(f"cannot attach to the block layer ({'; '.join(errors)})")
        if "dirtier" not in self.attached and self.cfg.dirtier:
            self.cfg.dirtier = 0  # no dirtier is recorded: bios need not look one up
            self.push_cfg()
        return self.attached

    # -- configuration ------------------------------------------------------
    def push_cfg(self) -> None:
        L.map_update(self.fd["cfg_map"], K0, self.cfg)

    def set_bases(self, page_offset_base: int, vmemmap_base: int, page_struct_size: int) -> None:
        self.cfg.page_offset_base = page_offset_base
        self.cfg.vmemmap_base = vmemmap_base
        self.cfg.page_struct_size = page_struct_size
        self.push_cfg()

    def add_device(self, kdev: int, part_start: int, regions: Regions | None = None) -> None:
        dev = Dev(part_start=part_start, traced=1)
        if regions is not None:
            if regions.base + regions.count > self.dirty_regions:
                raise ValueError("the dirty map is smaller than the device's regions")
            dev.region_shift, dev.region_base, dev.nregions = (regions.shift, regions.base,
                                                               regions.count)
        L.map_update(self.fd["dev_map"], ctypes.c_uint32(kdev), dev)
        if not self.cfg.dev_bloom & dev_bit(kdev):  # after the entry: its bios then find it
            self.cfg.dev_bloom |= dev_bit(kdev)
            self.push_cfg()

    def set_traced(self, kdev: int, on: bool) -> None:
        """Stop or restart capturing a device added before (its bios then pass untouched, not
        even stamped or marked dirty). Only to measure what capture costs: writes made while
        it is off are nowhere, not even counted as lost."""
        dev = Dev()
        L.map_lookup(self.fd["dev_map"], ctypes.c_uint32(kdev), dev)
        dev.traced = int(on)
        L.map_update(self.fd["dev_map"], ctypes.c_uint32(kdev), dev)

    def set_dirtier(self, on: bool) -> None:
        """Switch recording who dirtied page-cache folios (when dirtier_btf is attached)
        off and on: benches measure its cost this way."""
        self.cfg.dirtier = int(on)
        self.push_cfg()

    def set_dirtier_owner(self, mode: int) -> None:
        """2 (the default): a file dirtied by one thread only is kept in owner_map, and a
        CPU's thread dirtying more of its last file just after is not looked up again; 1:
        owner_map without that; 0: per range always (benches compare)."""
        self.cfg.dirtier_owner = int(mode)
        self.push_cfg()

    def set_dirtier_shift(self, shift: int) -> None:
        """The dirtier kept per 2^shift pages of a file (0: per folio; benches compare)."""
        self.cfg.dirtier_shift = int(shift)
        self.push_cfg()

    def set_dirty_tracking(self, on: bool) -> None:
        """The dirty map is kept by default; off only to measure what it costs."""
        self.cfg.dirty = int(on)
        self.push_cfg()

    # -- the dirty map, the grace period, write errors -----------------------
    def dirty(self) -> np.ndarray:
        """The whole dirty map as a read-only u64 array over the kernel's memory (live)."""
        if self._dirty_mm is None:
            size = (self.dirty_regions * 8 + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            self._dirty_mm = mmap.mmap(self.fd["dirty_map"], size, mmap.MAP_SHARED, mmap.PROT_READ)
        return np.frombuffer(self._dirty_mm, dtype="<u8", count=self.dirty_regions)

    def grace_counters(self) -> list[tuple[int, int]]:
        """(active, quiet) of every possible CPU."""
        vals = (Grace * self._ncpu)()
        L.map_lookup(self.fd["grace_map"], K0, vals)
        return [(int(v.active), int(v.quiet)) for v in vals]

    def grace(self, timeout: float = 10.0) -> bool:
        """Wait until every bio program that took its stamp before this call has finished
        (its dirty-map update done, its records reserved or counted as dropped). A CPU is
        past when its active count is seen at 0, or its quiet count (times active fell to 0)
        moved. False on timeout (a program cannot run that long: something is wrong)."""
        start = self.grace_counters()
        waiting = {i for i, (active, _) in enumerate(start) if active}
        deadline = time.monotonic() + timeout
        delay = 20e-6
        while waiting:
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.002)
            now = self.grace_counters()
            waiting = {i for i in waiting if now[i][0] and now[i][1] == start[i][1]}
        return True

    def errors(self, since: int) -> tuple[list[Err], int, bool]:
        """Write errors number since.. (the state's write_errs): (errors, new count,
        complete). complete is False when more errors happened than err_map remembers."""
        total = self.state().write_errs
        out: list[Err] = []
        first = max(since, total - ERR_SLOTS)
        for n in range(first, total):
            e = Err()
            for _ in range(1000):  # the slot is written just after the counter moved
                L.map_lookup(self.fd["err_map"], ctypes.c_uint32(n % ERR_SLOTS), e)
                if e.n >= n + 1:
                    break
                time.sleep(0.0001)
            if e.n != n + 1:  # overwritten by a newer error, or never completed
                return out, total, False
            out.append(e)
        return out, total, first == since

    def init_counters(self, stamp_base: int, seq_base: int = 1) -> None:
        L.map_update(self.fd["state_map"], K0, State(stamp=stamp_base, seq=seq_base))

    def set_wake_bytes(self, nbytes: int) -> None:
        """0: every record is submitted as libbpf does (it wakes a consumer that has caught
        up). Else records go without a wake-up, and the one that takes the unconsumed data
        past nbytes forces one: the consumer must poll with a timeout (RingConsumer.wait)."""
        self.cfg.wake_bytes = nbytes
        self.push_cfg()

    def enable(self, on: bool = True) -> None:
        self.cfg.enabled = int(on)
        if on:
            self.cfg.enabled_ktime = time_ns_monotonic()
        self.push_cfg()

    def state(self) -> State:
        return L.map_lookup(self.fd["state_map"], K0, State())

    def missed_runs(self) -> int:
        """Runs of the attached bio and completion programs the kernel skipped because the
        program was already running on that CPU (an interrupt reached the same tracepoint).
        A skipped queue run is a bio without stamp, record or dirty-map mark: only a resync
        of the whole device repairs it (tracer/resync.py). Never seen in the benches."""
        # the legacy programs' bios and points that could claim no stamp: unseen alike
        return (sum(L.prog_misses(fd) for fd in self._run_fds) + _injected_misses()
                + int(self.state().unstamped))

    def counters(self) -> dict[str, int]:
        """The loss and progress counters: state() and missed_runs() ("missed")."""
        return {**self.state().as_dict(), "missed": self.missed_runs()}

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
        with self._run_lock:   # else another thread's point could replace this one's input
            L.map_update(self.fd["point_map"], K0, p)   # before the run, and its stamp be
            L.test_run(self.prog_fd("point"))           # returned for this one
            out = L.map_lookup(self.fd["point_map"], K0, Point())
        return int(out.stamp), bool(out.ok)

    def prog_stats(self, name: str) -> tuple[int, int]:
        """(run_time_ns, run_cnt) of a loaded program: kernel BPF stats, counted while an
        fd from libbpf.enable_run_stats() is open (benches)."""
        lib = L.lib()
        f = lib.bpf_obj_get_info_by_fd
        f.restype, f.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.c_void_p,
                                               ctypes.POINTER(ctypes.c_uint32)]
        info = ctypes.create_string_buffer(256)  # struct bpf_prog_info (its first 216 bytes)
        n = ctypes.c_uint32(256)
        if f(self.prog_fd(name), info, ctypes.byref(n)) != 0:
            raise L.BpfError(ctypes.get_errno(), f"bpf_obj_get_info_by_fd {name}")
        run_time_ns, run_cnt = struct.unpack_from("<QQ", info.raw, 192)
        return run_time_ns, run_cnt

    # -- kernel memory reads (calibration) ------------------------------------
    def _reader(self, op: int, addr: int = 0, length: int = 0) -> tuple[int, RdBuf]:
        with self._run_lock:
            ret = L.test_run(self.prog_fd("reader"), struct.pack("<3Q", op, addr, length))
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
        """Disable capture, remove the pins (tracer/pins.py) and close: the programs detach."""
        if self.obj is not None or self._owned_fds:
            try:
                self.cfg.enabled = 0
                self.push_cfg()
            except Exception:
                pass
            if self._dirty_mm is not None:
                try:
                    self._dirty_mm.close()
                except BufferError:  # a numpy view still exists: the GC unmaps it
                    pass
                self._dirty_mm = None
            if self.pin_dir is not None:
                from blkrewind.tracer import pins
                pins.release_dir(os.path.basename(self.pin_dir))
                self.pin_dir = None
            if self.obj is not None:
                self.obj.close()
                self.obj = None
            self._close_fds()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _injected_misses() -> int:
    """Fault injection for tests (tests/test_resync.py): skipped runs cannot be caused on
    purpose, so BLKREWIND_TEST_MISSED_RUNS names a file whose number is added to the count."""
    path = os.environ.get("BLKREWIND_TEST_MISSED_RUNS")
    if not path:
        return 0
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def time_ns_monotonic() -> int:
    import time
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def load_error(e: L.BpfError) -> str:
    """One short block: what failed on which kernel and, for a program the verifier
    rejected, the last lines of its verifier log."""
    release = os.uname().release
    if e.verifier:
        prog, tail = e.verifier
        log = "\n".join("    " + ln for ln in tail.splitlines()) or "    (the verifier wrote no log)"
        return (f"cannot load the BPF programs on kernel {release}: the verifier rejected "
                f"{prog} ({e.strerror or e}); the end of its log:\n{log}")
    if e.errno == 1 and os.geteuid() != 0:  # EPERM
        hint = "needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)"
    else:
        msgs = [ln for ln in L.libbpf_messages().splitlines() if ln.strip()]
        hint = "libbpf: " + " | ".join(msgs[-3:]) if msgs else "libbpf said nothing more"
    return f"cannot load the BPF programs on kernel {release}: {e.strerror or e} ({hint})"
