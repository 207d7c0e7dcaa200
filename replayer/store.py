"""The replayer's store: DuckDB for everything but the payload, Parquet for the payload.

Layout of a store directory (created 0700)::

    DIR/lock                    flock: held (exclusive) by the one process writing the store
    DIR/meta.duckdb             the metadata database (schema below)
    DIR/payload/<session>/<segno:06d>-<first:06d>-<end:06d>.b<batch>.parquet
                                payload bytes of frames [first, end) of one LOG segment,
                                stored by batch <batch> (Parquet page checksums on)
    DIR/damaged/<session>/      payload files the integrity check found damaged (kept as
                                evidence; their batches are dropped: replayer/integrity.py)
    DIR/restores/               images made by `restore --loop`

Why this split: the metadata is small, queried by SQL and by the rebuild
(extents newest first), and must change atomically with what is stored;
the payload is large, written once, read by row group (~4 MiB each), and
stored lz4-compressed when a sample of the batch shrinks (file-system data:
~3x), plain when it does not (random data: lz4 would only cost time).

Crash safety. A batch (a run of consecutive frames of one LOG segment, from
`blkrewind ingest --log` or from the network, replayer/ingest/) is stored by
writing its Parquet file under a temporary name (O_DIRECT where possible),
fdatasyncing it, recording its size and checksum, renaming it to its final
name (which holds the batch id; fsync of the directory), then ONE DuckDB
transaction that inserts every
metadata row of the batch, each tagged with the batch id, and the batch's
`frame_ranges` row. A crash before the commit leaves at most an unreferenced
Parquet file (deleted by the next ingest or server start); after it,
everything. Which frames the store holds is exactly the union of
`frame_ranges`: a frame is stored once, whatever path brought it, in any
order; a damaged batch can be dropped exactly (replayer/integrity.py) and
stored again later. Store format 1 (frame progress per segment) is not read:
ingest the LOGs into a new store.

Schema (every `session` column is the session id; `dev` is the kernel dev_t
the records carry; `time_ns` is wall time in ns since the epoch, computed as
``ktime_ns + (real_ns - mono_ns)`` of the LOG frame holding the record, or the
frame's ``real_ns`` for records without a kernel time; `batch` is the id of
the batch (commit) a row came from)::

    store_info(key PK, value)                 format version, creation time, batch_hwm
    sessions(session PK, host,                -- host: bound to the host that stored its first frame
             stamp_base, seq_base, version, boot_id, kernel,
             start_ns, info JSON,              -- from R_SESSION (NULL until stored)
             end_stamp, end_seq, clean, end_ns,  -- from R_END (NULL while open)
             complete_to,                      -- scan state: [stamp_base, complete_to] is complete
             watermark, watermark_ns,          -- the consistent watermark W (NULL: none yet)
             first_gap, gap_reason, after_gap, -- first incomplete/missing stamp, why, stamps seen past it
             dirty,                            -- new records since the watermark was computed
             held_segno, held_frame)           -- every frame of the session before frame
                                               -- held_frame of segment held_segno is stored
    devices(device PK 'host:name', host, name, path, size_bytes)   -- latest description
    session_devices(session, dev, device, host, name, path, size_bytes,
                    logical_block_size, physical_block_size, part_start, info JSON,
                    baseline_end, baseline_end_ns,          -- stamp/time of R_POINT baseline_end
                    restorable_from, restorable_to,         -- stamps, NULL when not restorable
                    from_ns, to_ns, PK(session, dev))
    records(session, dev, stamp, seq, time_ns, ktime_ns, sector, part_start, cgroup_id,
            aux, opf, bio_size, offset, len, flags, tgid, tid, op, comm,
            pfile, prg, pidx, batch)          -- one row per R_BIO record (a payload piece,
                                              -- or the only record of a no-data bio);
                                              -- payload at row pidx of row group prg of
                                              -- payload_files[pfile] (NULL: no payload)
    base(session, dev, stamp, seq, aux, time_ns, sector, bio_size, flags, pfile, prg, pidx, batch)
                                              -- R_BASE chunks; F_ZERO chunks have no payload
    marks(session, stamp, seq, time_ns, name, tgid, tid, comm, batch)
    points(session, stamp, seq, time_ns, what, dev, payload JSON, segno, frame_no, batch)
                                              -- segno/frame_no: the LOG frame holding it
    completions(session, seq, time_ns, dev, sector, bio_size, aux, error, flags,
                stamps UBIGINT[], batch)      -- R_COMPLETE: which bios a request completed
    loss(session, seq, time_ns, drops, drop_bytes, read_errs, truncs, counters JSON, batch)
    dirtiers(session, dev, stamp, seq, time_ns, cgroup_id, aux, tgid, tid, comm, batch)
                                              -- R_DIRTY: the task that dirtied the first page
                                              -- of the bio `stamp` (submitted by another task:
                                              -- writeback), when it did (time_ns), the page's
                                              -- folio index (aux); no row: not known, or the
                                              -- submitter itself (records.flags F_DIRTYSELF)
    segments(session, segno, seg_id, host, sealed, nframes, torn_bytes, error, PK(session, segno))
                                              -- seg_id from its first stored frame, host from its
                                              -- HEADER (frame 0), nframes = SEAL's frame_no + 1
                                              -- once the SEAL is stored; torn_bytes/error: notes
                                              -- of the last LOG ingest
    frame_ranges(batch PK, session, segno, first_frame, end_frame, source, stored_ns)
                                              -- frames [first_frame, end_frame) of the segment
                                              -- are stored, by batch `batch` ('log' | 'net')
    payload_files(id PK, path, session, segno, first_frame, end_frame, rows,
                  payload_bytes, file_bytes, crc32, batch)
                                              -- id == batch; crc32: zlib.crc32 of the file bytes

The interface. `StoreReader` is what every reader uses, a local `Store` or a `RemoteStore`
(replayer/query.py: the store a running server holds): the devices, named reads per table
family (sessions, records and marks, restorable intervals, restore points, written ranges,
the rebuild's extents, the detector, pruning, bisection, payload files), reading() (several
reads of one state), and the SELECT primitives query/query_one/numpy they are built on (the
analytics run their SQL on the public views of analytics/views.py through them). `Store` adds
the writer's side: transaction(undo=..., failed=...) (ONE DuckDB transaction; on failure
ROLLBACK, the caller's in-memory state put back, a database error made a StoreError), named
writes per table family (sessions, segments and frame ranges, rows of batches, payload files,
dropping batches, the scan and the restorable intervals -- replayer/watermark.py holds the
rule --, pruning), the frame ledger (`Store.ledger`, replayer/ledger.py) and the payload files
(`Store.payload`, a PayloadStore: replayer/payloadstore.py, the local directory backend).
No other module runs SQL on these tables, and the DuckDB connection and its lock are private
(`_con`, `_mutex`; tests/test_layers.py checks both): `Store.locked()` holds the lock across
several operations (the ledger is kept under it), `user_query(sql)` runs a user's query
(`blkrewind sql`), `query_cursor()` gives the query socket its cursor (replayer/query.py) and
`define_views(define)` installs the SQL views.

The rebuild reads `records`/`base` of one (session, dev) filtered by stamp;
DuckDB's zone maps make that a range scan because ingest appends in roughly
stamp order. The user-facing SQL views over these tables are in
analytics/views.py.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import duckdb

from blkrewind.errors import StoreError, UserError
from blkrewind.formats import record
from blkrewind.replayer.ledger import Ledger, SegState
from blkrewind.replayer.payloadstore import LocalPayloadStore, PayloadStore

FORMAT_VERSION = "2"
META = "meta.duckdb"
LOCK = "lock"
SUBDIRS = ("payload", "restores", "damaged")

# SQL condition on a `points` row: every frame of its session up to the frame holding it is
# stored (sessions.held_segno/held_frame). The chunks a baseline_end / resync_end point closes
# (R_BASE, no stamps of their own) are in the frames before it: a point that does not pass
# may not open a restorable interval yet (frames arrive in any order; a batch may be dropped).
HELD_POINT = ("(points.segno IS NULL OR EXISTS (SELECT 1 FROM sessions hs "
              "WHERE hs.session = points.session AND (points.segno < hs.held_segno "
              "OR (points.segno = hs.held_segno AND points.frame_no < hs.held_frame))))")

# Store.stamp_states: per stamp in ($a, $b] of session $s, whether it is complete and its time.
_STAMP_BAD = record.F_READERR | record.F_TRUNC
_STAMP_STATES = f"""
SELECT stamp, bool_and(ok) AND count(*) = 1 AS complete, min(t) AS time_ns FROM (
    SELECT stamp,
           NOT bool_or(flags & {_STAMP_BAD} != 0)
           AND (bool_or(flags & {record.F_NODATA} != 0)
                OR (bool_or(flags & {record.F_FIRST} != 0) AND bool_or(flags & {record.F_LAST} != 0)
                    AND sum(len) = max(bio_size))) AS ok, min(time_ns) AS t
      FROM records WHERE session = $s AND stamp > $a AND stamp <= $b GROUP BY stamp
    UNION ALL SELECT stamp, TRUE, time_ns FROM marks WHERE session = $s AND stamp > $a AND stamp <= $b
    UNION ALL SELECT stamp, TRUE, time_ns FROM points WHERE session = $s AND stamp > $a AND stamp <= $b
) GROUP BY stamp ORDER BY stamp
"""

# The store's internal tables: no module but this one runs SQL on them (tests/test_layers.py
# checks; the user-facing SQL is analytics/views.py's views).
INTERNAL_TABLES = ("store_info", "sessions", "devices", "session_devices", "records", "base",
                   "marks", "points", "completions", "loss", "dirtiers", "segments",
                   "frame_ranges", "payload_files", "scan_state", "gap_runs", "restorable",
                   "gap_windows", "pruned", "pruned_marks")

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS store_info (key VARCHAR PRIMARY KEY, value VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS sessions (
        session VARCHAR PRIMARY KEY, host VARCHAR, stamp_base UBIGINT, seq_base UBIGINT,
        version VARCHAR, boot_id VARCHAR, kernel VARCHAR, start_ns BIGINT, info JSON,
        end_stamp UBIGINT, end_seq UBIGINT, clean BOOLEAN, end_ns BIGINT,
        complete_to UBIGINT, watermark UBIGINT, watermark_ns BIGINT,
        first_gap UBIGINT, gap_reason VARCHAR, after_gap UBIGINT,
        dirty BOOLEAN DEFAULT TRUE, held_segno INTEGER DEFAULT 0, held_frame INTEGER DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS devices (
        device VARCHAR PRIMARY KEY, host VARCHAR, name VARCHAR, path VARCHAR, size_bytes UBIGINT)""",
    """CREATE TABLE IF NOT EXISTS session_devices (
        session VARCHAR, dev UINTEGER, device VARCHAR, host VARCHAR, name VARCHAR, path VARCHAR,
        size_bytes UBIGINT, logical_block_size UINTEGER, physical_block_size UINTEGER,
        part_start UBIGINT, info JSON, baseline_end UBIGINT, baseline_end_ns BIGINT,
        restorable_from UBIGINT, restorable_to UBIGINT, from_ns BIGINT, to_ns BIGINT,
        PRIMARY KEY (session, dev))""",
    """CREATE TABLE IF NOT EXISTS records (
        session VARCHAR, dev UINTEGER, stamp UBIGINT, seq UBIGINT, time_ns BIGINT,
        ktime_ns UBIGINT, sector UBIGINT, part_start UBIGINT, cgroup_id UBIGINT, aux UBIGINT,
        opf UINTEGER, bio_size UINTEGER, "offset" UINTEGER, len UINTEGER, flags UINTEGER,
        tgid UINTEGER, tid UINTEGER, op UTINYINT, comm VARCHAR,
        pfile INTEGER, prg INTEGER, pidx INTEGER, batch INTEGER, randomness REAL)""",
    """CREATE TABLE IF NOT EXISTS base (
        session VARCHAR, dev UINTEGER, stamp UBIGINT, seq UBIGINT, aux UBIGINT, time_ns BIGINT,
        sector UBIGINT, bio_size UINTEGER, flags UINTEGER, pfile INTEGER, prg INTEGER,
        pidx INTEGER, batch INTEGER, randomness REAL, blocks BLOB)""",
    """CREATE TABLE IF NOT EXISTS marks (
        session VARCHAR, stamp UBIGINT, seq UBIGINT, time_ns BIGINT, name VARCHAR,
        tgid UINTEGER, tid UINTEGER, comm VARCHAR, batch INTEGER)""",
    """CREATE TABLE IF NOT EXISTS points (
        session VARCHAR, stamp UBIGINT, seq UBIGINT, time_ns BIGINT, what VARCHAR, dev UINTEGER,
        payload JSON, segno INTEGER, frame_no INTEGER, batch INTEGER)""",
    """CREATE TABLE IF NOT EXISTS completions (
        session VARCHAR, seq UBIGINT, time_ns BIGINT, dev UINTEGER, sector UBIGINT,
        bio_size UINTEGER, aux UBIGINT, error USMALLINT, flags UINTEGER, stamps UBIGINT[],
        batch INTEGER)""",
    """CREATE TABLE IF NOT EXISTS loss (
        session VARCHAR, seq UBIGINT, time_ns BIGINT, drops UBIGINT, drop_bytes UBIGINT,
        read_errs UBIGINT, truncs UBIGINT, counters JSON, batch INTEGER)""",
    """CREATE TABLE IF NOT EXISTS segments (
        session VARCHAR, segno INTEGER, seg_id UBIGINT, host VARCHAR, sealed BOOLEAN,
        nframes INTEGER, torn_bytes UBIGINT, error VARCHAR, PRIMARY KEY (session, segno))""",
    """CREATE TABLE IF NOT EXISTS frame_ranges (
        batch INTEGER PRIMARY KEY, session VARCHAR, segno INTEGER, first_frame INTEGER,
        end_frame INTEGER, source VARCHAR, stored_ns BIGINT)""",
    """CREATE TABLE IF NOT EXISTS payload_files (
        id INTEGER PRIMARY KEY, path VARCHAR, session VARCHAR, segno INTEGER,
        first_frame INTEGER, end_frame INTEGER, rows INTEGER, payload_bytes UBIGINT,
        file_bytes UBIGINT, crc32 UBIGINT, batch INTEGER)""",
    # replayer/watermark.py (restorable intervals across gaps; see its docstring)
    """CREATE TABLE IF NOT EXISTS scan_state (
        session VARCHAR PRIMARY KEY, scanned_to UBIGINT, prefix UBIGINT)""",
    """CREATE TABLE IF NOT EXISTS gap_runs (
        session VARCHAR, lo UBIGINT, hi UBIGINT, reason VARCHAR, settled BOOLEAN)""",
    """CREATE TABLE IF NOT EXISTS restorable (
        session VARCHAR, dev UINTEGER, from_stamp UBIGINT, to_stamp UBIGINT, from_ns BIGINT,
        to_ns BIGINT)""",
    """CREATE TABLE IF NOT EXISTS gap_windows (
        session VARCHAR, dev UINTEGER, from_stamp UBIGINT, last_stamp UBIGINT, resumed UBIGINT,
        from_ns BIGINT, resumed_ns BIGINT, stamps UBIGINT, cause VARCHAR, reason VARCHAR)""",
    # replayer/prune.py: history of (session, dev) folded into its base up to `stamp`
    """CREATE TABLE IF NOT EXISTS pruned (
        session VARCHAR, dev UINTEGER, stamp UBIGINT, time_ns BIGINT, whole BOOLEAN,
        kept UBIGINT[], batch INTEGER, PRIMARY KEY (session, dev))""",
    # ... and the marks a prune deleted (restore --at NAME then says it was pruned)
    """CREATE TABLE IF NOT EXISTS pruned_marks (
        session VARCHAR, stamp UBIGINT, time_ns BIGINT, name VARCHAR)""",
]

