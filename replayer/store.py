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

The rebuild reads `records`/`base` of one (session, dev) filtered by stamp;
DuckDB's zone maps make that a range scan because ingest appends in roughly
stamp order. The user-facing SQL views over these tables are in
analytics/views.py.
"""
from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import duckdb

from blkrewind.errors import StoreError, UserError
from replayer.ledger import Ledger

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


class Store:
    """An open store. Writers hold DIR/lock; readers open the database read-only.

    DuckDB connections are not safe for concurrent use: every use of `con`
    from several threads goes through `self.mutex`.
    """

    # state other modules keep with the open store (read with getattr and a default)
    _wm_devices_changed: bool    # replayer.watermark: refresh `devices` at the next finalize

    def __init__(self, path: str, con: Any, writable: bool, lock_fd: int | None):
        """con: a duckdb.DuckDBPyConnection, or replayer.query's RemoteConnection for a
        RemoteStore."""
        self.path = path
        self.con = con
        self.writable = writable
        self._lock_fd = lock_fd
        self.mutex = threading.RLock()
        self._ledger: Ledger | None = None

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
        con = self.con
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
            row = self.con.execute("SELECT value FROM store_info WHERE key = 'format'").fetchone()
        except duckdb.Error:
            raise StoreError(f"{self.path} is not a blkrewind store (no store_info)") from None
        if not row or row[0] != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format {row[0] if row else '?'} is not "
                             f"supported (this blkrewind reads format {FORMAT_VERSION}; there is "
                             f"no migration: ingest the LOGs into a new store)")

    def close(self) -> None:
        if self.con is not None:
            try:
                self.con.close()
            finally:
                self.con = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- ledger
    @property
    def ledger(self) -> Ledger:
        """The frames this writable store holds and is storing (replayer/ledger.py), made on
        first use."""
        with self.mutex:
            if self._ledger is None:
                if not self.writable:
                    raise StoreError(f"{self.path}: the frame ledger needs the store open for "
                                     f"writing")
                self._ledger = Ledger(self.mutex, self._ledger_rows)
            return self._ledger

    def _ledger_rows(self):
        con = self.con
        ranges = con.execute("SELECT batch, session, segno, first_frame, end_frame FROM "
                             "frame_ranges ORDER BY session, segno, first_frame").fetchall()
        segs = con.execute("SELECT session, segno, seg_id, host, sealed, nframes, torn_bytes, "
                           "error FROM segments").fetchall()
        sessions = con.execute("SELECT session, host, held_segno, held_frame "
                               "FROM sessions").fetchall()
        hwm = con.execute("SELECT value FROM store_info WHERE key = 'batch_hwm'").fetchone()
        top = con.execute("SELECT greatest((SELECT coalesce(max(batch), 0) FROM frame_ranges), "
                          "(SELECT coalesce(max(id), 0) FROM payload_files))").fetchone()[0]
        return ranges, segs, sessions, max(int(top), int(hwm[0]) if hwm else 0) + 1

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
        return bool(self.query_one(
            "SELECT count(*) FROM duckdb_columns() WHERE database_name = current_database() "
            "AND table_name = ? AND column_name = ?", [table, column])[0])

    def query(self, sql: str, params=None) -> list[tuple]:
        with self.mutex:
            return self.con.execute(sql, params or []).fetchall()

    def query_one(self, sql: str, params=None):
        with self.mutex:
            return self.con.execute(sql, params or []).fetchone()

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
