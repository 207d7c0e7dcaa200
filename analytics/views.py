"""The SQL views `blkrewind sql` offers over a store.

`blkrewind sql --store DIR "QUERY"` opens the store's database read-only,
defines these TEMP views, and runs QUERY (DuckDB SQL). Nothing can be written:
the database is read-only and file access is switched off. Times are
TIMESTAMPTZ (wall time, shown in the local time zone, microseconds);
stamps are the order stamps `restore --at N` accepts; a device is named
`host:name` (e.g. `db1:loop3`).

devices -- one row per traced device
    device            host:name
    host, name        where and what (kernel name, e.g. loop3, sdb1)
    path              the path it was traced as (newest session)
    size_bytes        its size (newest session)
    sessions          how many sessions traced it
    first_time        start of its first session
    last_time         end of its last session (or its newest record while tracing)
    restorable_from   earliest restorable time (end of the first baseline, or the prune point)
    restorable_to     latest restorable time (there may be gaps in between: see restorable)

writes -- one row per bio (not per payload piece)
    time              when the bio was submitted
    stamp             its order stamp
    device            host:name
    session           session id
    op                write | discard | secure_erase | write_zeroes | flush
    sector            first 512-byte sector, relative to the device
    length            bytes of the bio (0 for a flush)
    pid, tid, comm    the submitting process, thread and command name
    cgroup_id         the submitter's cgroup v2 id
    flags             text list of FUA, PREFLUSH, SYNC, META, READERR, TRUNC (e.g. 'FUA,SYNC')
    captured          payload bytes captured (== length for a complete write)
    complete          the bio's records are all present and valid
    randomness        fraction in [0, 1] of the payload's sampled 256-byte segments that look
                      random (ciphertext, compressed data); NULL without payload or for rows
                      ingested before it was computed (replayer/entropy.py)
    dirty_pid, dirty_tid, dirty_comm, dirty_cgroup_id
                      the process that dirtied the bio's first page in the page cache: for
                      buffered writes, which a flusher (kworker, jbd2, sync) submits, the real
                      writer; the submitter itself when it dirtied the page (fsync, or a
                      process writing back its own pages). NULL when not known: O_DIRECT and
                      other bios of pages not from the page cache (the submitter is the writer),
                      journal writes, pages dirtied before tracing began, kernels without the
                      writeback_dirty_folio tracepoint, sessions recorded before it existed.
                      Only the first page's dirtier and, per page, the first task that dirtied
                      it since its last writeback (docs/internals.md, "The dirtier of a
                      buffered write")
    dirty_time        when its dirtier last took a page of that file (of a file several
                      threads write: of that page's 64 KiB of the file) clean -> dirty, at
                      or after the page's own dirtying (NULL when the dirtier is unknown or
                      is the submitter)

marks -- named points set with `blkrewind mark`
    name, time, stamp, session
    devices           list of the devices the session traced
    pid, comm         who set the mark
    restorable        whether every device of the session can be restored at it

sessions -- one row per tracing session
    session           id (YYYYMMDDTHHMMSSZ-xxxxxxxx, sorts by time)
    host              traced host
    started, ended    start time; end time (NULL while open or after a crash)
    clean             the session ended cleanly (R_END)
    stamp_base        its first stamp
    end_stamp         one past its last stamp (NULL while open)
    watermark         consistent watermark: every stamp up to it is complete
    watermark_time    time of the record at the watermark
    first_gap         first incomplete or missing stamp (NULL: none)
    gap_reason        why it is incomplete
    stamps_after_gap  stamps ingested past the gap (never exposed)
    devices           list of traced devices
    drops             records the kernel lost (ring buffer full), from the loss reports
    version, kernel   tracer version, kernel release

restorable -- one row per restorable interval of a device in a session: what `restore`
can rebuild (a session with gaps has several; docs/internals.md "Gaps and resync")
    device, session
    from_stamp, to_stamp   the interval's stamps, both restorable (NULL when nothing is)
    from_time, to_time     the same as times (to_time: the session end after a clean end)
    baseline_end           stamp at which the device's baseline finished (NULL: never)
    reason                 why nothing is restorable (NULL when something is)

gaps -- one row per gap window of a device: stamps not restorable because a record was
lost or is incomplete, until a resync of the device made it whole again
    session, device
    stamp             the first lost or incomplete stamp of the window
    last_stamp        the last stamp of the window (NULL: open, not resynced yet)
    resumed           stamp from which the device is restorable again (the resync's end)
    time, resumed_time  the same as times
    missing           lost or incomplete stamps in the window
    cause             the resync's cause (ring full, log full, write error, ...), or
                      'not resynced (yet)' with the kernel's loss count
    reason            what is wrong with the first stamp (missing, incomplete, read error, ...)
    watermark         the last restorable stamp of the device before the window
    stamps_after      complete stamps ingested inside the window (never exposed)

loss -- the kernel's loss reports (R_LOSS)
    session, time
    drops, drop_bytes records lost in the ring buffer and their payload bytes
    read_errs         payload reads that failed
    truncs            bios not captured to their end
    counters          every counter as JSON

completions -- completions of requests (R_COMPLETE)
    time, session, device, sector
    length            bytes completed
    error             blk_status_t (0 = success)
    stamps            stamps of the bios the request completed (0: queued before capture)
    old               the request held bios queued before capture began

baseline -- the baseline chunks (R_BASE)
    time, session, device, sector, length
    zero              the chunk read as zeroes (no payload stored)
    reread            order of the read (a larger one wins: a re-read)

points -- internal stamped points (R_POINT), e.g. baseline_end
    time, stamp, session, what, device, payload (JSON)
"""
from __future__ import annotations

