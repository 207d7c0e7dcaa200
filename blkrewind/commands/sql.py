"""Query the write history with SQL (DuckDB).

Opens the store read-only and defines views over it -- devices, writes,
marks, sessions, restorable, gaps, loss, completions, baseline, points
(analytics/views.py documents every column) -- then runs QUERY, e.g.

  blkrewind sql --store S "SELECT comm, count(*), sum(length) FROM writes GROUP BY comm"
  blkrewind sql --store S "SELECT * FROM restorable" --format json

Nothing can be written: the database is opened read-only and file access is off.
"""
from __future__ import annotations

from blkrewind.errors import UserError

EXAMPLES = """\
  blkrewind sql --store S "SELECT * FROM devices"
  blkrewind sql --store S "SELECT comm, count(*), sum(length) FROM writes GROUP BY comm"
  blkrewind sql --store S "SELECT * FROM restorable" --format json
"""


def add_arguments(p):
    from blkrewind.analytics.output import FORMATS

    p.add_argument("--store", required=True, metavar="DIR",
                   help="the store to query (through `serve` while it runs)")
    p.add_argument("query", metavar="QUERY", help="one read-only SQL statement (DuckDB's dialect)")
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="output: table (default), csv, or json (a list of objects)")



def check_query(query: str) -> None:
    """One query (SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE, EXPLAIN), or UserError."""
    import duckdb

    from blkrewind.replayer.query import one_line

    if not query.strip():
        raise UserError("SQL: an empty query (give one SQL statement, e.g. "
                        "\"SELECT * FROM devices\")")
    try:
        stmts = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise UserError(f"SQL: {one_line(e)}") from None
    if not stmts:
        raise UserError("SQL: the query holds no statement (only comments or ';')")
    if len(stmts) > 1:
        raise UserError(f"SQL: {len(stmts)} statements: give one query (run several one by one)")
    kind = stmts[0].type
    if kind not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
        raise UserError(f"SQL: only queries are allowed (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN), "
                        f"not {kind.name}: the store is read-only")


def run(args) -> int:
    import duckdb

    from blkrewind.analytics.output import write_rows
    from blkrewind.analytics.views import define_views
    from blkrewind.replayer.query import one_line, open_for_reading

    check_query(args.query)
    # a served store is queried through its server (read-only statements, no file access)
    with open_for_reading(args.store, views=define_views) as store:
        try:
            cols, rows = store.user_query(args.query)
        except duckdb.Error as e:
            raise UserError(f"SQL: {one_line(e)}") from None
    write_rows(cols, rows, args.format)
    return 0
