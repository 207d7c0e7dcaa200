"""The durable local LOG (tracer/log.py), on real files: round trips with rotation, sealing,
torn tails at every byte, corruption anywhere, bounded allocation, the directory lock, fsync
policies, a full disk, last_stamp, and a property test."""
import errno
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import lz4.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkrewind.errors import CorruptLog, UserError
from blkrewind.formats import logframe
from blkrewind.formats import record as R
from blkrewind.tracer import log as L

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------- helpers
def rec(payload=b"", **f):
    f.setdefault("rtype", R.R_BIO)
    return R.make_record(payload, **f)


def make_span(rng: random.Random, nrec: int, max_payload: int = 3000, stamp0: int = 1):
    recs = []
    for i in range(nrec):
        n = rng.randrange(max_payload + 1)
        payload = rng.randbytes(n) if rng.random() < 0.5 else bytes([i & 0xFF]) * n
        recs.append(rec(payload, stamp=stamp0 + i, seq=stamp0 + i, sector=rng.randrange(1 << 30),
                        bio_size=n, op=R.OP_WRITE, comm=b"dd"))
    return b"".join(recs)


def write_spans(log_dir, spans, session="s1", close=True, **kw):
    """Append each span; returns [(span, nrec, mono, real)] as written."""
    kw.setdefault("host", "h1")
    w = L.LogWriter(str(log_dir), session, **kw)
    out = []
    for i, span in enumerate(spans):
        nrec = sum(1 for _ in R.iter_framed(span))
        w.append(span, nrec, 1000 + i, 2000 + i)
        out.append((span, nrec, 1000 + i, 2000 + i))
    if close:
        w.close()
    return out, w


def read_all(log_dir, session=None):
    frames = []
    for s in logframe.list_segments(log_dir):
        if session is None or s.session == session:
            with logframe.SegmentReader(s.path) as r:
                frames += list(r.frames())
    return frames


def read_until_error(path):
    """(frames yielded, exception or None, reader)."""
    got = []
    with logframe.SegmentReader(path) as r:
        try:
            for f in r.frames():
                got.append(f)
        except CorruptLog as e:
            return got, e, r
    return got, None, r


def offsets(path):
    with logframe.SegmentReader(path) as r:
        return [(off, off + logframe.FRAME_SIZE + h.stored_len) for off, h in r.index()]


def unseal(path):
    """Remove the SEAL frame: what a crash right after the last append leaves."""
    with logframe.SegmentReader(path) as r:
        assert r.sealed
    os.truncate(path, os.path.getsize(path) - logframe.FRAME_SIZE)


def one_segment(tmp_path, nspans=6, seed=1, **kw):
    rng = random.Random(seed)
    spans = [make_span(rng, rng.randrange(1, 4), 600, stamp0=100 * i + 1) for i in range(nspans)]
    written, w = write_spans(tmp_path / "log", spans, **kw)
    (seg,) = logframe.list_segments(tmp_path / "log")
    return Path(seg.path), written


def fresh_copy(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True)
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    return dst


# ------------------------------------------------------------------------------ round trips
def test_round_trip_many_frames_with_rotation(tmp_path):
    rng = random.Random(7)
    spans = [make_span(rng, rng.randrange(1, 12), stamp0=1000 * i + 1) for i in range(300)]
    spans.append(b"".join(rec(bytes(R.MAX_PIECE), stamp=10**6 + i) for i in range(4)))  # big
    d = tmp_path / "log"
    written, w = write_spans(d, spans, segment_bytes=64 << 10)
    segs = logframe.list_segments(d)
    assert [s.segno for s in segs] == list(range(len(segs))) and len(segs) > 5
    assert w.frames == len(spans) and w.segno == segs[-1].segno
    assert w.bytes_written == sum(s.size for s in segs)
    frames = []
    for s in segs:
        with logframe.SegmentReader(s.path) as r:
            assert (r.session, r.segno, r.host, r.sealed) == ("s1", s.segno, "h1", True)
            fs = list(r.frames())
            assert [f.frame_no for f in fs] == list(range(1, len(fs) + 1)) and fs
            assert r.torn_bytes == 0 and r.records == sum(f.nrec for f in fs)
            assert s.size <= 64 << 10 or len(fs) == 1  # only a lone big frame outgrows it
            frames += fs
    assert [(f.data, f.nrec, f.mono_ns, f.real_ns) for f in frames] == written
    assert all(f.session == "s1" and f.offset >= logframe.FRAME_SIZE for f in frames)
    got = [(h, bytes(p)) for f in frames for h, p in R.iter_records(f.data)]
    want = [(h, bytes(p)) for span in spans for h, p in R.iter_records(span)]
    assert got == want


def _as_written_before_body_crcs(path: Path) -> None:
    """Rewrite a segment as blkrewind wrote it before FL_BODY_CRC: every frame's flags 0 and
    its body one lz4 frame with lz4's content checksum."""
    import struct
    import zlib
    data = path.read_bytes()
    out, pos = bytearray(), 0
    while pos < len(data):
        f = list(logframe._HEAD.unpack_from(data, pos))
        n = f[-1]
        body = data[pos + logframe.FRAME_SIZE: pos + logframe.FRAME_SIZE + n]
        if n:
            body = lz4.frame.compress(lz4.frame.decompress(body[:-4]), content_checksum=True)
        f[3], f[-1] = 0, len(body)
        h = logframe._HEAD.pack(*f)
        out += h + struct.pack("<I", zlib.crc32(h)) + body
        pos += logframe.FRAME_SIZE + n
    path.write_bytes(bytes(out))


