"""Direct reads of payload bytes from a payload file's mapping, without decoding row groups.

A payload file (replayer/payloadstore.py, parquet_writer) is Parquet; the `data` column of a
row group stored UNCOMPRESSED holds its rows as PLAIN byte arrays: per page, a header, the definition levels,
then each row as a 4-byte length and its bytes. So the bytes of row r of row group g sit at a
fixed place in the file. `PayloadFile.rows(g)` finds those places once per row group (walking
its page headers: a few per row group, one length per row) and returns the absolute file
offset and length of every row; a read then copies just the bytes it needs straight out of the
file's mapping -- a 4 KiB read of a 4 MiB row group no longer decodes (allocates, copies) the
4 MiB, and a restore copies each byte once instead of three times.

Every page is checked against its CRC (Parquet's page checksum, which ingest always writes)
before any byte of it is used, once per open file: a damaged page is an error, never wrong
bytes (`verify`). A row group that is not laid out that way -- compressed (lz4: the batch was
compressible), a dictionary page, a null row, a page without a checksum, a data page v2 --
gives None: the caller decodes it with pyarrow as before.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np

from blkrewind.errors import StoreError
from blkrewind.osutil import crc32
from blkrewind.replayer.arrays import unique
from blkrewind.replayer.native import copy_pieces as _native_copy
from blkrewind.replayer.native import parquet_chunks as _native_chunks
from blkrewind.replayer.native import walk_pages as _native_walk

_I32 = struct.Struct("<i")


class _NotDirect(Exception):
    """This row group is not plain uncompressed pages: decode it with pyarrow."""


def _varint(b, p: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        c = b[p]
        p += 1
        v |= (c & 0x7F) << shift
        if c < 0x80:
            return v, p
        shift += 7
        if shift > 63:
            raise _NotDirect("bad varint")


def _zz(v: int) -> int:
    return (v >> 1) ^ -(v & 1)


class _Cursor:
    """A position in a thrift compact buffer, moved by _fields and by its caller."""
    __slots__ = ("b", "p")

    def __init__(self, b, p: int):
        self.b, self.p = b, p


def _fields(c: _Cursor):
    """The fields of the thrift compact struct at c.p: yields (field id, type) with c.p at
    the field's value, which the caller reads or skips (moving c.p past it); ends after the
    struct's stop byte."""
    b, fid = c.b, 0
    while True:
        h = b[c.p]
        c.p += 1
        if h == 0:
            return
        t, d = h & 0x0F, h >> 4
        if d:
            fid += d
        else:
            v, c.p = _varint(b, c.p)
            fid = _zz(v)
        yield fid, t


def _skip(b, p: int, t: int) -> int:
    """Skip one thrift compact value of type t at p."""
    if t in (1, 2):            # bool (in the field header)
        return p
    if t == 3:                 # byte
        return p + 1
    if t in (4, 5, 6):         # i16, i32, i64: varints
        return _varint(b, p)[1]
    if t == 7:                 # double
        return p + 8
    if t == 8:                 # binary
        n, p = _varint(b, p)
        return p + n
    if t in (9, 10):           # list, set
        h = b[p]
        p += 1
        n, et = h >> 4, h & 0x0F
        if n == 15:
            n, p = _varint(b, p)
        for _ in range(n):
            p = _skip(b, p, et) if et not in (1, 2) else p + 1
        return p
    if t == 11:                # map
        n, p = _varint(b, p)
        if n:
            kv = b[p]
            p += 1
            for _ in range(n):    # (a bool in a container is a byte of its own)
                p = _skip(b, p, kv >> 4) if kv >> 4 not in (1, 2) else p + 1
                p = _skip(b, p, kv & 0x0F) if kv & 0x0F not in (1, 2) else p + 1
        return p
    if t == 12:                # struct
        return _struct(b, p, None)[1]
    raise _NotDirect(f"thrift type {t}")


