"""A thin ctypes binding to the system libbpf (libbpf.so.1, Debian libbpf1).

Only what blkrewind needs: open/load an object, set map sizes and program
autoload, attach programs, map lookups/updates, and BPF_PROG_TEST_RUN. libbpf
objects are opaque pointers. Errors become BpfError with libbpf's errno.
(docs/design.md, "Toolchain": bcc cannot compile without kernel headers and the only PyPI
binding is not production ready, so this module is the whole dependency.)
"""
from __future__ import annotations

import ctypes
import os
import re
import struct
import sys

c_vp, c_int, c_u32, c_u64, c_char_p, c_size_t = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32,
                                                  ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t)


class BpfError(OSError):
    verifier: tuple[str, str] | None = None  # a rejected program: (name, its verifier log tail)


def _load():
    try:
        return ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise BpfError(f"libbpf.so.1 not found ({e}): install libbpf1 (./bootstrap.sh does)") from None


_lib = None


def lib():
    global _lib
    if _lib is None:
        _lib = _load()
        for name, res, args in _SIGNATURES:
            f = getattr(_lib, name)
            f.restype, f.argtypes = res, args
    return _lib


class bpf_test_run_opts(ctypes.Structure):
    _fields_ = [("sz", c_size_t), ("data_in", c_vp), ("data_out", c_vp),
                ("data_size_in", c_u32), ("data_size_out", c_u32),
                ("ctx_in", c_vp), ("ctx_out", c_vp), ("ctx_size_in", c_u32), ("ctx_size_out", c_u32),
                ("retval", c_u32), ("repeat", c_int), ("duration", c_u32),
                ("flags", c_u32), ("cpu", c_u32), ("batch_size", c_u32)]


_SIGNATURES = [
    ("libbpf_version_string", c_char_p, []),
    ("libbpf_set_print", c_vp, [c_vp]),
    ("bpf_object__open_file", c_vp, [c_char_p, c_vp]),
    ("bpf_object__load", c_int, [c_vp]),
    ("bpf_object__close", None, [c_vp]),
    ("bpf_object__find_program_by_name", c_vp, [c_vp, c_char_p]),
    ("bpf_object__next_program", c_vp, [c_vp, c_vp]),
    ("bpf_program__name", c_char_p, [c_vp]),
    ("bpf_program__set_autoload", c_int, [c_vp, ctypes.c_bool]),
    ("bpf_program__fd", c_int, [c_vp]),
    ("bpf_program__attach", c_vp, [c_vp]),
    ("bpf_link__destroy", c_int, [c_vp]),
    ("bpf_object__find_map_by_name", c_vp, [c_vp, c_char_p]),
    ("bpf_map__fd", c_int, [c_vp]),
    ("bpf_map__set_max_entries", c_int, [c_vp, c_u32]),
    ("bpf_map_update_elem", c_int, [c_int, c_vp, c_vp, c_u64]),
    ("bpf_map_lookup_elem", c_int, [c_int, c_vp, c_vp]),
    ("bpf_map_delete_elem", c_int, [c_int, c_vp]),
    ("bpf_prog_test_run_opts", c_int, [c_int, ctypes.POINTER(bpf_test_run_opts)]),
    ("bpf_enable_stats", c_int, [c_int]),
    ("bpf_map__pin", c_int, [c_vp, c_char_p]),
    ("bpf_program__pin", c_int, [c_vp, c_char_p]),
    ("bpf_link__fd", c_int, [c_vp]),
    ("bpf_obj_pin", c_int, [c_int, c_char_p]),
    ("bpf_obj_get", c_int, [c_char_p]),
    ("bpf_obj_get_info_by_fd", c_int, [c_int, c_vp, ctypes.POINTER(c_u32)]),
    ("bpf_prog_get_fd_by_id", c_int, [c_u32]),
    ("libbpf_probe_bpf_helper", c_int, [c_int, c_int, c_vp]),
    ("bpf_prog_load", c_int, [c_int, c_char_p, c_char_p, c_vp, c_size_t, c_vp]),
]