from blkrewind.formats import record

_FLAG_TEXT = [(record.F_FUA, "FUA"), (record.F_PREFLUSH, "PREFLUSH"), (record.F_SYNC, "SYNC"),
              (record.F_META, "META"), (record.F_READERR, "READERR"), (record.F_TRUNC, "TRUNC")]


def _ts(expr: str) -> str:
    return f"make_timestamptz(({expr}) // 1000)"


def _op_case(expr: str) -> str:
    whens = " ".join(f"WHEN {k} THEN '{v or 'none'}'" for k, v in record.OP_NAMES.items())
    return f"CASE {expr} {whens} ELSE 'op' || {expr} END"


def _flags_text(expr: str) -> str:
    parts = ", ".join(f"CASE WHEN ({expr}) & {bit} != 0 THEN '{name}' END" for bit, name in _FLAG_TEXT)
    return f"concat_ws(',', {parts})"


def view_sql(db: str, randomness: bool = True, dirtiers: bool = True) -> dict[str, str]:
    """name -> SELECT defining the view; `db` is the catalog of the store's tables
    (randomness=False: a store whose records have no randomness column yet; dirtiers=False:
    nor a dirtiers table)."""
    t = f"{db}.main"
    self_ = f"(bit_or(r.flags) & {record.F_DIRTYSELF}) != 0"
    if dirtiers:
        dj = (f"LEFT JOIN {t}.dirtiers dz ON dz.session = r.session AND dz.stamp = r.stamp "
              f"AND dz.dev = r.dev")
        dcols = (f"CASE WHEN {self_} THEN any_value(r.tgid) ELSE any_value(dz.tgid) END "
                 f"AS dirty_pid, "
                 f"CASE WHEN {self_} THEN any_value(r.tid) ELSE any_value(dz.tid) END "
                 f"AS dirty_tid, "
                 f"CASE WHEN {self_} THEN any_value(r.comm) ELSE any_value(dz.comm) END "
                 f"AS dirty_comm, "
                 f"CASE WHEN {self_} THEN any_value(r.cgroup_id) ELSE any_value(dz.cgroup_id) "
                 f"END AS dirty_cgroup_id, "
                 f"CASE WHEN {self_} THEN NULL ELSE {_ts('any_value(dz.time_ns)')} END "
                 f"AS dirty_time")
    else:
        dj = ""
        dcols = ("CAST(NULL AS UINTEGER) AS dirty_pid, CAST(NULL AS UINTEGER) AS dirty_tid, "
                 "CAST(NULL AS VARCHAR) AS dirty_comm, CAST(NULL AS UBIGINT) AS dirty_cgroup_id, "
                 "CAST(NULL AS TIMESTAMPTZ) AS dirty_time")
    rnd = ("CAST(sum(r.randomness * r.len) / nullif(sum(CASE WHEN r.randomness IS NOT NULL "
           "THEN r.len END), 0) AS REAL)" if randomness else "CAST(NULL AS REAL)")
    bad = record.F_READERR | record.F_TRUNC
    return {
        "writes": f"""
            SELECT {_ts('min(r.time_ns)')} AS time, r.stamp, any_value(sd.device) AS device,
                   r.session, {_op_case('any_value(r.op)')} AS op, any_value(r.sector) AS sector,
                   any_value(r.bio_size) AS length, any_value(r.tgid) AS pid,
                   any_value(r.tid) AS tid, any_value(r.comm) AS comm,
                   any_value(r.cgroup_id) AS cgroup_id, {_flags_text('bit_or(r.flags)')} AS flags,
                   sum(r.len) AS captured,
                   (bit_or(r.flags) & {bad}) = 0 AND (bit_or(r.flags) & {record.F_NODATA} != 0
                     OR (bit_or(r.flags) & {record.F_FIRST | record.F_LAST}) =
                        {record.F_FIRST | record.F_LAST} AND sum(r.len) = any_value(r.bio_size))
                     AS complete,
                   {rnd} AS randomness, {dcols}
              FROM {t}.records r
              LEFT JOIN {t}.session_devices sd ON sd.session = r.session AND sd.dev = r.dev
              {dj}
             GROUP BY r.session, r.stamp""",
        "marks": f"""
            SELECT m.name, {_ts('m.time_ns')} AS time, m.stamp, m.session,
                   (SELECT list(sd.device ORDER BY sd.device) FROM {t}.session_devices sd
                     WHERE sd.session = m.session) AS devices,
                   m.tgid AS pid, m.comm,
                   coalesce((SELECT bool_and(EXISTS (SELECT 1 FROM {t}.restorable r
                                WHERE r.session = sd.session AND r.dev = sd.dev
                                  AND m.stamp BETWEEN r.from_stamp AND r.to_stamp))
                               FROM {t}.session_devices sd WHERE sd.session = m.session),
                            FALSE) AS restorable
              FROM {t}.marks m""",
        "sessions": f"""
            SELECT s.session, s.host, {_ts('s.start_ns')} AS started, {_ts('s.end_ns')} AS ended,
                   s.clean, s.stamp_base, s.end_stamp, s.watermark,
                   {_ts('s.watermark_ns')} AS watermark_time, s.first_gap, s.gap_reason,
                   s.after_gap AS stamps_after_gap,
                   (SELECT list(sd.device ORDER BY sd.device) FROM {t}.session_devices sd
                     WHERE sd.session = s.session) AS devices,
                   coalesce((SELECT max(l.drops) FROM {t}.loss l WHERE l.session = s.session), 0)
                     AS drops,
                   s.version, s.kernel
              FROM {t}.sessions s""",
        "restorable": f"""
            SELECT sd.device, sd.session, r.from_stamp, r.to_stamp, {_ts('r.from_ns')} AS from_time,
                   {_ts('r.to_ns')} AS to_time, sd.baseline_end,
                   CASE WHEN r.from_stamp IS NOT NULL THEN NULL
                        WHEN s.stamp_base IS NULL THEN 'the session start is not ingested yet'
                        WHEN p.whole THEN 'pruned'
                        WHEN sd.baseline_end IS NULL THEN 'the baseline never finished'
                        WHEN s.watermark IS NULL THEN 'no consistent stamp yet'
                             || coalesce(': ' || s.gap_reason, '')
                        ELSE 'the history stops before the end of the baseline'
                             || coalesce(': ' || s.gap_reason, '') END AS reason
              FROM {t}.session_devices sd JOIN {t}.sessions s USING (session)
              LEFT JOIN {t}.restorable r ON r.session = sd.session AND r.dev = sd.dev
              LEFT JOIN {t}.pruned p ON p.session = sd.session AND p.dev = sd.dev""",
        "devices": f"""
            SELECT d.device, d.host, d.name, d.path, d.size_bytes,
                   count(DISTINCT sd.session) AS sessions,
                   {_ts('min(s.start_ns)')} AS first_time,
                   {_ts('max(coalesce(s.end_ns, s.watermark_ns, s.start_ns))')} AS last_time,
                   {_ts('min(sd.from_ns)')} AS restorable_from,
                   {_ts('max(sd.to_ns)')} AS restorable_to
              FROM {t}.devices d
              JOIN {t}.session_devices sd ON sd.device = d.device
              JOIN {t}.sessions s ON s.session = sd.session
             GROUP BY d.device, d.host, d.name, d.path, d.size_bytes""",
        "gaps": f"""
            SELECT w.session, sd.device, w.from_stamp AS stamp, w.last_stamp, w.resumed,
                   {_ts('w.from_ns')} AS time, {_ts('w.resumed_ns')} AS resumed_time,
                   w.stamps AS missing, w.cause, w.reason,
                   (SELECT max(r.to_stamp) FROM {t}.restorable r WHERE r.session = w.session
                      AND r.dev = w.dev AND r.to_stamp < w.from_stamp) AS watermark,
                   CASE WHEN w.resumed IS NOT NULL THEN w.resumed - w.from_stamp - w.stamps
                        ELSE (SELECT greatest(ss.scanned_to + 1 - w.from_stamp - w.stamps, 0)
                                FROM {t}.scan_state ss WHERE ss.session = w.session) END
                     AS stamps_after
              FROM {t}.gap_windows w
              LEFT JOIN {t}.session_devices sd ON sd.session = w.session AND sd.dev = w.dev""",
        "loss": f"""
            SELECT l.session, {_ts('l.time_ns')} AS time, l.drops, l.drop_bytes, l.read_errs,
                   l.truncs, l.counters
              FROM {t}.loss l""",
        "completions": f"""
            SELECT {_ts('c.time_ns')} AS time, c.session, sd.device, c.sector,
                   c.bio_size AS length, c.error, c.stamps,
                   (c.flags & {record.F_OLD}) != 0 AS old
              FROM {t}.completions c
              LEFT JOIN {t}.session_devices sd ON sd.session = c.session AND sd.dev = c.dev""",
        "baseline": f"""
            SELECT {_ts('b.time_ns')} AS time, b.session, sd.device, b.sector,
                   b.bio_size AS length, (b.flags & {record.F_ZERO}) != 0 AS zero, b.aux AS reread
              FROM {t}.base b
              LEFT JOIN {t}.session_devices sd ON sd.session = b.session AND sd.dev = b.dev""",
        "points": f"""
            SELECT {_ts('p.time_ns')} AS time, p.stamp, p.session, p.what, sd.device, p.payload
              FROM {t}.points p
              LEFT JOIN {t}.session_devices sd ON sd.session = p.session AND sd.dev = p.dev""",
    }


