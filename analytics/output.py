"""Printing query results: table, csv or json.

table  a rich table when stdout is a terminal; plain aligned columns otherwise
       (so pipes and files get text without box drawing or colour)
csv    the csv module, a header row first
json   one JSON list of objects; times as ISO 8601 strings, lists as JSON lists,
       blobs as hex
"""
from __future__ import annotations

import csv
import datetime as _dt
import decimal
import json
import sys
import uuid

FORMATS = ("table", "csv", "json")


def _plain(v):
    """A value as JSON can hold it."""
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, decimal.Decimal):
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _text(v) -> str:
    """A value as one cell of text."""
    if v is None:
        return ""
    if isinstance(v, _dt.datetime):
        return v.isoformat(sep=" ")
    p = _plain(v)
    if isinstance(p, (list, dict)):
        return json.dumps(p)
    return str(p)


def write_rows(columns: list[str], rows: list[tuple], fmt: str, out=None) -> None:
    out = out or sys.stdout
    if fmt == "json":
        json.dump([{c: _plain(v) for c, v in zip(columns, r)} for r in rows], out, indent=1)
        out.write("\n")
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([_text(v) for v in r])
    elif fmt == "table":
        if out.isatty():
            _rich_table(columns, rows, out)
        else:
            _plain_table(columns, rows, out)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def _numeric(v) -> bool:
    return isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool)


def _plain_table(columns, rows, out) -> None:
    cells = [[_text(v) for v in r] for r in rows]
    widths = [len(c) for c in columns]
    for r in cells:
        for i, s in enumerate(r):
            widths[i] = max(widths[i], len(s))
    right = [bool(rows) and all(_numeric(r[i]) or r[i] is None for r in rows)
             for i in range(len(columns))]

    def line(vals):
        return "  ".join(v.rjust(w) if rt else v.ljust(w)
                         for v, w, rt in zip(vals, widths, right)).rstrip()

    out.write(line(columns) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for r in cells:
        out.write(line(r) + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


def _rich_table(columns, rows, out) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=False, header_style="bold")
    for i, c in enumerate(columns):
        num = bool(rows) and all(_numeric(r[i]) or r[i] is None for r in rows)
        t.add_column(c, justify="right" if num else "left", overflow="fold")
    for r in rows:
        t.add_row(*[_text(v) for v in r])
    con = Console(file=out)
    con.print(t)
    con.print(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", style="dim")
