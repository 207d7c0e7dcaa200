"""The LOG's on-disk format: the frame codec, segment names and the segment reader.

The one definition of the LOG frame, shared by the tracer (tracer/log.py writes segments,
tracer/shipper.py ships raw frames), the wire (blkrewind/formats/wire.py) and the replayer
(replayer/ingest/ decodes received frames and reads LOG directories).
A LOG directory holds segment files ``<session>.<segno:06d>.brlog``.

Segment file, format version 1
------------------------------
A segment is a sequence of frames::

    frame 0      HEADER  body: JSON {"format", "session", "segno", "host", "created_ns", "tool"}
    frame 1..N   DATA    body: one span of framed records (record.iter_records)
    frame N+1    SEAL    no body; written by a clean close or by repair(), always the last frame

Each frame is a fixed 48-byte header followed by ``stored_len`` bytes of body. Little-endian::

    off size field
      0    4 magic       b"BRLG"
      4    2 version     FORMAT_VERSION (1)
      6    1 kind        1 HEADER, 2 DATA, 3 SEAL
      7    1 flags       FL_BODY_CRC (1) on HEADER and DATA frames, 0 on SEAL; a LOG written
                         before it has 0 everywhere (lz4's content checksum then covers the body).
                         FL_RAW (2), only with FL_BODY_CRC: the body holds the span as is
      8    4 seg_id      random per segment, the same in all its frames: a frame of another
                         segment (a copied file, LOG bytes inside a payload) never passes as ours
     12    4 frame_no    0 for the HEADER, then consecutive
     16    8 mono_ns     CLOCK_MONOTONIC when the span was consumed (HEADER, SEAL: when written)
     24    8 real_ns     CLOCK_REALTIME at the same moment
     32    4 nrec        live records in the span (SEAL: records in the segment)
     36    4 raw_len     bytes of the span, <= MAX_RAW
     40    4 stored_len  bytes of the body, <= MAX_STORED (0 for SEAL)
     44    4 hcrc        zlib.crc32 of bytes 0..43

The body is one lz4 frame (python lz4.frame: independent 4 MiB blocks, content size stored, no
content checksum; lz4 stores incompressible blocks raw) followed by the CRC-32 (zlib's; computed
with zlib-ng) of the lz4 frame's bytes. A span whose sample lz4 cannot shrink (random, encrypted
or already compressed payload) is stored as is instead (FL_RAW, stored_len == raw_len + 4): lz4
would spend a pass over it for nothing. The header CRC covers the lengths and flags, the body
CRC the body's bytes as stored: nothing is checksummed twice. (A LOG written before FL_BODY_CRC
existed has flags 0 and lz4's content checksum instead; it reads the same.) A reader checks a
frame in this order: header complete, magic, CRC, version, kind/flags, lengths within the maxima,
seg_id, frame_no, body within the file (before allocating anything), body CRC, lz4 frame header
(content size == raw_len), decompression, every body byte used.

Torn tail vs corruption
-----------------------
A sealed segment is one whose last 48 bytes are a valid SEAL frame of the segment. In an
unsealed segment, a frame that fails its checks is a **torn tail** (readers stop quietly and set
``torn_bytes``) when it runs past the end of the file, or when it is the last frame: it ends at
the end of the file, or no valid frame of the segment (same seg_id, a frame_no not lower) starts
anywhere after it. Any other failing frame -- any in a sealed segment, anything after a SEAL --
is **corruption**: CorruptLog, after every good frame before it. A segment file gets its final
name only once its HEADER frame is durable (written to a hidden ``.tmp`` file, fsynced,
renamed), so a bad HEADER is always corruption.

Zero-padded tails
-----------------
Readers, in an unsealed segment, at the frame position after the last good frame:
  - 48 zero bytes: a **zero-padded tail** -- the end of what was written (pad_bytes = the rest
    of the file; torn_bytes = 0); unless a valid frame of this segment (same seg_id, frame_no
    not lower) starts anywhere after it: then it is corruption (zeros where a frame should be).
  - a SEAL followed by 48 zero bytes (or the end of the file): the end (sealed, the
    preallocated rest not yet cut: a crash between SEAL and cut); repair() cuts it.
  - anything else failing the checks: a torn tail or corruption, as below (a frame whose header
    is good but whose body did not all reach the file is a torn tail).
repair() cuts a zero-padded tail like a torn one and seals the segment.

"""
from __future__ import annotations