def _struct(b, p: int, want: dict | None) -> tuple[dict, int]:
    """Parse a compact struct at p; `want` maps field id -> None (an integer wanted) or a
    dict (a nested struct wanted, its own `want`). Returns ({field: value}, end)."""
    out: dict = {}
    fid = 0
    while True:
        h = b[p]
        p += 1
        if h == 0:
            return out, p
        t = h & 0x0F
        d = h >> 4
        if d:
            fid += d
        else:
            v, p = _varint(b, p)
            fid = _zz(v)
        w = want.get(fid, False) if want is not None else False
        if w is None and t in (4, 5, 6):
            v, p = _varint(b, p)
            out[fid] = _zz(v)
        elif isinstance(w, dict) and t == 12:
            out[fid], p = _struct(b, p, w)
        else:
            p = _skip(b, p, t)


# PageHeader: 1 type, 2 uncompressed size, 3 compressed size, 4 crc, 5 data page header
# (1 num_values, 2 encoding, 3 definition level encoding, 4 repetition level encoding)
_PAGE_HEADER = {1: None, 2: None, 3: None, 4: None, 5: {1: None, 2: None, 3: None, 4: None}}
_DATA_PAGE, _PLAIN, _RLE = 0, 0, 3


class Rows:
    """Where the rows of one row group lie in the file: pos[r], ln[r] (int64), and per row its
    page (page[r]); pages' [start, end) and crc (spans: int64 rows of 3), verified once."""

    __slots__ = ("pos", "ln", "page", "spans", "ok")

    def __init__(self, pos, ln, page, spans):
        self.pos, self.ln, self.page, self.spans = pos, ln, page, spans
        self.ok = np.zeros(len(spans), bool)


def _uvarint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