# Columns added to tables of this format after stores were made with it: every writer applies
# them (older rows hold NULL); a reader of a store no writer opened since sees them missing
# (analytics/views.py, Store.has_column).
MIGRATIONS = [
    # replayer/entropy.py: fraction of a payload piece's sampled segments that look random
    "ALTER TABLE records ADD COLUMN IF NOT EXISTS randomness REAL",
    "ALTER TABLE base ADD COLUMN IF NOT EXISTS randomness REAL",
    # ... and a state per 4 KiB block of a baseline chunk (entropy.block_states)
    "ALTER TABLE base ADD COLUMN IF NOT EXISTS blocks BLOB",
    # R_DIRTY: who dirtied the first page of a bio another task (a flusher) submitted
    """CREATE TABLE IF NOT EXISTS dirtiers (
        session VARCHAR, dev UINTEGER, stamp UBIGINT, seq UBIGINT, time_ns BIGINT,
        cgroup_id UBIGINT, aux UBIGINT, tgid UINTEGER, tid UINTEGER, comm VARCHAR,
        batch INTEGER)""",
]


@dataclass(frozen=True)
class StoreDevice:
    """A device as the store knows it (its latest description)."""
    device: str      # host:name
    host: str
    name: str
    path: str
    size_bytes: int


class SessionScan(NamedTuple):
    """Where the scan of one session goes on from (Store.session_scan)."""
    stamp_base: int | None
    end_stamp: int | None
    end_ns: int | None
    state: tuple          # (complete_to, watermark, watermark_ns, first_gap, gap_reason, after_gap)
    dirty: bool
    held: tuple           # (held_segno, held_frame)
    scan: tuple | None    # its scan_state (scanned_to, prefix); None: no row yet