def view_of(store, name: str) -> str:
    """The SELECT of one view for a store opened without the views (a Store or RemoteStore,
    through its query/query_one): to use it as a subquery beside the tables, whose names
    some views share."""
    db, has, dirt = store.query_one(
        "SELECT current_database(), (SELECT count(*) FROM duckdb_columns() WHERE "
        "database_name = current_database() AND table_name = 'records' AND "
        "column_name = 'randomness'), (SELECT count(*) FROM duckdb_tables() WHERE "
        "database_name = current_database() AND table_name = 'dirtiers')")
    return view_sql(f'"{db}"', randomness=bool(has), dirtiers=bool(dirt))[name]


def define_views(con) -> list[str]:
    """Create the TEMP views on a connection to the store's database; returns their names."""
    db = con.execute("SELECT current_database()").fetchone()[0]
    has = con.execute("SELECT count(*) FROM duckdb_columns() WHERE database_name = ? AND "
                      "table_name = 'records' AND column_name = 'randomness'", [db]).fetchone()[0]
    dirt = con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND "
                       "table_name = 'dirtiers'", [db]).fetchone()[0]
    views = view_sql(f'"{db}"', randomness=bool(has), dirtiers=bool(dirt))
    for name, sql in views.items():
        con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {sql}")
    return list(views)
