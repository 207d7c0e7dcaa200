"""Files, not sectors: what was written between two points (from metadata), which files that
changed (from the file systems at both points), and who wrote a file.

- `written_ranges(store, session, dev, a, b)`: the device byte ranges written by stamps in
  (a, b] -- data writes, discards/write-zeroes, and resync chunks -- merged; from the
  metadata tables alone (one query; no payload read).
- `file_map(mnt)`: every regular file of a mounted file system: path, inode, size, and its
  physical extents (FIEMAP, the kernel's own answer for ext4 and xfs) as device byte ranges.
- `diff_files(map_a, mnt_a, map_b, mnt_b, ranges)`: created / deleted / modified (appended,
  truncated or rewritten) regular files, each with the bytes of it the history wrote.
- `writers(store, session, dev, a, b, ranges)`: which processes wrote (submitted, and dirtied in
  the page cache where known) into byte ranges between
  two points, when, how many bytes.

Limits: only regular files are listed (directories, symlinks and metadata blocks change with
them); a file's bytes held inside its inode (ext4 inline data) have no extent to intersect;
buffered writes are attributed to the thread that submitted them (the flusher), not to the
process that dirtied the pages.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import struct

import numpy as np

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 1
FIEMAP_EXTENT_LAST = 1
_HDR = struct.Struct("=QQIIII")
_EXT = struct.Struct("=QQQQQIIII")
_BATCH = 256


def fiemap(path: str) -> list[tuple[int, int, int]]:
    """(logical, physical, length) extents of a file, in bytes."""
    out: list[tuple[int, int, int]] = []
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        start = 0
        while True:
            buf = bytearray(_HDR.size + _EXT.size * _BATCH)
            _HDR.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
            n = _HDR.unpack_from(buf, 0)[3]
            if n == 0:
                return out
            last = False
            for i in range(n):
                lg, ph, ln, _, _, fl, *_ = _EXT.unpack_from(buf, _HDR.size + i * _EXT.size)
                out.append((lg, ph, ln))
                last = bool(fl & FIEMAP_EXTENT_LAST)
                start = lg + ln
            if last:
                return out
    finally:
        os.close(fd)


def file_map(mnt: str) -> dict[str, dict]:
    """path (relative to mnt) -> {ino, size, extents: [(physical, length)]} of every regular
    file (lost+found skipped)."""
    out = {}
    for root, dirs, files in os.walk(mnt):
        if root == mnt and "lost+found" in dirs:
            dirs.remove("lost+found")
        for f in files:
            p = os.path.join(root, f)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            ext = [(ph, ln) for _, ph, ln in fiemap(p)]
            out[os.path.relpath(p, mnt)] = {"ino": st.st_ino, "size": st.st_size, "extents": ext}
    return out


def _merge(starts: np.ndarray, ends: np.ndarray) -> list[list[int]]:
    if len(starts) == 0:
        return []
    o = np.argsort(starts, kind="stable")
    s, e = starts[o], ends[o]
    out = [[int(s[0]), int(e[0])]]
    cur = out[-1]
    for a, b in zip(s[1:].tolist(), e[1:].tolist()):
        if a <= cur[1]:
            if b > cur[1]:
                cur[1] = b
        else:
            cur = [a, b]
            out.append(cur)
    return out


def merge_extents(extents) -> list[list[int]]:
    """[(start, length)] -> merged sorted [[start, end)]."""
    s = np.array([a for a, _ in extents], np.int64)
    return _merge(s, s + np.array([n for _, n in extents], np.int64))


def written_ranges(store, session: str, dev: int, a: int, b: int) -> list[list[int]]:
    """Merged [start, end) device byte ranges written by stamps in (a, b]."""
    r = store.written_extents(session, dev, a, b)
    s = np.asarray(r["s"], np.int64)
    n = np.asarray(r["n"], np.int64)
    return _merge(s, s + n)


def overlap(extents, ranges) -> int:
    """Bytes of the extents [(start, length)] inside the merged sorted ranges [[s, e)]."""
    if not extents or not ranges:
        return 0
    rs = np.array([r[0] for r in ranges], np.int64)
    re_ = np.array([r[1] for r in ranges], np.int64)
    total = 0
    for ph, ln in extents:
        a, e = ph, ph + ln
        i = int(np.searchsorted(re_, a, side="right"))
        while i < len(rs) and rs[i] < e:
            total += min(e, int(re_[i])) - max(a, int(rs[i]))
            i += 1
    return total


def _digest(path: str, limit: int | None = None) -> str:
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while True:
            k = 1 << 20 if left is None else min(1 << 20, left)
            if k == 0:
                break
            chunk = f.read(k)
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def diff_files(map_a: dict, mnt_a: str, map_b: dict, mnt_b: str, ranges) -> list[dict]:
    """The regular files that differ between two file system states."""
    out = []
    for p in sorted(set(map_a) | set(map_b)):
        fa, fb = map_a.get(p), map_b.get(p)
        if fa is None:
            assert fb is not None, "p is in one of the maps"
            out.append({"path": p, "inode": fb["ino"], "change": "created", "how": "",
                        "bytes": fb["size"], "size_from": None, "size_to": fb["size"],
                        "written": overlap(fb["extents"], ranges)})
            continue
        if fb is None:
            out.append({"path": p, "inode": fa["ino"], "change": "deleted", "how": "",
                        "bytes": fa["size"], "size_from": fa["size"], "size_to": None,
                        "written": overlap(fa["extents"], ranges)})
            continue
        w = overlap(fb["extents"], ranges)
        same_map = fa["extents"] == fb["extents"] and fa["size"] == fb["size"]
        if same_map and w == 0:
            continue       # nothing of it was written: the same bytes
        pa_, pb = os.path.join(mnt_a, p), os.path.join(mnt_b, p)
        if fa["size"] == fb["size"] and _digest(pa_) == _digest(pb):
            continue       # written with the same bytes (or moved)
        if fb["size"] > fa["size"] and _digest(pa_) == _digest(pb, fa["size"]):
            how, nbytes = "appended", fb["size"] - fa["size"]
        elif fb["size"] < fa["size"] and _digest(pb) == _digest(pa_, fb["size"]):
            how, nbytes = "truncated", fa["size"] - fb["size"]
        else:
            how, nbytes = "rewritten", max(w, abs(fb["size"] - fa["size"])) or fb["size"]
        out.append({"path": p, "inode": fb["ino"], "change": "modified", "how": how,
                    "bytes": nbytes, "size_from": fa["size"], "size_to": fb["size"],
                    "written": w})
    return out


def writers(store, session: str, dev: int, a: int, b: int, ranges) -> list[tuple]:
    """(comm, pid, dirty_comm, dirty_pid, first time ns, last time ns, writes, bytes) of the
    processes that wrote into the byte ranges [[s, e)] with stamps in (a, b], most bytes first.
    comm/pid submitted the bios; dirty_comm/dirty_pid dirtied their (first) page in the page
    cache (buffered writes a flusher submitted), None when not known (O_DIRECT, journal)."""
    if not ranges:
        return []
    return store.range_writers(session, dev, a, b, ranges)
