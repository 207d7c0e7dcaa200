"""Integrity of the stored payload: find damaged or missing Parquet files, drop what they held.

Every payload file is recorded at its commit with its size and the zlib.crc32 of its bytes
(`payload_files.file_bytes`, `crc32`; computed after writing, before the rename), and written
with Parquet page checksums, which the rebuild verifies on every read: a damaged page is an
error, never wrong bytes (replayer/rebuild.py).

`check(store, full)` -- quick: every payload file exists with its recorded size; full: also its
CRC, and its Parquet footer reads with the recorded row count. A file that fails is moved aside
to STORE/damaged/<session>/ (evidence is never deleted), then ONE transaction drops every
metadata row of its batch (records, base, marks, points, completions, loss, dirtiers, payload_files,
frame_ranges rows with that batch id): the frames of the batch read as missing -- `lacks()`
reports them, a tracer or `blkrewind ingest --log` stores them again -- and the affected
sessions are rescanned from below the smallest stamp dropped (replayer.watermark.forget_scan),
in the same transaction, so no watermark or restorable interval ever covers data that is gone.

`verify_store(store)` is the full check without dropping anything (`blkrewind verify --store`).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import duckdb
import pyarrow.parquet as pq

from blkrewind.errors import StoreError
from blkrewind.formats.ranges import merge
from blkrewind.osutil import file_crc32
from replayer import watermark
from replayer.store import Store

# held by check() and by a prune run inside the server (replayer/query.py): a file a prune
# deletes must never be taken for a missing one
MAINTENANCE = threading.Lock()

_TABLES = ("records", "base", "marks", "points", "completions", "loss", "dirtiers",
           "payload_files", "frame_ranges")


@dataclass
class Damage:
    pfile: int
    batch: int
    path: str          # relative to the store
    session: str
    segno: int
    first: int
    end: int
    why: str

    @property
    def line(self) -> str:
        return (f"{self.path}: {self.why} (frames {self.first}..{self.end - 1} of "
                f"{self.session}.{self.segno:06d}, batch {self.batch})")


def _check_file(store: Store, row: tuple, full: bool) -> Damage | None:
    pfile, rel, session, segno, first, end, rows, size, crc, batch = row
    path = store.payload_path(rel)

    def bad(why: str) -> Damage:
        return Damage(int(pfile), int(batch if batch is not None else pfile), rel, session,
                      int(segno), int(first), int(end), why)

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return bad("missing")
    except OSError as e:
        return bad(f"cannot stat: {e.strerror}")
    if st.st_size != size:
        return bad(f"{st.st_size} bytes, {size} recorded")
    if not full:
        return None
    try:
        got, _ = file_crc32(path)
    except OSError as e:
        return bad(f"unreadable: {e.strerror}")
    if crc is not None and got != crc:
        return bad(f"checksum {got:08x}, {int(crc):08x} recorded")
    try:
        n = pq.ParquetFile(path).metadata.num_rows
    except (OSError, ValueError) as e:
        return bad(f"not a readable Parquet file: {str(e).splitlines()[0]}")
    if n != rows:
        return bad(f"{n} rows, {rows} recorded")
    return None


def scan(store: Store, full: bool, *, jobs: int = 2, upto: int | None = None) -> list[Damage]:
    """The payload files that are missing or damaged (nothing is changed); upto: only those
    with an id <= upto."""
    rows = store.query("SELECT id, path, session, segno, first_frame, end_frame, rows, "
                       "file_bytes, crc32, batch FROM payload_files WHERE id <= ? ORDER BY id",
                       [(1 << 62) if upto is None else upto])
    if not rows:
        return []
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="verify") as ex:
        found = list(ex.map(lambda r: _check_file(store, r, full), rows))
    return [d for d in found if d is not None]


def verify_store(store: Store) -> list[str]:
    """The full check WITHOUT dropping anything: one line per damaged or missing file."""
    return [d.line for d in scan(store, True)]


def _move_aside(store: Store, d: Damage) -> str | None:
    """Move a damaged file to STORE/damaged/<session>/ (never over another); its new path."""
    src = store.payload_path(d.path)
    if not os.path.exists(src):
        return None
    dst_dir = os.path.join(store.damaged_dir, d.session)
    os.makedirs(dst_dir, mode=0o700, exist_ok=True)
    base = os.path.join(dst_dir, os.path.basename(src))
    dst, k = base, 1
    while os.path.exists(dst):
        dst, k = f"{base}.{k}", k + 1
    try:
        os.rename(src, dst)
        fd = os.open(dst_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise StoreError(f"cannot move the damaged payload file {src} aside: "
                         f"{e.strerror}") from None
    return dst


def drop_batches(store: Store, batches: list[int]) -> dict[str, list[dict]]:
    """Drop every metadata row of `batches` in ONE transaction, reset the scan of the sessions
    they touched below the smallest stamp dropped and recompute their watermarks and intervals.
    Returns what is lost now, per host: {host: [{"session","segno","ranges":[[a,e],...]}]}."""
    if not batches:
        return {}
    led = store.ledger
    ids = sorted(set(int(b) for b in batches))
    with store.mutex:
        con = store.con
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
        old = {}
        for s in sessions:
            old[s] = con.execute("SELECT complete_to, stamp_base FROM sessions WHERE session = ?",
                                 [s]).fetchone()
        # the ledger's view without those batches (restored if the transaction fails)
        keys = {(r[1], r[2]) for r in ranges}
        saved = led.saved(keys, sessions)
        for k in keys:
            led.ranges[k] = [x for x in led.ranges.get(k, []) if x[2] not in set(ids)]
        for s in sessions:
            led.prefix[s] = led.compute_prefix(s)
        try:
            con.execute("BEGIN")
            try:
                for t in _TABLES:
                    col = "id" if t == "payload_files" else "batch"
                    con.execute(f"DELETE FROM {t} WHERE {col} IN (SELECT batch FROM _drop)")
                hwm = con.execute("SELECT value FROM store_info WHERE key = 'batch_hwm'").fetchone()
                top = max(ids[-1], int(hwm[0]) if hwm else 0)
                con.execute("INSERT INTO store_info VALUES ('batch_hwm', ?) ON CONFLICT (key) "
                            "DO UPDATE SET value = excluded.value", [str(top)])
                for s in sessions:
                    ps, pf = led.prefix[s]
                    con.execute("UPDATE sessions SET held_segno = ?, held_frame = ? "
                                "WHERE session = ?", [ps, pf, s])
                    row = old[s]
                    if row is None:
                        continue
                    ct, base = row
                    if s in lowest and lowest[s] is not None and ct is not None \
                            and int(ct) >= int(lowest[s]):
                        ct = int(lowest[s]) - 1
                        ct = ct if base is None or ct >= int(base) else None
                    # redo the scan from ct (gap runs, resynced windows too), moved or not
                    watermark.forget_scan(con, s, None if ct is None else int(ct))
                    watermark.update_watermark(con, s)
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        except BaseException as e:
            led.restore(saved)
            if isinstance(e, duckdb.Error):
                raise StoreError(f"dropping damaged batches failed: "
                                 f"{str(e).splitlines()[0]}") from None
            raise
        finally:
            try:
                con.execute("DROP TABLE IF EXISTS _drop")
            except duckdb.Error:
                pass
        hosts = {s: h for s, h in con.execute(
            "SELECT session, host FROM sessions").fetchall() if s in sessions}
    lost: dict[str, dict] = {}
    for _b, s, n, a, end in ranges:
        lost.setdefault(hosts.get(s) or "", {}).setdefault((s, n), []).append((a, end))
    return {h: [{"session": s, "segno": n, "ranges": merge(rs)}
                for (s, n), rs in sorted(per.items())] for h, per in lost.items()}


def check(store: Store, full: bool, on_lost=None, upto: int | None = None) -> list[str]:
    """Quick (exists, size) or full (also CRC and Parquet footer) check of every payload file.
    Damaged or missing files: moved aside to STORE/damaged/, their batches dropped (one
    transaction), on_lost(host, items) called per host; returns one line per damage."""
    if not store.writable:
        raise StoreError(f"{store.path}: checking with repair needs the store open for writing")
    with MAINTENANCE:  # a prune run by the server deletes files: never at the same time
        return _check(store, full, on_lost, upto)


def _check(store: Store, full: bool, on_lost, upto: int | None) -> list[str]:
    damages = scan(store, full, upto=upto)
    if not damages:
        return []
    lines = []
    for d in damages:
        moved = _move_aside(store, d)
        lines.append(d.line + (f"; moved to {os.path.relpath(moved, store.path)}" if moved
                               else "") + "; its frames are dropped (stored again when shipped "
                                          "or ingested)")
    lost = drop_batches(store, [d.batch for d in damages])
    if on_lost is not None:
        for host, items in lost.items():
            on_lost(host, items)
    return lines