import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple, TypeGuard

import lz4.frame

from blkrewind.errors import CorruptLog, UserError
from blkrewind.osutil import crc32

FORMAT_VERSION = 1
MAGIC = b"BRLG"
K_HEADER, K_DATA, K_SEAL = 1, 2, 3
_HEAD = struct.Struct("<4sHBBIIQQIII")   # everything the CRC covers
_CRC = struct.Struct("<I")
FL_BODY_CRC = 1                          # flags: the body ends with the CRC-32 of the rest
FL_RAW = 2                               # ... and the rest is the span itself, not lz4
FRAME_SIZE = _HEAD.size + _CRC.size       # 48
MAX_RAW = 256 << 20                       # a span; the tracer's are 1-8 MiB
MAX_STORED = MAX_RAW + (MAX_RAW >> 8) + 4096  # lz4 worst case: raw blocks + 4 bytes per 64 KiB
MAX_HEADER_BODY = 64 << 10
SUFFIX = ".brlog"
# Header field offsets, for readers of one field of a raw frame (tracer/shipconn.py, shipstate.py).
SEG_ID_AT = struct.calcsize("<4sHBB")            # 8
REAL_NS_AT = struct.calcsize("<4sHBBIIQ")        # 24
ZERO_HEAD = bytes(FRAME_SIZE)

# The session-id rule (LOG segment names, the wire, the store): one definition.
SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
MAX_SESSION = 128


def valid_session(s) -> TypeGuard[str]:
    """Is s a session id: a str of 1-MAX_SESSION letters, digits, '_' and '-', not starting
    with '_' or '-'."""
    return isinstance(s, str) and len(s) <= MAX_SESSION and SESSION_RE.fullmatch(s) is not None


_SEGMENT_RE = re.compile(r"(" + SESSION_RE.pattern + r")\.(\d{6,})" + re.escape(SUFFIX))

class SegmentInfo(NamedTuple):
    path: str
    session: str
    segno: int
    size: int


class FrameHead(NamedTuple):
    kind: int
    seg_id: int
    frame_no: int
    mono_ns: int
    real_ns: int
    nrec: int
    raw_len: int
    stored_len: int
    flags: int = 0


@dataclass(slots=True)
class Frame:
    session: str
    segno: int
    frame_no: int
    offset: int      # of the frame header in the segment file
    mono_ns: int
    real_ns: int
    nrec: int
    data: bytes      # the span of framed records


def segment_name(session: str, segno: int) -> str:
    return f"{session}.{segno:06d}{SUFFIX}"


def pack_header(kind: int, seg_id: int, frame_no: int, mono_ns: int, real_ns: int, nrec: int,
          raw_len: int, stored_len: int, flags: int = FL_BODY_CRC) -> bytes:
    if kind == K_SEAL:
        flags = 0  # every body this version writes has a CRC; a SEAL has no body
    h = _HEAD.pack(MAGIC, FORMAT_VERSION, kind, flags, seg_id, frame_no, mono_ns, real_ns, nrec,
                   raw_len, stored_len)
    return h + _CRC.pack(zlib.crc32(h))


def parse_header(buf) -> FrameHead | str:
    """The frame header at the start of buf, or why it is not one."""
    if len(buf) < FRAME_SIZE:
        return "incomplete frame header"
    (magic, version, kind, flags, seg_id, frame_no, mono_ns, real_ns, nrec, raw_len,
     stored_len) = _HEAD.unpack_from(buf)
    if magic != MAGIC:
        return "bad magic"
    if zlib.crc32(memoryview(buf)[:_HEAD.size]) != _CRC.unpack_from(buf, _HEAD.size)[0]:
        return "header checksum mismatch"
    if version != FORMAT_VERSION:
        return f"unsupported frame version {version}"
    h = FrameHead(kind, seg_id, frame_no, mono_ns, real_ns, nrec, raw_len, stored_len, flags)
    if flags & ~(FL_BODY_CRC | FL_RAW) or kind not in (K_HEADER, K_DATA, K_SEAL) or (
            kind == K_SEAL and flags) or (flags & FL_RAW and not flags & FL_BODY_CRC):
        return f"bad kind {kind} / flags {flags}"
    if h.raw_len > MAX_RAW or h.stored_len > MAX_STORED:
        return f"lengths out of range (raw {h.raw_len}, stored {h.stored_len})"
    if flags & FL_RAW and h.stored_len != h.raw_len + _CRC.size:
        return f"raw body of {h.stored_len} bytes for a span of {h.raw_len}"
    if (kind == K_SEAL) != (h.stored_len == 0) or (kind == K_SEAL and h.raw_len):
        return "body length does not fit the frame kind"
    return h