def test_a_log_written_before_body_crcs_reads_the_same(tmp_path):
    """Frames with lz4's content checksum and no body CRC (flags 0) still read, a flipped
    byte in one of their bodies is still found, and such frames pass decode_raw_frame."""
    path, written = one_segment(tmp_path)
    _as_written_before_body_crcs(path)
    frames = read_all(tmp_path / "log")
    assert [f.data for f in frames] == [w[0] for w in written]
    with logframe.SegmentReader(path) as r:
        assert r.sealed
        for _, off, size in r.frame_spans():
            h, f = logframe.decode_raw_frame(r.read_raw(off, size), seg_id=r.seg_id, frame_no=None)
            assert h.flags == 0
    (a, b), = offsets(path)[1:2]
    data = bytearray(path.read_bytes())
    data[b - 10] ^= 0x20
    path.write_bytes(bytes(data))
    got, err, _ = read_until_error(path)
    assert len(got) == 1 and err is not None, (len(got), err)


def test_frames_from_start_frame_and_live_reading(tmp_path):
    rng = random.Random(3)
    spans = [make_span(rng, 2, stamp0=10 * i + 1) for i in range(10)]
    written, w = write_spans(tmp_path, spans, close=False, fsync="never")
    with logframe.SegmentReader(w.current_path) as r:  # the tracer is still writing it
        assert not r.sealed
        assert [f.data for f in r.frames()] == spans and r.torn_bytes == 0
        assert [f.frame_no for f in r.frames(start_frame=8)] == [8, 9, 10]
    w.close()
    with pytest.raises(ValueError):
        w.append(spans[0], 2, 0, 0)


def test_compressible_payload_is_compressed(tmp_path):
    span = b"".join(rec(bytes(60000), stamp=i + 1) for i in range(16))
    _, w = write_spans(tmp_path, [span])
    assert w.bytes_written < len(span) // 20
    assert read_all(tmp_path)[0].data == span


def test_new_writer_continues_the_session_and_new_sessions_sort(tmp_path):
    rng = random.Random(4)
    write_spans(tmp_path, [make_span(rng, 1)], session="20240101T000000Z-aaaa")
    write_spans(tmp_path, [make_span(rng, 1)], session="20240101T000000Z-aaaa")
    write_spans(tmp_path, [make_span(rng, 1)], session="20230101T000000Z-bbbb")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".20240101T000000Z-aaaa.000009.brlog.tmp").write_bytes(b"")
    got = [(s.session, s.segno) for s in logframe.list_segments(tmp_path)]
    assert got == [("20230101T000000Z-bbbb", 0), ("20240101T000000Z-aaaa", 0),
                   ("20240101T000000Z-aaaa", 1)]
    with pytest.raises(UserError, match="no LOG directory"):
        logframe.list_segments(tmp_path / "nope")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        L.LogWriter(tmp_path, "s1", host="h", fsync="sometimes")
    with pytest.raises(ValueError):
        L.LogWriter(tmp_path, "../evil", host="h")


# -------------------------------------------------------------------------------- torn tails
def test_unsealed_segment_reads_whole_and_repair_seals_it(tmp_path):
    path, written = one_segment(tmp_path)
    unseal(path)
    with logframe.SegmentReader(path) as r:
        assert not r.sealed
        assert [f.data for f in r.frames()] == [w[0] for w in written] and r.torn_bytes == 0
    msgs = L.repair(path.parent)
    assert msgs == [f"sealed {path} (6 frames, {sum(w[1] for w in written)} records)"]
    with logframe.SegmentReader(path) as r:
        assert r.sealed and len(list(r.frames())) == 6
    assert L.repair(path.parent) == []


def test_torn_tail_at_every_byte_of_the_last_frame(tmp_path):
    path, written = one_segment(tmp_path, nspans=5)
    unseal(path)
    start, end = offsets(path)[-1]
    want = [w[0] for w in written[:-1]]
    for cut in range(start, end):
        d = tmp_path / f"cut{cut}"
        p = fresh_copy(path, d)
        os.truncate(p, cut)
        got, err, r = read_until_error(p)
        assert err is None and [f.data for f in got] == want, cut
        assert r.torn_bytes == cut - start and not r.sealed
        msgs = L.repair(d)
        if cut > start:
            assert msgs[0] == f"cut torn tail of {p}: {cut - start} bytes after frame 4"
        assert msgs[-1].startswith(f"sealed {p} (4 frames")
        assert os.path.getsize(p) == start + logframe.FRAME_SIZE
        # a new tracer continues in the same directory
        more = [rec(b"more", stamp=999)]
        write_spans(d, more, session="s1")
        write_spans(d, more, session="s2")
        assert [f.data for f in read_all(d, "s1")] == want + more
        assert [f.data for f in read_all(d, "s2")] == more


def test_torn_seal_frame_is_cut_and_resealed(tmp_path):
    path, written = one_segment(tmp_path, nspans=3)
    size = os.path.getsize(path)
    for cut in range(size - logframe.FRAME_SIZE + 1, size):
        p = fresh_copy(path, tmp_path / f"c{cut}")
        os.truncate(p, cut)
        got, err, r = read_until_error(p)
        assert err is None and len(got) == 3 and r.torn_bytes == cut - (size - logframe.FRAME_SIZE)
        L.repair(p.parent)
        assert p.read_bytes()[:size - logframe.FRAME_SIZE] == path.read_bytes()[:size - logframe.FRAME_SIZE]
        with logframe.SegmentReader(p) as r2:
            assert r2.sealed and len(list(r2.frames())) == 3


