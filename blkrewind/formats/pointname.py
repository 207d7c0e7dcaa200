"""What a point's name may look like: the rule `mark` (names) and the replayer (points) share.

A date, valid or not, is a time (replayer/points.py), never a mark's name (`mark` refuses it).
It lives in the floor, apart from the store's modules, so that `mark`, which runs while a file
system may be frozen, checks a name without importing the store and DuckDB.
"""
from __future__ import annotations

import re

LOOKS_LIKE_TIME = re.compile(r"\d{4}-\d{1,2}-\d{1,2}([T ]|$)")
