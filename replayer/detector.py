"""Ransomware caught while it runs: episodes where a process group overwrites data that was
compressible with data that is not.

Each payload piece has its randomness (replayer/entropy.py, `records.randomness`: the fraction
of sampled segments that look random). Random-looking data alone means nothing (media,
archives, an encrypted volume, fio's buffers); what ransomware does and little else does is
*replace* data that was compressible (text, databases, documents) by ciphertext, over many
places, at a rate. So the detector keeps, per device and session, the state of every block of
BLOCK bytes as the history left it (`BlockMap`: unknown, zeroes, or the randomness of the last
write or baseline chunk that covered it) and looks at what each write replaces:

- a write is *random* when its randomness >= RANDOM_WRITE;
- a random write *encrypts* the blocks whose previous state was compressible data (randomness
  <= COMPRESSIBLE, not zeroes: new files in free space replace zeroes; not unknown);
- per group (the process in its cgroup that dirtied the pages of a buffered write when the
  tracer recorded it -- `trace --dirtier`, `dirtiers` -- else the submitting process; the
  flusher threads, which submit buffered writes, as one group per cgroup), an episode
  starts when, within WINDOW_NS, at least MIN_BYTES were
  encrypted by at least MIN_WRITES writes in at least MIN_RUNS separate places (a write that
  does not continue the previous one, or continues it after more than PLACE_NS: files; a new
  file written over the freed blocks of deleted text -- gzip and then a copy -- is one place),
  and at least RANDOM_SHARE of all the group wrote in that window was random (random_share:
  a process unpacking files over the freed blocks of older ones writes mostly compressible
  data beside its few compressed files; ransomware writes ciphertext).
  The flusher group (kworker/*: buffered writes of every process of the cgroup, e.g. the
  outputs of a log rotation landing on the freed blocks of the logs it deleted) needs
  FLUSHER_FACTOR times the bytes and places (seen in tests/test_detector.py: 580 KiB of
  gzip/zstd output over freed log blocks in 13 writes at 8 places). The episode begins at the group's first random
  write over existing data (any randomness before: a jpeg encrypted first replaces random
  data) inside that window, so its clean point (the stamp before) precedes all of it; it lasts
  while encrypting writes follow each other within WINDOW_NS.
- every process also counts in its *workers group*: all processes of its name (comm) in its
  cgroup (`_workers`). An attack spread over processes -- a parent forking workers, `xargs
  -P 4 -n 2`, each process encrypting two files: 2 places, below MIN_RUNS -- is an episode
  of that group when the rules above hold for WORKERS_FACTOR times the bytes and places and
  its writes are spread (`_spread`: at least WORKERS_PROCS processes, none with more than half
  of the bytes: one attacker, or two one after the other, are their own groups'); in it a
  write by another process than the write before is another place (`_places` per_proc:
  each its own file, even where the file system put the files one after the other). The
  same for the streaks of the file-level check and for the deletion rule (below). A process's
  writes leave its workers group's count once an episode of its own opens; while a workers
  episode is open, it takes the writes of every process of that name in the cgroup.
- every process also counts in its *cgroup group*: all processes of its cgroup whatever
  their names (`_cgroup`; a systemd unit, a container, a user's session). An attack whose
  pieces are done by programs of different names (a script running `openssl enc`, `dd`,
  python by turns, one process per file; a binary copied under a random name per worker) is
  an episode of that group when the rules above hold for CGROUP_FACTOR times the bytes and
  places, its writes are spread like a workers group's and over at least CGROUP_NAMES names
  (one name is its workers group's), and at least CGROUP_ENC_SHARE of the random data the
  cgroup wrote in the window replaced compressible data: a service's cgroup copying media
  or writing archives over blocks its log compression just freed (tests/test_detector.py:
  cp and python put 0.8 MiB of their 3 MiB there) writes most of its random data
  elsewhere; ransomware in place replaces with most of it (74 % where openssl also wrote
  temporary files into free space). The episode starts at the first random write in the window by a process of one
  of its names (another program of the cgroup writing media just before is not its start).
  The same (without the last condition) for the streaks of the file-level check and the
  deletion rule. (The parent/child tree and the session are not recorded: an attack spread
  over several cgroups is not one group.)
- where the file system can be read (FileCheck below: `suspects`, `serve`; ext4, xfs), an
  episode of these rules is one only once the file system says the data was replaced *in
  place* (FileCheck.in_place): read at the point before the episode and at the write that
  opened it, at least IN_PLACE_SHARE of the bytes it replaced are held by the same file (path
  and inode) at both. New files written over the freed blocks of deleted ones replace
  compressible data at the block level too, and xfs reuses freed extents as soon as the
  deletion is in its log: CI's benign service (tests/test_detector.py's cgroup test, xfs;
  here in 3 of 8 runs with two busy loops beside it, 0 of 6 without) alarmed when the
  writeback of its gzip/zstd outputs landed on the freed blocks of the logs (the cgroup
  group: 444 KiB of the 6 compressors' 468 KiB of random data replaced text, 95 %, over the
  74 % of an attack) and
  when tar, unpacking a package again, put its new .gz man pages over the freed blocks of its
  first copy's .mo files (one process: 128-148 KiB of its 216-232 KiB); in each 0 % was in
  place, against 84-100 % for the attacks in place of bench/bench_detector.py and
  tests/test_detector.py (84 %: xfs's cgroup script, its openssl temporary files over freed
  blocks too). An attack that truncates or replaces the files (its ciphertext over the freed blocks
  of other originals) is the file-level check's below, as before. Without the file systems
  (not ext4/xfs, the points not restorable) the rules alone decide. Each such episode mounts
  two points (~2-3 s at low load): the episode is reported that much later.

Encryption into new files, then deletion of the originals, replaces nothing in place: the
ciphertext goes to free space and the deletion only writes metadata. Where the file system
discards what it frees (mounted with `discard`), the deletion is seen: compressible data
discarded (at least MIN_BYTES at MIN_RUNS places within WINDOW_NS) while one group wrote
DELETE_RATIO (0.5-2) times as much random data into free space is an episode of that group
(gzip + delete writes a fifth of what it deletes; deleting media discards random data).

Without discard (the default mount of ext4 and xfs) the deletion is not seen at the block
level; then the file systems are asked (FileCheck). A group writing random data into new
places (over zeroes, unknown or non-random blocks; a *streak* with no WINDOW_NS pause) of at
least MIN_BYTES at MIN_RUNS + 2 places is a *candidate*, again each time its bytes double; the
check reads the file system (ext4, xfs) at the point before the streak and at the candidate's
last write: files holding compressible data that are gone or whose blocks changed (deleted,
renamed over, truncated and rewritten) against files holding random data that the group
wrote, created or changed since (a file whose path holds other data at the last write is
not lost: dpkg renames a new copy over every file of a package it reinstalls). At least
MIN_RUNS such pairs -- the same path, or by size a file gone against one at a new path --
of about the same size (encryption keeps a file's size, compression does not; copying media
deletes nothing) for
MIN_BYTES are an episode ("encrypted into new files, originals deleted or rewritten"). When
none of the group's data shows as files at its last write yet (one burst of writeback writes
the data, then commits the metadata), that point is read again at the journal commit within
SETTLE_NS. Each
check mounts two points (~2-3 s each); a point not restorable yet is checked again at the
next pass.

What it cannot see: data encrypted by a process that writes through the page cache without fsync reaches the device
at writeback (up to dirty_expire_centisecs, 30 s by default), so the alert follows the
writeback, not the encryption; without `trace --dirtier` (or for pages the dirtier
misses, docs/internals.md) the group of buffered writes is the flusher's (a shell loop
running `openssl enc` then `cat tmp > file` per file writes through the page cache: its cat
processes are a workers group only with --dirtier); an attack spread over processes of
different names each below the thresholds is seen only within one cgroup (an attack
spread over cgroups, each piece below the thresholds, is not), and one inside a cgroup
whose other programs write much random data meanwhile (over half of the cgroup's random
data elsewhere) or much compressible data (random_share) is not its cgroup group's; a
service deleting compressible files and writing random data into their freed blocks (a
process, or several programs at once with half of it or more there) is one where the file
system cannot be read (not ext4/xfs: FileCheck.in_place); the workers group
of a common name (python, sh) mixes an attacker's processes with benign ones of that name in
the cgroup (their random data before the attack can move the episode's start, and so its
clean point, earlier); the file-level check needs ext4 or xfs, and pairs files by size
(a process that copies random files while others delete compressible ones of the same sizes
would pair).

`Detector` is incremental (serve feeds it the writes stored since its last pass); `scan()`
runs it over a whole session.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from blkrewind.formats import record
from blkrewind.replayer import entropy

if TYPE_CHECKING:
    from blkrewind.replayer.store import StoreDevice

BLOCK = 4096
MAX_BLOCKS = 1 << 26          # larger devices get larger blocks (64 MiB of state at most)
UNKNOWN, ZERO = 255, 254      # block states besides 0..100 (randomness in percent)
RANDOM_WRITE = 0.75
COMPRESSIBLE = 0.5
WINDOW_NS = 10 * 10**9
MIN_BYTES = 128 << 10
MIN_WRITES = 4
MIN_RUNS = 3                  # separate places (_places)
PLACE_NS = 500 * 10**6
DELETE_RATIO = (0.5, 2.0)     # random bytes into free space per compressible byte discarded
RANDOM_SHARE = 0.5            # an episode's group wrote at least this share of random data
FLUSHER_FACTOR = 8            # the flusher group needs 8x the bytes and places (1 MiB, 24)
WORKERS = -1                  # the tgid of a workers group (_workers)
WORKERS_FACTOR = 2            # a workers group needs 2x the bytes and places, spread over
WORKERS_PROCS = 3             # >= 3 processes, none with more than half of its bytes
CGROUP = -2                   # the tgid of a cgroup group (_cgroup)
CGROUP_FACTOR = 2             # a cgroup group needs 2x the bytes and places, spread as a
CGROUP_NAMES = 2              # workers group's, and over >= 2 names (one name: its workers')
CGROUP_ENC_SHARE = 0.5        # ... and at least this share of the random data it wrote in the
                              # window replaced compressible data (random_share's volumes)
CHUNK_ROWS = 200_000
NEWFILES = "encrypted into new files, originals deleted or rewritten"
RETRY = "retry"


def merge_ranges(ranges) -> list[list[int]]:
    """[start, end) ranges sorted, those that touch or overlap joined."""
    out: list[list[int]] = []
    for a, e in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([a, e])
    return out


@dataclass
class Episode:
    session: str
    dev: int
    group: tuple                    # (cgroup id, tgid, comm): _group()
    first_stamp: int                # first write of the episode
    first_ns: int
    detect_stamp: int               # the write that made it an episode
    detect_ns: int
    last_stamp: int
    last_ns: int
    bytes: int = 0                  # bytes of compressible data replaced by random data
    writes: int = 0                 # writes that did so
    procs: Counter = field(default_factory=Counter)   # "comm[pid]" -> bytes
    kind: str = "overwrote compressible data with random data"
    ranges: list = field(default_factory=list)        # [start, end) byte ranges its processes
                                                      # overwrote with random data
    files: list = field(default_factory=list)         # file-level check: "old -> new" pairs
    before: int | None = None       # the clean point when not first_stamp - 1 (the check's)
    pending: bool = False           # in place, waiting for the file-level check (_confirm)
    replaced: list = field(default_factory=list)     # (start, end, bytes) of the writes that
                                                      # opened it (FileCheck.in_place)

    def add_range(self, a: int, e: int) -> None:
        r = self.ranges
        if r and a <= r[-1][1] and e >= r[-1][0]:
            r[-1][0] = min(r[-1][0], a)
            r[-1][1] = max(r[-1][1], e)
        else:
            r.append([a, e])

    def merged_ranges(self) -> list[list[int]]:
        return merge_ranges(self.ranges)

    def row(self) -> dict:
        return {"session": self.session, "dev": self.dev, "group": self.group,
                "first_stamp": self.first_stamp, "first_ns": self.first_ns,
                "detect_stamp": self.detect_stamp, "detect_ns": self.detect_ns,
                "last_stamp": self.last_stamp, "last_ns": self.last_ns, "bytes": self.bytes,
                "writes": self.writes, "procs": dict(self.procs.most_common(10)),
                "kind": self.kind, "files": self.files, "before": self.before,
                "ranges": self.merged_ranges()}


@dataclass
class Streak:
    """A group's random writes into new places (over zeroes, unknown or non-random data),
    without a pause of WINDOW_NS: new files, or files rewritten into new blocks."""
    group: tuple
    first_stamp: int
    first_ns: int
    last_stamp: int = 0
    last_ns: int = 0
    bytes: int = 0
    writes: int = 0
    places: int = 0
    next_check: int = 0
    procs: Counter = field(default_factory=Counter)
    ranges: list = field(default_factory=list)    # [start, end), merged when adjacent
    _prev: tuple | None = None

    def add(self, s: int, t: int, n: int, who: str, a: int, e: int) -> None:
        """A random write; a new place unless it continues the previous one on the device,
        within PLACE_NS, with no other write between them (a file system allocating new
        files one after the other, xfs, has them contiguous: the fsync's log write between
        two files separates them), or, in a workers group, by another process (each its own
        file: one burst of writeback, syncfs, wrote xfs's contiguous files of 28 processes
        as one run)."""
        p = self._prev
        if (p is None or t - p[0] > PLACE_NS or s > p[3] + 1
                or not (p[1] <= a <= p[2] or a <= p[1] < e)
                or (self.group[1] in (WORKERS, CGROUP) and who != p[4])):
            self.places += 1
        self._prev = (t, min(a, p[1]) if p and p[1] <= a <= p[2] else a, e, s, who)
        if s != self.last_stamp:
            self.writes += 1
        self.last_stamp, self.last_ns = s, t
        self.bytes += n
        self.procs[who] += n
        r = self.ranges
        if r and a <= r[-1][1] and e >= r[-1][0]:
            r[-1][0], r[-1][1] = min(r[-1][0], a), max(r[-1][1], e)
        else:
            r.append([a, e])

    def snapshot(self) -> Streak:
        return Streak(self.group, self.first_stamp, self.first_ns, self.last_stamp,
                      self.last_ns, self.bytes, self.writes, self.places, self.next_check,
                      Counter(self.procs), [list(x) for x in self.ranges])

    def merged_ranges(self) -> list[list[int]]:
        return merge_ranges(self.ranges)


class BlockMap:
    """The state of every block of a device (UNKNOWN, ZERO, or randomness 0..100)."""

    def __init__(self, size_bytes: int):
        bs = BLOCK
        while -(-size_bytes // bs) > MAX_BLOCKS:
            bs *= 2
        self.block = bs
        self.state = np.full(max(1, -(-size_bytes // bs)), UNKNOWN, np.uint8)

    def blocks(self, start: np.ndarray, length: np.ndarray):
        """(block index, row) of every block the byte ranges touch."""
        b0 = start // self.block
        b1 = np.minimum((start + np.maximum(length, 1) - 1) // self.block, len(self.state) - 1)
        nb = np.maximum(b1 - b0 + 1, 0)
        rows = np.repeat(np.arange(len(start)), nb)
        first = np.cumsum(nb) - nb
        blk = np.repeat(b0, nb) + (np.arange(int(nb.sum())) - np.repeat(first, nb))
        return blk, rows

    def apply(self, start: np.ndarray, length: np.ndarray, value: np.ndarray) -> tuple:
        """Write `value` (per row, uint8 state) over the rows' blocks, in row order; returns
        (blk, rows, prev): each touched block, its row and its state before that row."""
        blk, rows = self.blocks(start, length)
        if len(blk) == 0:
            return blk, rows, np.empty(0, np.uint8)
        val = value[rows]
        o = np.lexsort((rows, blk))
        bs, vs = blk[o], val[o]
        prev_sorted = self.state[bs]
        same = np.zeros(len(bs), bool)
        same[1:] = bs[1:] == bs[:-1]
        idx = np.nonzero(same)[0]
        prev_sorted[idx] = vs[idx - 1]
        last = np.ones(len(bs), bool)
        last[:-1] = bs[1:] != bs[:-1]
        self.state[bs[last]] = vs[last]
        prev = np.empty_like(prev_sorted)
        prev[o] = prev_sorted
        return blk, rows, prev


def state_of(randomness: np.ndarray) -> np.ndarray:
    """Block state of written data with this randomness (NaN: unknown)."""
    r = np.asarray(randomness, np.float64)
    out = np.full(len(r), UNKNOWN, np.uint8)
    ok = ~np.isnan(r)
    out[ok] = np.clip(np.rint(r[ok] * 100), 0, 100).astype(np.uint8)
    return out


class Detector:
    """Episodes of one (session, device). feed_base() the baseline first, then feed() the
    writes in stamp order (any chunking). `episodes` holds every episode (open ones too);
    `on_episode(ep)` is called once when one starts."""

    def __init__(self, session: str, dev: int, size_bytes: int, *, on_episode=None,
                 window_ns: int = WINDOW_NS, min_bytes: int = MIN_BYTES,
                 min_writes: int = MIN_WRITES, min_runs: int = MIN_RUNS):
        self.session, self.dev = session, dev
        self.map = BlockMap(size_bytes)
        self.size_bytes = size_bytes
        self.window_ns, self.min_bytes, self.min_writes = window_ns, min_bytes, min_writes
        self.min_runs = min_runs
        self.on_episode = on_episode
        self.episodes: list[Episode] = []
        self.open: dict[tuple, Episode] = {}
        # per group: recent (time_ns, stamp, encrypted bytes) and random overwrites
        self.recent: dict[tuple, deque] = {}
        self.touch: dict[tuple, deque] = {}
        self.disc: deque = deque()                     # compressible data discarded
        self.fresh: dict[tuple, deque] = {}            # random data written into free space
        self.deleting: Episode | None = None           # the open deletion episode
        self.streaks: dict[tuple, Streak] = {}          # random data into new places
        self.pending: list[Streak] = []                # candidates for newfiles_check
        self.confirm = False                           # in-place episodes wait for the
        self.unconfirmed: list[Episode] = []           # file-level check (FileCheck.in_place)
        self.checked: dict[tuple, int] = {}            # per group: the streak (its first stamp)
                                                       # of its file-level check's episode
        self.vol: dict[tuple, list] = {}               # per group: random_share's data
        self.last_stamp = 0
        self.last_ns = 0                              # time of the newest write fed
        self.dirtier_seen = False                     # a dirtier named a write (trace --dirtier)

    def feed_base(self, sector, nbytes, flags, randomness, blocks=None) -> None:
        """Baseline (or resync) chunks, in the order they apply (larger aux last); `blocks`:
        per chunk its state per 4 KiB (entropy.block_states) or None."""
        sector = np.asarray(sector, np.int64)
        nbytes = np.asarray(nbytes, np.int64)
        st = state_of(randomness)
        st[(np.asarray(flags, np.int64) & record.F_ZERO) != 0] = ZERO
        if blocks is None:
            blocks = [None] * len(sector)
        starts, lens, vals = [], [], []
        for i, bl in enumerate(blocks):
            off = int(sector[i]) * 512
            if bl is None or len(bl) == 0:
                starts.append(np.array([off]))
                lens.append(np.array([int(nbytes[i])]))
                vals.append(np.array([st[i]], np.uint8))
                continue
            k = len(bl)
            a = off + np.arange(k, dtype=np.int64) * entropy.BLOCK
            starts.append(a)
            lens.append(np.minimum(entropy.BLOCK, off + int(nbytes[i]) - a))
            vals.append(np.frombuffer(bytes(bl), np.uint8))
        if starts:
            self.map.apply(np.concatenate(starts), np.concatenate(lens), np.concatenate(vals))

    def feed(self, c: dict) -> None:
        """Write pieces in stamp order: numpy columns stamp, time_ns, sector, offset, len,
        bio_size, op, randomness, cgroup_id, tgid, comm (object array)."""
        n = len(c["stamp"])
        if n == 0:
            return
        self.last_ns = max(self.last_ns, int(np.max(c["time_ns"])))
        op = np.asarray(c["op"], np.int64)
        ln = np.asarray(c["len"], np.int64)
        zeroing = np.isin(op, list(record.ZEROING_OPS))
        data = (op == record.OP_WRITE) & (ln > 0)
        keep = np.nonzero(data | zeroing)[0]
        if len(keep) == 0:
            self.last_stamp = max(self.last_stamp, int(c["stamp"][-1]))
            return
        sector = np.asarray(c["sector"], np.int64)[keep]
        start = sector * 512 + np.where(zeroing[keep], 0, np.asarray(c["offset"], np.int64)[keep])
        length = np.where(zeroing[keep], np.asarray(c["bio_size"], np.int64)[keep], ln[keep])
        rnd = np.asarray(c["randomness"], np.float64)[keep]
        val = state_of(rnd)
        val[zeroing[keep]] = ZERO
        blk, rows, prev = self.map.apply(start, length, val)
        self._volumes(c, keep, length, rnd, zeroing[keep])
        rnd_row = np.nan_to_num(rnd, nan=0.0) >= RANDOM_WRITE
        rnd_row &= ~zeroing[keep]
        if rnd_row.any():
            r_blk = rnd_row[rows]
            comp = r_blk & (prev <= int(COMPRESSIBLE * 100))
            nb = len(keep)
            enc_blocks = np.bincount(rows[comp], minlength=nb)
            # every random write goes by (_episodes' touch: where an episode starts), also
            # into blocks read as zeroes (sparse or freed pages of a database file)
            cand = np.nonzero(rnd_row)[0]
            self._episodes(c, keep, cand, enc_blocks, start, length)
        # encryption into new files, then deletion: visible where deletions are discarded
        z_blk = zeroing[keep][rows]
        d_comp = np.bincount(rows[z_blk & (prev <= int(COMPRESSIBLE * 100))],
                             minlength=len(keep))
        f_rnd = np.bincount(rows[rnd_row[rows] & (prev >= ZERO)], minlength=len(keep)) \
            if rnd_row.any() else np.zeros(len(keep), np.int64)
        ev = np.nonzero((d_comp > 0) | (f_rnd > 0))[0]
        if len(ev):
            self._deletions(c, keep, ev, d_comp, f_rnd, start, length)
        # random data over anything but random data: new files (or files rewritten through
        # new blocks), candidates for the file-level check (newfiles_check)
        if rnd_row.any():
            new_blk = rnd_row[rows] & ((prev < int(RANDOM_WRITE * 100)) | (prev >= ZERO))
            nw = np.bincount(rows[new_blk], minlength=len(keep))
            ev = np.nonzero(nw > 0)[0]
            if len(ev):
                self._new_data(c, keep, ev, nw, start, length)
        self.last_stamp = max(self.last_stamp, int(c["stamp"][-1]))

    def _new_data(self, c, keep, ev, nw, start, length) -> None:
        """Per group, a streak of random writes into new places (no WINDOW_NS pause); once it
        holds MIN_BYTES at MIN_RUNS places it is a candidate (`pending`), and again each time
        its bytes double: the file-level check (newfiles_check) decides."""
        bs = self.map.block
        cols = _rows(c, keep[ev])
        nws = nw[ev].tolist()
        ends = (start[ev] + length[ev]).tolist()
        for s, t, cgi, tg, cm, nwk, a, e in zip(*cols, nws, start[ev].tolist(), ends):
            g = _group(cgi, tg, cm)
            wg, cgg = _workers(g), _cgroup(g)
            ep = None
            for x in (cgg, wg, g):
                o = self.open.get(x) if x is not None else None
                if o is not None and o.detect_stamp <= s and t - o.last_ns <= self.window_ns \
                        and not o.pending:
                    ep = o
                    break
            if ep is not None:
                if ep.kind == NEWFILES:   # the episode goes on
                    ep.last_stamp, ep.last_ns = max(ep.last_stamp, s), max(ep.last_ns, t)
                    ep.writes += 1
                continue
            n, who = min(nwk * bs, e - a), f"{cm}[{tg}]"
            if self._streak(g, s, t, n, who, a, e, FLUSHER_FACTOR if g[2] == "kworker" else 1):
                for x in (wg, cgg):
                    ws = self.streaks.get(x) if x is not None else None
                    if ws is not None and t - ws.last_ns <= self.window_ns:
                        ws.next_check = 1 << 62   # its workers' (cgroup's) streak: checked
                                                  # as this one
            if wg is not None:
                if self._streak(wg, s, t, n, who, a, e, WORKERS_FACTOR, spread=True):
                    ws = self.streaks.get(cgg) if cgg is not None else None
                    if ws is not None and t - ws.last_ns <= self.window_ns:
                        ws.next_check = 1 << 62
            if cgg is not None:
                self._streak(cgg, s, t, n, who, a, e, CGROUP_FACTOR, spread=True)

    def _streak(self, g: tuple, s: int, t: int, n: int, who: str, a: int, e: int,
                factor: int, spread: bool = False) -> bool:
        """Add a random write into new places to group g's streak; a candidate for the
        file-level check (factor x the bytes and places; spread: over processes, _spread):
        True."""
        st = self.streaks.get(g)
        if st is None or t - st.last_ns > self.window_ns:
            st = self.streaks[g] = Streak(g, s, t)
        st.add(s, t, n, who, a, e)
        if (st.bytes >= max(st.next_check, self.min_bytes * factor)
                and st.places >= (self.min_runs + NEW_PLACES_MORE) * factor
                and (not spread or _spread(st.procs, g[1] == CGROUP))):
            st.next_check = 2 * st.bytes
            self.pending.append(st.snapshot())
            return True
        return False

    def _volumes(self, c, keep, length, rnd, zeroing) -> None:
        """Per group, the times and sizes of its data writes and of its random ones (for
        random_share), the last WINDOW_NS kept."""
        data = ~zeroing
        if not data.any():
            return
        idx = keep[data]
        cg = np.asarray(c["cgroup_id"], np.uint64)[idx]
        tg = np.asarray(c["tgid"], np.int64)[idx]
        comm = c["comm"][idx]
        kw = np.array([str(x).startswith("kworker/") for x in comm], bool)
        tg = np.where(kw, -1, tg)
        t = np.asarray(c["time_ns"], np.int64)[idx]
        n = length[data].astype(np.int64)
        r = np.where(np.nan_to_num(rnd[data], nan=0.0) >= RANDOM_WRITE, n, 0)
        pairs = np.stack([cg.astype(np.int64), tg], axis=1)
        uniq, inv = np.unique(pairs, axis=0, return_inverse=True)
        inv = np.asarray(inv).reshape(-1)
        t_first = int(t.min())
        for j in range(len(uniq)):
            sel = inv == j
            i0 = int(np.argmax(sel))
            g = _group(int(cg[i0]), int(tg[i0]) if tg[i0] >= 0 else 0,
                       "kworker/" if kw[i0] else comm[i0])
            o = np.argsort(t[sel], kind="stable")
            ts = t[sel][o]
            x = (ts, np.cumsum(n[sel][o]), np.cumsum(r[sel][o]))
            self.vol.setdefault(g, []).append(x)
            for y in (_workers(g), _cgroup(g)):
                if y is not None:
                    self.vol.setdefault(y, []).append(x)
        # kept from the window before this chunk's first write on: the chunk's episodes are
        # counted after this (pruned at its last write, a chunk longer than the window --
        # suspects reads up to CHUNK_ROWS at once -- had no volumes for its earlier writes,
        # and random_share said 1.0 there)
        for g, v in list(self.vol.items()):
            v[:] = [x for x in v if x[0][-1] >= t_first - self.window_ns]
            if not v:
                del self.vol[g]

    def random_share(self, g: tuple, t: int) -> float:
        """The share of random data in what group g wrote in (t - WINDOW_NS, t]: ransomware
        writes ciphertext and little else; a process unpacking or copying files that reuses
        freed blocks of compressible data writes mostly compressible data itself."""
        tot, rn = self._volume(g, t)
        return rn / tot if tot else 1.0

    def _volume(self, g: tuple, t: int) -> tuple[int, int]:
        """(bytes, random bytes) group g wrote in (t - WINDOW_NS, t]."""
        tot = rn = 0
        for ts, cn, cr in self.vol.get(g, []):
            a = int(np.searchsorted(ts, t - self.window_ns, side="right"))
            b = int(np.searchsorted(ts, t, side="right"))
            if b > a:
                tot += int(cn[b - 1]) - (int(cn[a - 1]) if a else 0)
                rn += int(cr[b - 1]) - (int(cr[a - 1]) if a else 0)
        return tot, rn

    def run_checks(self, check) -> None:
        """The file-level check of the pending candidates: check(det, streak) returns an
        Episode, None (not one) or RETRY (its points are not restorable yet); first the
        in-place episodes waiting for it (_confirm)."""
        if self.unconfirmed:
            self._confirm(check)
        later = []
        for st in self.pending:
            ep = self.open.get(st.group)
            if ep is not None and ep.detect_stamp <= st.last_stamp \
                    and st.last_ns - ep.last_ns <= self.window_ns:
                continue          # already an episode at that point
            if ep is not None and ep.kind == NEWFILES and self.checked.get(st.group) == \
                    st.first_stamp:   # a later candidate of the streak that is this episode
                ep.last_stamp = max(ep.last_stamp, st.last_stamp)   # (one chunk fed before
                ep.last_ns = max(ep.last_ns, st.last_ns)            # its checks: suspects)
                continue
            r = check(self, st)
            if r is RETRY:
                later.append(st)
            elif r is not None:
                if ep is not None and ep.detect_stamp > r.detect_stamp \
                        and ep.first_ns - r.last_ns <= self.window_ns:
                    # an episode the rules in place found later in the same chunk of
                    # history: the same attack, found earlier by the check
                    if ep.first_stamp < r.first_stamp:
                        r.first_stamp, r.first_ns = ep.first_stamp, ep.first_ns
                        r.before = min(r.before or ep.first_stamp - 1, ep.first_stamp - 1)
                    r.bytes += ep.bytes
                    r.writes += ep.writes
                    r.procs.update(ep.procs)
                    r.ranges += ep.ranges
                    r.last_stamp, r.last_ns = ep.last_stamp, ep.last_ns
                    if ep.pending:
                        self.unconfirmed.remove(ep)
                    else:
                        self.episodes.remove(ep)
                self.open[st.group] = r
                self.checked[st.group] = st.first_stamp
                self.episodes.append(r)
                for y in _wider(st.group):   # its writes are its episode's, not its
                    q = self.recent.get(y)     # workers' or cgroup's group's
                    if q:
                        self.recent[y] = deque(x for x in q if x[3] not in r.procs)
                if self.on_episode is not None:
                    self.on_episode(r)
        self.pending = later

    def _deletions(self, c, keep, ev, d_comp, f_rnd, start, length) -> None:
        """Compressible data discarded (a deletion on a file system mounted with discard)
        while one group writes about as much random data into free space: an episode of that
        group (encrypting into new files and deleting the originals). Its ranges are the
        deleted data (the originals, readable at the clean point)."""
        bs = self.map.block
        cols = _rows(c, keep[ev])
        ends = (start[ev] + length[ev]).tolist()
        for s, t, cgi, tg, cm, dk, fk, a, e in zip(*cols, d_comp[ev].tolist(), f_rnd[ev].tolist(),
                                                    start[ev].tolist(), ends):
            dl = self.deleting
            if dl is not None and t - dl.last_ns > self.window_ns:
                dl = self.deleting = None
            if dk and dl is not None:    # the open episode's deletions go on
                dl.bytes += min(dk * bs, e - a)
                dl.add_range(a, e)
                dl.last_stamp, dl.last_ns = s, t
            elif dk:
                self.disc.append((t, s, min(dk * bs, e - a), "", a, e))
            if fk:
                g = _group(cgi, tg, cm)
                item = (t, s, min(fk * bs, e - a), f"{cm}[{tg}]", a, e)
                for x in (g, _workers(g), _cgroup(g)):
                    if x is not None:
                        self.fresh.setdefault(x, deque()).append(item)
            while self.disc and self.disc[0][0] < t - self.window_ns:
                self.disc.popleft()
            for q in self.fresh.values():
                while q and q[0][0] < t - self.window_ns:
                    q.popleft()
            if self.deleting is not None or not self.disc:
                continue
            dsum = sum(x[2] for x in self.disc)
            for g, q in self.fresh.items():
                if g in self.open or (g[1] in (WORKERS, CGROUP)
                                      and not _spread(_by_proc(q), g[1] == CGROUP)):
                    continue
                f_ = (FLUSHER_FACTOR if g[2] == "kworker" else
                      CGROUP_FACTOR if g[1] == CGROUP else 1)
                fsum = sum(x[2] for x in q)
                if (dsum >= self.min_bytes * f_ and _places(self.disc) >= self.min_runs * f_
                        and DELETE_RATIO[0] * dsum <= fsum <= DELETE_RATIO[1] * dsum):
                    ep = Episode(self.session, self.dev, g, q[0][1], q[0][0], s, t, s, t)
                    ep.kind = "encrypted into new files, originals deleted"
                    ep.bytes = dsum
                    ep.writes = len({x[1] for x in q})
                    for x in q:
                        ep.procs[x[3]] += x[2]
                    for x in self.disc:
                        ep.add_range(x[4], x[5])
                    self.disc.clear()
                    self.open[g] = ep
                    self.deleting = ep
                    self.episodes.append(ep)
                    if self.on_episode is not None:
                        self.on_episode(ep)
                    break

    def _episodes(self, c, keep, cand, enc_blocks, start, length) -> None:
        bs = self.map.block
        cols = _rows(c, keep[cand])
        encs = np.minimum(enc_blocks[cand] * bs, length[cand]).tolist()
        ends = (start[cand] + length[cand]).tolist()
        for s, t, cgi, tg, cm, enc, a, e in zip(*cols, encs, start[cand].tolist(), ends):
            g = _group(cgi, tg, cm)
            wg, cgg = _workers(g), _cgroup(g)
            who = f"{cm}[{tg}]"
            for x in (g, wg, cgg):
                if x is None:
                    continue
                touch = self.touch.setdefault(x, deque())
                touch.append((t, s, who, a, e))
                while touch and touch[0][0] < t - self.window_ns:
                    touch.popleft()
            ep = None
            for x in (cgg, wg, g):   # the cgroup's (workers') episode takes its members' writes
                if x is None:
                    continue
                o = self.open.get(x)
                if o is not None and t - o.last_ns > self.window_ns:
                    del self.open[x]
                    o = None
                if ep is None:
                    ep = o
            if enc == 0:   # random over random: part of an open episode of its process
                if ep is not None and who in ep.procs:
                    ep.add_range(a, e)
                continue
            if ep is not None:
                ep.last_stamp, ep.last_ns = s, t
                ep.bytes += enc
                ep.writes += 1
                ep.procs[who] += enc
                ep.add_range(a, e)
                continue
            item = (t, s, enc, who, a, e)
            if self._inplace(g, item, 1):
                for y in _wider(g):   # its writes are its episode's, not its wider groups'
                    q = self.recent.get(y)
                    if q:
                        self.recent[y] = deque(x for x in q if x[3] != who)
                continue
            if wg is not None and self._inplace(wg, item, WORKERS_FACTOR, spread=True):
                ep = self.open[wg]
                q = self.recent.get(cgg) if cgg is not None else None
                if q and cgg is not None:
                    self.recent[cgg] = deque(x for x in q if x[3] not in ep.procs)
                continue
            if cgg is not None:
                self._inplace(cgg, item, CGROUP_FACTOR, spread=True)

    def _inplace(self, g: tuple, item: tuple, factor: int, spread: bool = False) -> bool:
        """Count an encrypting write (time, stamp, bytes, who, start, end) for group g; open
        its episode when the rule holds (factor x the bytes and places; spread: over
        processes, _spread): True."""
        t, s = item[0], item[1]
        rec = self.recent.setdefault(g, deque())
        rec.append(item)
        while rec and rec[0][0] < t - self.window_ns:
            rec.popleft()
        total = sum(x[2] for x in rec)
        nwrites = len({x[1] for x in rec})
        k_ = FLUSHER_FACTOR if g[2] == "kworker" else factor
        if not (total >= self.min_bytes * k_ and nwrites >= self.min_writes
                and _places(rec, spread) >= self.min_runs * k_
                and (not spread or _spread(_by_proc(rec), g[1] == CGROUP))
                and self.random_share(g, t) >= RANDOM_SHARE
                and (g[1] != CGROUP or total >= CGROUP_ENC_SHARE * self._volume(g, t)[1])):
            return False
        if os.environ.get("BLKREWIND_DEBUG_DETECTOR"):
            vol = self._volume(g, t)
            print(f"blkrewind: detector: episode of {group_kind(g)} {g[0]}:{g[2]}[{g[1]}] at "
                  f"stamp {s}: {total >> 10} KiB replaced in {nwrites} writes at "
                  f"{_places(rec, spread)} places; wrote {vol[0] >> 10} KiB, {vol[1] >> 10} KiB "
                  f"random; {dict(_by_proc(rec))}", file=sys.stderr)
        touch = self.touch.get(g, ())
        whos = {x[3] for x in rec}   # its first random overwrite by these processes
        # (a workers group: by any of its processes in the window -- the first workers may
        # have written only into free space, ciphertext of files deleted after: xfs put the
        # next workers' files over those blocks, and an episode from there missed 3 files)
        # (a cgroup group: by processes of the names in it: another program of the cgroup
        # writing media or archives before the attack is not its start)
        names = {_name(w) for w in whos}
        mine = ([x for x in touch if _name(x[2]) in names] if g[1] == CGROUP else
                list(touch) if spread else [x for x in touch if x[2] in whos])
        # and, where the tracer records dirtiers, by the flushers of its cgroup whose
        # writes no dirtier names (a bio's later pages, pages the dirtier map missed):
        # they may be its own (without dirtiers every flushed write is unnamed: other
        # processes' random data flushed before the attack is not its start)
        fl = self.touch.get((g[0], 0, "kworker")) \
            if g[2] != "kworker" and self.dirtier_seen else None
        early = [(x[0], x[1]) for x in fl or () if x[0] >= t - self.window_ns]
        t0, s0 = min([(x[0], x[1]) for x in mine] + early + [(rec[0][0], rec[0][1])],
                     key=lambda x: x[1])
        ep = Episode(self.session, self.dev, g, s0, t0, s, t, s, t)
        for x in mine:
            ep.add_range(x[3], x[4])
        for (_, _, e, w, a, b) in rec:
            ep.bytes += e
            ep.writes += 1
            ep.procs[w] += e
            ep.add_range(a, b)
            ep.replaced.append((a, b, e))
        rec.clear()
        self.open[g] = ep
        if self.confirm:     # the file-level check says whether it replaced files' data in
            ep.pending = True   # place or new files' over freed blocks (run_checks)
            self.unconfirmed.append(ep)
            return True
        self._publish(ep)
        return True

    def _publish(self, ep: Episode) -> None:
        ep.pending = False
        self.episodes.append(ep)
        if self.on_episode is not None:
            self.on_episode(ep)

    def _confirm(self, check) -> None:
        """The in-place episodes waiting for the file-level check (check.in_place: True,
        False or RETRY): an episode, or not one (its blocks held other files' data before: new
        files written over the freed blocks of deleted ones; the group's writes count again
        from here)."""
        left = []
        for ep in self.unconfirmed:
            r = check.in_place(self, ep) if hasattr(check, "in_place") else True
            if r is RETRY:
                left.append(ep)
            elif r:
                self._publish(ep)
            elif self.open.get(ep.group) is ep:
                del self.open[ep.group]
        self.unconfirmed = left


def _rows(c: dict, idx: np.ndarray) -> tuple[list, ...]:
    """Rows idx of the columns as Python lists (the per-row loops below: one conversion per
    column instead of a numpy scalar per value): stamp, time_ns, cgroup_id, tgid, comm."""
    return (c["stamp"][idx].tolist(), c["time_ns"][idx].tolist(),
            np.asarray(c["cgroup_id"])[idx].tolist(), np.asarray(c["tgid"])[idx].tolist(),
            c["comm"][idx].tolist())


def _group(cgroup: int, tgid: int, comm: str) -> tuple:
    """What an episode is counted per: the submitting process in its cgroup; the flusher
    threads (kworker/*) of a cgroup as one (buffered writes of any process of the cgroup)."""
    if comm.startswith("kworker/"):
        return (cgroup, 0, "kworker")
    return (cgroup, tgid, comm)


def _workers(g: tuple) -> tuple | None:
    """The workers group a process group also counts in: every process of its name in its
    cgroup (tgid WORKERS): an attack spread over processes (a parent forking workers,
    `xargs -P`), each below the thresholds, is one there. None for the flushers (one group
    per cgroup already)."""
    if g[2] == "kworker":
        return None
    return (g[0], WORKERS, g[2])


def _cgroup(g: tuple) -> tuple | None:
    """The cgroup group a process group also counts in: every process of its cgroup (a
    systemd unit, a container, a user's session), whatever their names (tgid CGROUP): an
    attack whose pieces are done by programs of different names (a script running `openssl
    enc`, `dd`, python in turn; a binary copied under random names per worker) is one there.
    None for the flushers (one group per cgroup already)."""
    if g[2] == "kworker":
        return None
    return (g[0], CGROUP, "*")


def _wider(g: tuple) -> list[tuple]:
    """The groups above g that its writes also count in (its workers', its cgroup's)."""
    if g[1] == CGROUP:
        return []
    out = [] if g[1] == WORKERS else [_workers(g)]
    return [x for x in (*out, _cgroup(g)) if x is not None]


def group_kind(g: tuple) -> str:
    """What an episode's group is: "process", "workers of NAME", "cgroup", "flushers"."""
    if g[2] == "kworker":
        return "flushers"
    if g[1] == WORKERS:
        return f"workers of {g[2]}"
    if g[1] == CGROUP:
        return "cgroup"
    return "process"


def _name(who: str) -> str:
    """The comm of a "comm[pid]"."""
    return who.rsplit("[", 1)[0]


def _by_proc(rec) -> Counter:
    """Bytes per process of (time, stamp, bytes, who, ...) items."""
    c: Counter = Counter()
    for x in rec:
        c[x[3]] += x[2]
    return c


def _spread(procs: Counter, names: bool = False) -> bool:
    """A workers group's writes are spread over processes: at least WORKERS_PROCS of them,
    none with more than half of the bytes (one process doing most of it, or two attackers
    one after the other, are each their own group's); names (a cgroup group): also over at
    least CGROUP_NAMES names (one name: its workers group's). (Not "none with more than half"
    of the names too: a script running three programs in turn over files of uneven sizes
    gave one of them 60 %.)"""
    tot = sum(procs.values())
    if not (len(procs) >= WORKERS_PROCS and tot > 0 and 2 * max(procs.values()) <= tot):
        return False
    if not names:
        return True
    by: Counter = Counter()
    for w, n in procs.items():
        by[_name(w)] += n
    return len(by) >= CGROUP_NAMES


def _places(rec, per_proc: bool = False) -> int:
    """How many separate places the encrypting writes (time, stamp, bytes, who, start, end),
    in stamp order, went to: a write starts a new place unless it continues the previous one
    (starts where it ended, or overlaps it) within PLACE_NS -- and, per_proc (a workers or
    cgroup group), by the same process (each its own file: xfs put the documents one after
    the other, and a script encrypting them in order, one process per file, continued each
    file where the last one ended). Files next to each other encrypted one a second are
    separate places; one file written sequentially is one."""
    n, prev = 0, None
    for t, _, _, who, a, e in rec:
        if prev is None or t - prev[0] > PLACE_NS or not (prev[1] <= a <= prev[2]
                                                          or a <= prev[1] < e) \
                or (per_proc and who != prev[3]):
            n += 1
        prev = (t, min(a, prev[1]) if prev and prev[1] <= a <= prev[2] else a, e, who)
    return n


# ------------------------------------------------------------------ reading a store
COLS = ("stamp", "time_ns", "sector", "offset", "len", "bio_size", "op", "randomness",
        "cgroup_id", "tgid", "comm")


def _columns(r: dict) -> dict:
    """Columns read from the store as plain numpy arrays (NULL: 0, NaN, None)."""
    out = {}
    for name, col in r.items():
        if isinstance(col, np.ma.MaskedArray):
            if name == "randomness":
                col = np.ma.filled(col.astype(np.float64), np.nan)
            elif name == "blocks":
                col = np.array([None if m else v for v, m in
                                zip(col.data.tolist(), np.ma.getmaskarray(col).tolist())], object)
            else:
                col = col.filled(0)
        out[name] = np.asarray(col)
    return out


def start(store, session: str, dev: int, size_bytes: int, **kw) -> Detector:
    """A Detector of (session, dev) with the session's baseline applied (store: a Store or a
    RemoteStore: a StoreReader)."""
    det = Detector(session, dev, size_bytes, **kw)
    b = _columns(store.baseline_chunks(session, dev))
    if len(b.get("sector", [])):
        det.feed_base(b["sector"], b["bio_size"], b["flags"],
                      np.asarray(b["randomness"], np.float64), list(b["blocks"]))
    return det


def advance(store, det: Detector, upto: int | None = None, check=None) -> None:
    """Feed the detector the records of its (session, dev) after its last stamp; `check`:
    the file-level check of its candidates (FileCheck), or None (no check)."""
    lo = det.last_stamp
    det.confirm = check is not None
    while True:
        c = _columns(store.detector_records(det.session, det.dev, lo, upto, CHUNK_ROWS))
        n = len(c.get("stamp", []))
        if n == 0:
            return
        if n == CHUNK_ROWS:   # do not split a stamp between two chunks
            last = c["stamp"][-1]
            cut = int(np.searchsorted(c["stamp"], last))
            if cut > 0:
                c = {k: v[:cut] for k, v in c.items()}
        c["randomness"] = np.asarray(c["randomness"], np.float64)
        if not det.dirtier_seen and c["named"].any():
            det.dirtier_seen = True
        det.feed(c)
        if check is not None and (det.pending or det.unconfirmed):
            det.run_checks(check)
        lo = det.last_stamp
        if n < CHUNK_ROWS:
            return


def scan(store, session: str, dev: int, size_bytes: int, upto: int | None = None,
         check=None, **kw) -> list[Episode]:
    det = start(store, session, dev, size_bytes, **kw)
    advance(store, det, upto, check)
    for ep in det.unconfirmed:   # points never restorable: an episode, as without the check
        det._publish(ep)
    det.unconfirmed = []
    return sorted(det.episodes, key=lambda e: e.first_stamp)


def scan_device(store, device: str, files: bool = True) -> list[Episode]:
    """Episodes of every session of a store device (host:name), oldest first; files=False:
    without the file-level check (no point is mounted)."""
    eps: list[Episode] = []
    check = FileCheck(store, device) if files else None
    try:
        for session, dev, size in store.device_session_sizes(device):
            eps += scan(store, session, int(dev), int(size or 0), check=check)
    finally:
        if check is not None:
            check.close()
    return eps


# ------------------------------------------------------------------ the file-level check
SAMPLE = 4096                 # bytes per sample of a file's content ...
SAMPLES = 32                  # ... and how many, spread over the file
MIN_FILE = 1024               # smaller files are not counted
PAIR_SLACK = (4096, 0.1)      # a new file pairs an old one within 4 KiB or 10 % of its size
SETTLE_NS = 2 * 10**9         # a journal commit follows a burst of writeback within this
IN_PLACE_SHARE = 0.5          # an in-place episode: at least this share of the bytes it
                              # replaced were the same file's before and after (in_place;
                              # measured: benign 0 %, attacks 84-100 %)
NEW_PLACES_MORE = 2           # a candidate has MIN_RUNS + 2 places: the deletion of a file
                              # reaches the journal with the next file's fsync, so a check at
                              # MIN_RUNS places would find too few pairs and cost a second one


def file_randomness(path: str, size: int) -> float:
    """randomness() of up to SAMPLES pieces of SAMPLE bytes spread over a file (one sampled
    segment per piece), their mean."""
    pieces = []
    with open(path, "rb") as f:
        if size <= SAMPLE * SAMPLES:
            data = f.read(SAMPLE * SAMPLES)
            pieces = [data[i:i + SAMPLE] for i in range(0, len(data), SAMPLE)]
        else:
            for i in range(SAMPLES):
                f.seek(i * (size - SAMPLE) // (SAMPLES - 1))
                pieces.append(f.read(SAMPLE))
    pieces = [x for x in pieces if x]
    if not pieces:
        return 0.0
    buf = b"".join(pieces)
    off = np.cumsum([0] + [len(x) for x in pieces]).astype(np.int64)
    return float(np.mean(entropy.randomness(buf, off)))


def pair_files(lost: dict, gained: dict) -> list[tuple[str, str]]:
    """(old path, new path) pairs: a path in both (rewritten), then by size (greedy, the
    sizes in order) within PAIR_SLACK. lost, gained: path -> size."""
    pairs = [(p, p) for p in lost if p in gained]
    a = sorted((n, p) for p, n in lost.items() if p not in gained)
    b = sorted((n, p) for p, n in gained.items() if p not in lost)
    i = j = 0
    while i < len(a) and j < len(b):
        na, nb = a[i][0], b[j][0]
        if abs(na - nb) <= max(PAIR_SLACK[0], PAIR_SLACK[1] * na):
            pairs.append((a[i][1], b[j][1]))
            i += 1
            j += 1
        elif nb < na:
            j += 1
        else:
            i += 1
    return pairs


class FileCheck:
    """The file-level check of a candidate streak (Detector.pending): the file system is
    read at the point before the streak (A) and at its last write (B) (ext4, xfs:
    replayer/pointimage.py, replayer/fsmap.py). Files of A holding compressible data that
    are gone at B, or whose blocks changed and whose path holds a gained file at B (deleted,
    replaced by a rename, truncated and rewritten) are *lost*; files of B holding random
    data, created or changed since A, at least half of whose blocks the streak's group
    wrote, are *gained*. When at least MIN_RUNS lost files pair with gained ones of about
    their size (pair_files: by path, and by size a file gone against one at a path new since
    A; encryption keeps sizes, compression does not) for at least MIN_BYTES of lost data, the
    streak is an episode: its ranges are the lost files' blocks at A. A point not restorable yet: RETRY."""

    def __init__(self, store, device: str, stopping: threading.Event | None = None):
        self.store = store
        self.device = device
        self.stopping = stopping     # set: no new point is read (serve is stopping)
        self.checks = 0
        self.disabled: str | None = None
        self._dev: StoreDevice | None = None
        self._a: tuple | None = None     # the point before the streak, mounted: _side_a

    def _restorable(self, det, stamp: int):
        """True, False (never: a gap, before the baseline) or RETRY (not yet)."""
        inside, last = self.store.restorable_at(det.session, det.dev, stamp)
        if inside:
            return True
        if last is None or stamp > last:
            return RETRY
        return False

    def point_before(self, det, stamp: int) -> int:
        """The point before a streak starting at `stamp`, and before the metadata writes
        right before it (the journal commit that may hold the truncation or deletion of its
        first file: ext4 committed `open(O_TRUNC)` before the first ciphertext reached the
        device): the last stamp before `stamp` that is not a metadata write (F_META)."""
        found = self.store.last_data_stamp(det.session, det.dev, stamp - 100_000, stamp)
        a = found if found is not None else stamp - 1
        # not before the restorable interval holding stamp - 1 (an attack right after the
        # baseline: the commit before it is the baseline's)
        iv = self.store.interval_start(det.session, det.dev, stamp - 1)
        if iv is not None:
            a = max(a, iv)
        return min(a, stamp - 1)

    def _point(self, det, stamp: int):
        from blkrewind.replayer import points
        st = self.store
        if self._dev is None:
            self._dev = st.find_device(self.device)
        return points.Resolved(self._dev, det.session, det.dev, stamp, det.size_bytes,
                               None, f"stamp:{stamp}")

    def _side_a(self, det: Detector, a_stamp: int):
        """(mount, file map, {path: randomness}) of the point before a streak, kept mounted
        for the streak's next checks (close() unmounts it)."""
        from blkrewind.replayer import fsmap
        from blkrewind.replayer.pointimage import mounted, open_point_image

        key = (det.session, det.dev, a_stamp)
        if self._a is not None and self._a[0] == key:
            return self._a[1:4]
        self.close()
        st = self.store
        if self._dev is None:
            self._dev = st.find_device(self.device)
        stack = contextlib.ExitStack()
        try:
            img, _ = stack.enter_context(open_point_image(st, self._dev, self._point(det, a_stamp)))
            mnt, _ = stack.enter_context(mounted(img))
            m = fsmap.file_map(mnt)
        except BaseException:
            stack.close()
            raise
        self._a = (key, mnt, m, {}, stack)
        return mnt, m, self._a[3]

    def close(self) -> None:
        a, self._a = self._a, None
        if a is not None:
            a[4].close()

    def _failed(self, e: Exception, what: str, a_stamp: int, b_stamp: int) -> None:
        """Say why a check could not read its points: a UserError (no ext4/xfs, no loop
        device...) disables the checks of this device, said once; an OSError fails this one."""
        from blkrewind.errors import UserError

        if isinstance(e, UserError):
            self.disabled = str(e)
            print(f"blkrewind: detector: no file-level check on {self.device}: {e}",
                  file=sys.stderr)
        else:
            print(f"blkrewind: detector: the {what} check at stamps {a_stamp}..{b_stamp} "
                  f"failed: {e}", file=sys.stderr)

    def __call__(self, det: Detector, sk: Streak):
        from blkrewind.errors import UserError
        from blkrewind.replayer import fsmap
        from blkrewind.replayer.pointimage import mounted, open_point_image

        if self.disabled:
            return None
        if self.stopping is not None and self.stopping.is_set():
            return RETRY
        a_stamp, b_stamp = self.point_before(det, sk.first_stamp), sk.last_stamp
        for x in (b_stamp, a_stamp):
            ok = self._restorable(det, x)
            if ok is not True:
                return ok if ok is RETRY else None
        st = self.store
        f_ = FLUSHER_FACTOR if sk.group[2] == "kworker" else 1
        ranges = sk.merged_ranges()
        self.checks += 1
        t0 = time.monotonic()
        if self._dev is None:
            self._dev = st.find_device(self.device)
        # the two points are made readable side by side (nbdkit, FUSE and the mounts mostly
        # wait): the point before the streak in a thread unless it is mounted already
        side: dict = {}

        def mount_a():
            try:
                side["a"] = self._side_a(det, a_stamp)
            except BaseException as e:   # handed to the caller
                side["e"] = e

        th = None
        if self._a is not None and self._a[0] == (det.session, det.dev, a_stamp):
            mount_a()
        else:
            th = threading.Thread(target=mount_a, name="detector-point-a", daemon=True)
            th.start()
        try:
            for again in (False, True):
                with open_point_image(st, self._dev, self._point(det, b_stamp)) as (img_b, _), \
                        mounted(img_b) as (mnt_b, _):
                    mb = fsmap.file_map(mnt_b)
                    if th is not None:
                        th.join()
                        th = None
                    if "e" in side:
                        raise side["e"]
                    mnt_a, ma, rnd_a = side["a"]
                    lost, gained = {}, {}
                    for p, fb in mb.items():
                        fa = ma.get(p)
                        if fb["size"] < MIN_FILE or (fa is not None and fa["ino"] == fb["ino"]
                                                     and fa["extents"] == fb["extents"]):
                            continue
                        own = sum(n for _, n in fb["extents"])
                        if own == 0 or 2 * fsmap.overlap(fb["extents"], ranges) < min(own, fb["size"]):
                            continue    # not written by this group in the streak
                        if file_randomness(os.path.join(mnt_b, p), fb["size"]) >= RANDOM_WRITE:
                            gained[p] = fb["size"]
                    for p, fa in ma.items():
                        fb2 = mb.get(p)
                        if fa["size"] < MIN_FILE or (fb2 is not None and (
                                p not in gained or (fb2["ino"] == fa["ino"]
                                                    and fb2["extents"] == fa["extents"]))):
                            continue   # kept, or replaced by data that is not the group's
                                       # random data (a package reinstalled: dpkg renames
                                       # a new copy over every file)
                        if p not in rnd_a:
                            rnd_a[p] = file_randomness(os.path.join(mnt_a, p), fa["size"])
                        if rnd_a[p] <= COMPRESSIBLE:
                            lost[p] = fa["size"]
                    # by size only files gone against new ones (a random file that replaced
                    # one of its path, random before too, pairs with no other file)
                    pairs = pair_files(lost, {p: n for p, n in gained.items()
                                              if p in lost or p not in ma})
                    old = [ma[p] for p, _ in pairs]
                # nothing of it shows as files yet: a burst of writeback (syncfs, the flusher)
                # writes the data first and the metadata at the journal commit right after it:
                # once more at the last point within SETTLE_NS of the streak's last write
                if gained or again:
                    break
                b2 = st.last_stamp_at(det.session, b_stamp + 1, max(det.last_stamp, b_stamp),
                                      sk.last_ns + SETTLE_NS)
                if b2 is None or b2 <= b_stamp or self._restorable(det, b2) is not True:
                    break
                b_stamp = b2
        except (UserError, OSError) as e:
            self._failed(e, "file-level", a_stamp, b_stamp)
            return None
        finally:
            if th is not None:   # B failed first: A's mount is kept (close() undoes it)
                th.join()
        nbytes = sum(f["size"] for f in old)
        if os.environ.get("BLKREWIND_DEBUG_DETECTOR"):
            print(f"blkrewind: detector: file-level check {self.checks} of {sk.group[2]}"
                  f"[{sk.group[1]}] at stamps {a_stamp}..{b_stamp} ({sk.bytes >> 10} KiB at "
                  f"{sk.places} places): {len(lost)} lost, {len(gained)} gained, {len(pairs)} "
                  f"pairs, {time.monotonic() - t0:.1f} s", file=sys.stderr)
        if len(pairs) < det.min_runs * f_ or nbytes < det.min_bytes * f_:
            return None
        # its clean point is the point the check read as clean (before the journal commit
        # that may hold the first truncation or deletion)
        ep = Episode(det.session, det.dev, sk.group, sk.first_stamp, sk.first_ns,
                     sk.last_stamp, sk.last_ns, sk.last_stamp, sk.last_ns, bytes=nbytes,
                     writes=sk.writes, procs=Counter(sk.procs), kind=NEWFILES, before=a_stamp)
        for f in old:
            for ph, ln in f["extents"]:
                ep.add_range(ph, ph + ln)
        ep.files = [f"{a} -> {b}" if a != b else a for a, b in pairs]
        return ep

    def in_place(self, det: Detector, ep: Episode):
        """Did an in-place episode replace files' data in place? The file system is read at
        the point before it (A) and at the write that opened it (B): a replaced write is in
        place when a file holding its blocks at A (path and inode) still holds them at B
        (ransomware overwriting a document: the same file's blocks). New files written over
        the freed blocks of deleted or replaced ones (a log rotation's compressed output; tar
        unpacking a package again, its new .gz files over the old copy's; xfs reuses freed
        extents once the deletion is in the log) replace blocks that at A were another
        file's or free. True when at least IN_PLACE_SHARE of the replaced bytes were in
        place; True when the file systems cannot be read (not ext4/xfs, no point
        restorable: as without the check), RETRY when its points are not restorable yet."""
        from blkrewind.errors import UserError
        from blkrewind.replayer import fsmap
        from blkrewind.replayer.pointimage import mounted, open_point_image

        if self.disabled or not ep.replaced:
            return True
        if self.stopping is not None and self.stopping.is_set():
            return RETRY
        a_stamp, b_stamp = ep.first_stamp - 1, ep.detect_stamp
        for x in (b_stamp, a_stamp):
            ok = self._restorable(det, x)
            if ok is not True:
                return RETRY if ok is RETRY else True
        st = self.store
        if self._dev is None:
            self._dev = st.find_device(self.device)
        self.checks += 1
        t0 = time.monotonic()
        side: dict = {}

        def map_at(key: str, stamp: int) -> None:
            try:
                with open_point_image(st, self._dev, self._point(det, stamp)) as (img, _), \
                        mounted(img) as (mnt, _):
                    side[key] = fsmap.file_map(mnt)
            except BaseException as e:   # handed to the caller
                side["e"] = e

        th = threading.Thread(target=map_at, args=("a", a_stamp), name="detector-point-a",
                              daemon=True)
        th.start()
        map_at("b", b_stamp)
        th.join()
        e = side.get("e")
        if isinstance(e, (UserError, OSError)):
            self._failed(e, "in-place", a_stamp, b_stamp)
            return True
        if e is not None:
            raise e
        held_a, held_b = _holders(side["a"]), _holders(side["b"])
        inplace = total = 0
        for a, b, n in ep.replaced:
            total += n
            if _holding(held_a, a, b) & _holding(held_b, a, b):
                inplace += n
        if os.environ.get("BLKREWIND_DEBUG_DETECTOR"):
            print(f"blkrewind: detector: in-place check {self.checks} of {group_kind(ep.group)} "
                  f"{ep.group[0]}:{ep.group[2]}[{ep.group[1]}] at stamps {a_stamp}..{b_stamp}: "
                  f"{inplace >> 10} of {total >> 10} KiB replaced in place (a file holding the "
                  f"blocks before holds them after), {time.monotonic() - t0:.1f} s",
                  file=sys.stderr)
        return inplace >= IN_PLACE_SHARE * total


def _holders(m: dict) -> tuple:
    """(starts, ends, keys) of every extent of a file map (fsmap.file_map), keys
    (path, inode)."""
    s, e, k = [], [], []
    for p, f in m.items():
        for ph, ln in f["extents"]:
            s.append(ph)
            e.append(ph + ln)
            k.append((p, f["ino"]))
    return np.array(s, np.int64), np.array(e, np.int64), k


def _holding(h: tuple, a: int, b: int) -> set:
    """The (path, inode) of the files whose extents overlap [a, b)."""
    s, e, k = h
    return {k[i] for i in np.nonzero((s < b) & (e > a))[0].tolist()}


def episode_json(ep: Episode) -> str:
    return json.dumps(ep.row(), sort_keys=True)


def clean_point(store, ep: Episode) -> tuple[int | None, int | None, str | None]:
    """(stamp, time_ns, mark name) of the last restorable point before the episode's first
    write (or its `before`): the stamp just before it when restorable, else the end of the last restorable
    interval before it; the newest restorable mark at or before that stamp (or None)."""
    before = ep.before if ep.before is not None else ep.first_stamp - 1
    stamp = store.last_restorable_upto(ep.session, ep.dev, before)
    if stamp is None:
        return None, None, None
    return (stamp, store.stamp_last_time(ep.session, stamp),
            store.restorable_mark_upto(ep.session, ep.dev, stamp))


class Watch:
    """Detectors of every (session, device) of a store, fed what was stored since the last
    pass (serve runs one pass every couple of seconds). A device is watched once its baseline
    is stored (its baseline_end point). New episodes go to on_episode(ep, device)."""

    def __init__(self, store, on_episode=None, files: bool = True,
                 stopping: threading.Event | None = None):
        self.store = store            # a Store (serve: its reads run between commits)
        self.files = files            # run the file-level check (FileCheck)
        self.stopping = stopping      # set: the pass ends without reading another point
        self.checks: dict[str, FileCheck] = {}
        self.on_episode = on_episode
        self.dets: dict[tuple, Detector] = {}
        self.devices: dict[tuple, str] = {}
        self.episodes: list[tuple[str, Episode]] = []

    def step(self) -> int:
        """One pass; returns how many new episodes it found."""
        new = 0
        rows = self.store.baselined_devices()
        for session, dev, size, device in rows:
            if self.stopping is not None and self.stopping.is_set():
                break
            key = (session, int(dev))
            det = self.dets.get(key)
            if det is None:
                found: list[Episode] = []
                det = start(self.store, session, int(dev), int(size or 0),
                            on_episode=found.append)
                self.dets[key] = det
                self.devices[key] = device
            before = len(det.episodes)
            check = self.checks.get(device)
            if check is None and self.files:
                check = self.checks[device] = FileCheck(self.store, device, self.stopping)
            advance(self.store, det, check=check)
            if check is not None and (det.pending or det.unconfirmed):   # candidates whose
                det.run_checks(check)                   # points were not restorable yet
            if check is not None:
                self._prepare(det, check)
            for ep in det.episodes[before:]:
                self.episodes.append((device, ep))
                new += 1
                if self.on_episode is not None:
                    self.on_episode(ep, device)
        return new

    @staticmethod
    def _prepare(det: Detector, check: FileCheck) -> None:
        """Mount the point before a live streak of MIN_BYTES ahead of its check (the check
        then mounts only its last write's point: about half the time to an alert), and
        unmount it once no streak is live."""
        live = [sk for sk in det.streaks.values()
                if sk.bytes >= det.min_bytes and det.last_ns - sk.last_ns <= det.window_ns
                and sk.group not in det.open]
        if not live:
            if not det.pending:
                check.close()
            return
        if check.stopping is not None and check.stopping.is_set():
            return
        sk = max(live, key=lambda x: x.bytes)
        a = check.point_before(det, sk.first_stamp)
        if check.disabled or check._restorable(det, a) is not True:
            return
        from blkrewind.errors import UserError
        try:
            check._side_a(det, a)
        except UserError as e:
            check.disabled = str(e)
            print(f"blkrewind: detector: no file-level check on {check.device}: {e}",
                  file=sys.stderr)
        except OSError as e:
            print(f"blkrewind: detector: cannot read {check.device} at stamp "
                  f"{sk.first_stamp - 1}: {e}", file=sys.stderr)

    def close(self) -> None:
        """Unmount what the file-level checks keep mounted (the point before a live streak)."""
        for check in self.checks.values():
            check.close()

    def summary(self, limit: int = 20) -> list[dict]:
        out = []
        for device, ep in self.episodes[-limit:]:
            r = ep.row()
            r["device"] = device
            r["group"] = list(ep.group)
            out.append(r)
        return out


def describe(ep: Episode, device: str) -> str:
    """One line about an episode (serve's log)."""
    procs = ", ".join(f"{k} {v >> 10} KiB" for k, v in ep.procs.most_common(3))
    what = (f"replaced {ep.bytes >> 10} KiB of compressible data with random data"
            if ep.kind != NEWFILES else
            f"encrypted {len(ep.files)} files ({ep.bytes >> 10} KiB) into new files, the "
            f"originals deleted or rewritten,")
    who = group_kind(ep.group)
    if who != "process":
        who = f"{who} {ep.group[0]}" if who == "cgroup" else who
        procs = f"{procs} ({who})"
    return (f"{device}: {procs} {what} in {ep.writes} writes, {len(ep.merged_ranges())} places, since stamp "
            f"{ep.first_stamp}; last clean point: stamp {ep.first_stamp - 1} or earlier "
            f"(blkrewind suspects --device {device} lists it with the restore command)")
