"""Consume the BPF ring buffer from Python without a callback per record.

The ring buffer is mmapped (consumer page read-write, producer page and the
double-mapped data area read-only). `peek()` walks the record prefixes from a
position to the first record still being written (BUSY) and returns that whole
committed span as a view into the mapping (no copy); `release()` hands the
space back by storing the new consumer_pos; `take()` does both with a copy. Records keep the
ring buffer's own 8-byte framing, which is the framing blkrewind.formats.record and the LOG
use, so the span goes to the LOG as is.

consumer_pos must be published with one aligned 8-byte store (a ctypes
c_uint64 at the mapped address): a byte-wise store lets the kernel see a
torn position and drop records (docs/design.md, "Cost").
"""
from __future__ import annotations

import ctypes
import mmap
import select

from blkrewind.formats.record import RB_BUSY, RB_DISCARD, RB_LEN_MASK
from blkrewind.tracer import native

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
PAGE = mmap.PAGESIZE


def _mmap(fd: int, length: int, prot: int, offset: int) -> int:
    addr = _libc.mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
    if addr in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, "mmap of the BPF ring buffer failed")
    return addr


def walk_py(words, mask: int, cons: int, limit: int) -> tuple[int, int]:
    """The record prefixes from cons to the first BUSY one (at most to limit): (end position,
    live records). words: the data area as u32s. tracer/ringwalk.c is the same loop, native."""
    end, n = cons, 0
    while end < limit:
        word = words[(end & mask) >> 2]
        if word & RB_BUSY:
            break
        if not word & RB_DISCARD:
            n += 1
        end += ((word & RB_LEN_MASK) + 8 + 7) & ~7
    return end, n


class RingConsumer:
    def __init__(self, fd: int, size: int, max_span: int = 8 << 20, use_native: bool = True):
        self.size = size
        self.mask = size - 1
        self.max_span = max_span
        self._cons_addr = _mmap(fd, PAGE, mmap.PROT_READ | mmap.PROT_WRITE, 0)
        self._prod_len = PAGE + 2 * size
        self._prod_addr = _mmap(fd, self._prod_len, mmap.PROT_READ, PAGE)
        self._cons = ctypes.c_uint64.from_address(self._cons_addr)
        self._prod = ctypes.c_uint64.from_address(self._prod_addr)
        self._data = (ctypes.c_char * (2 * size)).from_address(self._prod_addr + PAGE)
        self._view = memoryview(self._data).cast("B")
        self._words = self._view.cast("I")  # record prefixes: 8-byte aligned u32s
        # the walk in C (tracer/native.py) where it is built: ~2 records per 4 KiB write
        self._walk = native.ring_walk if use_native else None
        self._data_addr = self._prod_addr + PAGE
        self._nrec = ctypes.c_uint64()
        self._ep: select.epoll | None = select.epoll()
        self._ep.register(fd, select.EPOLLIN)
        self.records = 0
        self.bytes = 0

    def producer_pos(self) -> int:
        return self._prod.value

    def consumed_pos(self) -> int:
        return self._cons.value

    def pending(self) -> int:
        return self._prod.value - self._cons.value

    def peek(self, pos: int | None = None) -> tuple[memoryview | None, int, int]:
        """Committed records from pos (default: consumer_pos) on, without copying
        or releasing them: (view into the ring, live records, end position).
        The view stays valid until release() passes its end."""
        cons = self._cons.value if pos is None else pos
        prod = self._prod.value
        limit = min(prod, cons + self.max_span)
        if self._walk is not None:
            end = self._walk(self._data_addr, self.mask, cons, limit, ctypes.byref(self._nrec))
            n = self._nrec.value
        else:
            end, n = walk_py(self._words, self.mask, cons, limit)
        if end == cons:
            return None, 0, cons
        view, start = self._view, cons & self.mask
        self.records += n
        self.bytes += end - cons
        return view[start:start + (end - cons)], n, end

    def release(self, pos: int) -> None:
        """Give the ring space before pos back to the kernel (one 8-byte store)."""
        self._cons.value = pos

    def take(self) -> tuple[bytes, int]:
        """Copy out the committed records after consumer_pos (at most max_span
        bytes) and release them; returns (span, number of live records)."""
        view, n, end = self.peek()
        if view is None:
            return b"", 0
        span = view.tobytes()
        view.release()
        self.release(end)
        return span, n

    def wait(self, timeout_s: float) -> None:
        if self._cons.value == self._prod.value:
            if self._ep is None:
                raise ValueError("the ring buffer is closed")
            self._ep.poll(timeout_s)

    def close(self) -> None:
        if self._ep is None:
            return
        self._ep.close()
        self._ep = None
        try:
            self._words.release()
            self._view.release()
        except BufferError:  # views handed out by peek(); never read after close
            pass
        _libc.munmap(ctypes.c_void_p(self._prod_addr), self._prod_len)
        _libc.munmap(ctypes.c_void_p(self._cons_addr), PAGE)
