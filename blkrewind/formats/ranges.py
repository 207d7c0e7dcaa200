"""Sets of frame numbers as [a, e) ranges: the one range algebra of the shipper (what is
acknowledged, lacking, in flight), the store's ledger (what is held) and LACKS messages.

merge() and subtract() work on plain lists of [a, e) (as stored and sent on the wire); Ranges is
a mutable set built on them."""
from __future__ import annotations

import bisect


def merge(ranges) -> list[list[int]]:
    """Sorted, merged [a, e) ranges."""
    out: list[list[int]] = []
    for a, e in sorted((r[0], r[1]) for r in ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([a, e])
    return out


def subtract(a: int, e: int, held) -> list[list[int]]:
    """The parts of [a, e) not covered by the merged ranges `held`."""
    out = []
    pos = a
    for ha, he in held:
        if he <= pos:
            continue
        if ha >= e:
            break
        if ha > pos:
            out.append([pos, ha])
        pos = max(pos, he)
        if pos >= e:
            break
    if pos < e:
        out.append([pos, e])
    return out


class Ranges:
    """A set of non-negative ints as sorted, disjoint, non-adjacent [a, e) ranges."""

    __slots__ = ("r",)

    def __init__(self, ranges=()):
        self.r: list[list[int]] = merge((a, e) for a, e in ranges if a < e)

    def add(self, a: int, e: int) -> None:
        if a >= e:
            return
        r = self.r
        i = bisect.bisect_left(r, [a])
        if i and r[i - 1][1] >= a:
            i -= 1
        j = i
        while j < len(r) and r[j][0] <= e:
            a, e = min(a, r[j][0]), max(e, r[j][1])
            j += 1
        r[i:j] = [[a, e]]

    def remove(self, a: int, e: int) -> None:
        if a < e:
            self.r = [p for x, y in self.r for p in subtract(x, y, [[a, e]])]

    def update(self, other: Ranges) -> None:
        for a, e in other.r:
            self.add(a, e)

    def difference(self, other: Ranges) -> Ranges:
        out = Ranges()
        out.r = [p for x, y in self.r for p in subtract(x, y, other.r)]
        return out

    def intersection(self, a: int, e: int) -> Ranges:
        out = Ranges()
        out.r = [[max(x, a), min(y, e)] for x, y in self.r if y > a and x < e]
        return out

    def covers(self, a: int, e: int) -> bool:
        i = bisect.bisect_right(self.r, [a, float("inf")]) - 1
        return a >= e or (i >= 0 and self.r[i][0] <= a and self.r[i][1] >= e)

    def count(self) -> int:
        return sum(e - a for a, e in self.r)

    def first(self) -> int | None:
        return self.r[0][0] if self.r else None

    def __bool__(self) -> bool:
        return bool(self.r)

    def as_list(self) -> list[list[int]]:
        return [list(x) for x in self.r]