BPF_PROG_TYPE_RAW_TRACEPOINT = 17


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def has_atomic_fetch() -> bool:
    """Whether the kernel's BPF has atomic fetch-and-add (BPF_ATOMIC | BPF_FETCH, 5.12): a
    tiny program doing one on its stack loads or not. Unsure answers (not root) count as
    yes, as in has_helper."""
    prog = b"".join([
        _insn(0xb7, dst=1),                               # r1 = 0
        _insn(0x7b, dst=10, src=1, off=-8),               # *(u64 *)(r10 - 8) = r1
        _insn(0xb7, dst=2, imm=1),                        # r2 = 1
        _insn(0xdb, dst=10, src=2, off=-8, imm=0x01),     # r2 = atomic64_fetch_add(r10 - 8, r2)
        _insn(0xb7, dst=0),                               # r0 = 0
        _insn(0x95),                                      # exit
    ])
    buf = ctypes.create_string_buffer(prog, len(prog))
    fd = lib().bpf_prog_load(BPF_PROG_TYPE_RAW_TRACEPOINT, b"br_probe", b"GPL",
                             ctypes.cast(buf, c_vp), len(prog) // 8, None)
    if fd >= 0:
        os.close(fd)
        return True
    return fd != -22  # EINVAL: the verifier does not know the instruction; else unsure (EPERM...)


def has_helper(helper_id: int, prog_type: int = BPF_PROG_TYPE_RAW_TRACEPOINT) -> bool:
    """Whether the running kernel offers a BPF helper to a program type (libbpf's probe:
    it loads a tiny program calling it). Unsure answers (a probe error) count as yes: the
    load then says what is wrong."""
    return lib().libbpf_probe_bpf_helper(prog_type, helper_id, None) != 0


def _err(what: str, code: int | None = None) -> BpfError:
    e = ctypes.get_errno() if code is None else abs(code)
    return BpfError(e, f"{what}: {os.strerror(e)}")


# libbpf prints its own diagnostics (verifier logs...) to stderr by default;
# we collect them instead and show them only when something fails.
_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_vp)
_libbpf_msgs: list[str] = []
_verifier_logs: dict[str, str] = {}  # program -> the tail of its last load log
VERIFIER_TAIL_LINES = 14


def _vformat(fmt: bytes, va) -> str:
    """vasprintf: the whole message however long (a verifier log can be megabytes)."""
    libc = ctypes.CDLL(None)
    libc.vasprintf.argtypes = [ctypes.POINTER(c_vp), c_char_p, c_vp]
    libc.free.argtypes = [c_vp]
    out = c_vp()
    if libc.vasprintf(ctypes.byref(out), fmt, va) < 0 or not out.value:
        return ""
    try:
        return ctypes.string_at(out.value).decode("utf-8", "replace")
    finally:
        libc.free(out)


_LOAD_LOG = re.compile(r"prog '([^']+)': -- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --",
                       re.S)


@_PRINT_FN
def _print_cb(level, fmt, va):
    try:
        msg = _vformat(fmt, va)
        m = _LOAD_LOG.search(msg)
        if m:
            lines = [ln for ln in m.group(2).splitlines() if ln.strip()]
            _verifier_logs[m.group(1)] = "\n".join(lines[-VERIFIER_TAIL_LINES:])
            msg = msg[:m.start(2)] + "[...]\n" + _verifier_logs[m.group(1)] + "\n" + msg[m.end(2):]
        _libbpf_msgs.append(msg)
        del _libbpf_msgs[:-200]
    except Exception:
        pass
    return 0


def libbpf_messages() -> str:
    return "".join(_libbpf_msgs)


_FAILED_PROG = re.compile(r"prog '([^']+)': (?:BPF program load failed|failed to load)")


def verifier_failure() -> tuple[str, str] | None:
    """(program, the tail of its verifier log) of the last rejected program, or None."""
    for msg in reversed(_libbpf_msgs):
        m = _FAILED_PROG.search(msg)
        if m:
            return m.group(1), _verifier_logs.get(m.group(1), "")
    return None


class BpfObject:
    """An opened and loaded BPF ELF object with the links attached from it."""

    def __init__(self, path: str, autoload: set[str] | None = None,
                 max_entries: dict[str, int] | None = None):
        L = lib()
        L.libbpf_set_print(ctypes.cast(_print_cb, c_vp))
        _libbpf_msgs.clear()
        _verifier_logs.clear()
        self.path = path
        self.links: list[int] = []
        self.obj = L.bpf_object__open_file(path.encode(), None)
        if not self.obj:
            raise _err(f"open {path}")
        try:
            if autoload is not None:
                p = L.bpf_object__next_program(self.obj, None)
                while p:
                    L.bpf_program__set_autoload(p, L.bpf_program__name(p).decode() in autoload)
                    p = L.bpf_object__next_program(self.obj, p)
            for name, n in (max_entries or {}).items():
                m = L.bpf_object__find_map_by_name(self.obj, name.encode())
                if not m or L.bpf_map__set_max_entries(m, n) != 0:
                    raise _err(f"set size of map {name}")
            r = L.bpf_object__load(self.obj)
            if r != 0:
                e = _err(f"load {os.path.basename(path)}", r)
                e.verifier = verifier_failure()  # (program, log tail) or None
                raise e
        except BaseException:
            L.bpf_object__close(self.obj)
            self.obj = None
            raise

    def _prog(self, name: str):
        p = lib().bpf_object__find_program_by_name(self.obj, name.encode())
        if not p:
            raise KeyError(name)
        return p

    def prog_fd(self, name: str) -> int:
        return lib().bpf_program__fd(self._prog(name))

    def attach(self, name: str) -> int:
        link = lib().bpf_program__attach(self._prog(name))
        if not link:
            raise _err(f"attach {name}")
        self.links.append(link)
        return link

    def map_fd(self, name: str) -> int:
        m = lib().bpf_object__find_map_by_name(self.obj, name.encode())
        if not m:
            raise KeyError(name)
        return lib().bpf_map__fd(m)

    def pin(self, directory: str, maps: list[str], progs: list[str]) -> None:
        """Pin the named maps and programs and every link in directory (on a bpffs), so
        they outlive this process: links as link_N (bpffs refuses dots in names), maps and programs by name. The
        links keep the programs attached until the pins are removed (pins.release)."""
        L = lib()
        for name in maps:
            m = L.bpf_object__find_map_by_name(self.obj, name.encode())
            r = L.bpf_map__pin(m, os.path.join(directory, name).encode()) if m else -2
            if r != 0:
                raise _err(f"pin map {name}", r)
        for name in progs:
            r = L.bpf_program__pin(self._prog(name), os.path.join(directory, name).encode())
            if r != 0:
                raise _err(f"pin program {name}", r)
        for i, link in enumerate(self.links):
            if L.bpf_obj_pin(L.bpf_link__fd(link), os.path.join(directory, f"link_{i}").encode()):
                raise _err(f"pin link {i}")

    def close(self) -> None:
        L = lib()
        for link in self.links:
            L.bpf_link__destroy(link)
        self.links = []
        if self.obj:
            L.bpf_object__close(self.obj)
            self.obj = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def obj_get(path: str) -> int:
    """An fd for a pinned map, program or link (BPF_OBJ_GET)."""
    fd = lib().bpf_obj_get(path.encode())
    if fd < 0:
        raise _err(f"open pinned {path}", fd)
    return fd


