"""Points in a device's history: what `restore --at POINT` accepts, and where it lands.

A point is written as
  latest                      the newest consistent state of the device (its newest
                              session's watermark)
  N | stamp:N                 an order stamp (as `blkrewind sql` shows them)
  ISO-8601 | time:ISO-8601    a wall time, e.g. 2026-11-25T11:40:00.5+01:00; without a
                              time zone it is local time; fractions down to ns
  NAME | mark:NAME            a mark set with `blkrewind mark NAME`

`resolve` maps a point to (session, stamp) for one device, or raises
NotRestorable saying why not: an unknown mark (listing the known ones), a
point before the device's baseline finished, a point inside a gap window
(naming its cause and the nearest restorable points before and after it), a
point past the last restorable stamp (naming the gap that stops it), a point
pruned away ("pruned: the oldest restorable point of DEV is ..."), a time
outside every restorable interval. The intervals are the `restorable` table
(replayer/watermark.py).
A time T lands on the largest stamp of the session whose record time is <= T
(internals.md). A mark name used more than once means the newest; a note on
stderr says so.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

from blkrewind.errors import NotRestorable, UserError
from blkrewind.formats.pointname import LOOKS_LIKE_TIME  # a date, valid or not
from blkrewind.replayer.store import StoreDevice, StoreReader


@dataclass(frozen=True)
class Point:
    kind: str            # "latest" | "stamp" | "time" | "mark"
    value: int | str | None  # None | stamp int | time in ns since the epoch | mark name
    text: str

    def number(self) -> int:
        """The value of a "stamp" or "time" point."""
        if not isinstance(self.value, int):
            raise ValueError(f"point {self.text!r} ({self.kind}) has no stamp or time")
        return self.value


_FRACTION = re.compile(r"[.,](\d+)")


def parse_time(text: str) -> int:
    """An ISO 8601 time -> ns since the epoch. Naive times are local time."""
    s = text.strip()
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise UserError(f"{text!r} is not an ISO 8601 time (e.g. 2026-11-25T11:40:00.5 or "
                        f"2026-11-25T11:40:00+01:00)") from None
    if dt.tzinfo is None:
        dt = dt.astimezone()  # naive: local time
    whole = dt.replace(microsecond=0)
    ns = int(whole.timestamp()) * 1_000_000_000
    m = _FRACTION.search(s[10:]) if len(s) > 10 else None
    if m:  # keep every digit (datetime stops at microseconds)
        ns += int((m.group(1) + "000000000")[:9])
    else:
        ns += dt.microsecond * 1000
    return ns


def parse_point(text: str) -> Point:
    t = text.strip()
    if not t:
        raise UserError("an empty point (use latest, a stamp, a time or a mark name)")
    kind, sep, rest = t.partition(":")
    if sep and kind in ("stamp", "time", "mark"):
        if kind == "stamp":
            if not rest.strip().isdigit():
                raise UserError(f"{text!r}: a stamp is a non-negative integer")
            return Point("stamp", int(rest), text)
        if kind == "time":
            return Point("time", parse_time(rest), text)
        if not rest:
            raise UserError(f"{text!r}: a mark needs a name")
        return Point("mark", rest, text)
    if t == "latest":
        return Point("latest", None, text)
    if t.isdigit():
        return Point("stamp", int(t), text)
    if t[:1].isdigit():
        try:
            return Point("time", parse_time(t), text)
        except UserError:
            if LOOKS_LIKE_TIME.match(t):  # a time with a wrong field, not a mark's name
                raise
    return Point("mark", t, text)


def fmt_time(ns: int | None) -> str:
    """Local time with ms, as messages show it."""
    if ns is None:
        return "?"
    dt = datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).astimezone()
    return dt.isoformat(timespec="milliseconds")


def past_gap(store: StoreReader, session: str) -> str | None:
    """'the history goes on past a gap ...' when the store holds stamps of the session
    after its first gap (the watermark stops there), else None."""
    row = store.session_gap(session)
    if not row or row[0] is None or not row[2]:
        return None
    gap, why, after, end = row
    upto = f" (up to stamp {int(end) - 1})" if end is not None else ""
    return (f"the history goes on past a gap at stamp {gap} ({why}): {after} later stamp(s)"
            f"{upto} are stored but not restorable")


@dataclass
class Resolved:
    device: StoreDevice
    session: str
    dev: int              # the kernel dev_t the session's records carry
    stamp: int
    size_bytes: int
    time_ns: int | None   # wall time of the point's record
    how: str              # what the point was, for messages


@dataclass
class _Sess:
    session: str
    dev: int
    size_bytes: int
    stamp_base: int | None
    baseline_end: int | None
    watermark: int | None
    first_gap: int | None
    gap_reason: str | None
    end_stamp: int | None
    start_ns: int | None
    intervals: list          # [(from_stamp, to_stamp, from_ns, to_ns)], in order
    windows: list            # [(from_stamp, last_stamp|None, resumed|None, cause, reason)]
    pruned: tuple | None     # (stamp, whole) when `blkrewind prune` folded history away

    @property
    def restorable_to(self):
        return self.intervals[-1][1] if self.intervals else None


def _sessions(store: StoreReader, device: StoreDevice) -> list[_Sess]:
    rows = store.device_sessions(device.device)
    ivs: dict = {}
    for sess, dev, a, b, fn, tn in store.device_intervals(device.device):
        ivs.setdefault((sess, dev), []).append((int(a), int(b), fn, tn))
    wins: dict = {}
    for sess, dev, a, last, resumed, cause, reason in store.device_gap_windows(device.device):
        wins.setdefault((sess, dev), []).append((int(a), last, resumed, cause, reason))
    pr = {(sess, dev): (None if st is None else int(st), bool(whole)) for sess, dev, st, whole in
          store.device_pruned(device.device)}
    # a row's columns, then its intervals, windows and pruned point
    return [_Sess(*(tuple(r) + (ivs.get((r[0], r[1]), []), wins.get((r[0], r[1]), []),
                                pr.get((r[0], r[1])))))
            for r in rows]


def _pruned_mark(store, name: str, sessions: set) -> tuple | None:
    """(stamp, time_ns) of the newest mark `name` of `sessions` a prune deleted, or None
    (also for a store no writer of this version opened: it has no pruned_marks table)."""
    rows = store.pruned_marks(name)
    rows = [r[1:] for r in rows if r[0] in sessions]
    return rows[-1] if rows else None


def _oldest(sessions: list[_Sess], device: StoreDevice) -> str:
    for s in sessions:
        if s.intervals:
            a, _, fn, _ = s.intervals[0]
            return f"stamp {a} ({fmt_time(fn)}, session {s.session})"
    return "none"


def _nearest(s: _Sess, stamp: int) -> str:
    """The restorable points of session s around `stamp`, for messages."""
    before = [(b, tn) for a, b, fn, tn in s.intervals if b < stamp]
    after = [(a, fn) for a, b, fn, tn in s.intervals if a > stamp]
    out = []
    if before:
        out.append(f"stamp {before[-1][0]} ({fmt_time(before[-1][1])}) before it")
    if after:
        out.append(f"stamp {after[0][0]} ({fmt_time(after[0][1])}) after it")
    return "; nearest restorable: " + (" and ".join(out) if out else "none")


def _not_restorable_why(s: _Sess, device: StoreDevice) -> str:
    if s.stamp_base is None:
        return f"the start of session {s.session} (segment 0) is not ingested yet"
    if s.pruned is not None and s.pruned[1]:
        return f"its history of {device.device} was pruned"
    if s.baseline_end is None:
        return f"the baseline of {device.device} never finished in session {s.session}"
    gap = f" (first gap at stamp {s.first_gap}: {s.gap_reason})" if s.first_gap is not None else ""
    if s.watermark is None:
        return f"session {s.session} has no consistent stamp yet{gap}"
    return (f"its consistent watermark {s.watermark} is before the end of its baseline "
            f"(stamp {s.baseline_end}){gap}")


def _check_stamp(s: _Sess, device: StoreDevice, stamp: int, what: str,
                 sessions: list[_Sess] | None = None) -> None:
    if any(a <= stamp <= b for a, b, _, _ in s.intervals):
        return
    if s.stamp_base is None:
        raise NotRestorable(f"{what}: the start of session {s.session} is not ingested yet")
    if s.pruned is not None and (s.pruned[1] or stamp <= s.pruned[0]):
        raise NotRestorable(f"{what}: pruned: the oldest restorable point of {device.device} is "
                            f"{_oldest(sessions or [s], device)}")
    if s.baseline_end is None and s.pruned is None:
        raise NotRestorable(f"{what}: the baseline of {device.device} never finished in session "
                            f"{s.session}, so nothing in it is restorable")
    if s.baseline_end is not None and stamp < s.baseline_end:
        raise NotRestorable(f"{what} is before the baseline of {device.device} finished "
                            f"(stamp {s.baseline_end} in session {s.session})")
    for a, last, resumed, cause, reason in s.windows:
        if resumed is not None and a <= stamp < resumed:
            raise NotRestorable(
                f"{what} is in a gap of {device.device} in session {s.session}: stamps {a}.."
                f"{resumed - 1} are not restorable ({cause}: {reason}; resynced at stamp "
                f"{resumed}){_nearest(s, stamp)}")
    if s.end_stamp is not None and stamp >= s.end_stamp and s.restorable_to == s.end_stamp - 1:
        raise NotRestorable(f"{what} is after session {s.session} ended (its last stamp is "
                            f"{s.end_stamp - 1}) and before any later session of "
                            f"{device.device}")
    last = s.restorable_to
    opened = next((w for w in s.windows if w[2] is None), None)
    if opened is not None and stamp >= opened[0]:
        w = "none" if last is None else str(last)
        raise NotRestorable(f"{what} is past the consistent watermark {w} of {device.device} in "
                            f"session {s.session} (first gap at stamp {opened[0]}: {opened[4]}; "
                            f"{opened[3]})")
    w = "none" if last is None else str(last)
    raise NotRestorable(f"{what} is past the consistent watermark {w} of {device.device} in "
                        f"session {s.session} (the LOG after it is not ingested yet)")


def _intervals(sessions: list[_Sess]) -> str:
    out = [f"{fmt_time(fn)} .. {fmt_time(tn)}" for s in sessions for _, _, fn, tn in s.intervals]
    shown = out[:8] + (["..."] if len(out) > 8 else [])
    return "; ".join(shown) if out else "none"


def resolve(store: StoreReader, device: StoreDevice, point: Point, warn=None) -> Resolved:
    """(session, stamp) of `point` for `device`, or NotRestorable."""
    return resolve_each(store, device, [point], warn)[0]


def resolve_each(store: StoreReader, device: StoreDevice, pts: list[Point],
                 warn=None) -> list[Resolved]:
    """resolve() of several points of one device, its sessions read once (rewind's two
    points: ~5 queries fewer)."""
    sessions = _sessions(store, device)
    return [_resolve(store, device, p, sessions, warn) for p in pts]


def _resolve(store: StoreReader, device: StoreDevice, point: Point, sessions: list[_Sess],
             warn) -> Resolved:
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    if not sessions:
        raise NotRestorable(f"{device.device} has no session in the store")

    def done(s: _Sess, stamp: int, how: str) -> Resolved:
        tn = store.stamp_time(stamp, [s.session])
        if tn is None:  # a pruned point keeps its time in `restorable`
            tn = next((fn for a, _, fn, _ in s.intervals if a == stamp), None)
        return Resolved(device, s.session, s.dev, stamp, s.size_bytes, tn, how)

    if point.kind == "latest":
        s = sessions[-1]
        if s.restorable_to is None:
            raise NotRestorable(f"{device.device} is not restorable at 'latest': in its newest "
                                f"session {s.session}, {_not_restorable_why(s, device)}")
        r = done(s, s.restorable_to, f"latest (stamp {s.restorable_to})")
        past = past_gap(store, s.session)
        if past:
            warn(f"note: {past}; 'latest' is the last consistent point before it, stamp "
                 f"{r.stamp} ({fmt_time(r.time_ns)})")
        return r

    if point.kind == "stamp":
        stamp = point.number()
        cands = [s for s in sessions if s.stamp_base is not None and s.stamp_base <= stamp]
        if not cands:
            first = next((s.stamp_base for s in sessions if s.stamp_base is not None), None)
            if any(s.pruned is not None for s in sessions):
                raise NotRestorable(f"stamp {stamp}: pruned: the oldest restorable point of "
                                    f"{device.device} is {_oldest(sessions, device)}")
            raise NotRestorable(f"stamp {stamp} is before {device.device} was traced"
                                + (f" (its first session starts at stamp {first})" if first else ""))
        s = cands[-1]
        _check_stamp(s, device, stamp, f"stamp {stamp}", sessions)
        return done(s, stamp, f"stamp {stamp}")

    if point.kind == "time":
        t = point.number()
        when = f"time {fmt_time(t)}"
        for s in reversed(sessions):
            for a, b, fn, tn in reversed(s.intervals):
                if fn is None or tn is None or not fn <= t <= tn:
                    continue
                found = store.last_stamp_at(s.session, a, b, t)
                stamp = max(a if found is None else found, a)
                return done(s, stamp, f"{when} (stamp {stamp})")
        # why not: find the session the time falls in
        inside = [s for s in sessions if s.start_ns is not None and s.start_ns <= t]
        if not inside:
            if any(s.pruned is not None for s in sessions):
                raise NotRestorable(f"{when}: pruned: the oldest restorable point of "
                                    f"{device.device} is {_oldest(sessions, device)}")
            raise NotRestorable(f"{when} is before {device.device} was traced; restorable: "
                                f"{_intervals(sessions)}")
        s = inside[-1]
        first = s.intervals[0] if s.intervals else None
        if s.pruned is not None and (s.pruned[1] or (first is not None and t < first[2])):
            raise NotRestorable(f"{when}: pruned: the oldest restorable point of "
                                f"{device.device} is {_oldest(sessions, device)}")
        if first is not None and t < first[2]:
            raise NotRestorable(f"{when} is before the baseline of {device.device} finished "
                                f"({fmt_time(first[2])}, stamp {s.baseline_end})")
        if first is not None:
            prev = [iv for iv in s.intervals if iv[3] is not None and iv[3] < t]
            nxt = [iv for iv in s.intervals if iv[2] is not None and iv[2] > t]
            if prev and nxt:
                w = next((w for w in s.windows if w[0] > prev[-1][1]), None)
                why = f" ({w[3]}: {w[4]})" if w else ""
                raise NotRestorable(
                    f"{when} is in a gap of {device.device} in session {s.session}{why}; "
                    f"nearest restorable: {fmt_time(prev[-1][3])} (stamp {prev[-1][1]}) before "
                    f"it and {fmt_time(nxt[0][2])} (stamp {nxt[0][0]}) after it")
            if prev and s is sessions[-1] and s.end_stamp is None:
                gap = (f" (first gap at stamp {s.first_gap}: {s.gap_reason})"
                       if s.first_gap is not None else "")
                raise NotRestorable(f"{when} is past the consistent watermark "
                                    f"{s.restorable_to} of {device.device} "
                                    f"({fmt_time(prev[-1][3])}){gap}")
        raise NotRestorable(f"{when} is outside every restorable interval of {device.device}: "
                            f"{_intervals(sessions)}")

    # a mark
    name = str(point.value)
    names = {x.session for x in sessions}
    rows = [r for r in store.marks_named(name) if r[0] in names]
    if not rows:
        known = store.device_mark_names(device.device)
        elsewhere = store.mark_count(name)
        if elsewhere:
            raise NotRestorable(f"mark {name!r} is not in a session that traced {device.device}")
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        pruned = [x.pruned[0] for x in sessions if x.pruned and x.pruned[0] is not None]
        gone = _pruned_mark(store, name, names)
        if gone is not None:
            raise NotRestorable(
                f"mark {name!r} (stamp {gone[0]}, {fmt_time(gone[1])}) was pruned"
                + (f" with the history of {device.device} up to stamp {max(pruned)}"
                   if pruned else "")
                + f"; the oldest restorable point is {_oldest(sessions, device)}")
        if pruned:
            raise NotRestorable(
                f"no mark named {name!r}; marks: {shown or 'none'}; the history of "
                f"{device.device} up to stamp {max(pruned)} was pruned, with the marks in it "
                f"(the oldest restorable point is {_oldest(sessions, device)})")
        raise NotRestorable(f"no mark named {name!r}; marks: {shown or 'none'}")
    session, stamp, t = rows[-1]
    if len(rows) > 1:
        warn(f"note: mark {name!r} was set {len(rows)} times; using the newest "
             f"(stamp {stamp}, {fmt_time(t)})")
    s = next(x for x in sessions if x.session == session)
    _check_stamp(s, device, int(stamp), f"mark {name!r} (stamp {stamp})", sessions)
    return done(s, int(stamp), f"mark {name!r} (stamp {stamp})")
