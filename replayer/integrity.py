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
sessions are rescanned from below the smallest stamp dropped (Store.reset_scan),
in the same transaction, so no watermark or restorable interval ever covers data that is gone.

`verify_store(store)` is the full check without dropping anything (`blkrewind verify --store`).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from blkrewind.errors import StoreError
from blkrewind.formats.ranges import merge
from blkrewind.replayer import watermark
from blkrewind.replayer.store import Store

# held by check() and by a prune run inside the server (replayer/query.py): a file a prune
# deletes must never be taken for a missing one
MAINTENANCE = threading.Lock()

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

    def bad(why: str) -> Damage:
        return Damage(int(pfile), int(batch if batch is not None else pfile), rel, session,
                      int(segno), int(first), int(end), why)

    try:
        got_size = store.payload.stat(rel)
    except OSError as e:
        return bad(f"cannot stat: {e.strerror}")
    if got_size is None:
        return bad("missing")
    if got_size != size:
        return bad(f"{got_size} bytes, {size} recorded")
    if not full:
        return None
    try:
        got, _ = store.payload.checksum(rel)
    except OSError as e:
        return bad(f"unreadable: {e.strerror}")
    if crc is not None and got != crc:
        return bad(f"checksum {got:08x}, {int(crc):08x} recorded")
    try:
        n = store.payload.open(rel).metadata.num_rows
    except (OSError, ValueError) as e:
        return bad(f"not a readable Parquet file: {str(e).splitlines()[0]}")
    if n != rows:
        return bad(f"{n} rows, {rows} recorded")
    return None


def scan(store: Store, full: bool, *, jobs: int = 2, upto: int | None = None) -> list[Damage]:
    """The payload files that are missing or damaged (nothing is changed); upto: only those
    with an id <= upto."""
    rows = store.payload_files_upto(upto)
    if not rows:
        return []
    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="verify") as ex:
        found = list(ex.map(lambda r: _check_file(store, r, full), rows))
    return [d for d in found if d is not None]


def verify_store(store: Store) -> list[str]:
    """The full check WITHOUT dropping anything: one line per damaged or missing file."""
    return [d.line for d in scan(store, True)]


def drop_batches(store: Store, batches: list[int]) -> dict[str, list[dict]]:
    """Drop every metadata row of `batches` in ONE transaction, reset the scan of the sessions
    they touched below the smallest stamp dropped and recompute their watermarks and intervals.
    Returns what is lost now, per host: {host: [{"session","segno","ranges":[[a,e],...]}]}."""
    if not batches:
        return {}
    led = store.ledger
    ids = sorted(set(int(b) for b in batches))
    with store.locked():
        try:
            ranges, lowest, old = store.batches_to_drop(ids)
            sessions = sorted(old)
            # the ledger's view without those batches (restored if the transaction fails)
            keys = {(r[1], r[2]) for r in ranges}
            saved = led.saved(keys, sessions)
            for k in keys:
                led.ranges[k] = [x for x in led.ranges.get(k, []) if x[2] not in set(ids)]
            for s in sessions:
                led.prefix[s] = led.compute_prefix(s)
            with store.transaction(undo=lambda: led.restore(saved),
                                   failed="dropping damaged batches failed: {}"):
                store.drop_batch_rows()
                store.raise_batch_hwm(ids[-1])
                for s in sessions:
                    store.set_session_held(s, led.prefix[s])
                    row = old[s]
                    if row is None:
                        continue
                    ct, base = row
                    if s in lowest and lowest[s] is not None and ct is not None \
                            and int(ct) >= int(lowest[s]):
                        ct = int(lowest[s]) - 1
                        ct = ct if base is None or ct >= int(base) else None
                    # redo the scan from ct (gap runs, resynced windows too), moved or not
                    store.reset_scan(s, None if ct is None else int(ct))
                    watermark.update_watermark(store, s)
        finally:
            store.forget_batches_to_drop()
        hosts = {s: h for s, h in store.session_hosts().items() if s in sessions}
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
        moved = store.payload.quarantine(d.path, d.session)
        lines.append(d.line + (f"; moved to {os.path.relpath(moved, store.path)}" if moved
                               else "") + "; its frames are dropped (stored again when shipped "
                                          "or ingested)")
    lost = drop_batches(store, [d.batch for d in damages])
    if on_lost is not None:
        for host, items in lost.items():
            on_lost(host, items)
    return lines
