"""Storing LOG frames: `blkrewind ingest --log DIR` (LOG segments) and FrameSink (frames received
from tracers over the network, replayer/server.py). One code path stores both.

The package by job:

    columns.py   a batch's data frames parsed into columns (Batch, parse_frames); the rare
                 record types decoded through a table (RARE)
    payload.py   a batch's payload into its Parquet file; files no commit refers to removed
    checks.py    the rules a stored frame keeps (session host, seg_id, SEAL, HEADER, record
                 hosts), one definition each; FrameRejected, NotYourSession
    commit.py    runs of frames -> batches (prepare) -> ONE transaction (commit_batches)
    logdir.py    LOG directory ingest (ingest, delete_ingested)
    sink.py      frames from the network (FrameSink, FrameGroup)

The ledger (what the store holds, frame by frame, and what is being stored) is the store's:
replayer/ledger.py, `Store.ledger`.

What is stored is tracked frame by frame (replayer/store.py: `frame_ranges`, `segments`): a
*batch* is a run of consecutive frames of one segment that the store does not hold yet. Its data
frames are parsed into columns (vectorised: one Python step per record to walk the framing and
slice the payload, numpy for everything else), its payload is written to one Parquet file (temp
name, page checksums, file CRC recorded, fsync, rename to a name holding the batch id), and one
DuckDB transaction inserts its metadata rows -- every row tagged with the batch id -- and its
`frame_ranges` row. Frame 0 (the segment HEADER) and the SEAL are bookkeeping: the segment's
host and seg_id, and that it is sealed with N frames.

A frame is never stored twice, whatever path brings it and in whatever order: the `Ledger`
(`Store.ledger`) mirrors `frame_ranges` in memory, and a caller *reserves* the frame ranges it is about to store
(waiting while another thread stores an overlapping range), stores only the frames not held,
and releases them after the commit. The heavy parts (lz4 decoding and its checksums, numpy,
Parquet encoding, CRC, fsync) run in the callers' threads and release the GIL; only the DuckDB
commit is serialised by the store's mutex.

Afterwards `finalize` (replayer/watermark.py) recomputes the consistent watermark of every
session that received records.

LOG ingest: a torn tail (an unsealed segment whose last frame is incomplete, e.g. a tracer still
writing or killed) is a note, not an error. CorruptLog stops the segment after every good frame
before the damage is stored; the other segments are ingested; the caller exits non-zero.

Network: FrameSink.store validates everything first (frames decoded and checked, records parsed,
hosts, session binding, seg_id) and raises FrameRejected with nothing of the call stored.
"""
from blkrewind.replayer.ingest.checks import FrameRejected, NotYourSession
from blkrewind.replayer.ingest.logdir import IngestResult, SegmentResult, delete_ingested, ingest
from blkrewind.replayer.ingest.sink import FrameGroup, FrameSink

__all__ = ["FrameGroup", "FrameRejected", "FrameSink", "IngestResult", "NotYourSession",
           "SegmentResult", "delete_ingested", "ingest"]