class StoreReader:
    """What every reader of a store uses: the local `Store` (DuckDB in this process) and
    `RemoteStore` (replayer/query.py: the store a running server holds, through its query
    socket) both implement it. Everything here is built on the primitives query(),
    query_one() and numpy() (SELECTs) and reading(); the named reads per table family
    follow. No DuckDB connection or lock is part of it."""

    path: str
    writable = False
    remote = False

    # ------------------------------------------------------------ primitives
    def query(self, sql: str, params=None) -> list[tuple]:
        raise NotImplementedError

    def query_one(self, sql: str, params=None):
        raise NotImplementedError

    def numpy(self, sql: str, params=None) -> dict:
        """The result's columns as numpy arrays, by name."""
        raise NotImplementedError

    def user_query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """A user's query (`blkrewind sql`: no file access): (column names, rows).
        UserError when it is not a query; duckdb.Error when it fails."""
        raise NotImplementedError

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Several reads that see one state of the store (in this process)."""
        yield

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- paths
    @property
    def payload_dir(self) -> str:
        return os.path.join(self.path, "payload")

    @property
    def restores_dir(self) -> str:
        return os.path.join(self.path, "restores")

    @property
    def damaged_dir(self) -> str:
        return os.path.join(self.path, "damaged")

    def payload_path(self, rel: str) -> str:
        return os.path.join(self.path, rel)

    # --------------------------------------------------------------- queries
    def has_column(self, table: str, column: str) -> bool:
        """Whether the store's table has the column. Only a yes is remembered (a migration
        adds columns and never removes one): the detector asks at every pass, and the
        catalog query cost ~5 ms of CPU each time."""
        seen = self.__dict__.setdefault("_columns_seen", set())
        if (table, column) in seen:
            return True
        if self.query_one(
                "SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database() "
                "AND table_name = ? AND column_name = ?", [table, column])[0]:
            seen.add((table, column))
            return True
        return False


    def devices(self) -> list[StoreDevice]:
        return [StoreDevice(*r) for r in self.query(
            "SELECT device, host, name, path, size_bytes FROM devices ORDER BY device")]

    def find_device(self, spec: str) -> StoreDevice:
        """A store device named by `host:name`, `name` or a recorded path
        (also: a path that resolves to a recorded path or to a device named
        like its kernel name). Unknown or ambiguous -> StoreError listing them."""
        devs = self.devices()
        if not devs:
            raise StoreError(f"the store {self.path} holds no device yet (ingest a LOG first)")
        by_key = [d for d in devs if d.device == spec]
        if by_key:
            return by_key[0]
        paths = {d.device: {p for (p,) in self.query(
            "SELECT DISTINCT path FROM session_devices WHERE device = ? AND path IS NOT NULL",
            [d.device])} | {d.path} for d in devs}
        real = os.path.realpath(spec) if spec.startswith("/") else None
        cands = [d for d in devs if d.name == spec or spec in paths[d.device]
                 or (real is not None and (real in paths[d.device]
                                           or os.path.basename(real) == d.name))]
        if len(cands) == 1:
            return cands[0]
        known = ", ".join(f"{d.device} ({d.path})" for d in devs)
        if not cands:
            raise StoreError(f"no device {spec!r} in the store; known: {known}")
        raise StoreError(f"{spec!r} names several devices ({', '.join(d.device for d in cands)}): "
                         f"name one as host:name")


    # -------------------------------------------------------------- sessions
    def session_states(self, sessions: list[str]) -> list[tuple]:
        """Per device of these sessions: (device, session, restorable_from, restorable_to,
        from_ns, to_ns, baseline_end, stamp_base, first_gap, gap_reason, after_gap, kernel
        drops, kernel drop bytes), by device and session."""
        marks = ", ".join("?" * len(sessions))
        return self.query(
            f"SELECT sd.device, sd.session, sd.restorable_from, sd.restorable_to, sd.from_ns, "
            f"sd.to_ns, sd.baseline_end, s.stamp_base, s.first_gap, s.gap_reason, s.after_gap, "
            f"(SELECT max(drops) FROM loss l WHERE l.session = s.session), "
            f"(SELECT max(drop_bytes) FROM loss l WHERE l.session = s.session) "
            f"FROM session_devices sd JOIN sessions s USING (session) "
            f"WHERE sd.session IN ({marks}) ORDER BY sd.device, sd.session", sessions)

    def latest_device_states(self) -> list[tuple]:
        """Per device, its newest session's state: (host, device, name, session, dev,
        watermark, watermark_ns, end_ns, clean, first_gap, gap_reason, after_gap,
        restorable_to, to_ns, kernel drops), by host and device."""
        return self.query(
            "SELECT sd.host, sd.device, sd.name, sd.session, sd.dev, s.watermark, "
            "       s.watermark_ns, s.end_ns, s.clean, s.first_gap, s.gap_reason, s.after_gap, "
            "       sd.restorable_to, sd.to_ns, "
            "       coalesce((SELECT max(l.drops) FROM loss l WHERE l.session = s.session), 0) "
            "  FROM session_devices sd JOIN sessions s USING (session) "
            "QUALIFY row_number() OVER (PARTITION BY sd.device "
            "        ORDER BY s.start_ns DESC NULLS LAST, sd.session DESC) = 1 "
            "ORDER BY sd.host, sd.device")

    def gap_counts(self) -> dict[str, int]:
        """Sessions with a gap: {session: 1}."""
        return dict(self.query("SELECT session, count(*) FROM sessions "
                               "WHERE first_gap IS NOT NULL GROUP BY ALL"))

    def sessions_of_device(self, device: str) -> list[str]:
        return [s for (s,) in self.query("SELECT session FROM session_devices "
                                         "WHERE device = ?", [device])]

    # ---------------------------------------------------- records and marks
    def write_rates(self, since_ns: int, op: int) -> dict[tuple[str, int], int]:
        """{(session, dev): bytes} that `op` records of time >= since_ns wrote."""
        return {(s, d): int(b) for s, d, b in self.query(
            "SELECT session, dev, sum(len) FROM records WHERE time_ns >= ? AND op = ? "
            "GROUP BY ALL", [since_ns, op])}

    def mark_time(self, name: str, sessions: list[str]) -> int | None:
        """The newest time of a mark `name` in these sessions."""
        marks = ", ".join("?" * len(sessions)) or "NULL"
        row = self.query_one(f"SELECT max(time_ns) FROM marks WHERE name = ? AND session IN "
                             f"({marks})", [name, *sessions])
        return None if not row or row[0] is None else int(row[0])

    def stamp_time(self, stamp: int, sessions: list[str]) -> int | None:
        """The time of a stamp (its records, marks, points) in these sessions."""
        marks = ", ".join("?" * len(sessions)) or "NULL"
        row = self.query_one(
            f"SELECT min(time_ns) FROM (SELECT time_ns FROM records WHERE stamp = ? AND "
            f"session IN ({marks}) UNION ALL SELECT time_ns FROM marks WHERE stamp = ? AND "
            f"session IN ({marks}) UNION ALL SELECT time_ns FROM points WHERE stamp = ? AND "
            f"session IN ({marks}))", [stamp, *sessions] * 3)
        return None if not row or row[0] is None else int(row[0])

    # -------------------------------------------------- restorable intervals
    def restorable_intervals(self, session: str, device: str) -> list[tuple]:
        """(from_stamp, to_stamp, from_ns, to_ns) of the device in the session."""
        return self.query(
            "SELECT r.from_stamp, r.to_stamp, r.from_ns, r.to_ns FROM restorable r "
            "JOIN session_devices sd ON sd.session = r.session AND sd.dev = r.dev "
            "WHERE r.session = ? AND sd.device = ? ORDER BY r.from_stamp", [session, device])

    def gap_windows(self, session: str, device: str) -> list[tuple]:
        """(from_stamp, resumed, cause, reason) of the device's gap windows in the session."""
        return self.query(
            "SELECT w.from_stamp, w.resumed, w.cause, w.reason FROM gap_windows w "
            "JOIN session_devices sd ON sd.session = w.session AND sd.dev = w.dev "
            "WHERE w.session = ? AND sd.device = ? ORDER BY w.from_stamp", [session, device])

    def gap_window_counts(self) -> dict[tuple[str, int], tuple[int, int]]:
        """{(session, dev): (its gap windows, those of them not closed by a resync)}."""
        return {(s, d): (int(n), int(o)) for s, d, n, o in self.query(
            "SELECT session, dev, count(*), count(*) FILTER (WHERE resumed IS NULL) "
            "FROM gap_windows GROUP BY ALL")}

    # ------------------------------------------- restore points (replayer/points.py)
    def session_gap(self, session: str) -> tuple | None:
        """(first_gap, gap_reason, after_gap, end_stamp) of the session, None: unknown."""
        return self.query_one("SELECT first_gap, gap_reason, after_gap, end_stamp FROM sessions "
                              "WHERE session = ?", [session])

    def device_sessions(self, device: str) -> list[tuple]:
        """Per session that traced the device: (session, dev, size_bytes, stamp_base,
        baseline_end, watermark, first_gap, gap_reason, end_stamp, start_ns), oldest first."""
        return self.query(
            "SELECT sd.session, sd.dev, sd.size_bytes, s.stamp_base, sd.baseline_end, "
            "s.watermark, s.first_gap, s.gap_reason, s.end_stamp, s.start_ns "
            "FROM session_devices sd JOIN sessions s USING (session) WHERE sd.device = ? "
            "ORDER BY coalesce(s.stamp_base, 0), sd.session", [device])

    def device_intervals(self, device: str) -> list[tuple]:
        """(session, dev, from_stamp, to_stamp, from_ns, to_ns) of the device's restorable
        intervals in every session, by from_stamp."""
        return self.query(
            "SELECT r.session, r.dev, r.from_stamp, r.to_stamp, r.from_ns, r.to_ns "
            "FROM restorable r JOIN session_devices sd USING (session, dev) WHERE sd.device = ? "
            "ORDER BY r.from_stamp", [device])

    def device_gap_windows(self, device: str) -> list[tuple]:
        """(session, dev, from_stamp, last_stamp, resumed, cause, reason) of the device's gap
        windows in every session, by from_stamp."""
        return self.query(
            "SELECT w.session, w.dev, w.from_stamp, w.last_stamp, w.resumed, w.cause, w.reason "
            "FROM gap_windows w JOIN session_devices sd USING (session, dev) WHERE sd.device = ? "
            "ORDER BY w.from_stamp", [device])

    def device_pruned(self, device: str) -> list[tuple]:
        """(session, dev, stamp, whole) of the device's pruned history in every session."""
        return self.query("SELECT p.session, p.dev, p.stamp, p.whole FROM pruned p "
                          "JOIN session_devices sd USING (session, dev) WHERE sd.device = ?",
                          [device])

    def has_table(self, table: str) -> bool:
        return bool(self.query_one(
            "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
            "AND table_name = ?", [table])[0])

    def pruned_marks(self, name: str) -> list[tuple]:
        """(session, stamp, time_ns) of the marks `name` a prune deleted, by stamp (none for a
        store no writer of this version opened: it has no pruned_marks table)."""
        if not self.has_table("pruned_marks"):
            return []
        return self.query("SELECT session, stamp, time_ns FROM pruned_marks WHERE name = ? "
                          "ORDER BY stamp", [name])

    def last_stamp_at(self, session: str, first: int, last: int, time_ns: int) -> int | None:
        """The largest stamp in [first, last] of the session (records, marks, points) whose
        time is <= time_ns."""
        row = self.query_one(
            "SELECT max(stamp) FROM (SELECT stamp, time_ns FROM records WHERE session = $s "
            "AND stamp BETWEEN $a AND $b "
            "UNION ALL SELECT stamp, time_ns FROM marks WHERE session = $s "
            "AND stamp BETWEEN $a AND $b "
            "UNION ALL SELECT stamp, time_ns FROM points WHERE session = $s "
            "AND stamp BETWEEN $a AND $b) WHERE time_ns <= $t",
            {"s": session, "t": time_ns, "a": first, "b": last})
        return int(row[0]) if row and row[0] is not None else None

    def marks_named(self, name: str) -> list[tuple]:
        """(session, stamp, time_ns) of every mark `name`, by stamp."""
        return self.query("SELECT session, stamp, time_ns FROM marks WHERE name = ? "
                          "ORDER BY stamp", [name])

    def device_mark_names(self, device: str) -> list[str]:
        """The names of the marks of sessions that traced the device, oldest first."""
        return [n for (n,) in self.query(
            "SELECT name FROM marks WHERE session IN (SELECT session FROM session_devices "
            "WHERE device = ?) GROUP BY name ORDER BY min(stamp)", [device])]

    def mark_count(self, name: str) -> int:
        return int(self.query_one("SELECT count(*) FROM marks WHERE name = ?", [name])[0])

    # ------------------------------------------- written ranges (replayer/fsmap.py)
    def written_extents(self, session: str, dev: int, a: int, b: int) -> dict:
        """{'s': device byte offsets, 'n': lengths} (numpy) of what stamps in (a, b] of the
        session's `dev` wrote: data writes, discards/write-zeroes, resync chunks; unmerged."""
        zero = ", ".join(str(o) for o in record.ZEROING_OPS)
        return self.numpy(
            f"SELECT CASE WHEN op IN ({zero}) THEN sector * 512 ELSE sector * 512 + \"offset\" END "
            f"AS s, CASE WHEN op IN ({zero}) THEN bio_size ELSE len END AS n FROM records "
            f"WHERE session = ? AND dev = ? AND stamp > ? AND stamp <= ? "
            f"AND (op IN ({zero}) OR (op = {record.OP_WRITE} AND len > 0)) "
            f"UNION ALL SELECT sector * 512, bio_size FROM base WHERE session = ? AND dev = ? "
            f"AND stamp > ? AND stamp <= ?", [session, dev, a, b] * 2)

    def range_writers(self, session: str, dev: int, a: int, b: int, ranges) -> list[tuple]:
        """(comm, pid, dirty_comm, dirty_pid, first time ns, last time ns, writes, bytes) of the
        tasks that wrote into the merged byte ranges [[s, e)] (not empty) with stamps in (a, b],
        most bytes first (replayer/fsmap.py writers())."""
        vals = ", ".join(f"({int(s)}, {int(e)})" for s, e in ranges)
        zero = ", ".join(str(o) for o in record.ZEROING_OPS)
        self_ = f"(r.flags & {record.F_DIRTYSELF}) != 0"
        if self.has_column("dirtiers", "tgid"):
            dcols = (f"CASE WHEN {self_} THEN r.comm ELSE dz.comm END AS dcomm, "
                     f"CASE WHEN {self_} THEN r.tgid ELSE dz.tgid END AS dpid")
            dj = ("LEFT JOIN dirtiers dz ON dz.session = r.session AND dz.dev = r.dev "
                  "AND dz.stamp = r.stamp")
        else:  # a store no writer opened since the table was added
            dcols = (f"CASE WHEN {self_} THEN r.comm END AS dcomm, "
                     f"CASE WHEN {self_} THEN r.tgid END AS dpid")
            dj = ""
        return self.query(
            f"WITH x(xs, xe) AS (VALUES {vals}), w AS (SELECT r.stamp, r.time_ns, r.comm, r.tgid, "
            f"{dcols}, "
            f"CASE WHEN r.op IN ({zero}) THEN r.sector * 512 ELSE r.sector * 512 + r.\"offset\" END "
            f"AS s, CASE WHEN r.op IN ({zero}) THEN r.bio_size ELSE r.len END AS n FROM records r "
            f"{dj} WHERE r.session = ? AND r.dev = ? AND r.stamp > ? AND r.stamp <= ? "
            f"AND (r.op IN ({zero}) OR (r.op = {record.OP_WRITE} AND r.len > 0))) "
            f"SELECT comm, tgid, dcomm, dpid, min(time_ns), max(time_ns), count(DISTINCT stamp), "
            f"sum(least(s + n, xe) - greatest(s, xs)) FROM w JOIN x "
            f"ON w.s < x.xe AND w.s + w.n > x.xs GROUP BY comm, tgid, dcomm, dpid "
            f"ORDER BY 8 DESC, 1, 3",
            [session, dev, a, b])

    # ---------------------------------------------- extents (replayer/rebuild.py)
    def resync_end_points(self, session: str, dev: int) -> list[tuple]:
        """(stamp, start stamp or None) of the resync_end points of (session, dev) that may
        open an interval (HELD_POINT), by stamp."""
        return self.query(
            "SELECT stamp, json_extract(payload, '$.start')::UBIGINT FROM points "
            f"WHERE session = ? AND dev = ? AND what = 'resync_end' AND {HELD_POINT} "
            "ORDER BY stamp",
            [session, dev])

    def base_extents(self, session: str, dev: int, stamp: int) -> dict:
        """The baseline/resync/prune chunks of (session, dev) at a stamp <= `stamp`, as numpy
        columns: p (stamp, 0: baseline), a (aux), q (seq), s (byte offset), n (length), f, g, i
        (payload file, row group, row; -1: none), z (reads as zeroes)."""
        return self.numpy(
            f"SELECT coalesce(stamp, 0) AS p, aux AS a, seq AS q, sector * 512 AS s, "
            f"bio_size AS n, coalesce(pfile, -1) AS f, coalesce(prg, -1) AS g, "
            f"coalesce(pidx, -1) AS i, (flags & {record.F_ZERO}) != 0 OR pfile IS NULL AS z "
            f"FROM base WHERE session = $s AND dev = $d AND coalesce(stamp, 0) <= $p",
            {"s": session, "d": dev, "p": stamp})

    def bio_extents(self, session: str, dev: int, stamp: int) -> dict:
        """The write pieces (with payload) and zeroing bios of (session, dev) with stamps <=
        `stamp`, as numpy columns p (stamp), a (offset in the bio), s, n, f, g, i, z."""
        zero_ops = ", ".join(str(o) for o in record.ZEROING_OPS)
        return self.numpy(
            f"SELECT stamp AS p, \"offset\" AS a, sector * 512 + \"offset\" AS s, len AS n, "
            f" pfile AS f, prg AS g, pidx AS i, FALSE AS z FROM records "
            f" WHERE session = $s AND dev = $d AND stamp <= $p AND op = {record.OP_WRITE} "
            f" AND len > 0 AND pfile IS NOT NULL"
            f" UNION ALL"
            f" SELECT stamp, 0, sector * 512, bio_size, -1, -1, -1, TRUE FROM records "
            f" WHERE session = $s AND dev = $d AND stamp <= $p AND op IN ({zero_ops}) "
            f" AND \"offset\" = 0 AND bio_size > 0",
            {"s": session, "d": dev, "p": stamp})

    def pruned_stamp(self, session: str, dev: int) -> int | None:
        """The stamp up to which `blkrewind prune` folded the history of (session, dev)."""
        row = self.query_one("SELECT stamp FROM pruned WHERE session = ? AND dev = ?",
                             [session, dev])
        return int(row[0]) if row and row[0] is not None else None

    # --------------------------------------------------------- pruning (replayer/prune.py)
    def device_restorable(self, device: str) -> list[tuple]:
        """(session, dev, size_bytes, from_stamp, to_stamp, from_ns, to_ns) of the device's
        restorable intervals, oldest session first, by from_stamp."""
        return self.query(
            "SELECT r.session, r.dev, sd.size_bytes, r.from_stamp, r.to_stamp, r.from_ns, "
            "r.to_ns FROM restorable r JOIN session_devices sd USING (session, dev) "
            "JOIN sessions s USING (session) WHERE sd.device = ? "
            "ORDER BY coalesce(s.stamp_base, 0), r.session, r.from_stamp", [device])

    def resync_starts(self, session: str, dev: int) -> list[int]:
        """The stamps of the resync_start points of (session, dev)."""
        return [int(rs) for (rs,) in self.query(
            "SELECT stamp FROM points WHERE session = ? AND dev = ? AND what = 'resync_start'",
            [session, dev])]

    def restorable_mark_stamps(self, session: str, dev: int, below: int) -> list[int]:
        """The stamps below `below` of the session's marks inside a restorable interval of
        (session, dev), in order."""
        return [int(s) for (s,) in self.query(
            "SELECT DISTINCT m.stamp FROM marks m JOIN restorable r ON r.session = m.session "
            "AND r.dev = ? AND m.stamp BETWEEN r.from_stamp AND r.to_stamp "
            "WHERE m.session = ? AND m.stamp < ? ORDER BY m.stamp", [dev, session, below])]

    def restorable_from_ns(self, session: str, dev: int, stamp: int) -> int | None:
        """The time of the restorable interval of (session, dev) that starts at `stamp` (a
        point a previous prune kept has no row of its own)."""
        row = self.query_one("SELECT from_ns FROM restorable WHERE session = ? AND dev = ? AND "
                             "from_stamp = ?", [session, dev, stamp])
        return row[0] if row else None

    def pruned_state(self, session: str, dev: int) -> tuple[int | None, bool] | None:
        """(stamp, whole) of the pruned history of (session, dev); None: never pruned."""
        row = self.query_one("SELECT stamp, whole FROM pruned WHERE session = ? AND dev = ?",
                             [session, dev])
        return None if row is None else (None if row[0] is None else int(row[0]), bool(row[1]))

    def record_count(self, session: str, dev: int, upto: int | None = None) -> int:
        """The records of (session, dev) with stamps <= upto (None: all)."""
        if upto is None:
            return int(self.query_one("SELECT count(*) FROM records WHERE session = ? AND "
                                      "dev = ?", [session, dev])[0])
        return int(self.query_one("SELECT count(*) FROM records WHERE session = ? AND dev = ? "
                                  "AND stamp <= ?", [session, dev, upto])[0])

    def base_chunk_count(self, session: str, dev: int, upto: int | None = None) -> int:
        """The base chunks of (session, dev) at stamps <= upto (None: all)."""
        if upto is None:
            return int(self.query_one("SELECT count(*) FROM base WHERE session = ? AND dev = ?",
                                      [session, dev])[0])
        return int(self.query_one("SELECT count(*) FROM base WHERE session = ? AND dev = ? "
                                  "AND coalesce(stamp, 0) <= ?", [session, dev, upto])[0])

    # -------------------------------------------- the detector (replayer/detector.py)
    def baseline_chunks(self, session: str, dev: int) -> dict:
        """The baseline chunks (stamp 0) of (session, dev) by aux, as numpy columns sector,
        bio_size, flags, randomness, blocks (NULL where the store has no such column)."""
        has = self.has_column("base", "blocks")
        rsel = "randomness, blocks" if has else "NULL::REAL AS randomness, NULL::BLOB AS blocks"
        return self.numpy(f"SELECT sector, bio_size, flags, {rsel} FROM base "
                          "WHERE session = ? AND dev = ? AND stamp = 0 ORDER BY aux",
                          [session, dev])

    def detector_records(self, session: str, dev: int, after: int, upto: int | None,
                         limit: int) -> dict:
        """At most `limit` records of (session, dev) with stamps in (after, upto] by stamp and
        offset, as numpy columns stamp, time_ns, sector, offset, len, bio_size, op, randomness,
        cgroup_id, tgid, comm, named; the process is the one that dirtied the pages where the
        tracer recorded it (trace --dirtier: `dirtiers`; named: true), else the submitter (with
        F_DIRTYSELF the submitter is the dirtier)."""
        has = self.has_column("records", "randomness")
        rsel = "r.randomness" if has else "NULL::REAL AS randomness"
        if self.has_column("dirtiers", "tgid"):
            who = ("CASE WHEN dz.tgid IS NULL THEN r.cgroup_id ELSE dz.cgroup_id END AS "
                   "cgroup_id, coalesce(dz.tgid, r.tgid) AS tgid, coalesce(dz.comm, r.comm) AS comm, "
                   "(dz.tgid IS NOT NULL) AS named")
            dj = ("LEFT JOIN (SELECT stamp, any_value(tgid) AS tgid, any_value(comm) AS comm, "
                  "any_value(cgroup_id) AS cgroup_id FROM dirtiers WHERE session = ? AND dev = ? "
                  "AND stamp > ? GROUP BY stamp) dz ON dz.stamp = r.stamp ")
        else:
            who, dj = "r.cgroup_id, r.tgid, r.comm, FALSE AS named", ""
        sql = (f"SELECT r.stamp, r.time_ns, r.sector, r.\"offset\", r.len, r.bio_size, r.op, "
               f"{rsel}, {who} FROM records r {dj}"
               "WHERE r.session = ? AND r.dev = ? AND r.stamp > ? "
               + ("AND r.stamp <= ? " if upto is not None else "")
               + "ORDER BY r.stamp, r.\"offset\" LIMIT ?")
        params = (([session, dev, after] if dj else []) + [session, dev, after]
                  + ([upto] if upto is not None else []) + [limit])
        return self.numpy(sql, params)

    def device_session_sizes(self, device: str) -> list[tuple]:
        """(session, dev, size_bytes) of every session that traced the device, oldest first."""
        return self.query("SELECT sd.session, sd.dev, sd.size_bytes FROM session_devices sd "
                          "JOIN sessions s USING (session) WHERE sd.device = ? "
                          "ORDER BY s.start_ns NULLS LAST, sd.session", [device])

    def baselined_devices(self) -> list[tuple]:
        """(session, dev, size_bytes, device) of every device whose baseline is stored."""
        return self.query("SELECT sd.session, sd.dev, sd.size_bytes, sd.device "
                          "FROM session_devices sd WHERE sd.baseline_end IS NOT NULL")

    def restorable_at(self, session: str, dev: int, stamp: int) -> tuple[bool, int | None]:
        """(whether a restorable interval of (session, dev) holds `stamp`, the end of its
        last interval or None)."""
        row = self.query_one(
            "SELECT count(*) FILTER (WHERE ? BETWEEN from_stamp AND to_stamp), max(to_stamp) "
            "FROM restorable WHERE session = ? AND dev = ?", [stamp, session, dev])
        if row is None:
            return False, None
        return bool(row[0]), None if row[1] is None else int(row[1])

    def last_data_stamp(self, session: str, dev: int, lo: int, before: int) -> int | None:
        """The largest stamp in [lo, before) of (session, dev) that is not a metadata write
        (F_META)."""
        row = self.query_one(
            f"SELECT max(stamp) FROM records WHERE session = ? AND dev = ? AND stamp < ? "
            f"AND stamp >= ? AND (flags & {record.F_META}) = 0", [session, dev, before, lo])
        return int(row[0]) if row and row[0] is not None else None

    def interval_start(self, session: str, dev: int, stamp: int) -> int | None:
        """The start of the restorable interval of (session, dev) holding `stamp`."""
        row = self.query_one(
            "SELECT max(from_stamp) FROM restorable WHERE session = ? AND dev = ? "
            "AND ? BETWEEN from_stamp AND to_stamp", [session, dev, stamp])
        return int(row[0]) if row and row[0] is not None else None

    def last_restorable_upto(self, session: str, dev: int, stamp: int) -> int | None:
        """The last restorable stamp of (session, dev) at or before `stamp`."""
        row = self.query_one(
            "SELECT max(least(to_stamp, ?)) FROM restorable WHERE session = ? AND dev = ? "
            "AND from_stamp <= ?", [stamp, session, dev, stamp])
        return int(row[0]) if row and row[0] is not None else None

    def stamp_last_time(self, session: str, stamp: int) -> int | None:
        """The newest time of a stamp (its records, marks, points) in the session."""
        row = self.query_one(
            "SELECT max(time_ns) FROM (SELECT time_ns FROM records WHERE session = ? "
            "AND stamp = ? UNION ALL SELECT time_ns FROM marks WHERE session = ? "
            "AND stamp = ? UNION ALL SELECT time_ns FROM points WHERE session = ? "
            "AND stamp = ?)", [session, stamp] * 3)
        return int(row[0]) if row and row[0] is not None else None

    def restorable_mark_upto(self, session: str, dev: int, stamp: int) -> str | None:
        """The newest mark of the session at or before `stamp` inside a restorable interval
        of (session, dev)."""
        row = self.query_one(
            "SELECT name FROM marks m WHERE session = ? AND stamp <= ? AND EXISTS (SELECT 1 "
            "FROM restorable r WHERE r.session = m.session AND r.dev = ? AND m.stamp BETWEEN "
            "r.from_stamp AND r.to_stamp) ORDER BY stamp DESC LIMIT 1", [session, stamp, dev])
        return row[0] if row else None

    # ------------------------------------------------ bisection (replayer/bisect.py)
    def restorable_ranges(self, session: str, dev: int) -> list[tuple[int, int]]:
        """(from_stamp, to_stamp) of the restorable intervals of (session, dev), in order."""
        return [(int(a), int(b)) for a, b in self.query(
            "SELECT from_stamp, to_stamp FROM restorable WHERE session = ? AND dev = ? "
            "AND from_stamp IS NOT NULL ORDER BY from_stamp", [session, dev])]

    def marks_between(self, session: str, after: int, before: int) -> list[tuple[int, str]]:
        """(stamp, name) of the session's marks with stamps in (after, before), in order."""
        return [(int(s), n) for s, n in self.query(
            "SELECT stamp, name FROM marks WHERE session = ? AND stamp > ? AND stamp < ? "
            "ORDER BY stamp", [session, after, before])]

    def flush_stamps(self, session: str, dev: int, after: int,
                     before: int) -> list[tuple[int, int, int]]:
        """(stamp, its records' flags OR'ed, its op) of the flush bios and the writes with FUA
        or PREFLUSH of (session, dev) with stamps in (after, before), in order."""
        fl = record.F_FUA | record.F_PREFLUSH
        return [(int(s), int(f), int(o)) for s, f, o in self.query(
            f"SELECT stamp, bit_or(flags), any_value(op) FROM records WHERE session = ? "
            f"AND dev = ? AND stamp > ? AND stamp < ? GROUP BY stamp "
            f"HAVING bit_or(flags) & {fl} != 0 OR any_value(op) = {record.OP_FLUSH} "
            f"ORDER BY stamp", [session, dev, after, before])]

    def write_stamps(self, session: str, dev: int, after: int, before: int) -> list[int]:
        """The stamps of the records of (session, dev) in (after, before), in order."""
        return [int(s) for (s,) in self.query(
            "SELECT DISTINCT stamp FROM records WHERE session = ? AND dev = ? AND stamp > ? "
            "AND stamp < ? ORDER BY stamp", [session, dev, after, before])]

    # ------------------------------------------------------------ payload files
    def payload_file_paths(self) -> list[str]:
        return [p for (p,) in self.query("SELECT path FROM payload_files")]

    def payload_file_map(self) -> dict[int, str]:
        """{id: path} of every payload file."""
        return dict(self.query("SELECT id, path FROM payload_files"))

    def payload_file_count(self) -> int:
        return int(self.query_one("SELECT count(*) FROM payload_files")[0])

    def last_payload_file(self) -> int:
        """The largest payload file id (0: none)."""
        return int(self.query_one("SELECT coalesce(max(id), 0) FROM payload_files")[0])

    def payload_files_upto(self, upto: int | None = None) -> list[tuple]:
        """(id, path, session, segno, first_frame, end_frame, rows, file_bytes, crc32, batch)
        of every payload file with id <= upto (all: None), by id."""
        return self.query("SELECT id, path, session, segno, first_frame, end_frame, rows, "
                          "file_bytes, crc32, batch FROM payload_files WHERE id <= ? ORDER BY id",
                          [(1 << 62) if upto is None else upto])

    def session_hosts(self) -> dict[str, str]:
        return dict(self.query("SELECT session, host FROM sessions"))


