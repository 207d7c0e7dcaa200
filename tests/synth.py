"""Synthetic LOGs for the replayer's tests, with the device images they must restore to.

`SynthSession` plays a tracer: it writes a real LOG with tracer.log.LogWriter
(segments, lz4 frames, seals) holding the records the BPF side and the tracer
would write -- R_SESSION, R_DEVICE, baseline chunks (incl. F_ZERO ones and
re-reads after an untraced "old" write), bios split into payload pieces, discards,
write-zeroes, flushes, completions, marks, the baseline_end point, R_LOSS and
R_END -- packed into frames of random record counts, with consistent clocks.

Next to the LOG it keeps a naive model: a bytearray of the device, changed by
each bio in stamp order. `snapshot()` and `mark()` store the model's bytes at
that stamp, so a test can compare a restore byte for byte with what the
device held. Nothing in here shares code with replayer/.
"""
from __future__ import annotations

import json
import random
import secrets
from dataclasses import dataclass

from blkrewind.formats import record
from blkrewind.tracer.log import LogWriter

REAL0 = 1_764_000_000 * 10**9     # wall clock at MONO0
MONO0 = 10**12


@dataclass
class Dropped:
    stamp: int
    why: str


@dataclass
class SynthSession:
    log_dir: str
    seed: int = 0
    size: int = 4 << 20
    host: str = "synth"
    name: str = "loop7"
    path: str = "/dev/loop7"
    dev: int = record.kdev(7, 7)
    segment_bytes: int = 256 << 10
    chunk: int = 256 << 10           # baseline chunk
    piece: int = 64 << 10            # payload bytes per BIO record
    frame_records: tuple = (1, 12)   # records per frame, min..max
    stamp_base: int | None = None
    session: str | None = None
    initial: bytes | None = None     # device content when tracing starts (default: generated)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        if self.session is None:
            self.session = f"20261125T1200{self.seed % 60:02d}Z-{secrets.token_hex(4)}"
        if self.stamp_base is None:
            self.stamp_base = REAL0 + 1_000_000 * (self.seed + 1)
        if self.initial is None:
            img = bytearray(self.size)
            # half random, half zero, in 64 KiB blocks: baseline chunks of both kinds
            for off in range(0, self.size, 64 << 10):
                if self.rng.random() < 0.5:
                    img[off:off + (64 << 10)] = self.rng.randbytes(min(64 << 10, self.size - off))
            self.initial = bytes(img)
        self.image = bytearray(self.initial)
        self.next_stamp = self.stamp_base
        self.kseq = 1
        self.useq = 0
        self.mono = MONO0 + 10**9 * (self.seed + 1)
        self.pending: list[bytes] = []
        self.marks: dict[str, list[int]] = {}
        self.at_stamp: dict[int, bytes] = {}     # stamp -> expected image at that stamp
        self.at_mark: dict[str, bytes] = {}      # mark name -> expected image (newest of a name)
        self.time_of: dict[int, int] = {}        # stamp -> wall time of its record
        self.dropped: list[Dropped] = []
        self.baseline_end: int | None = None
        self.old_write: tuple[int, int] | None = None  # (offset, bytes) of the untraced write
        self.bios: list[tuple] = []              # (stamp, op, sector, nbytes)
        self.touched = bytearray(self.size // 512)  # sectors a traced bio has changed
        self.device: bytearray | None = None     # what the device really holds, when it differs
                                                 # from `image` (after a failed write)
        self.writer = LogWriter(self.log_dir, self.session, host=self.host,
                                segment_bytes=self.segment_bytes, fsync="never")
        self._user(record.json_record(record.R_SESSION, {
            "session": self.session, "host": self.host, "stamp_base": self.stamp_base,
            "seq_base": 1, "version": "synth", "boot_id": "synth", "kernel": "synth",
            "devices": [self.name]}, seq=self._useq()))
        self._user(record.json_record(record.R_DEVICE, {
            "name": self.name, "path": self.path, "dev": self.dev, "size_bytes": self.size,
            "logical_block_size": 512, "physical_block_size": 4096, "part_start": 0,
            "host": self.host, "major": self.dev >> 20, "minor": self.dev & 0xFFFFF,
            "disk": self.name}, seq=self._useq(), dev=self.dev))
        self.flush_frame()

    # ------------------------------------------------------------ plumbing
    def _useq(self) -> int:
        self.useq += 1
        return self.useq

    def _kseq(self) -> int:
        s = self.kseq
        self.kseq += 1
        return s

    def tick(self) -> int:
        self.mono += self.rng.randrange(1_000, 200_000)
        return self.mono

    @property
    def offset_ns(self) -> int:
        return REAL0 - MONO0

    def _user(self, rec: bytes) -> None:
        self.pending.append(rec)

    def _kernel(self, rec: bytes) -> None:
        self.pending.append(rec)
        lo, hi = self.frame_records
        if len(self.pending) >= self.rng.randint(lo, hi):
            self.flush_frame()

    def flush_frame(self) -> None:
        if not self.pending:
            return
        mono = self.tick()
        self.writer.append(b"".join(self.pending), len(self.pending), mono,
                           mono + self.offset_ns)
        self.pending = []

    def _stamp(self) -> tuple[int, int]:
        s = self.next_stamp
        self.next_stamp += 1
        t = self.tick()
        self.time_of[s] = t + self.offset_ns
        return s, t

    # ---------------------------------------------------------------- bios
    def write(self, offset: int, data: bytes, *, pid: int = 4242, comm: str = "synthw",
              flags: int = 0, drop_piece: int | None = None, piece: int | None = None) -> int:
        """A write bio of `data` at byte `offset` (512-aligned); pieces of `piece` bytes."""
        assert offset % 512 == 0 and len(data) % 512 == 0 and data
        stamp, kt = self._stamp()
        piece = piece or self.piece
        n = len(data)
        pos = 0
        while pos < n:
            ln = min(piece, n - pos)
            fl = flags | (record.F_FIRST if pos == 0 else 0) | (record.F_LAST if pos + ln == n else 0)
            rec = record.make_record(data[pos:pos + ln], rtype=record.R_BIO, stamp=stamp,
                                     seq=self._kseq(), ktime_ns=kt, sector=offset // 512,
                                     dev=self.dev, bio_size=n, offset=pos, flags=fl,
                                     op=record.OP_WRITE, tgid=pid, tid=pid + 1,
                                     comm=comm.encode()[:15], cgroup_id=77, opf=1)
            if drop_piece is not None and pos // piece == drop_piece:
                self.dropped.append(Dropped(stamp, f"piece {drop_piece} lost"))
            else:
                self._kernel(rec)
            pos += ln
        self.image[offset:offset + n] = data
        if self.device is not None:
            self.device[offset:offset + n] = data
        self.touched[offset // 512:(offset + n) // 512] = b"\1" * (n // 512)
        self.bios.append((stamp, record.OP_WRITE, offset // 512, n))
        return stamp

    def dirtier(self, stamp: int, *, pid: int, comm: str, cgroup_id: int = 88) -> None:
        """An R_DIRTY for the bio `stamp` (the kernel's goes just before the bio's records):
        process pid (thread pid + 1) dirtied its first page."""
        self._kernel(record.make_record(b"", rtype=record.R_DIRTY, stamp=stamp,
                                        seq=self._kseq(), ktime_ns=self.tick(), dev=self.dev,
                                        flags=record.F_NODATA, op=record.OP_WRITE, tgid=pid,
                                        tid=pid + 1, comm=comm.encode()[:15],
                                        cgroup_id=cgroup_id, aux=7))

    def random_write(self, **kw) -> int:
        n = 512 * self.rng.choice([1, 3, 7, 8, 16, 100, 128, 129, 256, 1024, 2048])
        n = min(n, self.size)
        off = 512 * self.rng.randrange(0, (self.size - n) // 512 + 1)
        return self.write(off, self.rng.randbytes(n), **kw)

    def nodata(self, op: int, offset: int = 0, n: int = 0, *, flags: int = 0,
               lose: bool = False) -> int:
        """A bio without payload: flush, discard, secure erase, write-zeroes."""
        stamp, kt = self._stamp()
        rec = record.make_record(b"", rtype=record.R_BIO, stamp=stamp, seq=self._kseq(),
                                 ktime_ns=kt, sector=offset // 512, dev=self.dev, bio_size=n,
                                 flags=flags | record.F_FIRST | record.F_LAST | record.F_NODATA,
                                 op=op, tgid=99, tid=99, comm=b"kworker/u8:1")
        if lose:
            self.dropped.append(Dropped(stamp, "record lost"))
        else:
            self._kernel(rec)
        if op in record.ZEROING_OPS:
            self.image[offset:offset + n] = bytes(n)
            if self.device is not None:
                self.device[offset:offset + n] = bytes(n)
            self.touched[offset // 512:(offset + n) // 512] = b"\1" * (n // 512)
        self.bios.append((stamp, op, offset // 512, n))
        return stamp

    def discard(self, offset: int, n: int) -> int:
        return self.nodata(record.OP_DISCARD, offset, n)

    def write_zeroes(self, offset: int, n: int) -> int:
        return self.nodata(record.OP_WRITE_ZEROES, offset, n)

    def flush(self) -> int:
        return self.nodata(record.OP_FLUSH, flags=record.F_PREFLUSH)

    def complete(self, stamps: list[int], *, old: bool = False, error: int = 0) -> None:
        """An R_COMPLETE for some bios (not stamped, like the kernel's); `error` is the
        blk_status_t (0 = success)."""
        payload = b"".join(int(s).to_bytes(8, "little") for s in stamps[:record.MAX_COMPLETE_BIOS])
        self._kernel(record.make_record(payload, rtype=record.R_COMPLETE, seq=self._kseq(),
                                        ktime_ns=self.tick(), dev=self.dev, aux=self.next_stamp,
                                        flags=record.F_OLD if old else 0, bio_size=4096,
                                        error=error))

    # ------------------------------------------------- failures and resyncs
    def failed_write(self, offset: int, data: bytes, *, error: int = 10, **kw) -> int:
        """A write whose completion carries an error: captured as usual (a restore before
        the resync shows its data), but the device kept what it held before."""
        if self.device is None:
            self.device = bytearray(self.image)
        keep = bytes(self.device[offset:offset + len(data)])
        stamp = self.write(offset, data, **kw)
        self.device[offset:offset + len(data)] = keep
        self.complete([stamp], error=error)
        return stamp

    def checkpoint(self) -> int:
        """The tracer's checkpoint: the stamp counter's value (nothing stamped)."""
        return self.next_stamp

    def resync(self, since: int, cause: str = "ring full", *, region: int = 64 << 10,
               between=None) -> tuple[int, int]:
        """What the tracer does after a loss: a stamped resync_start point (Rs), the
        regions written by a bio with stamp >= `since` read from the device as R_BASE
        chunks with stamp = Rs, then resync_end (Re). `between(self)` runs after the
        start point (writes during the resync land after Rs, on top of the chunks: the
        chunks hold the device as of Rs). From Re on the model is what the device holds."""
        dirty: set[int] = set()
        for stamp, op, sector, n in self.bios:
            if stamp >= since and (op == record.OP_WRITE or op in record.ZEROING_OPS) and n:
                dirty.update(range(sector * 512 // region, (sector * 512 + n - 1) // region + 1))
        regions = sorted(dirty)
        stamp, kt = self._stamp()
        rs = stamp
        self._kernel(record.json_record(record.R_POINT, {
            "what": "resync_start", "dev": self.dev, "since": since, "cause": cause,
            "region_bytes": region, "regions": len(regions), "bytes": len(regions) * region},
            stamp=rs, seq=self._kseq(), ktime_ns=kt))
        truth = bytes(self.device if self.device is not None else self.image)
        chunks = []
        for r in regions:
            off = r * region
            n = min(region, self.size - off)
            chunks.append((off, truth[off:off + n]))
        if between is not None:
            between(self)
        for off, data in chunks:
            seq = self._useq()
            if data == bytes(len(data)):
                rec = record.make_record(b"", rtype=record.R_BASE, stamp=rs, seq=seq,
                                         dev=self.dev, sector=off // 512, bio_size=len(data),
                                         aux=seq, flags=record.F_ZERO, ktime_ns=self.tick())
            else:
                rec = record.make_record(data, rtype=record.R_BASE, stamp=rs, seq=seq,
                                         dev=self.dev, sector=off // 512, bio_size=len(data),
                                         aux=seq, ktime_ns=self.tick())
            self._user(rec)
        stamp, kt = self._stamp()
        self._kernel(record.json_record(record.R_POINT, {
            "what": "resync_end", "dev": self.dev, "start": rs}, stamp=stamp, seq=self._kseq(),
            ktime_ns=kt))
        if self.device is not None:
            self.image[:] = self.device
            self.device = None
        self.at_stamp[stamp] = bytes(self.image)
        return rs, stamp

    # ------------------------------------------------------------- points
    def mark(self, name: str) -> int:
        stamp, kt = self._stamp()
        self._kernel(record.make_record(name.encode(), rtype=record.R_MARK, stamp=stamp,
                                        seq=self._kseq(), ktime_ns=kt, tgid=555, tid=555,
                                        comm=b"blkrewind"))
        self.marks.setdefault(name, []).append(stamp)
        self.at_mark[name] = bytes(self.image)
        self.at_stamp[stamp] = self.at_mark[name]
        return stamp

    def snapshot(self) -> int:
        """Remember the model at the last stamp taken; returns that stamp."""
        s = self.next_stamp - 1
        self.at_stamp[s] = bytes(self.image)
        return s

    def baseline(self, *, writes_during: int = 6, old_write: bool = True) -> int:
        """Baseline chunks of the device (writes go on meanwhile), a re-read after an
        untraced old write, then the stamped baseline_end point."""
        nchunks = (self.size + self.chunk - 1) // self.chunk
        order = list(range(nchunks))
        during = set(self.rng.sample(order, min(writes_during, nchunks)))
        stale = self.rng.randrange(nchunks) if old_write else None
        for i in order:
            if i in during:
                self.random_write()
            self._read_chunk(i)
            if i == stale:
                # a write queued before capture began completes now: the chunk just read
                # is stale; its completion (F_OLD) makes the tracer read it again later.
                # (It lands where no traced bio went: which of two racing overlapping
                # writes wins is not something a trace can know.)
                off = i * self.chunk
                n = min(self.chunk, self.size - off)
                free = [k for k in range(off // 512, (off + n) // 512) if not self.touched[k]]
                if free:
                    a = self.rng.choice(free)
                    e = a
                    while e < (off + n) // 512 and not self.touched[e]:
                        e += 1
                    self.image[a * 512:e * 512] = self.rng.randbytes((e - a) * 512)
                    self.old_write = (a * 512, (e - a) * 512)
                self.complete([0], old=True)
        if stale is not None:
            self._read_chunk(stale)
        stamp, kt = self._stamp()
        self._kernel(record.make_record(
            json.dumps({"what": "baseline_end", "dev": self.dev}).encode(), rtype=record.R_POINT,
            stamp=stamp, seq=self._kseq(), ktime_ns=kt, comm=b"blkrewind"))
        self.baseline_end = stamp
        self.at_stamp[stamp] = bytes(self.image)
        return stamp

    def _read_chunk(self, i: int) -> None:
        off = i * self.chunk
        n = min(self.chunk, self.size - off)
        data = bytes(self.image[off:off + n])
        seq = self._useq()
        kt = self.tick()
        if data == bytes(n):
            rec = record.make_record(b"", rtype=record.R_BASE, seq=seq, dev=self.dev,
                                     sector=off // 512, bio_size=n, aux=seq, flags=record.F_ZERO,
                                     ktime_ns=kt)
        else:
            rec = record.make_record(data, rtype=record.R_BASE, seq=seq, dev=self.dev,
                                     sector=off // 512, bio_size=n, aux=seq, ktime_ns=kt)
        self._user(rec)
        if self.rng.random() < 0.5:
            self.flush_frame()

    # ---------------------------------------------------------------- end
    def end(self, *, clean: bool = True, drops: int = 0) -> None:
        """R_LOSS and R_END, then seal the LOG (clean=False: no R_END, as after a crash)."""
        self.flush_frame()
        counters = {"drops": drops, "drop_bytes": 0, "read_errs": 0, "truncs": 0,
                    "stamp": self.next_stamp, "seq": self.kseq}
        self._user(record.json_record(record.R_LOSS, counters, seq=self._useq()))
        if clean:
            self._user(record.json_record(record.R_END, {"end_stamp": self.next_stamp,
                                                         "end_seq": self.kseq, "clean": True},
                                          seq=self._useq()))
        self.flush_frame()
        self.writer.close()

    @property
    def last_stamp(self) -> int:
        return self.next_stamp - 1

    def workload(self, nbios: int, *, marks: int = 3, snapshots: int = 4) -> None:
        """A mix: writes of random sizes (sub-4K, unaligned to 4K, overlapping, >1 MiB split
        in pieces), discards, write-zeroes, flushes, completions, marks and snapshots."""
        mark_at = set(self.rng.sample(range(nbios), min(marks, nbios)))
        snap_at = set(self.rng.sample(range(nbios), min(snapshots, nbios)))
        recent: list[int] = []
        for k in range(nbios):
            r = self.rng.random()
            if r < 0.75:
                recent.append(self.random_write())
            elif r < 0.82:
                n = 512 * self.rng.randrange(1, 4096)
                n = min(n, self.size)
                self.discard(512 * self.rng.randrange(0, (self.size - n) // 512 + 1), n)
            elif r < 0.88:
                n = min(512 * self.rng.randrange(1, 512), self.size)
                self.write_zeroes(512 * self.rng.randrange(0, (self.size - n) // 512 + 1), n)
            elif r < 0.95:
                self.flush()
            else:
                self.complete(recent[-16:])
                recent = []
            if k in mark_at:
                self.mark(f"m{len(self.marks) + 1}")
            if k in snap_at:
                self.snapshot()


def history(log_dir, seed: int = 1, *, pre: int = 8, nbios: int = 150, marks: int = 3,
            snapshots: int = 4, end: bool = True, **kw) -> SynthSession:
    """A whole session: some writes, the baseline (with writes meanwhile), a workload
    with marks and snapshots, the end."""
    s = SynthSession(str(log_dir), seed=seed, **kw)
    s.workload(pre, marks=0, snapshots=0)
    s.baseline()
    s.workload(nbios, marks=marks, snapshots=snapshots)
    if end:
        s.end()
    return s


def cli_main(capsys, *args) -> tuple[int, str, str]:
    """Run `blkrewind ARGS` in this process (blkrewind.cli.main): (exit code, stdout, stderr)."""
    from blkrewind.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def restored(capsys, store, at, tmp_path, device="loop7") -> bytes:
    """The bytes of DEVICE restored at AT (through the CLI, into a scratch image)."""
    out = tmp_path / "restored.img"
    rc, _, err = cli_main(capsys, "restore", "--store", store, "--device", device, "--at", at,
                          "--to", out, "--force")
    assert rc == 0, err
    data = out.read_bytes()
    assert len(data) == out.stat().st_size
    out.unlink()
    return data
