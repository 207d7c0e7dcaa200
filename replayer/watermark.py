"""What is restorable: the scan for gaps and the restorable intervals of each device
(docs/internals.md, "What is restorable" and "Gaps and resync").

`finalize` runs for every session that received rows since the last run
(`sessions.dirty`): by `blkrewind ingest` at its end and by the server every
~0.2 s. Its cost follows what is new, not the history:

1. **The scan** (`scan_state.scanned_to`): every stamp of the session in
   `[stamp_base, scanned_to]` has been classified complete or not. Each run
   goes on from `scanned_to` up to the newest stamp ingested (the session's
   end after R_END), in steps of WM_CHUNK stamps; the stamps that are missing
   or incomplete are kept as runs in `gap_runs(session, lo, hi, reason,
   settled)`. A run that is not *settled* (covered, for every device of the
   session, by a finished resync) is checked again on each run: a frame
   ingested late (segments in any order) shrinks or removes it. A settled run
   stays as it is: the resync made the lost stamps moot, and checking them
   again would cost a query per old loss event on every run.
2. **The intervals**, recomputed from the small tables only (gap runs, the
   resync points, the baseline_end points, `pruned`): for device D, a gap
   stamp g is covered by a resync of D (R_POINT resync_start {dev, since} at
   Rs, resync_end {dev, start: Rs} at Re) when since <= g < Rs; D is
   restorable at P when P >= baseline_end(D) and every gap g <= P is covered
   by a resync with Re <= P (of the covering resyncs, the earliest Re counts).
   So D's restorable set is `[baseline_end, g1 - 1]`, `[Re1, g2 - 1]`, ...,
   up to the first uncovered gap or the newest stamp; it goes to
   `restorable(session, dev, from_stamp, to_stamp, from_ns, to_ns)`, and every
   gap window `[g, Re)` (or `[g, ...)` while not covered) with its cause to
   `gap_windows`. After `blkrewind prune` (replayer/prune.py) the row of
   `pruned` for (session, dev) says where D's history starts: its stamp K
   replaces baseline_end, gaps <= K no longer count (K was restorable, so each
   of them was covered by a resync that ended before K), and kept marks older
   than K are single-stamp intervals.

The old per-session columns stay filled: `sessions.complete_to` /
`watermark` = the last stamp of the complete prefix (`[stamp_base, W]` all
complete), `first_gap`/`gap_reason`/`after_gap`; `session_devices.
restorable_from/_to` = the first and the last restorable stamp of the device
in the session (there may be gap windows in between: `restorable` says).

Rescan: the scan trusts `sessions.complete_to` as it last wrote it
(`scan_state.prefix`). Code that removes stored rows (the integrity check
dropping a damaged batch) sets `sessions.complete_to` to the last stamp it
knows complete (or NULL) and `dirty = TRUE`; the next run then drops its gap
runs and scans again from there (`Store.reset_scan` does exactly that).

Every read and write of these tables is a named operation of the store (replayer/store.py,
"restorable intervals: the scan's tables"); this module is the rule.
"""
from __future__ import annotations

import json
import threading

import numpy as np

from blkrewind.errors import StoreError
from blkrewind.formats import record
from blkrewind.replayer.store import Store

WM_CHUNK = 1 << 20           # stamps per watermark scan step


# ============================================================ the scan
class _Times:
    """Times of stamps (the min time_ns of a stamp's records, marks and points): known ones
    (from the previous run's rows, from the scan's own result), else one query each."""

    def __init__(self, store: Store, session: str):
        self.store, self.session = store, session
        self.known: dict[int, int | None] = {}
        self.scanned: list[tuple] = []   # (stamps (sorted), times, NULL mask)

    def add_scan(self, stamps: np.ndarray, times, runs) -> None:
        """One scan step's result (times: masked where NULL): its arrays are kept until the
        next step (the newest stamp is in the last one), the times around its bad runs for
        good (interval ends, gap windows)."""
        if not len(stamps):
            return
        self.scanned = [(stamps, np.ma.getdata(times).astype(np.int64, copy=False),
                         np.ma.getmaskarray(times))]
        for a, _b in runs:
            for t in (a - 1, a):
                found, v = self._lookup(t)
                if found:
                    self.known[t] = v

    def _lookup(self, stamp: int):
        for st, tm, null in self.scanned:
            if int(st[0]) <= stamp <= int(st[-1]):
                i = int(np.searchsorted(st, np.uint64(stamp)))
                if i < len(st) and int(st[i]) == stamp:
                    return True, None if null[i] else int(tm[i])
        return False, None

    def __call__(self, stamp: int) -> int | None:
        if stamp in self.known:
            return self.known[stamp]
        found, v = self._lookup(stamp)
        if not found:
            v = self.store.stamp_time(stamp, [self.session])
        self.known[stamp] = v
        return v


