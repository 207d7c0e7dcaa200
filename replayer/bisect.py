"""Finding the first bad point of a device's history, as `git bisect run` does.

`candidates(store, session, dev, good, bad, level)`: the restorable points strictly between
two stamps, coarsest first -- "marks" (the user's named points), "flush" (the stamps of flush
bios and of writes with FUA or PREFLUSH: where a file system or database commits, so the
state there is crash-consistent), "any" (every write's stamp).

`search(cands, check)` is the bisection: check(stamp) -> "good" | "bad" | "skip"; it returns
(last good index or -1, first bad index or len, checks made, skipped). With no skip it makes
at most ceil(log2(n + 1)) checks over n candidates; a skipped candidate is set aside and its
nearest neighbour inside the interval is checked instead.
"""
from __future__ import annotations

from blkrewind.formats import record
from blkrewind.replayer.store import StoreReader

LEVELS = ("marks", "flush", "any")


def candidates(store: StoreReader, session: str, dev: int, good: int, bad: int,
               level: str) -> list[tuple]:
    """(stamp, label) of the restorable candidates of `level` in (good, bad), in order."""
    ivs = store.restorable_ranges(session, dev)

    def ok(s: int) -> bool:
        return any(a <= s <= b for a, b in ivs)

    if level == "marks":
        rows = [(s, f"mark {name}") for s, name in store.marks_between(session, good, bad)]
    elif level == "flush":
        rows = [(s, "FUA write" if flags & record.F_FUA else
                 "flush" if op == record.OP_FLUSH else "PREFLUSH write")
                for s, flags, op in store.flush_stamps(session, dev, good, bad)]
    elif level == "any":
        rows = [(s, "write") for s in store.write_stamps(session, dev, good, bad)]
    else:
        raise ValueError(level)
    return [(s, lbl) for s, lbl in rows if ok(s)]


def search(cands: list, check) -> tuple[int, int, int, list]:
    """Bisect over cands (ordered; the good point is before them all, the bad after)."""
    lo, hi = -1, len(cands)
    skipped: set[int] = set()
    checks = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        pick = None
        for d in range(hi - lo):   # the nearest candidate not skipped, inside (lo, hi)
            for m in (mid - d, mid + d):
                if lo < m < hi and m not in skipped:
                    pick = m
                    break
            if pick is not None:
                break
        if pick is None:
            break
        checks += 1
        v = check(cands[pick][0])
        if v == "good":
            lo = pick
        elif v == "bad":
            hi = pick
        else:
            skipped.add(pick)
    return lo, hi, checks, sorted(skipped)