def _decode(body, raw_len: int, flags: int) -> bytes | str:
    """The span in a frame body, or why the body is bad."""
    if flags & FL_BODY_CRC:
        mv = memoryview(body)
        if mv.nbytes < 4:
            return "body shorter than its CRC"
        body = mv[:-4]
        if crc32(body) != _CRC.unpack_from(mv, mv.nbytes - 4)[0]:
            return "body checksum mismatch"
        if flags & FL_RAW:  # parse_header checked its length
            return body.tobytes()
    try:
        info = lz4.frame.get_frame_info(body)
        if not (flags & FL_BODY_CRC or info["content_checksum"]):
            return "lz4 frame without content checksum"
        if info["content_size"] != raw_len:
            return f"lz4 content size {info['content_size']} != raw length {raw_len}"
        data, used = lz4.frame.decompress(body, return_bytes_read=True)
    except (RuntimeError, ValueError) as e:
        return f"lz4: {e}"
    if used != len(body) or len(data) != raw_len:
        return f"lz4 frame of {used} bytes / {len(data)} raw, expected {len(body)} / {raw_len}"
    return data


def decode_raw_frame(raw, *, seg_id: int | None,
                     frame_no: int | None) -> tuple[FrameHead, Frame | None]:
    """Check one raw frame (48-byte header + body, exactly as in a segment file, e.g. received
    over the network) as SegmentReader does: header (magic, CRC, version, kind/flags, lengths),
    seg_id and frame_no (when not None), kind in its place (HEADER at 0 only), the body length,
    the lz4 frame header, the content checksum, every body byte used.

    Returns (header, Frame) -- Frame.data is the span of a DATA frame or the JSON of a HEADER;
    a raw frame does not know its session/segment/offset (session "", segno -1, offset -1) --
    or (header, None) for a SEAL. Raises CorruptLog with a one-line reason."""
    mv = memoryview(raw)
    h = parse_header(mv)
    where = f"frame {frame_no}" if frame_no is not None else "frame"
    if isinstance(h, str):
        raise CorruptLog(f"{where}: {h}")
    where = f"frame {h.frame_no}"
    if seg_id is not None and h.seg_id != seg_id:
        raise CorruptLog(f"{where}: frame of another segment ({h.seg_id:#x}, expected {seg_id:#x})")
    if frame_no is not None and h.frame_no != frame_no:
        raise CorruptLog(f"{where}: expected frame {frame_no}")
    if (h.kind == K_HEADER) != (h.frame_no == 0):
        raise CorruptLog(f"{where}: kind {h.kind} out of place")
    if h.kind == K_HEADER and h.stored_len > MAX_HEADER_BODY:
        raise CorruptLog(f"{where}: HEADER body of {h.stored_len} bytes")
    if mv.nbytes != FRAME_SIZE + h.stored_len:
        raise CorruptLog(f"{where}: {mv.nbytes - FRAME_SIZE} body bytes, the header says "
                         f"{h.stored_len}")
    if h.kind == K_SEAL:
        return h, None
    data = _decode(mv[FRAME_SIZE:], h.raw_len, h.flags)
    if isinstance(data, str):
        raise CorruptLog(f"{where}: {data}")
    return h, Frame("", -1, h.frame_no, -1, h.mono_ns, h.real_ns, h.nrec, data)


# ------------------------------------------------------------------------------------ writing
DEFAULT_LEVEL = -10          # lz4 acceleration 10: most of level 0's gain on file-system data
FAST_LEVEL = -100            # spans that hardly compress: several times faster, nearly as small
SAMPLE = 256 << 10           # the sample that decides: a 16th of the span, ...
SAMPLE_FLOOR = 4 << 10       # ... 4-256 KiB, ...
SAMPLE_MIN = 16 << 10        # ... of a span of at least this (smaller ones: lz4 as asked)
SAMPLE_KEEPS = 0.9           # ... a sample that lz4 cannot shrink below this: FAST_LEVEL
SAMPLE_RAW = 0.93            # ... nor below this: stored as is (FL_RAW; FAST_LEVEL would save
                             # 0.3-2 % on such data: fio 1 MiB writes sample at 0.94-0.98);
                             # between the two, the sample at FAST_LEVEL must also stay below
                             # it (fio's 4 KiB writes sample at 0.93 but save 1 % at FAST_LEVEL)