class _Template:
    """The pages of a row group that ingest wrote alike -- the same header but for the CRC,
    the same definition levels, n rows of one length each -- found by matching the first
    such page's bytes (one compiled pattern: the header's bytes, any varint for the CRC,
    the rest of the header and the definition levels verbatim, then the body's length)
    rather than parsing each header in Python (thrift compact: identical bytes around the
    CRC's varint parse to identical fields). Their CRCs and rows' length words are then
    read at once; the CRCs are those checked before a page is used."""

    __slots__ = ("_rx", "pre", "suf", "skip", "size", "n", "len")

    def __init__(self, pre: bytes, suf: bytes, skip: int, size: int, n: int, ln: int):
        self._rx: re.Pattern[bytes] | None = None
        self.pre, self.suf = pre, suf
        self.skip, self.size, self.n, self.len = skip, size, n, ln

    @classmethod
    def of(cls, b, h: dict, p: int, body: int, q: int, stop: int,
           ln: np.ndarray) -> "_Template | None":
        """From the page at p parsed the long way: h its header, its body at `body`, rows
        from q to stop of lengths ln."""
        n = len(ln)
        if n == 0 or not bool((ln == ln[0]).all()) or q + n * (4 + int(ln[0])) != stop:
            return None
        # fields 1-3 (type, uncompressed and compressed size: i32 zigzag varints) then field
        # 4's header byte; what follows the CRC's varint up to the first row, verbatim
        pre = b"".join(b"\x15" + _uvarint(_zze(h[k])) for k in (1, 2, 3)) + b"\x15"
        hdr = bytes(b[p:body])
        crc = _uvarint(_zze(h[4]))
        if not hdr.startswith(pre + crc):
            return None
        suf = hdr[len(pre) + len(crc):] + bytes(b[body:q])
        return cls(pre, suf, q - body, stop - body, n, int(ln[0]))

    def walk(self, b, p: int, end: int, left: int) -> tuple[list, list, int]:
        """The pages of this kind from p on, while they fit in [p, end) and in `left` rows:
        (the start of each one's CRC varint, of each one's body), the end of the last."""
        if self._rx is None:    # compiled on first use (the native walk needs none)
            self._rx = re.compile(re.escape(self.pre) + rb"([\x80-\xff]{0,4}[\x00-\x7f])"
                                  + re.escape(self.suf), re.DOTALL)
        match = self._rx.match
        size, skip = self.size, self.skip
        crcs: list[int] = []
        bodies: list[int] = []
        k = min(left // self.n, (end - p) // size if size else 0)
        while k > 0:
            m = match(b, p)
            if m is None:
                break
            body = m.end() - skip
            if body + size > end:
                break
            crcs.append(m.start(1))
            bodies.append(body)
            p = body + size
            k -= 1
        return crcs, bodies, p

    def walk_native(self, base: int, p: int, end: int, left: int):
        """walk() in C (replayer/pieces.c br_walk_pages), the rows' length words checked
        there too: (bodies, crcs) as arrays, the end of the last page."""
        k = min(left // self.n, (end - p) // self.size if self.size else 0)
        if k <= 0:
            return None, None, p
        body = np.empty(k, np.int64)
        crc = np.empty(k, np.uint32)
        endp = np.zeros(1, np.int64)
        assert _native_walk is not None     # (called only when it is built)
        got = _native_walk(base, p, end, k, self.pre, len(self.pre), self.suf, len(self.suf),
                           self.skip, self.size, self.n, self.len, body.ctypes.data,
                           crc.ctypes.data, endp.ctypes.data)
        return body[:got], crc[:got], int(endp[0])

    def add_found(self, body: np.ndarray, crc: np.ndarray, first_page: int, span_parts: list,
                  pos_parts: list, len_parts: list, page_parts: list) -> None:
        """The pages walk_native() found (their rows' length words already checked)."""
        n, ln = self.n, self.len
        span_parts.append(np.column_stack([body, body + self.size, crc.astype(np.int64)]))
        pos = ((body + self.skip + 4)[:, None] + np.arange(n, dtype=np.int64) * (4 + ln)).ravel()
        pos_parts.append(pos)
        len_parts.append(np.full(len(pos), ln, np.int64))
        page_parts.append(np.repeat(np.arange(first_page, first_page + len(body),
                                              dtype=np.int32), n))

    def add(self, b, crc_at: list, bodies: list, first_page: int, span_parts: list,
            pos_parts: list, len_parts: list, page_parts: list) -> None:
        """The pages walk() found: their spans (CRCs read), their rows' places (length words
        checked)."""
        n, ln = self.n, self.len
        u8 = np.frombuffer(b, np.uint8)
        # the CRCs: zigzag varints of at most 5 bytes, the last one < 0x80
        c = u8[np.asarray(crc_at, np.int64)[:, None] + np.arange(5)].astype(np.int64)
        last = np.argmax(c < 0x80, axis=1)
        v = ((c & 0x7F) << (7 * np.arange(5))) * (np.arange(5) <= last[:, None])
        v = v.sum(axis=1)
        crc = ((v >> 1) ^ -(v & 1)) & 0xFFFFFFFF
        body = np.asarray(bodies, np.int64)
        span_parts.append(np.column_stack([body, body + self.size, crc]))
        pos = ((body + self.skip + 4)[:, None] + np.arange(n, dtype=np.int64) * (4 + ln)).ravel()
        w = u8[(pos - 4)[:, None] + np.arange(4)]
        if not bool((np.ascontiguousarray(w).view("<i4").ravel() == ln).all()):
            raise _NotDirect("row lengths")
        pos_parts.append(pos)
        len_parts.append(np.full(len(pos), ln, np.int64))
        page_parts.append(np.repeat(np.arange(first_page, first_page + len(bodies),
                                              dtype=np.int32), n))


def _base(b) -> int:
    """The address of a mapping's first byte (0: none, or empty)."""
    if len(b) == 0:
        return 0
    return int(np.frombuffer(b, np.uint8).ctypes.data)


_CODECS = {0: "UNCOMPRESSED", 1: "SNAPPY", 2: "GZIP", 3: "LZO", 4: "BROTLI", 5: "LZ4_HADOOP", 6: "ZSTD",
           7: "LZ4"}   # (pyarrow's names; only UNCOMPRESSED is read directly)
_TYPES = {0: "BOOLEAN", 1: "INT32", 2: "INT64", 3: "INT96", 4: "FLOAT", 5: "DOUBLE",
          6: "BYTE_ARRAY", 7: "FIXED_LEN_BYTE_ARRAY"}


class _Chunk:
    """What _index and _span read of a column chunk (pyarrow's names)."""
    __slots__ = ("physical_type", "compression", "num_values", "total_compressed_size",
                 "data_page_offset", "dictionary_page_offset")
    physical_type: str
    compression: str
    num_values: int
    total_compressed_size: int
    data_page_offset: int
    dictionary_page_offset: int | None


class _Footer:
    """A Parquet footer's `data` column chunk of each row group, read with the thrift compact
    parser above: the direct read path does not import pyarrow (~0.1 s of every start-up:
    mount's plugin, rewind, restore). Only what _index needs; anything unexpected raises and
    meta() asks pyarrow."""

    def __init__(self, chunks: list):
        self.chunks = chunks                # per row group: _Chunk of `data`, or None
        self.num_row_groups = len(chunks)
        self.has_data = bool(chunks) and all(c is not None for c in chunks)

    def row_group(self, rg: int):
        return SimpleNamespace(column=lambda _col: self.chunks[rg])

    @classmethod
    def read(cls, b) -> "_Footer":
        n = len(b)
        if n < 12 or bytes(b[n - 4:]) != b"PAR1":
            raise _NotDirect("not parquet")
        (flen,) = _I32.unpack_from(b, n - 8)
        p = n - 8 - flen
        if flen <= 0 or p < 4:
            raise _NotDirect("footer length")
        if _native_chunks is not None:
            got = cls._read_native(b, p, n - 8)
            if got is not None:
                return got
        # FileMetaData: 4 row_groups list<RowGroup>; RowGroup: 1 columns list<ColumnChunk>;
        # ColumnChunk: 3 meta_data ColumnMetaData
        chunks: list = []
        cur = _Cursor(b, p)
        for fid, t in _fields(cur):
            if fid == 4 and t == 9:
                chunks += _struct_list(cur, _row_group, "row groups")
            else:
                cur.p = _skip(b, cur.p, t)
        return cls(chunks)


    @classmethod
    def _read_native(cls, b, p: int, end: int) -> "_Footer | None":
        """read() in C (replayer/pieces.c br_parquet_chunks: the same fields, every byte
        bounds-checked; a footer of 5 row groups in ~10 us instead of ~1.5 ms); None when it
        finds something it does not expect (then the Python parser says what)."""
        out = np.zeros((end - p + 1, _CH_N), np.int64)   # (a row group takes >= 1 byte)
        assert _native_chunks is not None
        k = _native_chunks(_base(b), end, p, b"data", 4, len(out), out.ctypes.data)
        if k < 0:
            return None
        chunks: list = []
        for found, typ, codec, values, size, data, has_dict, dict_off in out[:k].tolist():
            if not found:
                chunks.append(None)
                continue
            c = _Chunk()
            c.physical_type = _TYPES.get(typ, str(typ))
            c.compression = _CODECS.get(codec, str(codec))
            c.num_values = values
            c.total_compressed_size = size
            c.data_page_offset = data
            c.dictionary_page_offset = dict_off if has_dict else None
            chunks.append(c)
        return cls(chunks)


_CH_N = 8   # values per row group from br_parquet_chunks (pieces.c CH_N)


def _list_head(b, p: int) -> tuple[int, int, int]:
    h = b[p]
    p += 1
    k, et = h >> 4, h & 0x0F
    if k == 15:
        k, p = _varint(b, p)
    return k, et, p


def _struct_list(cur: _Cursor, parse, what: str) -> list:
    """The list of structs at cur.p (moved past it), each read by parse(b, p) -> (value,
    end); what: named when it is not a list of structs."""
    k, et, cur.p = _list_head(cur.b, cur.p)
    if et != 12:
        raise _NotDirect(what)
    out = []
    for _ in range(k):
        v, cur.p = parse(cur.b, cur.p)
        out.append(v)
    return out


def _row_group(b, p: int) -> tuple["_Chunk | None", int]:
    """A RowGroup struct at p: (its `data` column chunk or None, end)."""
    found = None
    cur = _Cursor(b, p)
    for fid, t in _fields(cur):
        if fid == 1 and t == 9:
            for c in _struct_list(cur, _column_chunk, "columns"):
                if c is not None:
                    found = c
        else:
            cur.p = _skip(b, cur.p, t)
    return found, cur.p


def _column_chunk(b, p: int) -> tuple["_Chunk | None", int]:
    """A ColumnChunk at p: (its metadata as a _Chunk when its path is ["data"], end)."""
    out = None
    cur = _Cursor(b, p)
    for fid, t in _fields(cur):
        if fid == 3 and t == 12:
            out, cur.p = _column_meta(b, cur.p)
        else:
            cur.p = _skip(b, cur.p, t)
    return out, cur.p


def _column_meta(b, p: int) -> tuple["_Chunk | None", int]:
    vals: dict = {}
    path: list = []
    cur = _Cursor(b, p)
    for fid, t in _fields(cur):
        if fid == 3 and t == 9:             # path_in_schema list<string>
            k, et, cur.p = _list_head(b, cur.p)
            if et != 8:
                raise _NotDirect("path")
            for _ in range(k):
                m, q = _varint(b, cur.p)
                path.append(bytes(b[q:q + m]))
                cur.p = q + m
        elif fid in (1, 4, 5, 7, 9, 11) and t in (5, 6):   # i32 / i64 zigzag varints
            v, cur.p = _varint(b, cur.p)
            vals[fid] = _zz(v)
        else:
            cur.p = _skip(b, cur.p, t)
    p = cur.p
    if path != [b"data"]:
        return None, p
    if not {1, 4, 5, 7, 9} <= vals.keys():
        raise _NotDirect("column metadata")
    c = _Chunk()
    c.physical_type = _TYPES.get(vals[1], str(vals[1]))
    c.compression = _CODECS.get(vals[4], str(vals[4]))
    c.num_values = vals[5]
    c.total_compressed_size = vals[7]
    c.data_page_offset = vals[9]
    c.dictionary_page_offset = vals.get(11)
    return c, p


def _zze(v: int) -> int:
    return v << 1 if v >= 0 else ((-v) << 1) - 1


class PayloadFile:
    """One payload file, mapped: its row groups' row places (built lazily, thread-safe)."""

    def __init__(self, path: str, mapping=None, *, populate: bool = False):
        """populate: map every page at once (MAP_POPULATE: a restore reads most of the file;
        one call instead of a page fault per 64 KiB)."""
        self.path = path
        if mapping is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise StoreError(f"cannot read payload file {path}: {e.strerror} (pruned "
                                 f"meanwhile? try again)") from None
            try:
                size = os.fstat(fd).st_size
                flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
                mapping = mmap.mmap(fd, size, flags, mmap.PROT_READ) if size else b""
            finally:
                os.close(fd)
        self.map = mapping
        self.view = memoryview(mapping)
        self.lock = threading.Lock()
        self.rgs: dict = {}           # rg -> Rows | None
        self._meta: Any = None       # _Footer, or pyarrow's FileMetaData (its fallback)
        self._col = -1
        self._tmpl: _Template | None = None
        self._base = -1       # the mapping's address, for the native walk (0: none)

    def meta(self):
        """The file's footer: its `data` column chunk per row group (_Footer, read here with
        the page headers' thrift parser; pyarrow's reader when that fails)."""
        if self._meta is None:
            try:
                footer = _Footer.read(self.map)
                self._col = 0 if footer.has_data else -1
                self._meta = footer       # after _col: a reader seeing _meta has _col too
                return self._meta
            except (_NotDirect, IndexError, struct.error, ValueError):
                pass
            import pyarrow as pa
            import pyarrow.parquet as pq
            try:
                meta = pq.ParquetFile(pa.BufferReader(pa.py_buffer(self.map))).metadata
            except (OSError, ValueError) as e:
                raise StoreError(f"cannot read payload file {self.path}: {e}") from None
            names = [meta.schema.column(i).name for i in range(meta.num_columns)]
            self._col = names.index("data") if "data" in names else -1
            self._meta = meta
        return self._meta

    def rows(self, rg: int) -> Rows | None:
        """The places of row group rg's rows, or None when it must be decoded by pyarrow."""
        try:
            return self.rgs[rg]
        except KeyError:
            pass
        with self.lock:
            if rg in self.rgs:
                return self.rgs[rg]
            try:
                r: Rows | None = self._index(rg)
            except (_NotDirect, IndexError, struct.error):
                r = None
            self.rgs[rg] = r
            return r

    def _index(self, rg: int) -> Rows:
        md = self.meta()
        if self._col < 0 or rg >= md.num_row_groups:
            raise _NotDirect("no such row group")
        c = md.row_group(rg).column(self._col)
        if c.compression != "UNCOMPRESSED" or c.dictionary_page_offset is not None \
                or c.physical_type != "BYTE_ARRAY":
            raise _NotDirect(c.compression)
        b = self.map
        p = int(c.data_page_offset)
        end = p + int(c.total_compressed_size)
        left = int(c.num_values)
        if end > len(b):
            raise StoreError(f"payload file {self.path} is shorter than its row group {rg} "
                             f"(damaged? 'blkrewind verify --store' checks the store)")
        pos_parts: list = []
        len_parts: list = []
        page_parts: list = []
        span_parts: list = []
        npages = 0
        # the pages of every row group of a file are alike: the last one's template first
        tmpl: _Template | None = self._tmpl
        matched = False     # tmpl found pages in this row group
        if self._base < 0:
            self._base = _base(b) if _native_walk is not None else 0
        base = self._base
        while left > 0 and p < end:
            if tmpl is not None and base:
                body, crc, p2 = tmpl.walk_native(base, p, end, left)
                if body is not None and len(body):
                    tmpl.add_found(body, crc, npages, span_parts, pos_parts, len_parts,
                                   page_parts)
                    matched = True
                    npages += len(body)
                    left -= tmpl.n * len(body)
                    p = p2
                    continue
            elif tmpl is not None:
                crc_at, bodies, p2 = tmpl.walk(b, p, end, left)
                if bodies:
                    tmpl.add(b, crc_at, bodies, npages, span_parts, pos_parts, len_parts,
                             page_parts)
                    matched = True
                    npages += len(bodies)
                    left -= tmpl.n * len(bodies)
                    p = p2
                    continue
            page_at = p
            h, body = _struct(b, p, _PAGE_HEADER)
            size = h.get(3, -1)
            dp = h.get(5)
            if h.get(1) != _DATA_PAGE or dp is None or 4 not in h or size < 0 \
                    or h.get(2) != size or dp.get(2) != _PLAIN or dp.get(3) != _RLE:
                raise _NotDirect("page kind")
            stop = body + size
            if stop > end:
                raise _NotDirect("page past its column chunk")
            n = dp.get(1, 0)
            # definition levels (max level 1): one RLE run of n ones = no null row
            (dl,) = _I32.unpack_from(b, body)
            q = body + 4
            rl, q2 = _varint(b, q)
            if rl & 1 or rl >> 1 != n or q2 + 1 != q + dl or b[q2] != 1:
                raise _NotDirect("def levels")
            q = body + 4 + dl
            pos, ln = _values(b, q, stop, n)
            pos_parts.append(pos)
            len_parts.append(ln)
            page_parts.append(np.full(n, npages, np.int32))
            span_parts.append(np.array([[body, stop, h[4] & 0xFFFFFFFF]], np.int64))
            npages += 1
            left -= n
            p = stop
            if not matched:   # (none yet, or the last row group's did not fit this one)
                tmpl = _Template.of(b, h, page_at, body, q, stop, ln) or tmpl
        if left != 0:
            raise _NotDirect("row count")
        if matched:
            self._tmpl = tmpl
        return Rows(np.concatenate(pos_parts), np.concatenate(len_parts),
                    np.concatenate(page_parts), np.concatenate(span_parts).astype(np.int64))

    def _span(self, rg: int) -> tuple[int, int] | None:
        """[a, e) of row group rg's data column in the mapping, a page-aligned."""
        md = self.meta()
        if self._col < 0 or rg >= md.num_row_groups or not isinstance(self.map, mmap.mmap):
            return None
        c = md.row_group(rg).column(self._col)
        a = int(c.data_page_offset)
        if c.dictionary_page_offset is not None:
            a = min(a, int(c.dictionary_page_offset))
        e = min(len(self.map), a + int(c.total_compressed_size))
        a -= a % mmap.PAGESIZE
        return (a, e) if e > a else None

    def willneed(self, rg: int) -> None:
        """Ask the kernel to read row group rg's data column in now, asynchronously (a payload
        file written with O_DIRECT is not in the page cache: one large read-ahead instead of
        a synchronous fault per 64 KiB when its pages are first touched)."""
        try:
            span = self._span(rg)
            if span is not None:
                self.map.madvise(mmap.MADV_WILLNEED, span[0], span[1] - span[0])
        except (OSError, ValueError, StoreError):
            pass    # only a hint

    def willneed_all(self, rgs) -> None:
        """willneed() of these row groups, neighbours merged into one call (on data in the
        page cache: ~5 ms a GB)."""
        try:
            spans = sorted(x for x in map(self._span, rgs) if x is not None)
        except StoreError:
            return
        a0 = e0 = -1
        for a, e in [*spans, (-1, -1)]:
            if a > e0 or a < 0:
                if e0 > a0 >= 0:
                    try:
                        self.map.madvise(mmap.MADV_WILLNEED, a0, e0 - a0)
                    except (OSError, ValueError):
                        return
                a0 = a
            e0 = max(e0, e)

    def willneed_rows(self, rg: int, idx: np.ndarray) -> None:
        """Read-ahead of just the pages that hold rows idx of row group rg (their places found
        first: the page headers are read, not the rows)."""
        r = self.rows(rg)
        if r is None:
            self.willneed(rg)
            return
        if not isinstance(self.map, mmap.mmap) or len(idx) == 0:
            return
        sp = r.spans[unique(r.page[idx])]
        a, e = sp[:, 0] - sp[:, 0] % mmap.PAGESIZE, sp[:, 1]
        # pages next to each other (within 64 KiB) in one call
        brk = np.flatnonzero(a[1:] > e[:-1] + (64 << 10)) + 1
        for x, y in zip(a[np.concatenate([[0], brk])].tolist(),
                        e[np.concatenate([brk - 1, [len(e) - 1]])].tolist()):
            try:
                self.map.madvise(mmap.MADV_WILLNEED, x, y - x)
            except (OSError, ValueError):
                return

    def verify(self, r: Rows, pages) -> None:
        """Check the CRC of the given pages of r (each once)."""
        for pg in pages:
            if r.ok[pg]:
                continue
            a, e, crc = r.spans[pg].tolist()
            if crc32(self.view[a:e]) & 0xFFFFFFFF != crc:
                raise StoreError(f"payload file {self.path}: a page fails its checksum "
                                 f"(damaged? 'blkrewind verify --store' checks the store)")
            r.ok[pg] = True

    def place(self, rg: int, idx: np.ndarray, src: np.ndarray, n: np.ndarray, *,
              check: bool = True):
        """File offsets of pieces (row idx, offset src in the row, n bytes) of row group rg, the
        pages they touch verified (check=False: not yet -- the caller verifies each page
        before it uses its bytes); None when rg must be decoded."""
        r = self.rows(rg)
        if r is None:
            return None
        if len(idx) and (int(idx.max()) >= len(r.pos) or int(idx.min()) < 0
                         or bool((src + n > r.ln[idx]).any()) or bool((src < 0).any())):
            raise StoreError(f"a payload row of {self.path} is shorter than its record says")
        if not check:
            return r.pos[idx] + src
        pages = unique(r.page[idx])
        if not r.ok[pages].all():
            self.verify(r, pages.tolist())
        return r.pos[idx] + src

    def close(self) -> None:
        self.view.release()
        self.rgs.clear()
        if isinstance(self.map, mmap.mmap):
            try:
                self.map.close()
            except BufferError:  # a view still alive: the mapping goes with it
                pass


def _values(b, q: int, stop: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, lengths) of n PLAIN byte arrays from q; they must end exactly at stop."""
    if n == 0:
        if q != stop:
            raise _NotDirect("trailing bytes")
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    (first,) = _I32.unpack_from(b, q)
    if first >= 0 and q + n * (4 + first) == stop:
        # all rows of one length (a history of 4 KiB writes; 1 MiB baseline chunks): check
        # every length word at once
        words = np.ndarray(shape=(n,), dtype="<i4", buffer=b, offset=q, strides=(4 + first,))
        if bool((words == first).all()):
            pos = q + 4 + np.arange(n, dtype=np.int64) * (4 + first)
            return pos, np.full(n, first, np.int64)
    pos = np.empty(n, np.int64)
    ln = np.empty(n, np.int64)
    unpack = _I32.unpack_from
    for i in range(n):
        (m,) = unpack(b, q)
        if m < 0:
            raise _NotDirect("negative length")
        pos[i] = q + 4
        ln[i] = m
        q += 4 + m
    if q != stop:
        raise _NotDirect("values do not fill the page")
    return pos, ln


def _address(v) -> tuple[int, int]:
    """(address, length) of a buffer for the native copy; (0, 0) for None or an empty one."""
    if v is None or len(v) == 0:
        return 0, 0
    a = np.frombuffer(v, np.uint8)
    return a.ctypes.data, len(a)


NATIVE_MIN = 8    # pieces: fewer are copied in Python (the native call's set-up costs ~10 us)


def copy_pieces(dst, d_off, src_views: list, f: np.ndarray | None, s_off, n) -> None:
    """dst[d_off[k]:+n[k]] = src_views[f[k]][s_off[k]:+n[k]] (f None: src_views[0]). Many
    pieces: one native call (replayer/pieces.c, a memcpy each, the GIL released), every
    bound checked here first with numpy; few, or without the library: a memoryview slice copy
    per piece (~1.5 us for 4 KiB)."""
    k = len(n)
    if k >= NATIVE_MIN and _native_copy is not None:
        d = np.frombuffer(dst, np.uint8) if not isinstance(dst, np.ndarray) else dst
        if d.dtype != np.uint8 or not d.flags.c_contiguous or not d.flags.writeable:
            d = np.frombuffer(memoryview(dst).cast("B"), np.uint8)
        if not d.flags.writeable:
            raise ValueError("copy_pieces: the destination is read-only")
        d_off = np.ascontiguousarray(d_off, np.int64)
        s_off = np.ascontiguousarray(s_off, np.int64)
        n = np.ascontiguousarray(n, np.int64)
        addr, size = zip(*map(_address, src_views)) if src_views else ((), ())
        base = np.asarray(addr, np.uint64)
        lens = np.asarray(size, np.int64)
        if f is None:
            fl = None
            lim = lens[0] if len(lens) else 0
        else:
            fl = np.ascontiguousarray(f, np.int64)
            if int(fl.min()) < 0 or int(fl.max()) >= len(lens):
                raise ValueError("copy_pieces: no such source")
            lim = lens[fl]
        if int(n.min()) < 0 or int(d_off.min()) < 0 or int(s_off.min()) < 0 \
                or int((d_off + n).max()) > len(d) or bool((s_off + n > lim).any()):
            raise ValueError("copy_pieces: a piece lies outside its buffer")
        _native_copy(d.ctypes.data, d_off.ctypes.data, base.ctypes.data,
                     None if fl is None else fl.ctypes.data, s_off.ctypes.data, n.ctypes.data, k)
        return
    dv = dst if isinstance(dst, memoryview) else memoryview(dst)
    if dv.format != "B":
        dv = dv.cast("B")
    if f is None:
        sv = src_views[0]
        for a, b, m in zip(d_off.tolist(), s_off.tolist(), n.tolist()):
            dv[a:a + m] = sv[b:b + m]
    else:
        for a, b, m, k in zip(d_off.tolist(), s_off.tolist(), n.tolist(), f.tolist()):
            dv[a:a + m] = src_views[k][b:b + m]
