"""The consistent watermark and what is restorable (docs/internals.md, "What is restorable").

`finalize` recomputes, for every session that received records since the last
run (`sessions.dirty`), the watermark (incrementally: stamps up to
`sessions.complete_to` are known complete, the scan continues from there in
stamp ranges), each device's restorable range, and the `devices` table.
Called by LOG ingest and by the server after commits.
"""
from __future__ import annotations

import numpy as np

from blkrewind import record
from replayer.store import Store

WM_CHUNK = 1 << 20           # stamps per watermark scan step
_STAMPED_BAD = record.F_READERR | record.F_TRUNC


# ============================================================ the watermark
_STAMP_SQL = f"""
SELECT stamp, bool_and(ok) AND count(*) = 1 AS complete FROM (
    SELECT stamp,
           NOT bool_or(flags & {_STAMPED_BAD} != 0)
           AND (bool_or(flags & {record.F_NODATA} != 0)
                OR (bool_or(flags & {record.F_FIRST} != 0) AND bool_or(flags & {record.F_LAST} != 0)
                    AND sum(len) = max(bio_size))) AS ok
      FROM records WHERE session = $s AND stamp > $a AND stamp <= $b GROUP BY stamp
    UNION ALL SELECT stamp, TRUE FROM marks WHERE session = $s AND stamp > $a AND stamp <= $b
    UNION ALL SELECT stamp, TRUE FROM points WHERE session = $s AND stamp > $a AND stamp <= $b
) GROUP BY stamp ORDER BY stamp
"""


def _time_of_stamp(con, session: str, stamp: int) -> int | None:
    row = con.execute(
        "SELECT min(time_ns) FROM (SELECT time_ns FROM records WHERE session = $s AND stamp = $t "
        "UNION ALL SELECT time_ns FROM marks WHERE session = $s AND stamp = $t "
        "UNION ALL SELECT time_ns FROM points WHERE session = $s AND stamp = $t)",
        {"s": session, "t": stamp}).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _gap_reason(con, session: str, g: int) -> str:
    row = con.execute(
        "SELECT sum(len), max(bio_size), bit_or(flags), count(*) FROM records "
        "WHERE session = ? AND stamp = ?", [session, g]).fetchone()
    if row is None or not row[3]:
        return f"stamp {g} is missing (a lost record, or a LOG frame not ingested yet)"
    got, size, flags, _ = row
    if flags & record.F_READERR:
        return f"bio {g}: its payload could not be read (read error)"
    if flags & record.F_TRUNC:
        return f"bio {g}: its payload was not captured to the end (truncated)"
    return f"bio {g} is incomplete: {int(got or 0)} of {int(size or 0)} bytes captured"


def update_watermark(con, session: str) -> None:
    """Advance sessions.complete_to / watermark for one session (caller holds the mutex)."""
    row = con.execute("SELECT stamp_base, end_stamp, end_ns, complete_to FROM sessions "
                      "WHERE session = ?", [session]).fetchone()
    stamp_base, end_stamp, end_ns, ct = row
    if stamp_base is None:
        con.execute("UPDATE sessions SET watermark = NULL, watermark_ns = NULL, first_gap = NULL, "
                    "gap_reason = 'the session record (segment 0) is not ingested yet', "
                    "after_gap = NULL WHERE session = ?", [session])
        return
    ct = int(ct) if ct is not None else int(stamp_base) - 1
    while True:
        lo = ct
        hi = ct + WM_CHUNK
        if end_stamp is not None:
            hi = min(hi, int(end_stamp) - 1)
        if hi <= lo:
            break
        r = con.execute(_STAMP_SQL, {"s": session, "a": lo, "b": hi}).fetchnumpy()
        st = np.asarray(r["stamp"], np.uint64)
        ok = np.asarray(r["complete"], bool)
        if len(st) == 0:
            break
        good = (st == (np.uint64(lo + 1) + np.arange(len(st), dtype=np.uint64))) & ok
        k = int(np.argmin(good)) if not good.all() else len(good)
        ct = lo + k
        if k < hi - lo:
            break
    first_gap = reason = after = None
    ended = end_stamp is not None and ct >= int(end_stamp) - 1
    if not ended:
        g = ct + 1
        after = con.execute(
            "SELECT count(DISTINCT stamp) FROM (SELECT stamp FROM records WHERE session = $s AND stamp > $g "
            "UNION ALL SELECT stamp FROM marks WHERE session = $s AND stamp > $g "
            "UNION ALL SELECT stamp FROM points WHERE session = $s AND stamp > $g)",
            {"s": session, "g": g}).fetchone()[0]
        has_g = _time_of_stamp(con, session, g) is not None
        if has_g or after or end_stamp is not None:
            first_gap = g
            reason = _gap_reason(con, session, g)
        else:
            after = None
    wm = ct if ct >= int(stamp_base) else None
    wm_ns = _time_of_stamp(con, session, wm) if wm is not None else None
    con.execute("UPDATE sessions SET complete_to = ?, watermark = ?, watermark_ns = ?, "
                "first_gap = ?, gap_reason = ?, after_gap = ? WHERE session = ?",
                [ct, wm, wm_ns, first_gap, reason, after, session])


def update_devices(con, session: str) -> None:
    """Baseline end and restorable range of each device of one session."""
    srow = con.execute("SELECT watermark, watermark_ns, end_stamp, end_ns FROM sessions "
                       "WHERE session = ?", [session]).fetchone()
    wm, wm_ns, end_stamp, end_ns = srow
    for dev, in con.execute("SELECT dev FROM session_devices WHERE session = ?",
                            [session]).fetchall():
        be = con.execute("SELECT stamp, time_ns FROM points WHERE session = ? AND what = 'baseline_end' "
                         "AND dev = ? ORDER BY stamp LIMIT 1", [session, dev]).fetchone()
        be_stamp, be_ns = (be if be else (None, None))
        rf = rt = fns = tns = None
        if be_stamp is not None and wm is not None and wm >= be_stamp:
            rf, rt, fns = be_stamp, wm, be_ns
            tns = wm_ns
            if end_stamp is not None and wm == end_stamp - 1 and end_ns is not None:
                tns = max(end_ns, wm_ns or end_ns)
        con.execute("UPDATE session_devices SET baseline_end = ?, baseline_end_ns = ?, "
                    "restorable_from = ?, restorable_to = ?, from_ns = ?, to_ns = ? "
                    "WHERE session = ? AND dev = ?", [be_stamp, be_ns, rf, rt, fns, tns, session, dev])


def finalize(store: Store) -> list[str]:
    """Recompute what changed: watermarks of dirty sessions, device ranges, `devices`."""
    with store.mutex:
        con = store.con
        dirty = [s for (s,) in con.execute(
            "SELECT session FROM sessions WHERE dirty ORDER BY session").fetchall()]
        for s in dirty:
            con.execute("BEGIN")
            try:
                update_watermark(con, s)
                update_devices(con, s)
                con.execute("UPDATE sessions SET dirty = FALSE WHERE session = ?", [s])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        if dirty:
            con.execute("BEGIN")
            con.execute("DELETE FROM devices")
            con.execute("INSERT INTO devices SELECT device, arg_max(host, session), "
                        "arg_max(name, session), arg_max(path, session), "
                        "arg_max(size_bytes, session) FROM session_devices GROUP BY device")
            con.execute("COMMIT")
        return dirty
