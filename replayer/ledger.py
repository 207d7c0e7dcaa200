"""What a writable store holds, frame by frame, mirrored in memory: the `Ledger`.

One per open writable Store (`Store.ledger`): the sessions' hosts, the segments (seg_id, host,
SEAL), the frame ranges of every batch, the frame ranges being stored right now
(reservations) and the next batch id. Every use is under the store's mutex (`cond` waits on
it). LOG ingest and FrameSink (replayer/ingest/) reserve, store and commit through it;
integrity (dropping damaged batches) and prune (allocating a batch id) change it too.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from blkrewind.formats.ranges import merge, subtract


@dataclass
class SegState:
    seg_id: int | None = None
    host: str | None = None
    sealed: bool = False
    nframes: int | None = None
    torn_bytes: int = 0
    error: str | None = None


class Ledger:
    """The frames a store holds and the frames being stored, in memory (see the module
    docstring). `rows` is the store's loader: rows() -> (frame_ranges rows (batch, session,
    segno, first, end), segments rows, sessions rows (session, host, held_segno,
    held_frame), the next batch id)."""

    def __init__(self, mutex: Any, rows):
        self.cond = threading.Condition(mutex)
        self._rows = rows
        self.inflight: dict[tuple, list[tuple[int, int]]] = {}
        self.writing: set[int] = set()      # batch ids allocated, not committed or dropped yet
        self.ids = threading.Lock()         # next_batch and writing (not the store mutex: a
                                            # commit holding it must not stall the others)
        with self.cond:
            self.reload()

    def reload(self) -> None:
        ranges, segs, sessions, next_batch = self._rows()
        self.ranges: dict[tuple, list[tuple[int, int, int]]] = {}
        for bt, s, n, a, e in ranges:
            self.ranges.setdefault((s, n), []).append((a, e, bt))
        self.segs = {(s, n): SegState(sid, h, bool(se), nf, int(tb or 0), err)
                     for s, n, sid, h, se, nf, tb, err in segs}
        self.hosts: dict[str, str] = {}
        self.prefix: dict[str, tuple[int, int]] = {}
        for s, h, ps, pf in sessions:
            self.hosts[s] = h
            self.prefix[s] = (int(ps or 0), int(pf or 0))
        self.next_batch = next_batch

    # -- queries
    def held(self, key) -> list[list[int]]:
        return merge(self.ranges.get(key, ()))

    def missing(self, key, a: int, e: int) -> list[list[int]]:
        return subtract(a, e, self.held(key))

    def complete(self, key) -> bool:
        st = self.segs.get(key)
        return bool(st and st.sealed and st.nframes is not None
                    and self.held(key) == [[0, st.nframes]])

    def compute_prefix(self, session: str, start: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """(segno, frame): every frame of the session before it is stored."""
        n, f = start
        while True:
            for a, e in self.held((session, n)):
                if a <= f <= e:
                    f = max(f, e)
                    break
            st = self.segs.get((session, n))
            if st and st.sealed and st.nframes is not None and f >= st.nframes:
                n, f = n + 1, 0
                continue
            return n, f

    # -- reservations
    def _busy(self, key, a: int, e: int) -> bool:
        return any(a < ie and ia < e for ia, ie in self.inflight.get(key, ()))

    def reserve(self, wants: list[tuple[tuple, int, int]]) -> None:
        """Wait until no other caller stores frames overlapping any of `wants`
        ((key, first, end) items), then claim them all at once (no hold-and-wait)."""
        with self.cond:
            while any(self._busy(k, a, e) for k, a, e in wants):
                self.cond.wait()
            for k, a, e in wants:
                self.inflight.setdefault(k, []).append((a, e))

    def release(self, wants: list[tuple[tuple, int, int]]) -> None:
        with self.cond:
            for k, a, e in wants:
                lst = self.inflight.get(k)
                if lst is not None:
                    lst.remove((a, e))
                    if not lst:
                        del self.inflight[k]
            self.cond.notify_all()

    def alloc_batch(self) -> int:
        with self.ids:
            n = self.next_batch
            self.next_batch += 1
            self.writing.add(n)
            return n

    def forget_batch(self, n: int | None) -> None:
        if n is not None:
            with self.ids:
                self.writing.discard(n)

    # -- undo
    def saved(self, keys=(), sessions=()) -> dict:
        """The entries of `keys` (session, segno) and `sessions`, for restore() when the
        transaction that changes them fails."""
        return {"ranges": {k: self.ranges.get(k) for k in keys},
                "segs": {k: self.segs.get(k) for k in keys},
                "hosts": {s: self.hosts.get(s) for s in sessions},
                "prefix": {s: self.prefix.get(s) for s in sessions}}

    def restore(self, saved: dict) -> None:
        """Put back what saved() took (an entry that did not exist is removed)."""
        for name, entries in saved.items():
            d = getattr(self, name)
            for key, value in entries.items():
                if value is None:
                    d.pop(key, None)
                else:
                    d[key] = value