def test_zeroes_after_the_last_frame_are_a_zero_padded_or_torn_tail(tmp_path):
    """A crash can leave the file longer than what reached the disk, the rest zeroes. Zeroes
    where the next frame header would be are a zero-padded tail (pad_bytes: what a
    preallocated segment holds after its last frame); zeroes inside a frame a torn one."""
    path, written = one_segment(tmp_path)
    unseal(path)
    good = os.path.getsize(path)
    start, _ = offsets(path)[-1]
    with open(path, "r+b") as f:
        f.seek(good)
        f.write(bytes(5000))
    got, err, r = read_until_error(path)
    assert err is None and len(got) == 6 and r.torn_bytes == 0 and r.pad_bytes == 5000
    with open(path, "r+b") as f:  # ... or inside the last frame's body, then more zeroes
        f.seek(start + logframe.FRAME_SIZE + 3)
        f.write(bytes(good - start))
    got, err, r = read_until_error(path)
    assert err is None and len(got) == 5 and r.torn_bytes == good + 5000 - start
    assert L.repair(path.parent)[0] == f"cut torn tail of {path}: {good + 5000 - start} " \
                                       f"bytes after frame 5"
    assert os.path.getsize(path) == start + logframe.FRAME_SIZE


def test_repair_removes_unfinished_segment_files(tmp_path):
    path, _ = one_segment(tmp_path)
    tmp = path.parent / ".s1.000001.brlog.tmp"
    tmp.write_bytes(b"partial header")
    assert L.repair(path.parent) == ["removed unfinished segment file .s1.000001.brlog.tmp "
                                     "(it held no records)"]
    assert not tmp.exists()


# ------------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("sealed", [True, False])
def test_flipped_byte_anywhere_in_an_early_frame_is_corruption(tmp_path, sealed):
    path, written = one_segment(tmp_path, nspans=6)
    if not sealed:
        unseal(path)
    start, end = offsets(path)[1]  # frame 2
    orig = path.read_bytes()
    benign = []
    for pos in range(start, end):
        data = bytearray(orig)
        data[pos] ^= 0x5A
        path.write_bytes(data)
        got, err, r = read_until_error(path)
        if err is None:
            # lz4 checks the content, not its encoding: a flipped match offset that copies
            # equal bytes decodes to the very same span. Never wrong data, though.
            assert [f.data for f in got] == [w[0] for w in written], pos
            benign.append(pos)
            continue
        assert [f.data for f in got] == [written[0][0]], pos  # the good frame before it
        assert str(err).startswith(f"{path}: corrupt frame 2 at offset {start}: "), (pos, err)
    lz4_header_end = start + logframe.FRAME_SIZE + 15
    assert all(p >= lz4_header_end for p in benign) and len(benign) < (end - start) // 50
    path.write_bytes(orig)