def map_update(fd: int, key, value, flags: int = 0) -> None:
    r = lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags)
    if r != 0:
        raise _err("bpf_map_update_elem", r)


def map_lookup(fd: int, key, value):
    r = lib().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value))
    if r != 0:
        raise _err("bpf_map_lookup_elem", r)
    return value


def map_delete(fd: int, key) -> bool:
    return lib().bpf_map_delete_elem(fd, ctypes.byref(key)) == 0


def test_run(prog_fd: int, ctx: bytes = b"") -> int:
    """BPF_PROG_TEST_RUN of a raw_tp program (ctx: its u64 arguments); returns retval."""
    buf = ctypes.create_string_buffer(bytes(ctx), max(len(ctx), 1))
    o = bpf_test_run_opts()
    o.sz = ctypes.sizeof(o)
    if ctx:
        o.ctx_in = ctypes.cast(buf, c_vp)
        o.ctx_size_in = len(ctx)
    r = lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(o))
    if r != 0:
        raise _err("bpf_prog_test_run", r)
    return o.retval


def enable_run_stats() -> int:
    """BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): returns an fd; stats stay on while it is open."""
    fd = lib().bpf_enable_stats(0)
    if fd < 0:
        raise _err("bpf_enable_stats", fd)
    return fd


# offsets in the kernel's uapi structs (append-only ABI): struct bpf_prog_info.recursion_misses
# (since 5.12) and struct bpf_link_info.prog_id
_PROG_INFO_MISSES = 208
_LINK_INFO_PROG_ID = 8


def _info(fd: int, size: int) -> tuple[bytes, int]:
    buf = ctypes.create_string_buffer(size)
    n = c_u32(size)
    r = lib().bpf_obj_get_info_by_fd(fd, ctypes.cast(buf, c_vp), ctypes.byref(n))
    if r != 0:
        raise _err("bpf_obj_get_info_by_fd", r)
    return buf.raw, n.value


def prog_misses(prog_fd: int) -> int:
    """Runs of the program the kernel skipped: it was already running on the CPU (an
    interrupt hit the same hook while it ran). Each is an event the program never saw."""
    raw, n = _info(prog_fd, 256)
    if n < _PROG_INFO_MISSES + 8:
        return 0  # kernel older than the counter
    return int.from_bytes(raw[_PROG_INFO_MISSES:_PROG_INFO_MISSES + 8], sys.byteorder)


_PROG_INFO_NAME = 64  # struct bpf_prog_info.name (char[16])


def prog_name(prog_fd: int) -> str:
    """A loaded program's name (the kernel keeps its first 15 bytes)."""
    raw, _ = _info(prog_fd, 256)
    return raw[_PROG_INFO_NAME:_PROG_INFO_NAME + 16].split(b"\0", 1)[0].decode("ascii", "replace")


def link_prog_fd(link_fd: int) -> int:
    """An fd for the program a (pinned) link attaches."""
    raw, _ = _info(link_fd, 64)
    pid = int.from_bytes(raw[_LINK_INFO_PROG_ID:_LINK_INFO_PROG_ID + 4], sys.byteorder)
    fd = lib().bpf_prog_get_fd_by_id(pid)
    if fd < 0:
        raise _err(f"bpf_prog_get_fd_by_id {pid}", fd)
    return fd