class Store(StoreReader):
    """An open store. Writers hold DIR/lock; readers open the database read-only.

    The DuckDB connection (`_con`) and its lock (`_mutex`, an RLock) are this module's: a
    DuckDB connection is not safe for concurrent use, so every use of it goes through the
    lock. Other modules hold the lock across several operations with `locked()` and reach the
    database through the named operations only (user SQL: user_query; the query socket:
    query_cursor; the SQL views: define_views).
    """

    # state other modules keep with the open store (read with getattr and a default)
    _wm_devices_changed: bool    # replayer.watermark: refresh `devices` at the next finalize

    def __init__(self, path: str, con: duckdb.DuckDBPyConnection, writable: bool,
                 lock_fd: int | None):
        self.path = path
        self._con = con
        self._con_open = True
        self.writable = writable
        self._lock_fd = lock_fd
        self._mutex = threading.RLock()
        self._ledger: Ledger | None = None
        self.payload: PayloadStore = LocalPayloadStore(path)   # where payload files live

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path, *, write: bool = False, create: bool = False,
             wait: float | None = None) -> "Store":
        """Open the store at `path`.

        write=True takes DIR/lock (waiting up to `wait` seconds for another
        writer, then UserError "busy"); create=True makes the store if DIR is
        missing or empty. Readers open meta.duckdb read-only, waiting up to
        `wait` seconds for a writer to finish. `wait` defaults to
        $BLKREWIND_STORE_WAIT, else 10 seconds.
        """
        if wait is None:
            wait = default_wait()
        path = os.path.abspath(os.fspath(path))
        check_access(path, write)
        meta = os.path.join(path, META)
        if not os.path.exists(meta):
            if not create:
                if not os.path.exists(path):
                    raise StoreError(f"no store at {path} (make one with "
                                     f"'blkrewind ingest --log LOG --store {path}')")
                raise StoreError(f"{path} is not a blkrewind store (no {META})")
            if os.path.exists(path):
                if not os.path.isdir(path):
                    raise StoreError(f"{path} is not a directory")
                extra = [n for n in os.listdir(path) if n not in (LOCK, *SUBDIRS)]
                if extra:
                    raise StoreError(f"{path} is not empty and not a blkrewind store "
                                     f"(holds {', '.join(sorted(extra)[:3])})")
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the store {path}: {e.strerror}") from None
        elif not os.path.isdir(path):
            raise StoreError(f"{path} is not a directory")

        lock_fd = None
        if write:
            lock_fd = _take_lock(path, wait)
        try:
            con = _connect(meta, read_only=not write, wait=wait, path=path)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        st = cls(path, con, write, lock_fd)
        try:
            if write:
                st._init_schema()
            st._check_format()
        except BaseException:
            st.close()
            raise
        return st

    def _init_schema(self) -> None:
        con = self._con
        names = {n for (n,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall()}
        if names and "store_info" not in names:
            raise StoreError(f"{self.path}/{META} is a DuckDB database but not a blkrewind store")
        if names:
            self._check_format()  # never add tables to a store of another format
        con.execute("BEGIN")
        for ddl in SCHEMA:
            con.execute(ddl)
        for ddl in MIGRATIONS:  # columns added since stores of this format were made
            con.execute(ddl)
        con.execute("INSERT INTO store_info VALUES ('format', ?) ON CONFLICT DO NOTHING",
                    [FORMAT_VERSION])
        con.execute("INSERT INTO store_info VALUES ('created', ?) ON CONFLICT DO NOTHING",
                    [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())])
        con.execute("COMMIT")
        for sub in SUBDIRS:
            os.makedirs(os.path.join(self.path, sub), mode=0o700, exist_ok=True)

    def _check_format(self) -> None:
        try:
            row = self._con.execute("SELECT value FROM store_info WHERE key = 'format'").fetchone()
        except duckdb.Error:
            raise StoreError(f"{self.path} is not a blkrewind store (no store_info)") from None
        if not row or row[0] != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {row[0] if row else '?'} is not "
                             f"supported (this blkrewind reads format {FORMAT_VERSION}; there is "
                             f"no migration: ingest the LOGs into a new store)")

    # ------------------------------------------------------------ primitives
    def query(self, sql: str, params=None) -> list[tuple]:
        with self._mutex:
            return self._con.execute(sql, params or []).fetchall()

    def query_one(self, sql: str, params=None):
        with self._mutex:
            return self._con.execute(sql, params or []).fetchone()

    def _row(self, sql: str, params: list, what: str) -> tuple:
        """The row of a query that has one (an aggregate, or a row the caller knows is
        there); StoreError when there is none."""
        row = self._con.execute(sql, params).fetchone()
        if row is None:
            raise StoreError(f"the store has no {what}")
        return row

    def numpy(self, sql: str, params=None) -> dict:
        with self._mutex:
            return self._con.execute(sql, params or []).fetchnumpy()

    def user_query(self, sql: str) -> tuple[list[str], list[tuple]]:
        with self._mutex:
            self._con.execute("SET enable_external_access = false")
            self._con.execute("SET lock_configuration = true")
            cur = self._con.execute(sql)
            if cur.description is None:
                raise UserError("the statement returned no rows (only queries are allowed)")
            return [d[0] for d in cur.description], cur.fetchall()

    @contextmanager
    def reading(self) -> Iterator[None]:
        with self._mutex:
            yield

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The store's lock held (reentrant): the operations run inside see no other thread's
        operation or transaction in between; the frame ledger (`ledger`) is kept under it."""
        with self._mutex:
            yield

    def query_cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of the store's database for the query socket (replayer/query.py: it runs
        read-only user queries on cursors of it); file access is turned off for the whole
        database first (the store's own writes go through registered Arrow tables, not
        files)."""
        with self._mutex:
            self._con.execute("SET enable_external_access = false")
            return self._con.cursor()

    def define_views(self, define: Callable[[Any], Any]) -> None:
        """define(connection): the SQL views of user queries on this store's connection
        (analytics.views.define_views: TEMP views, nothing of the store changes)."""
        with self._mutex:
            define(self._con)

    def close(self) -> None:
        if self._con_open:
            self._con_open = False   # closed once (later uses fail: connection closed)
            self._con.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def checkpoint(self) -> None:
        """Make every committed change durable in the database file."""
        with self._mutex:
            self._con.execute("CHECKPOINT")

    # ---------------------------------------------------------------- ledger
    @property
    def ledger(self) -> Ledger:
        """The frames this writable store holds and is storing (replayer/ledger.py), made on
        first use."""
        with self._mutex:
            if self._ledger is None:
                if not self.writable:
                    raise StoreError(f"{self.path}: the frame ledger needs the store open for "
                                     f"writing")
                self._ledger = Ledger(self._mutex, self._ledger_rows)
            return self._ledger

    def _ledger_rows(self):
        con = self._con
        ranges = con.execute("SELECT batch, session, segno, first_frame, end_frame FROM "
                             "frame_ranges ORDER BY session, segno, first_frame").fetchall()
        segs = con.execute("SELECT session, segno, seg_id, host, sealed, nframes, torn_bytes, "
                           "error FROM segments").fetchall()
        sessions = con.execute("SELECT session, host, held_segno, held_frame "
                               "FROM sessions").fetchall()
        hwm = con.execute("SELECT value FROM store_info WHERE key = 'batch_hwm'").fetchone()
        top = self._row("SELECT greatest((SELECT coalesce(max(batch), 0) FROM frame_ranges), "
                        "(SELECT coalesce(max(id), 0) FROM payload_files))", [],
                        "highest batch number")[0]
        return ranges, segs, sessions, max(int(top), int(hwm[0]) if hwm else 0) + 1

    # ----------------------------------------------------------- transactions
    @contextmanager
    def transaction(self, undo: Callable[[], None] | None = None,
                    failed: str | None = None) -> Iterator[None]:
        """ONE DuckDB transaction, under the store's mutex: COMMIT at a clean exit; on any
        error ROLLBACK, then undo() (the caller puts back its in-memory state, e.g. the
        ledger's), and a database error becomes StoreError(failed, its `{}` the error's first
        line). The named operations marked "in a transaction" run inside it."""
        with self._mutex:
            con = self._con
            try:
                con.execute("BEGIN")
                try:
                    yield
                    con.execute("COMMIT")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
            except BaseException as e:
                if undo is not None:
                    undo()
                if failed is not None and isinstance(e, duckdb.Error):
                    raise StoreError(failed.format(str(e).splitlines()[0])) from None
                raise

    # ------------------------------------------------- sessions (in a transaction)
    def put_session(self, session: str, host: str, held: tuple[int, int], new: bool) -> None:
        """A session received frames: bound to `host` (new) and dirty (its watermark is
        recomputed by the next finalize); every frame before `held` (segno, frame) is stored."""
        if new:
            self._con.execute("INSERT INTO sessions (session, host, dirty, held_segno, "
                             "held_frame) VALUES (?, ?, TRUE, ?, ?)", [session, host, *held])
        else:
            self._con.execute("UPDATE sessions SET dirty = TRUE, held_segno = ?, held_frame = ? "
                             "WHERE session = ?", [*held, session])

    def set_session_held(self, session: str, held: tuple[int, int]) -> None:
        self._con.execute("UPDATE sessions SET held_segno = ?, held_frame = ? WHERE session = ?",
                         [*held, session])

    def set_session_start(self, session: str, info: dict, stamp_base: int, seq_base: int,
                          start_ns: int) -> None:
        """From its R_SESSION record."""
        self._con.execute(
            "UPDATE sessions SET stamp_base = ?, seq_base = ?, version = ?, boot_id = ?, "
            "kernel = ?, start_ns = ?, info = ? WHERE session = ?",
            [stamp_base, seq_base, _text(info.get("version")), _text(info.get("boot_id")),
             _text(info.get("kernel")), start_ns, json.dumps(info, sort_keys=True), session])

    def set_session_end(self, session: str, end_stamp: int, end_seq: int, clean: bool,
                        end_ns: int) -> None:
        """From its R_END record."""
        self._con.execute("UPDATE sessions SET end_stamp = ?, end_seq = ?, clean = ?, end_ns = ? "
                         "WHERE session = ?", [end_stamp, end_seq, clean, end_ns, session])

    def add_session_device(self, session: str, dev: int, host: str, name: str,
                           path: str | None, size_bytes: int, logical_block_size: int,
                           physical_block_size: int, part_start: int, info: dict) -> None:
        """From an R_DEVICE record (the first description of `dev` in the session holds)."""
        self._con.execute(
            "INSERT INTO session_devices (session, dev, device, host, name, path, size_bytes, "
            "logical_block_size, physical_block_size, part_start, info) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [session, dev, f"{host}:{name}", host, name, path, size_bytes, logical_block_size,
             physical_block_size, part_start, json.dumps(info, sort_keys=True)])

    # ------------------------------------ segments and frame ranges (in a transaction)
    def put_segment(self, key: tuple[str, int], st: SegState, new: bool) -> None:
        vals = [st.seg_id, st.host, st.sealed, st.nframes, st.torn_bytes, st.error]
        if new:
            self._con.execute("INSERT INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [*key, *vals])
        else:
            self._con.execute("UPDATE segments SET seg_id = ?, host = ?, sealed = ?, nframes = ?, "
                             "torn_bytes = ?, error = ? WHERE session = ? AND segno = ?",
                             [*vals, *key])

    def add_frame_ranges(self, rows: list[tuple]) -> None:
        """(batch, session, segno, first_frame, end_frame, source, stored_ns) rows."""
        if rows:
            self._con.execute("INSERT INTO frame_ranges VALUES " + ", ".join(
                ["(?, ?, ?, ?, ?, ?, ?)"] * len(rows)), [v for r in rows for v in r])

    # ------------------------------------------------ rows of batches (in a transaction)
    BULK_TABLES = ("records", "base", "completions", "dirtiers")

    def append_rows(self, table: str, rows) -> None:
        """An Arrow table of rows for one of BULK_TABLES, by column name."""
        if table not in self.BULK_TABLES:
            raise ValueError(f"not a bulk table: {table}")
        self._con.register("_batch", rows)
        try:
            self._con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _batch")
        finally:
            self._con.unregister("_batch")

    def add_marks(self, rows: list[tuple]) -> None:
        if rows:
            self._con.executemany("INSERT INTO marks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def add_points(self, rows: list[tuple]) -> None:
        if rows:
            self._con.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def add_loss(self, rows: list[tuple]) -> None:
        if rows:
            self._con.executemany("INSERT INTO loss VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def raise_batch_hwm(self, batch: int) -> None:
        """No batch id up to `batch` is handed out again (a dropped or pruned batch's)."""
        self._con.execute("INSERT INTO store_info VALUES ('batch_hwm', ?) ON CONFLICT (key) DO "
                         "UPDATE SET value = CAST(greatest(CAST(store_info.value AS BIGINT), "
                         "CAST(excluded.value AS BIGINT)) AS VARCHAR)", [str(batch)])

    # ------------------------------------------------------------ payload files
    def add_payload_files(self, rows: list[tuple]) -> None:
        """(id, path, session, segno, first_frame, end_frame, rows, payload_bytes,
        file_bytes, crc32, batch) rows (in a transaction)."""
        if rows:
            self._con.execute("INSERT INTO payload_files VALUES " + ", ".join(
                ["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(rows)), [v for r in rows for v in r])


    # ------------------------------------------------ dropping batches (integrity)
    DROP_TABLES = ("records", "base", "marks", "points", "completions", "loss", "dirtiers",
                   "payload_files", "frame_ranges")

    def batches_to_drop(self, ids: list[int]) -> tuple[list[tuple], dict, dict]:
        """What dropping the batches `ids` takes away (under the mutex, before the drop):
        their frame_ranges rows (batch, session, segno, first, end), the smallest stamp they
        hold per session, and per session touched (session, complete_to, stamp_base)."""
        con = self._con
        con.execute("CREATE OR REPLACE TEMP TABLE _drop (batch INTEGER)")
        con.executemany("INSERT INTO _drop VALUES (?)", [(b,) for b in ids])
        ranges = con.execute("SELECT batch, session, segno, first_frame, end_frame FROM "
                             "frame_ranges WHERE batch IN (SELECT batch FROM _drop)").fetchall()
        lowest = dict(con.execute(
            "SELECT session, min(stamp) FROM ("
            "SELECT session, stamp FROM records WHERE batch IN (SELECT batch FROM _drop) "
            "UNION ALL SELECT session, stamp FROM marks WHERE batch IN (SELECT batch FROM _drop) "
            "UNION ALL SELECT session, stamp FROM points WHERE batch IN (SELECT batch FROM _drop) "
            "UNION ALL SELECT session, stamp FROM base WHERE batch IN (SELECT batch FROM _drop) "
            "AND stamp > 0) GROUP BY session").fetchall())
        sessions = sorted({r[1] for r in ranges} | set(lowest))
        scans = {s: con.execute("SELECT complete_to, stamp_base FROM sessions "
                                "WHERE session = ?", [s]).fetchone() for s in sessions}
        return ranges, lowest, scans

    def drop_batch_rows(self) -> None:
        """Delete every row of the batches batches_to_drop() named (in a transaction)."""
        for t in self.DROP_TABLES:
            col = "id" if t == "payload_files" else "batch"
            self._con.execute(f"DELETE FROM {t} WHERE {col} IN (SELECT batch FROM _drop)")

    def forget_batches_to_drop(self) -> None:
        try:
            self._con.execute("DROP TABLE IF EXISTS _drop")
        except duckdb.Error:
            pass

    # ------------------------- restorable intervals: the scan's tables (replayer/watermark.py)
    # The watermark runs these under the store's mutex, inside a transaction (finalize, prune,
    # dropping batches): the reads see the transaction's own writes.
    def dirty_sessions(self) -> list[str]:
        """The sessions that received rows since their watermark was computed."""
        return [s for (s,) in self._con.execute(
            "SELECT session FROM sessions WHERE dirty ORDER BY session").fetchall()]

    def session_scan(self, session: str) -> SessionScan:
        """What the scan of the session goes on from (its sessions and scan_state rows)."""
        row = self._row(
            "SELECT s.stamp_base, s.end_stamp, s.end_ns, s.complete_to, s.watermark, "
            "s.watermark_ns, s.first_gap, s.gap_reason, s.after_gap, s.dirty, s.held_segno, "
            "s.held_frame, ss.session IS NOT NULL, ss.scanned_to, ss.prefix FROM sessions s "
            "LEFT JOIN scan_state ss ON ss.session = s.session WHERE s.session = ?",
            [session], f"session {session}")
        return SessionScan(row[0], row[1], row[2], tuple(row[3:9]), row[9], (row[10], row[11]),
                           (row[13], row[14]) if row[12] else None)

    def stamp_states(self, session: str, lo: int, hi: int) -> dict:
        """Every stamp in (lo, hi] the session holds, by stamp, as numpy columns stamp,
        complete, time_ns (the stamp's first time). A stamp is complete when it is one mark or
        one point, or the pieces of one bio with neither a read error nor a truncation that
        are a no-data bio or run from its first piece to its last and add up to its size."""
        return self._con.execute(_STAMP_STATES, {"s": session, "a": lo, "b": hi}).fetchnumpy()

    def stamp_pieces(self, session: str, stamp: int) -> tuple[int | None, int | None, int | None,
                                                              int]:
        """(bytes captured, bio size, flags of all pieces, pieces) of the records of a stamp."""
        got, size, flags, n = self._row(
            "SELECT sum(len), max(bio_size), bit_or(flags), count(*) FROM records "
            "WHERE session = ? AND stamp = ?", [session, stamp], "aggregate row")
        return got, size, flags, int(n)

    def newest_stamp(self, session: str, after: int) -> int | None:
        """The largest stamp of the session's records, marks and points above `after`."""
        row = self._con.execute(
            "SELECT max(m) FROM (SELECT max(stamp) AS m FROM records WHERE session = $s "
            "AND stamp > $a UNION ALL SELECT max(stamp) FROM marks WHERE session = $s "
            "AND stamp > $a UNION ALL SELECT max(stamp) FROM points WHERE session = $s "
            "AND stamp > $a)", {"s": session, "a": after}).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def gap_runs(self, session: str) -> list[tuple[int, int, str | None, bool]]:
        """(lo, hi, reason, settled) of the session's gap runs, by lo."""
        return [(int(a), int(b), r, bool(s)) for a, b, r, s in self._con.execute(
            "SELECT lo, hi, reason, settled FROM gap_runs WHERE session = ? ORDER BY lo",
            [session]).fetchall()]

    def replace_gap_runs(self, session: str, runs: list[tuple]) -> None:
        """The session's gap runs become `runs`: (lo, hi, reason, settled)."""
        self._con.execute("DELETE FROM gap_runs WHERE session = ?", [session])
        if runs:
            self._con.executemany("INSERT INTO gap_runs VALUES (?, ?, ?, ?, ?)",
                                 [(session, *r) for r in runs])

    def settle_gap_runs(self, session: str, los: list[int]) -> None:
        """The gap runs of the session starting at `los` are settled."""
        if los:
            self._con.executemany("UPDATE gap_runs SET settled = TRUE WHERE session = ? AND lo = ?",
                                 [(session, lo) for lo in los])

    def put_scan_progress(self, session: str, scanned_to: int, prefix: int, new: bool) -> None:
        """scan_state of the session: scanned up to `scanned_to`, complete up to `prefix`."""
        if new:
            self._con.execute("INSERT INTO scan_state VALUES (?, ?, ?)", [session, scanned_to,
                                                                         prefix])
        else:
            self._con.execute("UPDATE scan_state SET scanned_to = ?, prefix = ? WHERE session = ?",
                             [scanned_to, prefix, session])

    def reset_scan(self, session: str, complete_to: int | None) -> None:
        """The next finalize scans the session again from complete_to + 1 (stamp_base when
        None): for code that removed stored rows (replayer/integrity.py)."""
        self._con.execute("UPDATE sessions SET complete_to = ?, dirty = TRUE WHERE session = ?",
                         [complete_to, session])
        self._con.execute("DELETE FROM scan_state WHERE session = ?", [session])

    def set_watermark(self, session: str, state: tuple, clear_dirty: bool) -> None:
        """The session's (complete_to, watermark, watermark_ns, first_gap, gap_reason,
        after_gap); clear_dirty: and it is not dirty any more."""
        self._con.execute("UPDATE sessions SET complete_to = ?, watermark = ?, watermark_ns = ?, "
                         "first_gap = ?, gap_reason = ?, after_gap = ?" +
                         (", dirty = FALSE" if clear_dirty else "") + " WHERE session = ?",
                         [*state, session])

    def set_no_watermark(self, session: str, reason: str, clear_dirty: bool) -> None:
        """The session has no watermark (gap_reason: why) and nothing restorable."""
        self._con.execute("UPDATE sessions SET watermark = NULL, watermark_ns = NULL, "
                         "first_gap = NULL, gap_reason = ?, after_gap = NULL" +
                         (", dirty = FALSE" if clear_dirty else "") + " WHERE session = ?",
                         [reason, session])
        self._con.execute("DELETE FROM restorable WHERE session = ?", [session])
        self._con.execute("DELETE FROM gap_windows WHERE session = ?", [session])

    def interval_points(self, session: str) -> list[tuple]:
        """(stamp, what, dev, payload, time_ns, segno, frame_no) of the session's
        resync_start, resync_end and baseline_end points, by stamp."""
        return self._con.execute(
            "SELECT stamp, what, dev, payload, time_ns, segno, frame_no FROM points "
            "WHERE session = ? AND what IN ('resync_start', 'resync_end', 'baseline_end') "
            "ORDER BY stamp", [session]).fetchall()

    def session_pruned(self, session: str) -> list[tuple]:
        """(dev, stamp, time_ns, whole, kept, batch) of the session's `pruned` rows."""
        return self._con.execute("SELECT dev, stamp, time_ns, whole, kept, batch FROM pruned "
                                "WHERE session = ?", [session]).fetchall()

    def payload_files_present(self, ids: list[int]) -> set[int]:
        """Those of the payload file ids `ids` (not empty) the store holds."""
        return {int(i) for (i,) in self._con.execute(
            "SELECT id FROM payload_files WHERE id IN (" + ", ".join("?" * len(ids)) + ")",
            ids).fetchall()}

    def session_drops(self, session: str):
        """The most records the kernel reported lost in the session (None: no report)."""
        return self._row("SELECT max(drops) FROM loss WHERE session = ?", [session],
                         "aggregate row")[0]

    def session_restorable(self, session: str) -> list[tuple]:
        """The session's `restorable` rows (session, dev, from_stamp, to_stamp, from_ns,
        to_ns), by dev and from_stamp."""
        return [tuple(r) for r in self._con.execute(
            "SELECT * FROM restorable WHERE session = ? ORDER BY dev, from_stamp",
            [session]).fetchall()]

    def session_gap_windows(self, session: str) -> list[tuple]:
        """The session's `gap_windows` rows (session, dev, from_stamp, last_stamp, resumed,
        from_ns, resumed_ns, stamps, cause, reason), by dev and from_stamp."""
        return [tuple(w) for w in self._con.execute(
            "SELECT * FROM gap_windows WHERE session = ? ORDER BY dev, from_stamp",
            [session]).fetchall()]

    def replace_restorable(self, session: str, rows: list[tuple]) -> None:
        """The session's restorable intervals become `rows` (as session_restorable)."""
        self._con.execute("DELETE FROM restorable WHERE session = ?", [session])
        if rows:
            self._con.executemany("INSERT INTO restorable VALUES (?, ?, ?, ?, ?, ?)", rows)

    def replace_gap_windows(self, session: str, rows: list[tuple]) -> None:
        """The session's gap windows become `rows` (as session_gap_windows)."""
        self._con.execute("DELETE FROM gap_windows WHERE session = ?", [session])
        if rows:
            self._con.executemany("INSERT INTO gap_windows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 rows)

    def session_device_intervals(self, session: str) -> list[tuple]:
        """(dev, baseline_end, baseline_end_ns, restorable_from, restorable_to, from_ns, to_ns)
        of the session's devices, by dev."""
        return self._con.execute(
            "SELECT dev, baseline_end, baseline_end_ns, restorable_from, restorable_to, "
            "from_ns, to_ns FROM session_devices WHERE session = ? ORDER BY dev",
            [session]).fetchall()

    def set_device_intervals(self, session: str, dev: int, vals: list) -> None:
        """(baseline_end, baseline_end_ns, restorable_from, restorable_to, from_ns, to_ns) of
        the session's device `dev`."""
        self._con.execute("UPDATE session_devices SET baseline_end = ?, baseline_end_ns = ?, "
                         "restorable_from = ?, restorable_to = ?, from_ns = ?, to_ns = ? "
                         "WHERE session = ? AND dev = ?", [*vals, session, dev])

    def refresh_devices(self) -> None:
        """The `devices` table from session_devices: each device's description in its newest
        session (in a transaction)."""
        self._con.execute("DELETE FROM devices")
        self._con.execute("INSERT INTO devices SELECT device, arg_max(host, session), "
                         "arg_max(name, session), arg_max(path, session), "
                         "arg_max(size_bytes, session) FROM session_devices GROUP BY device")

    # ------------------------------------- pruning (replayer/prune.py; in a transaction)
    def delete_base_chunks(self, session: str, dev: int, upto: int | None = None) -> None:
        """The base chunks of (session, dev) at stamps <= upto (None: all) go."""
        if upto is None:
            self._con.execute("DELETE FROM base WHERE session = ? AND dev = ?", [session, dev])
        else:
            self._con.execute("DELETE FROM base WHERE session = ? AND dev = ? "
                             "AND coalesce(stamp, 0) <= ?", [session, dev, upto])

    def add_base_chunks(self, rows: list[tuple]) -> None:
        """(session, dev, stamp, seq, aux, time_ns, sector, bio_size, flags, pfile, prg, pidx,
        batch) rows of new base chunks."""
        if rows:
            self._con.executemany(
                "INSERT INTO base (session, dev, stamp, seq, aux, time_ns, sector, bio_size, "
                "flags, pfile, prg, pidx, batch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows)

    def delete_history(self, session: str, dev: int, upto: int | None = None) -> None:
        """The records, dirtiers, points and completions of (session, dev) up to stamp upto
        (None: all) go (a completion's aux is the stamp of its request + 1)."""
        if upto is None:
            for t in ("records", "points", "completions", "dirtiers"):
                self._con.execute(f"DELETE FROM {t} WHERE session = ? AND dev = ?",
                                 [session, dev])
            return
        p = {"s": session, "d": dev, "k": upto}
        self._con.execute("DELETE FROM records WHERE session = $s AND dev = $d AND stamp <= $k", p)
        self._con.execute("DELETE FROM dirtiers WHERE session = $s AND dev = $d AND stamp <= $k",
                         p)
        self._con.execute("DELETE FROM points WHERE session = $s AND dev = $d AND stamp <= $k", p)
        self._con.execute("DELETE FROM completions WHERE session = $s AND dev = $d "
                         "AND aux <= $k + 1", p)

    def set_pruned(self, session: str, dev: int, stamp: int, time_ns: int | None,
                   kept: list[int], batch: int | None) -> None:
        """The history of (session, dev) is folded up to `stamp` (its time time_ns), the marks
        `kept` below it kept, the layers in payload file `batch` (None: no payload)."""
        self._con.execute(
            "INSERT INTO pruned VALUES (?, ?, ?, ?, FALSE, ?, ?) ON CONFLICT (session, dev) "
            "DO UPDATE SET stamp = excluded.stamp, time_ns = excluded.time_ns, "
            "whole = FALSE, kept = excluded.kept, batch = excluded.batch",
            [session, dev, stamp, time_ns, kept, batch])

    def set_pruned_whole(self, session: str, dev: int) -> None:
        """The whole history of (session, dev) is pruned."""
        self._con.execute("INSERT INTO pruned VALUES (?, ?, NULL, NULL, TRUE, [], NULL) ON CONFLICT "
                         "(session, dev) DO UPDATE SET stamp = NULL, time_ns = NULL, whole = TRUE, "
                         "kept = [], batch = NULL", [session, dev])

    def session_device_pruning(self, session: str) -> list[tuple]:
        """(dev, pruned stamp, whole, kept) of every device of the session (NULLs: not
        pruned)."""
        return self._con.execute("SELECT sd.dev, p.stamp, p.whole, p.kept FROM session_devices sd "
                                "LEFT JOIN pruned p USING (session, dev) WHERE sd.session = ?",
                                [session]).fetchall()

    def prune_marks(self, session: str, below: int, kept: list[int]) -> None:
        """The marks of the session below `below` but those at stamps `kept` go; their names
        stay in pruned_marks (restore --at NAME says it was pruned)."""
        cond, args = "session = ? AND stamp < ? AND NOT list_contains(?, stamp)", [session,
                                                                                   below, kept]
        self._con.execute(f"INSERT INTO pruned_marks SELECT session, stamp, time_ns, name "
                         f"FROM marks WHERE {cond}", args)
        self._con.execute(f"DELETE FROM marks WHERE {cond}", args)

    def unreferenced_payload_files(self, sessions: list[str]) -> list[tuple]:
        """(id, path, file_bytes) of the payload files of these sessions (not empty) that no
        record and no base chunk refers to."""
        ref = ("SELECT pfile FROM records WHERE pfile IS NOT NULL UNION "
               "SELECT pfile FROM base WHERE pfile IS NOT NULL")
        marks = ", ".join("?" * len(sessions))
        return self._con.execute(
            f"SELECT id, path, file_bytes FROM payload_files WHERE session IN ({marks}) "
            f"AND id NOT IN ({ref})", sessions).fetchall()

    def delete_payload_files(self, ids: list[int]) -> None:
        """The payload_files rows `ids` go (the files are the caller's: Store.payload)."""
        for i in ids:
            self._con.execute("DELETE FROM payload_files WHERE id = ?", [i])


# ---------------------------------------------------------------------- helpers
def check_access(path: str, write: bool = False) -> None:
    """StoreError naming the owner when this user may not read (or write) the store."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except PermissionError:
        raise StoreError(f"{path}: permission denied (run as the store's owner or root)") from None
    want = os.R_OK | os.X_OK | (os.W_OK if write else 0)
    if os.path.isdir(path) and not os.access(path, want):
        try:
            import pwd
            owner = pwd.getpwuid(st.st_uid).pw_name
        except (KeyError, ImportError):
            owner = f"uid {st.st_uid}"
        raise StoreError(f"{path}: permission denied: the store belongs to {owner} (mode "
                         f"{st.st_mode & 0o777:04o}); run as {owner}") from None


def default_wait() -> float:
    """How long to wait for a busy store: $BLKREWIND_STORE_WAIT seconds, else 10."""
    try:
        return float(os.environ.get("BLKREWIND_STORE_WAIT", "10"))
    except ValueError:
        return 10.0


def _take_lock(path: str, wait: float) -> int:
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise StoreError(f"cannot lock the store {path}: {e.strerror}") from None
            if not said and time.monotonic() >= deadline - wait + 1.0 and \
                    time.monotonic() < deadline:  # waited 1 s already, more to go: say so
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                who = f" (pid {holder})" if holder.isdigit() else ""
                print(f"note: store {path} is being written by another process{who}; waiting "
                      f"up to {wait:g} s in all for it ($BLKREWIND_STORE_WAIT)", file=sys.stderr,
                      flush=True)
                said = True
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise UserError(f"store {path} is busy: another ingest is writing it{who}; "
                                f"try again when it is done")
            time.sleep(0.1)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _connect(meta: str, *, read_only: bool, wait: float, path: str) -> duckdb.DuckDBPyConnection:
    deadline = time.monotonic() + wait
    while True:
        try:
            return duckdb.connect(meta, read_only=read_only)
        except duckdb.IOException as e:
            msg = str(e)
            if "lock" not in msg.lower():
                raise StoreError(f"cannot open {meta}: {msg.splitlines()[0]}") from None
            if time.monotonic() >= deadline:
                raise StoreError(f"store {path} is busy: an ingest is writing it; "
                                 f"try again when it is done") from None
            time.sleep(0.1)
        except duckdb.ConnectionException as e:
            if "different configuration" in str(e):  # this process has it open already
                raise StoreError(f"store {path} is busy: this process has it open for "
                                 f"{'reading' if read_only else 'writing'}") from None
            raise StoreError(f"cannot open {meta}: {str(e).splitlines()[0]}") from None
        except duckdb.Error as e:
            raise StoreError(f"cannot open {meta}: {str(e).splitlines()[0]}") from None


def _text(v) -> str | None:
    return None if v is None else str(v)
