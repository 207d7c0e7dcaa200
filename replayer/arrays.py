"""numpy helpers of the replayer's hot paths.

`unique`: numpy 2.x's np.unique finds the distinct values with a hash table, then sorts
them; on many distinct int64 values (a plan's extent bounds, a window's pages) that is 10-40x
slower than sorting and keeping each value that differs from the one before it (256k bounds:
0.26 s against 7 ms, numpy 2.4).
"""
from __future__ import annotations

import numpy as np


def unique(a) -> np.ndarray:
    """np.unique(a) (sorted distinct values, 1-D) by a sort."""
    s = np.sort(np.asarray(a).ravel())
    if len(s) < 2:
        return s
    keep = np.empty(len(s), np.bool_)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]