class Body(NamedTuple):
    """A frame body as append() writes it: data, then crc (the CRC-32 of data, 4 bytes LE).
    data is an lz4 frame, or the span itself when flags has FL_RAW: a copy, or with
    encode_span(copy=False) a view of the span (valid only as long as the span is)."""
    data: bytes | bytearray | memoryview
    crc: bytes
    flags: int

    @property
    def stored_len(self) -> int:
        return len(self.data) + _CRC.size


def _compress(data, level: int) -> bytearray:
    return lz4.frame.compress(data, compression_level=level, content_checksum=False,
                              block_linked=False, block_size=lz4.frame.BLOCKSIZE_MAX4MB,
                              return_bytearray=True)


def encode_span(span, compression_level: int = DEFAULT_LEVEL, adaptive: bool = True,
                copy: bool = True) -> Body:
    """The body append() writes for span. CPU only and the GIL is released: a producer thread
    can encode the next span while the writer thread writes (append(..., body=)); span may be
    a view into the ring buffer, which the body never references.

    adaptive: a sample from the middle of the span (a 16th of it, 4-256 KiB) decides. If lz4
    shrinks it below SAMPLE_KEEPS: lz4 at compression_level; below SAMPLE_RAW, and below it
    at FAST_LEVEL too: lz4 at FAST_LEVEL (nearly as small on such data, 3x faster); else the
    span is stored as is (random, encrypted or already compressed payload: one copy instead of
    a pass of lz4 that gains nothing). Spans under SAMPLE_MIN are not sampled.

    copy=False: a span stored as is is not copied; the body is a view of it (the tracer then
    keeps the span's ring buffer space until the frame is written)."""
    # 4 MiB blocks: less per-block overhead than the 64 KiB default. No lz4 content checksum:
    # its xxh32 cost more than the compression; zlib-ng's CRC-32 of the body is far cheaper
    # (figures: docs/costs.md, the LOG).
    # The CRC is written from its own buffer: appending it to data would realloc (copy) it.
    mv = memoryview(span).cast("B")
    level = compression_level
    if adaptive and level > FAST_LEVEL and mv.nbytes >= SAMPLE_MIN:
        n = max(SAMPLE_FLOOR, min(SAMPLE, mv.nbytes // 16))
        mid = min((mv.nbytes // 2) & ~4095, mv.nbytes - n)
        sample = mv[mid:mid + n]
        kept = len(_compress(sample, DEFAULT_LEVEL)) / n
        if kept > SAMPLE_KEEPS and (kept > SAMPLE_RAW or
                                    len(_compress(sample, FAST_LEVEL)) / n > SAMPLE_RAW):
            data = bytearray(mv) if copy else mv  # the copy out of the ring buffer, or none
            return Body(data, _CRC.pack(crc32(data)), FL_BODY_CRC | FL_RAW)
        if kept > SAMPLE_KEEPS:
            level = FAST_LEVEL
    data = _compress(mv, level)
    return Body(data, _CRC.pack(crc32(data)), FL_BODY_CRC)


# ------------------------------------------------------------------------------------ reading
class SegmentReader:
    """Reads one segment file. The constructor checks the HEADER frame (CorruptLog if bad;
    UserError if written by a newer format) and whether the segment is sealed.

    After frames() has run to its end: torn_bytes (bytes of a torn tail, 0 if none), good_end
    (offset just past the last good frame), last_frame (its frame_no, 0 if none), records.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._f = open(self.path, "rb", buffering=0)
        try:
            self._read_header()
        except BaseException:
            self._f.close()
            raise

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def _corrupt(self, what: str) -> CorruptLog:
        return CorruptLog(f"{self.path}: {what}")

    def _read_header(self) -> None:
        fd = self._f.fileno()
        self.size = os.fstat(fd).st_size
        self._buf = bytearray()
        raw = os.pread(fd, FRAME_SIZE, 0)
        h = parse_header(raw)
        if isinstance(h, str):
            if h.startswith("unsupported frame version") and raw[:4] == MAGIC:
                raise UserError(f"{self.path}: LOG format {_HEAD.unpack_from(raw)[1]} is newer "
                                f"than this blkrewind reads ({FORMAT_VERSION})")
            raise self._corrupt(f"bad segment header: {h}")
        if h.kind != K_HEADER or h.frame_no != 0 or h.stored_len > MAX_HEADER_BODY:
            raise self._corrupt("bad segment header: not a HEADER frame")
        body = os.pread(fd, h.stored_len, FRAME_SIZE)
        if len(body) != h.stored_len:
            raise self._corrupt("bad segment header: truncated")
        data = _decode(body, h.raw_len, h.flags)
        if isinstance(data, str):
            raise self._corrupt(f"bad segment header: {data}")
        try:
            meta = json.loads(data)
            self.session, self.segno = str(meta["session"]), int(meta["segno"])
            self.host, self.created_ns = str(meta["host"]), int(meta["created_ns"])
        except (ValueError, KeyError, TypeError) as e:
            raise self._corrupt(f"bad segment header: {e!r}") from None
        m = _SEGMENT_RE.fullmatch(os.path.basename(self.path))
        if m and (m[1], int(m[2])) != (self.session, self.segno):
            raise self._corrupt(f"header names segment {segment_name(self.session, self.segno)}")
        self.seg_id = h.seg_id
        self.data_start = FRAME_SIZE + h.stored_len
        tail = parse_header(os.pread(fd, FRAME_SIZE, self.size - FRAME_SIZE)) \
            if self.size >= self.data_start + FRAME_SIZE else "too short"
        self.sealed = (not isinstance(tail, str) and tail.kind == K_SEAL
                       and tail.seg_id == self.seg_id)
        self.torn_bytes = 0
        self.pad_bytes = 0
        self.good_end, self.last_frame, self.records = self.data_start, 0, 0

    def frames(self, start_frame: int = 0) -> Iterator[Frame]:
        """Every good data frame (frame_no >= start_frame; earlier bodies are not read), in
        order. Stops quietly at a torn tail; raises CorruptLog at corruption."""
        self.good_end, self.last_frame, self.records = self.data_start, 0, 0
        for off, h in self.index():
            if h.frame_no >= start_frame:
                f = self.read(off, h)
                if f is None:
                    return
                yield f
            self.good_end = off + FRAME_SIZE + h.stored_len
            self.last_frame = h.frame_no
            self.records += h.nrec

    def index(self) -> Iterator[tuple[int, FrameHead]]:
        """(offset, header) of each data frame, checking headers only (bodies: read())."""
        fd = self._f.fileno()
        off, expect = self.data_start, 1
        self.torn_bytes = self.pad_bytes = 0
        while off < self.size:
            raw = os.pread(fd, FRAME_SIZE, off)
            if raw == ZERO_HEAD and not self.sealed:
                # a zero-padded tail: the end of what a preallocated or recycled segment's
                # writer wrote (it always leaves a zero frame header after its last frame)
                if self._frame_after(off + 1, expect):
                    raise self._corrupt(f"corrupt frame {expect} at offset {off}: zeros "
                                        f"where a frame should be, frames of the segment after")
                self.pad_bytes = self.size - off
                return
            h = parse_header(raw)
            if isinstance(h, str):
                return self._bad(off, expect, h, past_end=off + FRAME_SIZE > self.size)
            if h.seg_id != self.seg_id:
                return self._bad(off, expect, f"frame of another segment ({h.seg_id:#x})")
            if h.frame_no != expect or h.kind == K_HEADER:
                return self._bad(off, expect, f"kind {h.kind} frame {h.frame_no} out of place")
            end = off + FRAME_SIZE + h.stored_len
            if end > self.size:
                return self._bad(off, expect, "runs past the end of the file", past_end=True)
            if h.kind == K_SEAL:
                if end != self.size and not self.sealed and \
                        os.pread(fd, FRAME_SIZE, end) in (ZERO_HEAD, ZERO_HEAD[:self.size - end]):
                    # a preallocated segment sealed, its zero-padded rest not yet cut: the
                    # end (repair() cuts it)
                    self.pad_bytes = self.size - end
                    return
                if end != self.size:
                    raise self._corrupt(f"corrupt frame {expect} at offset {off}: "
                                        f"{self.size - end} bytes after the SEAL")
                return
            yield off, h
            off, expect = end, expect + 1

    def read(self, off: int, h: FrameHead) -> Frame | None:
        """The data frame at off (from index()), its body checked; None if it is a torn tail."""
        n = h.stored_len
        if len(self._buf) < n:  # lengths were checked against the file size: bounded
            self._buf = bytearray(n)
        body = memoryview(self._buf)[:n]
        if os.preadv(self._f.fileno(), [body], off + FRAME_SIZE) != n:
            self._bad(off, h.frame_no, "the file shrank", past_end=True)
            return None
        data = _decode(body, h.raw_len, h.flags)
        if isinstance(data, str):
            self._bad(off, h.frame_no, data, past_end=off + FRAME_SIZE + n >= self.size)
            return None
        return Frame(self.session, self.segno, h.frame_no, off, h.mono_ns, h.real_ns, h.nrec,
                     data)

    # -- raw frames (shipping): whole frames exactly as in the file, headers checked by index()
    def frame_spans(self) -> Iterator[tuple[int, int, int]]:
        """(frame_no, offset, size) of every complete frame: the HEADER (0), the data frames
        (index()) and, in a sealed segment, the SEAL. Torn tail / CorruptLog as index()."""
        yield 0, 0, self.data_start
        last, end = 0, self.data_start
        for off, h in self.index():
            last, end = h.frame_no, off + FRAME_SIZE + h.stored_len
            yield last, off, FRAME_SIZE + h.stored_len
        if self.sealed and end == self.size - FRAME_SIZE:
            yield last + 1, end, FRAME_SIZE

    def read_raw(self, offset: int, size: int) -> bytes:
        """size bytes of the file at offset (a frame from frame_spans()); CorruptLog if the
        file is shorter."""
        data = os.pread(self._f.fileno(), size, offset)
        if len(data) != size:
            raise self._corrupt(f"{size} bytes at offset {offset}: the file shrank")
        return data

    def raw_frames(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(frame_no, raw frame bytes) for the frames start <= frame_no < end."""
        for no, off, size in self.frame_spans():
            if end is not None and no >= end:
                return
            if no >= start:
                yield no, self.read_raw(off, size)

    def _bad(self, off: int, frame_no: int, why: str, past_end: bool = False) -> None:
        """The frame at off failed its checks: record a torn tail, or raise CorruptLog."""
        if not self.sealed and (past_end or not self._frame_after(off + 1, frame_no)):
            self.torn_bytes = self.size - off
            return None
        raise self._corrupt(f"corrupt frame {frame_no} at offset {off}: {why}")

    def _frame_after(self, pos: int, frame_no: int) -> bool:
        """Does a valid header of this segment with a frame_no >= frame_no start at or after
        pos? (Only on the failure path: reads the rest of the file.)"""
        chunk_size = 1 << 20
        while pos < self.size:
            chunk = os.pread(self._f.fileno(), chunk_size + FRAME_SIZE, pos)
            i = chunk.find(MAGIC)
            while 0 <= i < chunk_size:  # later hits start the next chunk
                h = parse_header(chunk[i:i + FRAME_SIZE])
                if not isinstance(h, str) and h.seg_id == self.seg_id and h.frame_no >= frame_no:
                    return True
                i = chunk.find(MAGIC, i + 1)
            pos += chunk_size
        return False



# ------------------------------------------------------------------------- the LOG directory
def list_segments(log_dir) -> list[SegmentInfo]:
    """The segment files in log_dir, sorted by (session, segno)."""
    log_dir = os.fspath(log_dir)
    try:
        entries = list(os.scandir(log_dir))
    except FileNotFoundError:
        raise UserError(f"no LOG directory at {log_dir}") from None
    except NotADirectoryError:
        raise UserError(f"{log_dir} is not a LOG directory") from None
    out = []
    for e in entries:
        m = _SEGMENT_RE.fullmatch(e.name)
        try:
            if m and e.is_file(follow_symlinks=False):
                out.append(SegmentInfo(e.path, m[1], int(m[2]),
                                       e.stat(follow_symlinks=False).st_size))
        except FileNotFoundError:  # deleted meanwhile (retention of a shipped segment)
            continue
    return sorted(out, key=lambda s: (s.session, s.segno))
