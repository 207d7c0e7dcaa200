"""Random reads of a device's image at a point: what `export` serves and `rewind` writes.

An `Image` is built from a rebuild plan (replayer/rebuild.py `plan`: the visible pieces at the
point, vectorised, O(extents log extents), metadata only -- its cost follows the history's
extent count, not the device size: a sparse 64 GiB device is as quick as a 1 GiB one). It keeps
the data pieces sorted by device offset; a read of [offset, offset + n) is

  1. two binary searches (numpy searchsorted) for the pieces that overlap it,
  2. for pieces in uncompressed row groups (random data; replayer/payload.py): a copy of just
     their bytes straight out of the payload file's mapping -- the row places of a row group
     are found once (its page headers walked), each page's CRC checked once, before any of its
     bytes are used; a 4 KiB read costs a 64 KiB page check, not a 4 MiB decode,
  3. for pieces in compressed (lz4) row groups: the decoded row group (from a byte-bounded LRU
     cache, `RowGroupCache`, decoded once even when several threads want it at once) and one
     vectorised scatter of its pieces into the caller's buffer (rebuild.scatter),
  4. zeroes wherever no data piece lies (holes, discards, never-written bytes).

Payload files are memory-mapped when the image is opened and read from those mappings only, so
a `prune` (or anything else) deleting or replacing files later cannot change what an open image
shows: it keeps serving the point it was opened at. A damaged page fails its Parquet checksum:
an error, never wrong bytes.
"""
from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from blkrewind.errors import StoreError
from blkrewind.replayer.arrays import unique
from blkrewind.replayer.payload import PayloadFile, copy_pieces

if TYPE_CHECKING:
    from blkrewind.replayer.rebuild import Plan

CACHE_BYTES = 256 << 20
UNKNOWN, DECODE = -2, -1  # Image.abs: row group not looked at yet / decoded by pyarrow
RG_BYTES = 4 << 20      # about the payload bytes of a row group (replayer/ingest/columns.py RG_BYTES)


def auto_cache_bytes(row_groups: int) -> int:
    """Room for every row group the image refers to (a sequential read of a history of random
    small writes visits them all again and again: an LRU smaller than that thrashes), at most
    an eighth of the machine's memory, at least CACHE_BYTES."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 8 << 30
    return max(CACHE_BYTES, min(row_groups * RG_BYTES + (RG_BYTES << 2), total // 8))


class RowGroupCache:
    """Decoded payload row groups, least recently used out past `max_bytes`. Thread-safe; a
    row group wanted by several threads at once is decoded by one of them."""

    def __init__(self, paths: dict, max_bytes: int = CACHE_BYTES, ids=None):
        self.paths = paths              # file id -> absolute path
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.lru: OrderedDict = OrderedDict()   # (fid, rg) -> (offs int64, vals uint8, arr)
        self.loading: dict = {}                 # (fid, rg) -> Event
        self.bytes = 0
        self.maps: dict = {}                    # fid -> mmap
        self.pfs: dict = {}                     # fid -> (ParquetFile, its lock)
        self.direct: dict = {}                  # fid -> payload.PayloadFile on the mapping
        self.decoded = 0
        for fid in (paths if ids is None else ids):
            self._map(int(fid))

    def _map(self, fid: int):
        m = self.maps.get(fid)
        if m is not None:
            return m
        path = self.paths[fid]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot read payload file {path}: {e.strerror} (pruned meanwhile? "
                             f"try again)") from None
        try:
            size = os.fstat(fd).st_size
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else b""
        finally:
            os.close(fd)
        self.maps[fid] = m
        return m

    def payload(self, fid: int) -> PayloadFile:
        """The file's direct reader (replayer/payload.py), on the mapping made at open."""
        pf = self.direct.get(fid)
        if pf is None:
            with self.lock:
                pf = self.direct.get(fid)
                if pf is None:
                    pf = self.direct[fid] = PayloadFile(self.paths[fid], self._map(fid))
        return pf

    def _parquet(self, fid: int):
        """(ParquetFile, lock): a ParquetFile is not safe for concurrent reads."""
        pf = self.pfs.get(fid)
        if pf is None:
            path = self.paths[fid]
            import pyarrow as pa  # (here: uncompressed payload is read without it)
            import pyarrow.parquet as pq
            try:
                pf = pq.ParquetFile(pa.BufferReader(pa.py_buffer(self._map(fid))),
                                    page_checksum_verification=True)
            except (OSError, ValueError) as e:
                raise StoreError(f"cannot read payload file {path}: {e}") from None
            pf = self.pfs[fid] = (pf, threading.Lock())
        return pf

    def get(self, fid: int, rg: int):
        key = (fid, rg)
        while True:
            with self.lock:
                hit = self.lru.get(key)
                if hit is not None:
                    self.lru.move_to_end(key)
                    return hit
                ev = self.loading.get(key)
                if ev is None:
                    ev = self.loading[key] = threading.Event()
                    pf = self._parquet(fid)
                    break
            ev.wait()
        try:
            try:
                with pf[1]:
                    tbl = pf[0].read_row_group(rg, columns=["data"], use_threads=False)
            except (OSError, ValueError) as e:
                raise StoreError(f"payload file {self.paths[fid]}, row group {rg}: {e} "
                                 f"(damaged? 'blkrewind verify --store' checks the store)") from None
            col = tbl.column("data")  # combine_chunks would copy even a single chunk
            arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
            bufs = arr.buffers()
            offs = np.frombuffer(bufs[1], np.int32)[arr.offset:arr.offset + len(arr) + 1] \
                .astype(np.int64)
            vals = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None \
                else np.zeros(0, np.uint8)
            ent = (offs, vals, arr)
            with self.lock:
                self.lru[key] = ent
                self.bytes += len(vals) + 8 * len(offs)
                self.decoded += 1
                while self.bytes > self.max_bytes and len(self.lru) > 1:
                    _, (o, v, _a) = self.lru.popitem(last=False)
                    self.bytes -= len(v) + 8 * len(o)
            return ent
        finally:
            with self.lock:
                self.loading.pop(key, None)
            ev.set()

    def close(self) -> None:
        self.lru.clear()
        self.pfs.clear()
        for pf in self.direct.values():
            pf.view.release()
        self.direct.clear()
        for m in self.maps.values():
            if isinstance(m, mmap.mmap):
                try:
                    m.close()
                except BufferError:  # a view still alive: the mapping goes with it
                    pass
        self.maps.clear()