def _gap_reason(store: Store, session: str, g: int) -> str:
    row = store.stamp_pieces(session, g)
    if not row[3]:
        return f"stamp {g} is missing (a lost record, or a LOG frame not ingested yet)"
    got, size, flags, _ = row
    if flags is None:   # bit_or over the stamp's records, which row[3] counted
        raise StoreError(f"stamp {g}: records without flags")
    if flags & record.F_READERR:
        return f"bio {g}: its payload could not be read (read error)"
    if flags & record.F_TRUNC:
        return f"bio {g}: its payload was not captured to the end (truncated)"
    return f"bio {g} is incomplete: {int(got or 0)} of {int(size or 0)} bytes captured"


_tl = threading.local()   # .times: the _Times of the update_watermark running in this thread


def _bad_runs(store: Store, session: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """Runs [a, b] of stamps in (lo, hi] that are missing or incomplete (the times of the
    stamps seen go to the running update_watermark's _Times)."""
    times = getattr(_tl, "times", None)
    if times is not None and times.session != session:
        times = None
    out: list[tuple[int, int]] = []
    while lo < hi:
        top = min(hi, lo + WM_CHUNK)
        r = store.stamp_states(session, lo, top)
        st = np.asarray(r["stamp"], np.uint64)
        ok = np.asarray(r["complete"], bool)
        good = np.zeros(top - lo, bool)
        good[(st[ok] - np.uint64(lo + 1)).astype(np.int64)] = True
        bad = ~good
        found = []
        if bad.any():
            edge = np.diff(np.concatenate([[False], bad, [False]]).astype(np.int8))
            starts = np.flatnonzero(edge == 1)
            ends = np.flatnonzero(edge == -1) - 1
            for a, b in zip(starts.tolist(), ends.tolist()):
                a, b = lo + 1 + a, lo + 1 + b
                found.append((a, b))
                if out and out[-1][1] == a - 1:
                    out[-1] = (out[-1][0], b)
                else:
                    out.append((a, b))
        if times is not None:
            times.add_scan(st, r["time_ns"], found)
        lo = top
    return out


def _scan(store: Store, session: str, stamp_base: int, end_stamp: int | None, complete_to,
          row: tuple | None) -> tuple:
    """Advance the scan of one session; returns (scanned_to, gap runs [(lo, hi, reason, settled)]).
    `row`: its scan_state (scanned_to, prefix), None: none yet."""
    ct = None if complete_to is None else int(complete_to)
    if row is None or row[1] is None or ct is None or int(row[1]) != ct:
        # first run, or the complete prefix was reset by someone: start from complete_to
        store.replace_gap_runs(session, [])
        scanned = ct if ct is not None and ct >= stamp_base - 1 else stamp_base - 1
        runs: list[tuple[int, int, str | None, bool]] = []
    else:
        scanned = int(row[0])
        runs = store.gap_runs(session)
    # runs not settled: what is still missing in them (late frames fill them)
    changed = False
    kept: list[tuple[int, int, str | None, bool]] = []
    for a, b, reason, settled in runs:
        if settled:
            kept.append((a, b, reason, settled))
            continue
        sub = _bad_runs(store, session, a - 1, b)
        if sub != [(a, b)]:
            changed = True
        for x, y in sub:
            kept.append((x, y, reason if x == a else None, False))
    # forward
    if end_stamp is not None:
        top = int(end_stamp) - 1
    else:
        newest = store.newest_stamp(session, scanned)
        top = scanned if newest is None else newest
    if top > scanned:
        new = _bad_runs(store, session, scanned, top)
        if new:
            changed = True
            if kept and new[0][0] == kept[-1][1] + 1 and not kept[-1][3]:
                a, _, r, _ = kept.pop()
                new[0] = (a, new[0][1])
                kept.append((a, new[0][1], r, False))
                new = new[1:]
            kept.extend((a, b, None, False) for a, b in new)
        scanned = top
    kept = [(a, b, r if r is not None else _gap_reason(store, session, a), s)
            for a, b, r, s in kept]
    if changed:
        store.replace_gap_runs(session, kept)
    return scanned, kept


# ============================================================ the intervals
def device_windows(runs, resyncs: list[dict], after: int | None) -> list[tuple]:
    """Gap windows of one device: [(g, resumed or None, run_lo, resync or None)], in order,
    ending with the first uncovered gap (resumed None). Gap stamps <= `after` are ignored."""
    done = [r for r in resyncs if r["end"] is not None]
    cuts = sorted({r["since"] for r in done} | {r["start"] for r in done})
    out: list[tuple[int, int | None, int, dict | None]] = []
    for lo, hi, _reason, _s in runs:
        if after is not None:
            if hi <= after:
                continue
            lo = max(lo, after + 1)
        pieces = [lo] + [c for c in cuts if lo < c <= hi]
        for k, a in enumerate(pieces):
            b = pieces[k + 1] - 1 if k + 1 < len(pieces) else hi
            cover = [r for r in done if r["since"] <= a and b < r["start"]]
            if not cover:
                out.append((a, None, lo, None))
                return out
            best = min(cover, key=lambda r: r["end"])
            if out and out[-1][1] == best["end"]:
                continue  # the same window goes on (one window per covering resync)
            out.append((a, best["end"], lo, best))
    return out


def _intervals(start: int, top: int, windows: list[tuple]) -> list[tuple[int, int]]:
    """[start, top] minus the windows [g, resumed) (resumed None: to the end)."""
    out = []
    cur = start
    for g, resumed, _lo, _r in windows:
        if g > cur:
            out.append((cur, min(g - 1, top)))
        if resumed is None:
            cur = top + 1
            break
        cur = max(cur, resumed)
    if cur <= top:
        out.append((cur, top))
    return [(a, b) for a, b in out if a <= b]


def update_watermark(store: Store, session: str, *, clear_dirty: bool = False) -> None:
    """Scan, then recompute the intervals and windows of one session (in a transaction of the
    store). clear_dirty: also mark the session not dirty.

    Cost: a steady stream of new stamps takes a dozen small statements; rows that did not
    change are not written again."""
    sc = store.session_scan(session)
    stamp_base, end_stamp, end_ns, ct = sc.stamp_base, sc.end_stamp, sc.end_ns, sc.state[0]
    old_state, dirty, held_at = sc.state, sc.dirty, sc.held
    scan_row = sc.scan
    if stamp_base is None:
        store.set_no_watermark(session, "the session record (segment 0) is not ingested yet",
                               clear_dirty)
        return
    stamp_base = int(stamp_base)
    times = _Times(store, session)
    _tl.times = times
    try:
        scanned, runs = _scan(store, session, stamp_base, end_stamp, ct, scan_row)
    finally:
        _tl.times = None
    prefix = runs[0][0] - 1 if runs else scanned
    first_gap = reason = after = None
    if runs:
        first_gap, reason = runs[0][0], runs[0][2]
        after = (scanned - first_gap + 1) - sum(b - a + 1 for a, b, _, _ in runs)
    wm = prefix if prefix >= stamp_base else None
    if wm is None:
        wm_ns = None
    elif old_state[1] is not None and int(old_state[1]) == wm and old_state[2] is not None:
        wm_ns = int(old_state[2])   # the time of a complete stamp never changes
    else:
        wm_ns = times(wm)
    state = (prefix, wm, wm_ns, first_gap, reason, after)
    if state != old_state or (clear_dirty and dirty):
        store.set_watermark(session, state, clear_dirty)
    if scan_row != (scanned, prefix):
        store.put_scan_progress(session, scanned, prefix, new=scan_row is None)
    _update_devices(store, session, stamp_base, scanned, runs, end_stamp, end_ns, times, held_at)


def _points(store: Store, session: str, held_at) -> list[tuple]:
    """The session's resync and baseline_end points: (stamp, what, dev, payload, time_ns,
    held) -- held: replayer.store.HELD_POINT, from the session's (held_segno, held_frame)."""
    hs, hf = held_at
    out = []
    for stamp, what, dev, payload, t, segno, frame_no in store.interval_points(session):
        if segno is None:
            held = True
        elif hs is None:
            held = False
        else:
            held = segno < hs or (segno == hs and frame_no is not None and hf is not None
                                  and frame_no < hf)
        out.append((int(stamp), what, dev, payload, t, held))
    return out


def _resyncs_of(points: list[tuple]) -> dict[int, list[dict]]:
    """dev -> [{start, since, end, cause}] of the session's resyncs (end None: not finished),
    from _points (as _resyncs)."""
    starts: dict[int, dict] = {}
    ends: dict[tuple[int, int], int] = {}
    for stamp, what, dev, payload, _t, held in points:
        if what == "baseline_end" or dev is None or (what == "resync_end" and not held):
            continue
        try:
            obj = json.loads(payload) if payload else {}
        except ValueError:
            obj = {}
        if what == "resync_start":
            since = obj.get("since")
            if not isinstance(since, int):
                continue
            starts[stamp] = {"dev": int(dev), "start": stamp, "since": since,
                             "end": None, "cause": obj.get("cause") or "?",
                             "unseen": obj.get("unseen") is True}
        elif isinstance(obj.get("start"), int):
            ends.setdefault((int(dev), int(obj["start"])), stamp)
    out: dict[int, list[dict]] = {}
    for rs, r in sorted(starts.items()):
        r["end"] = ends.get((r["dev"], rs))
        out.setdefault(r["dev"], []).append(r)
    return out


def _update_devices(store: Store, session, stamp_base, scanned, runs, end_stamp, end_ns,
                    times: _Times, held_at) -> None:
    points = _points(store, session, held_at)
    resyncs = _resyncs_of(points)
    # (a prune layer whose payload file was dropped as damaged makes the device unrestorable)
    prow = store.session_pruned(session)
    lost_batches: set = set()
    pbatches = sorted({int(r[5]) for r in prow if r[5] is not None})
    if pbatches:
        lost_batches = set(pbatches) - store.payload_files_present(pbatches)
    pruned = {int(d): (None if s is None else int(s), t, bool(w) or (b is not None and
                                                                      int(b) in lost_batches),
                       list(k or []))
              for d, s, t, w, k, b in prow}
    drops = store.session_drops(session)
    # times of stamps known from the last run (a stamp's time never changes)
    cache = times.known
    old_rows = store.session_restorable(session)
    for _s, _d, f, t, fn, tn in old_rows:
        cache.setdefault(int(f), fn)
        if end_stamp is None or int(t) != int(end_stamp) - 1:
            cache.setdefault(int(t), tn)

    old_wins = store.session_gap_windows(session)
    wfrom = {}
    for w in old_wins:
        wfrom[int(w[2])] = w[5]
        if w[4] is not None:
            cache.setdefault(int(w[4]), w[6])

    tns = times

    def wtns(g):
        if wfrom.get(g) is None:
            wfrom[g] = tns(g) or tns(g - 1)
        return wfrom[g]

    devrows = store.session_device_intervals(session)
    devs = [int(r[0]) for r in devrows]
    rows, wins = [], []
    settled = [bool(devs)] * len(runs)
    for dev, *old_dev in devrows:
        dev = int(dev)
        be = next(((st, t) for st, what, d, _p, t, held in points
                   if what == "baseline_end" and d == dev and held), None)
        be_stamp, be_ns = (int(be[0]), be[1]) if be else (None, None)
        if be_stamp is not None and be_ns is not None:
            cache[be_stamp] = be_ns
        pr = pruned.get(dev)
        after = None
        start = be_stamp
        kept: list[int] = []
        if pr is not None:
            if pr[2]:  # the whole history of dev in this session is pruned
                start = None
            else:
                cut = pr[0]
                if cut is None:   # Store.set_pruned() always writes one
                    raise StoreError(f"session {session} device {dev}: pruned without a stamp")
                after = cut
                start = cut if be_stamp is None else max(be_stamp, cut)
                kept = sorted(k for k in pr[3] if k < start)
                if pr[1] is not None:
                    cache[cut] = pr[1]
        windows = device_windows(runs, resyncs.get(dev, []), after)
        # a loss no stamp shows (a write the kernel's queue program never saw, so it has no
        # stamp: tracer/resync.py SKIPPED): nothing in [since, resync_end) is restorable
        unseen = [(r["since"], r["end"], r["since"], r) for r in resyncs.get(dev, [])
                  if r.get("unseen") and (after is None or r["since"] > after)]
        if unseen:
            windows = sorted(windows + unseen, key=lambda w: w[0])
        # a resync_end whose frames are not all stored yet (its chunks may be missing):
        # the device is not restorable from it on, for now
        unheld = next((st for st, what, d, _p, _t, held in points
                       if what == "resync_end" and d == dev and not held), None)
        if unheld is not None:
            windows = [w for w in windows if w[0] < int(unheld)]
            if not windows or windows[-1][1] is not None:
                windows.append((int(unheld), None, int(unheld), None))
        # a run stays unsettled while some device has an uncovered gap at or before it
        open_at = next((w[0] for w in windows if w[1] is None), None)
        for k, (lo, hi, _, _) in enumerate(runs):
            if open_at is not None and hi >= open_at and (after is None or hi > after):
                settled[k] = False
        ivs = [(k, k) for k in kept]
        if start is not None:
            ivs += _intervals(start, scanned, windows)
        for a, b in ivs:
            tn = tns(b)
            if end_stamp is not None and b == int(end_stamp) - 1 and end_ns is not None:
                tn = max(int(end_ns), tn or int(end_ns))
            rows.append((session, dev, a, b, tns(a), tn))
        for g, resumed, lo, r in windows:
            run = next((x for x in runs if x[0] <= g <= x[1]), None)
            if r is not None and r.get("unseen") and g == r["since"]:
                wins.append((session, dev, g, None if resumed is None else resumed - 1, resumed,
                             wtns(g), tns(resumed) if resumed is not None else None, 0,
                             r["cause"], "a write the kernel's BPF program did not see (no "
                             "stamp): any of these points may lack it"))
                continue
            if run is None:  # the unheld resync_end above
                wins.append((session, dev, g, None, None, tns(g), None, 0,
                             "resync not stored completely yet",
                             f"stamp {g} ends a resync whose chunks are not all stored yet"))
                continue
            last = (resumed - 1) if resumed is not None else None
            nmiss = sum(min(b, last if last is not None else b) - max(a, g) + 1
                        for a, b, _, _ in runs if b >= g and (last is None or a <= last))
            if r is not None:
                cause = r["cause"]
            elif drops:
                cause = f"not resynced (yet); the kernel reported {int(drops)} lost records"
            else:
                cause = "not resynced (yet)"
            wins.append((session, dev, g, last, resumed, wtns(g),
                         tns(resumed) if resumed is not None else None, nmiss, cause,
                         run[2] if g == run[0] else _gap_reason(store, session, g)))
        mine = [r for r in rows if r[1] == dev]
        new_dev = [be_stamp, be_ns, mine[0][2] if mine else None, mine[-1][3] if mine else None,
                   mine[0][4] if mine else None, mine[-1][5] if mine else None]
        if new_dev != list(old_dev):
            store.set_device_intervals(session, dev, new_dev)
    rows.sort(key=lambda r: (r[1], r[2]))
    wins.sort(key=lambda w: (w[1], w[2]))
    if old_rows != rows:
        store.replace_restorable(session, rows)
    if old_wins != wins:
        store.replace_gap_windows(session, wins)
    store.settle_gap_runs(session, [lo for k, (lo, _hi, _, s) in enumerate(runs)
                                    if settled[k] and not s])


def finalize(store: Store) -> list[str]:
    """Recompute what changed: scan and intervals of dirty sessions, the `devices` table (when
    session_devices may have changed: the first run on this Store object, or a commit stored
    R_DEVICE rows since: `devices_changed`). One transaction."""
    with store.locked():
        dirty = store.dirty_sessions()
        if not dirty:
            return dirty
        devices = getattr(store, "_wm_devices_changed", True)
        with store.transaction():
            for s in dirty:
                update_watermark(store, s, clear_dirty=True)
            if devices:
                store.refresh_devices()
        if devices:
            store._wm_devices_changed = False
        return dirty


def devices_changed(store: Store) -> None:
    """session_devices rows were added or changed: the next finalize refreshes `devices`
    (caller holds the store's mutex)."""
    store._wm_devices_changed = True