def test_spans_in_the_fast_band_that_fast_level_hardly_shrinks_are_stored_as_is():
    """A sample in the FAST_LEVEL band (0.90-0.93 at the default level) that FAST_LEVEL cannot
    shrink below SAMPLE_RAW is stored as is (fio's 4 KiB writes: lz4 at FAST_LEVEL saved 1-2 %
    of such spans for a whole pass of lz4); the body is the span and its CRC."""
    rng = random.Random(9)
    raw = logframe.FL_BODY_CRC | logframe.FL_RAW
    # the band: random 4 KiB payload and records with short repeats between (fio's writes and
    # their completions): 0.90-0.93 at the default level, which FAST_LEVEL hardly shrinks
    fio = b"".join(rec(rng.randbytes(4096), stamp=2 * i + 1, seq=2 * i + 1) +
                   rec(b"".join(rng.randbytes(6) + b"\0blk\0rwd\0" for _ in range(128)),
                       stamp=2 * i + 2, seq=2 * i + 2) for i in range(256))
    n = max(logframe.SAMPLE_FLOOR, min(logframe.SAMPLE, len(fio) // 16))
    sample = memoryview(fio)[min((len(fio) // 2) & ~4095, len(fio) - n):][:n]
    kept = len(logframe._compress(sample, logframe.DEFAULT_LEVEL)) / n
    fast = len(logframe._compress(sample, logframe.FAST_LEVEL)) / n
    assert logframe.SAMPLE_KEEPS < kept <= logframe.SAMPLE_RAW < fast, (kept, fast)
    body = logframe.encode_span(fio)
    assert body.flags == raw and bytes(body.data) == fio
    assert logframe.crc32(fio) == int.from_bytes(body.crc, "little")


def test_spans_that_do_not_compress_are_stored_as_is(tmp_path):
    """A span whose sample lz4 cannot shrink (random payload) is written raw (FL_RAW: the span
    itself and its CRC); file-system-like payload stays lz4. Both read back the same, raw
    frames pass decode_raw_frame, and every flipped byte of a raw frame is corruption."""
    rng = random.Random(7)
    noise = b"".join(rec(rng.randbytes(64 << 10), stamp=i + 1, seq=i + 1) for i in range(24))
    text = b"".join(rec(b"blkrewind " * 6000, stamp=100 + i, seq=100 + i) for i in range(24))
    assert logframe.encode_span(noise).flags == logframe.FL_BODY_CRC | logframe.FL_RAW
    assert logframe.encode_span(text).flags == logframe.FL_BODY_CRC
    assert logframe.encode_span(noise, adaptive=False).flags == logframe.FL_BODY_CRC  # always lz4
    written, _ = write_spans(tmp_path / "log", [noise, text])
    (seg,) = logframe.list_segments(tmp_path / "log")
    path = Path(seg.path)
    assert [f.data for f in read_all(tmp_path / "log")] == [noise, text]
    with logframe.SegmentReader(path) as r:
        heads = [h for _, h in r.index()]
        for _, off, size in r.frame_spans():
            logframe.decode_raw_frame(r.read_raw(off, size), seg_id=r.seg_id, frame_no=None)
    assert heads[0].flags == logframe.FL_BODY_CRC | logframe.FL_RAW and heads[0].stored_len == len(noise) + 4
    assert heads[1].flags == logframe.FL_BODY_CRC and heads[1].stored_len < len(text) // 10
    start, end = offsets(path)[0]
    orig = path.read_bytes()
    for pos in list(range(start, start + logframe.FRAME_SIZE + 64)) + rng.sample(range(start, end), 300):
        data = bytearray(orig)
        data[pos] ^= 0x10
        path.write_bytes(data)
        got, err, _ = read_until_error(path)
        assert got == [] and f"corrupt frame 1 at offset {start}" in str(err), pos
    path.write_bytes(orig)


def test_a_raw_frame_whose_lengths_disagree_is_corrupt(tmp_path):
    """FL_RAW promises stored_len == raw_len + 4 and needs FL_BODY_CRC: a frame breaking
    either is refused by its header alone (even with a valid header CRC)."""
    span = rec(b"x" * 100, stamp=1)
    crc = struct.pack("<I", zlib.crc32(span))
    for raw_len, flags in ((len(span) + 1, logframe.FL_BODY_CRC | logframe.FL_RAW), (len(span), logframe.FL_RAW)):
        frame = logframe.pack_header(logframe.K_DATA, 1, 1, 0, 0, 1, raw_len, len(span) + 4, flags) + span + crc
        with pytest.raises(CorruptLog, match="raw body|flags"):
            logframe.decode_raw_frame(frame, seg_id=1, frame_no=1)
    ok = logframe.pack_header(logframe.K_DATA, 1, 1, 0, 0, 1, len(span), len(span) + 4,
                 logframe.FL_BODY_CRC | logframe.FL_RAW) + span + crc
    decoded = logframe.decode_raw_frame(ok, seg_id=1, frame_no=1)[1]
    assert decoded is not None and decoded.data == span


def test_flipped_byte_in_the_last_frame(tmp_path):
    path, written = one_segment(tmp_path, nspans=4)
    start, end = offsets(path)[-1]
    data = bytearray(path.read_bytes())
    data[(start + end) // 2] ^= 1
    path.write_bytes(data)
    got, err, _ = read_until_error(path)  # sealed: corruption
    assert len(got) == 3 and "corrupt frame 4" in str(err)
    unseal(path)  # unsealed: the last frame failing its checks is a torn tail
    got, err, r = read_until_error(path)
    assert len(got) == 3 and err is None and r.torn_bytes == end - start


def test_garbage_between_frames_of_an_unsealed_segment_is_corruption(tmp_path):
    path, written = one_segment(tmp_path, nspans=5)
    unseal(path)
    start, end = offsets(path)[2]
    data = bytearray(path.read_bytes())
    data[start:end] = bytes(end - start)  # zeroes where frame 3 was; frames 4, 5 are intact
    path.write_bytes(data)
    got, err, _ = read_until_error(path)
    assert len(got) == 2 and "corrupt frame 3" in str(err)
    with pytest.raises(CorruptLog):
        L.repair(path.parent)  # never cut good frames
    assert path.read_bytes() == data


def test_bad_segment_header_and_data_after_seal(tmp_path):
    path, _ = one_segment(tmp_path, nspans=2)
    orig = path.read_bytes()
    for pos in range(offsets(path)[0][0]):  # every byte of the HEADER frame
        data = bytearray(orig)
        data[pos] ^= 0x80
        path.write_bytes(data)
        with pytest.raises(CorruptLog, match="bad segment header"):
            logframe.SegmentReader(path)
    path.write_bytes(orig + b"x" * 100)
    got, err, _ = read_until_error(path)
    assert len(got) == 2 and "100 bytes after the SEAL" in str(err)
    renamed = path.with_name("s1.000007.brlog")
    path.write_bytes(orig)
    path.rename(renamed)
    with pytest.raises(CorruptLog, match="header names segment s1.000000.brlog"):
        logframe.SegmentReader(renamed)


def test_newer_format_is_refused_not_called_corrupt(tmp_path):
    path, _ = one_segment(tmp_path, nspans=1)
    data = bytearray(path.read_bytes())
    head = bytearray(data[:logframe._HEAD.size])
    head[4:6] = (logframe.FORMAT_VERSION + 1).to_bytes(2, "little")
    data[:logframe.FRAME_SIZE] = bytes(head) + logframe._CRC.pack(__import__("zlib").crc32(head))
    path.write_bytes(data)
    with pytest.raises(UserError, match="newer than this blkrewind reads") as e:
        logframe.SegmentReader(path)
    assert not isinstance(e.value, CorruptLog)


def _segment_with(tmp_path, build, sealed: bool) -> tuple[Path, int]:
    """A segment whose only data frame is build(seg_id) (header + body, made by hand)."""
    path, _ = one_segment(tmp_path, nspans=0)
    with logframe.SegmentReader(path) as r:
        seg_id, start = r.seg_id, r.data_start
    frame = build(seg_id)
    data = path.read_bytes()[:start] + frame
    if sealed:
        data += logframe.pack_header(logframe.K_SEAL, seg_id, 2, 0, 0, 0, 0, 0)
    path.write_bytes(data)
    return path, len(frame)


def _lz4_claiming(content_size: int, real: bytes) -> bytes:
    """An lz4 frame for `real` whose header claims content_size (header checksum fixed up)."""
    body = bytearray(lz4.frame.compress(real, content_checksum=True, store_size=True))
    body[6:14] = content_size.to_bytes(8, "little")  # magic 4, FLG, BD, content size 8, HC
    for hc in range(256):
        body[14] = hc
        try:
            if lz4.frame.get_frame_info(bytes(body))["content_size"] == content_size:
                return bytes(body)
        except RuntimeError:
            pass
    raise AssertionError("no header checksum fits")


@pytest.mark.parametrize("case", ["huge-past-eof", "over-max", "lz4-claims-4GiB", "raw-mismatch"])
@pytest.mark.parametrize("sealed", [True, False])
def test_garbage_lengths_do_not_allocate(tmp_path, case, sealed):
    real = rec(b"abc", stamp=5)
    body = lz4.frame.compress(real, content_checksum=True)
    evil = _lz4_claiming(4 << 30, real)

    def build(seg_id):
        def head(raw_len, stored_len):
            return logframe.pack_header(logframe.K_DATA, seg_id, 1, 0, 0, 1, raw_len, stored_len)
        return {  # valid CRC, lengths at the maxima, 50 bytes of body on disk
                "huge-past-eof": head(logframe.MAX_RAW, logframe.MAX_STORED) + body,
                "over-max": head(0xFFFFFFFF, 0xFFFFFFF0) + body,
                "lz4-claims-4GiB": head(len(real), len(evil)) + evil,
                "raw-mismatch": head(len(real) + 1, len(body)) + body}[case]
    path, frame_len = _segment_with(tmp_path, build, sealed)
    tracemalloc.start()
    try:
        got, err, r = read_until_error(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [] and peak < (4 << 20)  # the corruption scan reads 1 MiB chunks
    if sealed:
        assert isinstance(err, CorruptLog)
    else:
        assert err is None and r.torn_bytes == frame_len


# ------------------------------------------------------------------------------------- lock
def test_lock_excludes_other_processes(tmp_path):
    d = tmp_path / "log"
    assert L.log_in_use(d) is None
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from blkrewind.tracer.log import LogLock\n"
         f"l = LogLock({str(d)!r}).acquire(blocking=False); print('held', flush=True)\n"
         "sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None, "started with PIPEs"
    try:
        assert child.stdout.readline().strip() == "held"
        assert L.log_in_use(d) == child.pid
        with pytest.raises(UserError) as e:
            L.LogLock(d).acquire(blocking=False)
        assert str(e.value) == f"LOG {d} is in use by another tracer (pid {child.pid})"
        with pytest.raises(UserError, match="in use"):
            L.repair(d)
    finally:
        child.stdin.close()
        child.wait(10)
    assert L.log_in_use(d) is None  # a dead holder's lock is gone with it
    with L.LogLock(d) as lock:
        assert lock.held and L.log_in_use(d) == os.getpid()
        assert L.repair(d) == []  # the caller's own lock is fine
        with pytest.raises(UserError, match=f"pid {os.getpid()}"):
            L.LogLock(d).acquire(blocking=False)
    assert L.log_in_use(d) is None and (d / "lock").read_text() == ""


# ------------------------------------------------------------------------------------ fsync
class FsyncCounter:
    def __init__(self, monkeypatch):
        self.files = self.dirs = 0
        real = os.fsync

        def fsync(fd):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                self.dirs += 1
            else:
                self.files += 1
            real(fd)
        monkeypatch.setattr(os, "fsync", fsync)

    def take(self):
        got, self.files, self.dirs = (self.files, self.dirs), 0, 0
        return got


@pytest.fixture
def clock(monkeypatch):
    t = [100.0]
    monkeypatch.setattr(L, "_monotonic", lambda: t[0])
    return t


def test_fsync_always_never_and_close(tmp_path, monkeypatch, clock):
    c = FsyncCounter(monkeypatch)
    span = rec(b"x" * 100, stamp=1)
    w = L.LogWriter(tmp_path / "a", "s1", host="h", fsync="always")
    assert c.take() == (1, 1)  # the new segment's header, then the directory
    for _ in range(5):
        w.append(span, 1, 0, 0)
    assert c.take() == (5, 0)
    w.close()
    assert c.take() == (1, 1)  # the seal, then the directory

    w = L.LogWriter(tmp_path / "n", "s1", host="h", fsync="never")
    c.take()
    clock[0] += 1000
    for _ in range(5):
        w.append(span, 1, 0, 0)
        w.maybe_sync()
    assert c.take() == (0, 0)
    w.sync()
    w.sync()  # nothing new to sync
    assert c.take() == (1, 0)
    w.close()
    assert c.take() == (1, 1)


def test_fsync_interval(tmp_path, monkeypatch, clock):
    c = FsyncCounter(monkeypatch)
    span = rec(b"x" * 100, stamp=1)
    w = L.LogWriter(tmp_path, "s1", host="h", fsync="interval", fsync_interval=1.0)
    c.take()
    for _ in range(3):
        clock[0] += 0.25
        w.append(span, 1, 0, 0)
        w.maybe_sync()
    assert c.take() == (0, 0)
    clock[0] += 0.25  # 1.0 s after the segment was created
    w.append(span, 1, 0, 0)
    assert c.take() == (1, 0) and w.last_sync_monotonic == clock[0]
    clock[0] += 5
    w.maybe_sync()  # nothing unsynced
    assert c.take() == (0, 0)
    w.append(span, 1, 0, 0)  # the interval is long over: synced at once
    clock[0] += 0.5
    w.append(span, 1, 0, 0)
    w.maybe_sync()
    assert c.take() == (1, 0)
    clock[0] += 0.6
    w.maybe_sync()
    assert c.take() == (1, 0)
    w.close()


def test_rotation_seals_and_syncs(tmp_path, monkeypatch, clock):
    c = FsyncCounter(monkeypatch)
    w = L.LogWriter(tmp_path, "s1", host="h", fsync="never", segment_bytes=4096)
    c.take()
    w.append(rec(os.urandom(3000), stamp=1), 1, 0, 0)
    w.append(rec(os.urandom(3000), stamp=2), 1, 0, 0)  # rotates
    assert c.take() == (2, 1) and w.segno == 1 and w.current_path.endswith("s1.000001.brlog")
    w.close()
    assert [logframe.SegmentReader(s.path).sealed for s in logframe.list_segments(tmp_path)] == [True, True]


# ------------------------------------------------------------------------------- disk full
class Disk:
    """os.pwritev that accepts `budget` more bytes, writing partially, then fails."""

    def __init__(self, monkeypatch, budget, err=errno.ENOSPC):
        self.budget, self.err, self.real = budget, err, os.pwritev
        monkeypatch.setattr(os, "pwritev", self.pwritev)

    def pwritev(self, fd, bufs, offset):
        if self.budget is None:
            return self.real(fd, bufs, offset)
        if self.budget <= 0:
            raise OSError(self.err, os.strerror(self.err))
        data = b"".join(bytes(b) for b in bufs)[:self.budget]
        n = os.pwrite(fd, data, offset)
        self.budget -= n
        return n


@pytest.mark.parametrize("budget", [0, 1, 47, 48, 49, 300, 1000])
def test_enospc_in_append_leaves_a_readable_segment(tmp_path, monkeypatch, budget):
    rng = random.Random(budget)
    spans = [make_span(rng, 2, 2000, stamp0=10 * i + 1) for i in range(5)]
    w = L.LogWriter(tmp_path, "s1", host="h", fsync="never", direct=False)
    for s in spans[:3]:
        w.append(s, 2, 0, 0)
    size = os.path.getsize(w.current_path)
    disk = Disk(monkeypatch, budget)
    with pytest.raises(L.LogFull) as e:
        w.append(spans[3], 2, 0, 0)
    assert isinstance(e.value, UserError) and "is full" in str(e.value)
    assert "appending frame 4" in str(e.value)
    assert os.path.getsize(w.current_path) == size  # the partial frame was cut
    got, err, r = read_until_error(w.current_path)
    assert err is None and r.torn_bytes == 0 and [f.data for f in got] == spans[:3]
    disk.budget = None  # space freed: the writer goes on
    w.append(spans[4], 2, 0, 0)
    w.close()
    assert [(f.frame_no, f.data) for f in read_all(tmp_path)] == \
           [(1, spans[0]), (2, spans[1]), (3, spans[2]), (4, spans[4])]


@pytest.mark.parametrize("budget", [0, 20, 48, 60, 150])
def test_enospc_while_rotating(tmp_path, monkeypatch, budget):
    """Budgets below 48 fail the old segment's SEAL; larger ones the new segment's header."""
    spans = [rec(os.urandom(3000), stamp=i + 1) for i in range(4)]
    w = L.LogWriter(tmp_path, "s1", host="h", fsync="never", segment_bytes=4096,
                    direct=False)
    w.append(spans[0], 1, 0, 0)
    disk = Disk(monkeypatch, budget)
    with pytest.raises(L.LogFull):
        w.append(spans[1], 1, 0, 0)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert [f.data for f in read_all(tmp_path)] == spans[:1]
    disk.budget = None
    w.append(spans[2], 1, 0, 0)
    w.close()
    segs = logframe.list_segments(tmp_path)
    assert [s.segno for s in segs] == [0, 1]
    assert [f.data for f in read_all(tmp_path)] == [spans[0], spans[2]]
    assert all(logframe.SegmentReader(s.path).sealed for s in segs)


def test_failed_cut_stops_the_writer_and_repair_recovers(tmp_path, monkeypatch):
    spans = [rec(os.urandom(5000), stamp=i + 1) for i in range(3)]
    w = L.LogWriter(tmp_path, "s1", host="h", fsync="never", direct=False)
    w.append(spans[0], 1, 0, 0)
    Disk(monkeypatch, 1000, errno.EIO)

    def no_truncate(fd, n):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(L.LogIOError, match="writer stops") as e:
        w.append(spans[1], 1, 0, 0)
    assert not isinstance(e.value, L.LogFull)
    monkeypatch.undo()
    with pytest.raises(L.LogIOError, match="writer stops"):
        w.append(spans[2], 1, 0, 0)
    w.close()  # leaves the segment unsealed
    got, err, r = read_until_error(w.current_path)
    assert err is None and [f.data for f in got] == spans[:1] and r.torn_bytes == 1000
    assert L.repair(tmp_path)[0].startswith(f"cut torn tail of {w.current_path}: 1000 bytes")


def test_failed_fsync_is_sticky(tmp_path, monkeypatch):
    w = L.LogWriter(tmp_path, "s1", host="h", fsync="always")

    def bad_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", bad_fsync)
    with pytest.raises(L.LogIOError, match="fsync"):
        w.append(rec(b"a", stamp=1), 1, 0, 0)
    monkeypatch.undo()
    with pytest.raises(L.LogIOError):
        w.sync()
    w.close()
    assert L.repair(tmp_path) == [f"sealed {w.current_path} (1 frames, 1 records)"]


# ------------------------------------------------------------------------------- last_stamp
def _session_span(stamp_base):
    return R.json_record(R.R_SESSION, {"session": "x", "stamp_base": stamp_base}, seq=1)


def test_last_stamp(tmp_path):
    d = tmp_path / "log"
    d.mkdir()
    assert L.last_stamp(d) == 0
    write_spans(d, [_session_span(100), rec(b"a", stamp=100) + rec(b"b", stamp=150)],
                session="20240101T000000Z-a")
    assert L.last_stamp(d) == 150
    # a newer session that took no stamp yet: its base says where it started
    write_spans(d, [_session_span(1000)], session="20240102T000000Z-b")
    assert L.last_stamp(d) == 999
    # records a little out of stamp order across frames; tracer records have stamp 0
    write_spans(d, [_session_span(2000), rec(b"", stamp=2000) + rec(b"", stamp=2002),
                    rec(b"", stamp=2001), rec(b"", rtype=R.R_LOSS, stamp=0)],
                session="20240103T000000Z-c", segment_bytes=1)
    assert L.last_stamp(d) == 2002
    write_spans(d, [_session_span(3000), rec(b"", stamp=3000),
                    R.json_record(R.R_END, {"end_stamp": 3005, "clean": True})],
                session="20240104T000000Z-d")
    assert L.last_stamp(d) == 3004
    write_spans(d, [], session="20240105T000000Z-e")  # an empty session: look further back
    assert L.last_stamp(d) == 3004


def test_last_stamp_reads_only_the_last_frames(tmp_path, monkeypatch):
    spans = [b"".join(rec(os.urandom(4000), stamp=100 * i + j + 1) for j in range(8))
             for i in range(200)]
    write_spans(tmp_path, spans, segment_bytes=256 << 10)
    reads = []
    real_read = logframe.SegmentReader.read

    def read(self, off, h):
        reads.append(h.frame_no)
        return real_read(self, off, h)
    monkeypatch.setattr(logframe.SegmentReader, "read", read)
    monkeypatch.setattr(L, "STAMP_LOOKBACK", 100 << 10)
    assert L.last_stamp(tmp_path) == 100 * 199 + 8
    assert 3 <= len(reads) <= 5


# -------------------------------------------------------------------------------- property
record_st = st.tuples(st.sampled_from([R.R_BIO, R.R_MARK, R.R_POINT, R.R_BASE, R.R_COMPLETE]),
                      st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                      st.one_of(st.binary(max_size=2000),
                                st.integers(0, 3000).map(lambda n: b"\0" * n)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spans=st.lists(st.lists(record_st, max_size=8), max_size=25),
       segment_bytes=st.sampled_from([1, 2048, 16384, 64 << 20]),
       level=st.sampled_from([0, 3]))
def test_any_spans_read_back_the_same(spans, segment_bytes, level):
    with tempfile.TemporaryDirectory() as d:
        blobs = [b"".join(rec(p, rtype=t, stamp=s, seq=q) for t, s, q, p in recs)
                 for recs in spans]
        written, _ = write_spans(d, blobs, segment_bytes=segment_bytes, fsync="never",
                                 compression_level=level)
        frames = read_all(d)
        assert [(f.data, f.nrec, f.mono_ns, f.real_ns) for f in frames] == written
        got = [(h.rtype, h.stamp, h.seq, bytes(p)) for f in frames
               for h, p in R.iter_records(f.data)]
        assert got == [(t, s, q, p) for recs in spans for t, s, q, p in recs]


def test_append_with_a_body_encoded_elsewhere(tmp_path):
    spans = [make_span(random.Random(i), 3, stamp0=10 * i + 1) for i in range(4)]
    w = L.LogWriter(tmp_path, "s1", host="h")
    for s in spans:
        w.append(s, 3, 0, 0, body=logframe.encode_span(s))
    w.close()
    assert [f.data for f in read_all(tmp_path)] == spans


def test_enospc_creating_the_first_segment(tmp_path, monkeypatch):
    disk = Disk(monkeypatch, 30)
    with pytest.raises(L.LogFull, match="creating segment"):
        L.LogWriter(tmp_path, "s1", host="h", direct=False)
    assert os.listdir(tmp_path) == []
    disk.budget = None
    write_spans(tmp_path, [rec(b"x", stamp=1)])
    assert [s.segno for s in logframe.list_segments(tmp_path)] == [0]


# ------------------------------------------------ preallocated (O_DIRECT) and recycled segments
MODES = pytest.mark.parametrize("mode", ["direct", "prealloc"])


def _direct_writer(log_dir, session="s1", mode="direct", **kw):
    """direct: O_DIRECT; prealloc: buffered writes into the preallocated / recycled file."""
    w = L.LogWriter(log_dir, session, host="h", fsync="never", **{mode: True}, **kw)
    if mode == "direct" and not w._direct:
        w.close()
        pytest.skip(f"{log_dir}: the file system refuses O_DIRECT")
    return w


@MODES
def test_preallocated_segment_reads_live_and_seals_to_its_end(mode, tmp_path):
    """A live segment is preallocated: what follows its last frame reads as a zero-padded
    tail (not torn) after every append, whatever block boundary the frame ends near; a
    clean close cuts the file right after the SEAL."""
    rng = random.Random(5)
    w = _direct_writer(tmp_path, segment_bytes=1 << 20, mode=mode)
    assert os.path.getsize(w.current_path) == 1 << 20
    spans = []
    for i in range(40):  # sizes that end frames on, just before and just after 4 KiB blocks
        n = rng.choice([4096 - 48 - 4 - 8, 4096 - 48 - 4 - 8 - 20, 4096, 100, 9000]) \
            + rng.randrange(0, 40) * 8
        spans.append(rec(os.urandom(max(0, n - R.FRAME_PREFIX_SIZE - R.HEADER_SIZE)),
                         stamp=i + 1))
        w.append(spans[-1], 1, 0, 0)
        with logframe.SegmentReader(w.current_path) as r:
            got = [f.data for f in r.frames()]
            assert got == spans and r.torn_bytes == 0 and not r.sealed
            assert r.pad_bytes == r.size - r.good_end > 0
    w.close()
    with logframe.SegmentReader(logframe.list_segments(tmp_path)[0].path) as r:
        assert r.sealed and [f.data for f in r.frames()] == spans and r.pad_bytes == 0
        assert r.size == r.good_end + logframe.FRAME_SIZE


@MODES
def test_recycled_segment_old_frames_are_never_read(mode, tmp_path):
    """A spare (retire_segment) is reused by the next segment: its old frames (another seg_id)
    stay in the file beyond the new ones and are never read, live, after a crash, nor by
    repair; a torn frame over old content is a torn tail."""
    w = _direct_writer(tmp_path, "s1", segment_bytes=1 << 20, mode=mode)
    old = [rec(os.urandom(20000), stamp=i + 1) for i in range(30)]
    for s in old:
        w.append(s, 1, 0, 0)
    w.close()
    seg = logframe.list_segments(tmp_path)[0]
    old_bytes = open(seg.path, "rb").read()
    assert L.retire_segment(seg.path) is True
    assert logframe.list_segments(tmp_path) == [] and L.inventory(tmp_path) == []
    assert L.repair(tmp_path) == []  # a spare is no segment, nor an unfinished one
    w = _direct_writer(tmp_path, "s2", segment_bytes=1 << 20, mode=mode)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".spare")]
    new = [rec(os.urandom(3000), stamp=100 + i) for i in range(5)]
    for s in new:
        w.append(s, 1, 0, 0)
    path = w.current_path
    data = open(path, "rb").read()
    with logframe.SegmentReader(path) as r:
        got = [f.data for f in r.frames()]
        assert got == new and r.torn_bytes == 0 and r.pad_bytes > 0
        cut = r.good_end
    assert len(old_bytes) > 200000 and data[40000:len(old_bytes)] == old_bytes[40000:]  # old
    # a crash (the writer just stops): repair cuts the zero-padded rest and seals
    os.close(w._fd)
    w._fd, w._closed = None, True
    os.close(w._dirfd)
    assert L.repair(tmp_path) == [f"sealed {path} (5 frames, 5 records)"]
    with logframe.SegmentReader(path) as r:
        assert r.sealed and [f.data for f in r.frames()] == new and r.size == cut + logframe.FRAME_SIZE
    # the last frame's last block lost over old content: a torn tail, not corruption
    p2 = tmp_path / "torn"
    p2.mkdir()
    torn = p2 / os.path.basename(path)
    blob = bytearray(data)
    start, end = offsets(path)[-1]  # the last data frame
    blob[end - 1000:end] = old_bytes[end - 1000:end]
    torn.write_bytes(bytes(blob))
    got, err, r = read_until_error(torn)
    assert err is None and [f.data for f in got] == new[:-1] and r.torn_bytes == len(blob) - start


@MODES
def test_zeros_between_frames_of_a_preallocated_segment_are_corruption(mode, tmp_path):
    w = _direct_writer(tmp_path, segment_bytes=1 << 20, mode=mode)
    for i in range(4):
        w.append(rec(os.urandom(5000), stamp=i + 1), 1, 0, 0)
    path = w.current_path
    start, end = offsets(path)[1]
    with open(path, "r+b") as f:  # frame 2's header lost, frames 3, 4 after it
        f.seek(start)
        f.write(bytes(logframe.FRAME_SIZE))
    got, err, r = read_until_error(path)
    assert len(got) == 1 and isinstance(err, CorruptLog) and "zeros where a frame" in str(err)
    w.close()


@MODES
def test_seal_written_but_not_cut_is_the_end(mode, tmp_path):
    """A crash between the SEAL and cutting the preallocated rest: the SEAL ends the segment,
    repair cuts the rest."""
    w = _direct_writer(tmp_path, segment_bytes=1 << 20, mode=mode)
    spans = [rec(os.urandom(5000), stamp=i + 1) for i in range(3)]
    for s in spans:
        w.append(s, 1, 0, 0)
    path = w.current_path
    w.close()
    size = os.path.getsize(path)
    os.truncate(path, 1 << 20)
    got, err, r = read_until_error(path)
    assert err is None and [f.data for f in got] == spans and r.pad_bytes == (1 << 20) - size
    assert L.repair(tmp_path) == [f"sealed {path} (3 frames, 3 records)"]
    assert os.path.getsize(path) == size and logframe.SegmentReader(path).sealed


@MODES
def test_direct_write_failure_leaves_the_segment_readable(mode, tmp_path, monkeypatch):
    w = _direct_writer(tmp_path, segment_bytes=1 << 20, mode=mode)
    spans = [rec(os.urandom(5000), stamp=i + 1) for i in range(3)]
    w.append(spans[0], 1, 0, 0)
    real = os.pwritev
    calls: list[int] = []

    def failing(fd, bufs, off):  # the frame's write fails after landing; the undo works
        if not calls:
            calls.append(1)
            real(fd, bufs, off)
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, bufs, off)
    monkeypatch.setattr(os, "pwritev", failing)
    with pytest.raises(L.LogIOError, match="appending frame 2"):
        w.append(spans[1], 1, 0, 0)
    got, err, r = read_until_error(w.current_path)
    assert err is None and [f.data for f in got] == spans[:1] and r.torn_bytes == 0
    w.append(spans[2], 1, 0, 0)
    w.close()
    assert [f.data for f in read_all(tmp_path)] == [spans[0], spans[2]]


def test_retire_keeps_at_most_the_spares_asked(tmp_path):
    for session in ("a1", "a2", "a3"):
        write_spans(tmp_path, [rec(b"x", stamp=1)], session=session)
    segs = logframe.list_segments(tmp_path)
    assert [L.retire_segment(s.path, keep=2) for s in segs] == [True, True, False]
    assert sorted(os.listdir(tmp_path)) == [".spare-0.brlog", ".spare-1.brlog", "lock"] or \
        sorted(n for n in os.listdir(tmp_path) if n != "lock") == [".spare-0.brlog",
                                                                   ".spare-1.brlog"]