class Image:
    """The bytes of a device at a point, read at random (see the module docstring)."""

    def __init__(self, p: Plan | SimpleNamespace, *, cache_bytes: int | None = None,
                 cache: RowGroupCache | None = None):
        """cache: another image's (of the same store: rewind's two points), whose mappings,
        row places and checked pages this one then shares."""
        self.size = p.size
        order = np.argsort(p.d_off, kind="stable")
        self.off = p.d_off[order].astype(np.int64)
        self.end = self.off + p.d_len[order].astype(np.int64)
        self.src = p.d_src[order].astype(np.int64)
        self.fid = p.d_file[order].astype(np.int64)
        self.rg = p.d_rg[order].astype(np.int64)
        self.idx = p.d_idx[order].astype(np.int64)
        self.key = self.fid * (1 << 32) + self.rg
        # data runs (touching pieces merged): what `extents` reports as data
        if len(self.off):
            brk = np.flatnonzero(self.off[1:] != self.end[:-1]) + 1
            self.run_off = self.off[np.concatenate([[0], brk])]
            self.run_end = self.end[np.concatenate([brk - 1, [len(self.off) - 1]])]
        else:
            self.run_off = self.run_end = np.zeros(0, np.int64)
        self.row_groups = len(unique(self.key))
        if cache_bytes is None:
            cache_bytes = auto_cache_bytes(self.row_groups)
        self.cache = cache if cache is not None else \
            RowGroupCache(p.files, cache_bytes, ids=unique(self.fid).tolist())
        self.data_bytes = int((self.end - self.off).sum())
        # direct reads (replayer/payload.py): per piece, the file offset of its first byte
        # (UNKNOWN until its row group is first read, DECODE when pyarrow must decode it)
        self.abs = np.full(len(self.off), UNKNOWN, np.int64)
        self.by_key = np.argsort(self.key, kind="stable")
        self.keys_sorted = self.key[self.by_key]
        ufid = unique(self.fid)
        self.slot = np.searchsorted(ufid, self.fid)   # per piece: its file's place in views
        self.slot_fid = ufid.tolist()
        self.views: list = [None] * len(ufid)
        # the page of each direct piece, numbered across the row groups resolved so far (a row
        # group's pages from pg_base[k]); a page's CRC is checked when a read first uses one
        # of its bytes, not when its row group is resolved (a 64 KiB read of a row group of
        # four 1 MiB rows checks one of them, not all four)
        self.pg = np.full(len(self.off), -1, np.int64)
        self._pg_lock = threading.Lock()
        self._pg_of: dict = {}                   # row group key -> its first page's number
        self._pg_rows: list = []                 # (PayloadFile, Rows) per resolved row group
        self._pg_base = np.zeros(0, np.int64)    # their first pages' numbers, ascending
        self._pg_ok = np.zeros(0, np.bool_)      # page checked (also in its Rows.ok)

    @classmethod
    def from_arrays(cls, size: int, arrays: dict, files: dict, **kw) -> "Image":
        # (not rebuild.Plan: the export's plugin does not import rebuild, its store, duckdb)
        p = SimpleNamespace(size=size, files=files, **{k: arrays[k] for k in (
            "d_off", "d_len", "d_src", "d_file", "d_rg", "d_idx")})
        return cls(p, **kw)

    def _resolve(self, keys) -> None:
        """Fill self.abs for every piece of the row groups `keys` (their pages verified)."""
        for k in keys:
            fid, rg = k >> 32, k & 0xFFFFFFFF
            a, e = np.searchsorted(self.keys_sorted, [k, k + 1])
            members = self.by_key[a:e]
            pf = self.cache.payload(fid)
            idx = self.idx[members]
            pos = pf.place(rg, idx, self.src[members], self.end[members] - self.off[members],
                           check=False)
            if pos is None:
                self.abs[members] = DECODE
                continue
            r = pf.rows(rg)
            assert r is not None    # (place() found it)
            with self._pg_lock:
                base = self._pg_of.get(k)
                if base is None:
                    base = self._pg_of[k] = len(self._pg_ok)
                    self._pg_rows.append((pf, r))
                    self._pg_base = np.append(self._pg_base, base)
                    self._pg_ok = np.concatenate([self._pg_ok, np.zeros(len(r.spans), np.bool_)])
            self.pg[members] = base + r.page[idx]
            j = int(self.slot[members[0]])
            if self.views[j] is None:
                self.views[j] = pf.view
            self.abs[members] = pos     # (last: a piece with abs >= 0 is resolved)

    def _check_pages(self, g: np.ndarray) -> None:
        """Verify the pages numbered g (self.pg) that are not yet (each CRC once)."""
        ok = self._pg_ok
        todo = g[~ok[g]]
        if len(todo) == 0:
            return
        todo = unique(todo)
        j = np.searchsorted(self._pg_base, todo, "right") - 1
        for jj, k in zip(j.tolist(), (todo - self._pg_base[j]).tolist()):
            pf, r = self._pg_rows[jj]
            if not r.ok[k]:
                pf.verify(r, [k])
        ok[todo] = True

    def prefetch(self, starts, ends) -> None:
        """Start reading in (asynchronously) the payload of the pieces that overlap the byte
        ranges [starts[i], ends[i]): a caller that knows what it will read (rewind) gets
        the disk reading all of it at once instead of one synchronous fault at a time."""
        starts = np.asarray(starts, np.int64)
        ends = np.asarray(ends, np.int64)
        if len(starts) == 0 or len(self.off) == 0:
            return
        a = np.searchsorted(self.end, starts, side="right")
        e = np.searchsorted(self.off, ends, side="left")
        n = np.maximum(e - a, 0)
        if int(n.sum()) == 0:
            return
        idx = np.repeat(a, n) + (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n))
        idx = idx[self.abs[idx] == UNKNOWN]
        if len(idx) == 0:
            return
        o = np.argsort(self.key[idx], kind="stable")
        idx = idx[o]
        ks = self.key[idx]
        brk = np.flatnonzero(ks[1:] != ks[:-1]) + 1
        for ga, ge in zip([0, *brk.tolist()], [*brk.tolist(), len(idx)]):
            k = int(ks[ga])
            self.cache.payload(k >> 32).willneed_rows(k & 0xFFFFFFFF, self.idx[idx[ga:ge]])

    def read_into(self, out, offset: int) -> None:
        """Fill `out` (a writable buffer) with the image's bytes from `offset`."""
        buf = np.frombuffer(out, np.uint8) if not isinstance(out, np.ndarray) else out
        n = len(buf)
        if offset < 0 or offset + n > self.size:
            raise ValueError(f"read of {n} bytes at {offset} is outside the image ({self.size})")
        end = offset + n
        a = int(np.searchsorted(self.end, offset, side="right"))
        e = int(np.searchsorted(self.off, end, side="left"))
        if e <= a:
            buf[:] = 0
            return
        lo = np.maximum(self.off[a:e], offset)
        hi = np.minimum(self.end[a:e], end)
        if int((hi - lo).sum()) != n:   # holes: zeroes there
            buf[:] = 0
        ab = self.abs[a:e]
        if (ab == UNKNOWN).any():
            self._resolve(unique(self.key[a:e][ab == UNKNOWN]).tolist())
            ab = self.abs[a:e]
        delta = lo - self.off[a:e]
        direct = ab >= 0
        self._check_pages(self.pg[a:e][direct])
        if direct.all():
            copy_pieces(buf, lo - offset, self.views, self.slot[a:e], ab + delta, hi - lo)
            return
        if direct.any():
            copy_pieces(buf, lo[direct] - offset, self.views, self.slot[a:e][direct],
                        ab[direct] + delta[direct], (hi - lo)[direct])
        d = ~direct
        lo, hi, delta = lo[d], hi[d], (self.src[a:e] + delta)[d]
        keys, idx = self.key[a:e][d], self.idx[a:e][d]
        if len(keys) == 1 or (keys[0] == keys).all():
            self._scatter_groups(buf, offset, lo, hi, delta, keys, idx, [(0, len(keys))])
            return
        o = np.argsort(keys, kind="stable")
        lo, hi, delta, keys, idx = lo[o], hi[o], delta[o], keys[o], idx[o]
        brk = np.flatnonzero(keys[1:] != keys[:-1]) + 1
        groups = list(zip([0, *brk.tolist()], [*brk.tolist(), len(keys)]))
        self._scatter_groups(buf, offset, lo, hi, delta, keys, idx, groups)

    def _scatter_groups(self, buf, offset, lo, hi, delta, keys, idx, groups) -> None:
        from blkrewind.replayer.rebuild import scatter
        for ga, ge in groups:
            k = int(keys[ga])
            fid, rg = k >> 32, k & 0xFFFFFFFF
            offs, vals, _arr = self.cache.get(fid, rg)
            ii = idx[ga:ge]
            s = offs[ii] + delta[ga:ge]
            ln = hi[ga:ge] - lo[ga:ge]
            if (s + ln > offs[ii + 1]).any():
                raise StoreError(f"a payload row of {self.cache.paths[fid]} is shorter than its "
                                 f"record says")
            scatter(buf, lo[ga:ge] - offset, vals, s, ln)

    def read(self, offset: int, n: int) -> bytes:
        b = bytearray(n)
        self.read_into(b, offset)
        return bytes(b)

    def extents(self, offset: int, count: int, limit: int = 4096) -> list:
        """[(offset, length, is_data)] covering [offset, offset + count) from `offset` on,
        contiguous (at most `limit` entries: then it ends early)."""
        end = min(self.size, offset + count)
        a = int(np.searchsorted(self.run_end, offset, side="right"))
        e = min(int(np.searchsorted(self.run_off, end, side="left")), a + limit)
        out = []
        pos = offset
        for ro, re_ in zip(self.run_off[a:e].tolist(), self.run_end[a:e].tolist()):
            ro, re_ = max(ro, offset), min(re_, end)
            if ro > pos:
                out.append((pos, ro - pos, False))
            out.append((ro, re_ - ro, True))
            pos = re_
        if pos < end and (e < a + limit or not out):
            out.append((pos, end - pos, False))
        return out

    def close(self) -> None:
        self.cache.close()


def save_index(path: str, p: Plan) -> None:
    """The plan's data pieces and payload paths in one file (numpy .npz), for the export's
    nbdkit plugin: it opens the image without the store's database."""
    import json
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, d_off=p.d_off, d_len=p.d_len, d_src=p.d_src, d_file=p.d_file, d_rg=p.d_rg,
                 d_idx=p.d_idx, size=np.array([p.size], np.int64),
                 files=np.frombuffer(json.dumps({str(k): v for k, v in p.files.items()
                                                 if k in set(unique(p.d_file).tolist())})
                                     .encode(), np.uint8))
    os.replace(tmp, path)


def load_index(path: str, **kw) -> Image:
    import json
    with np.load(path) as z:
        arrays = {k: z[k] for k in ("d_off", "d_len", "d_src", "d_file", "d_rg", "d_idx")}
        size = int(z["size"][0])
        files = {int(k): v for k, v in json.loads(bytes(z["files"]).decode()).items()}
    return Image.from_arrays(size, arrays, files, **kw)
