"""The rules a stored frame must keep, one definition each: the session's host, the segment's
seg_id and SEAL, the HEADER's names, the hosts in R_SESSION / R_DEVICE records; and the
exceptions that reject a peer's input. LOG ingest (logdir.py), FrameSink (sink.py) and the
commit (commit.py) all check through these."""
from __future__ import annotations

import json

from blkrewind.replayer.ledger import SegState


class FrameRejected(Exception):
    """Input from a peer that must not be stored (bad frame, bad records, wrong host).
    str(e) is a one-line reason for the server's log; nothing of the call was stored."""


class NotYourSession(FrameRejected):
    """The session is bound to another host."""


def segment_name(session: str, segno: int) -> str:
    return f"{session}.{segno:06d}"


def check_host(bound: str | None, session: str, host: str) -> None:
    """NotYourSession unless the session is new (bound None) or bound to `host`."""
    if bound is not None and bound != host:
        raise NotYourSession(f"session {session} belongs to host {bound}, not {host}")


def check_seg_id(name: str, st: SegState | None, seg_id: int) -> None:
    """FrameRejected unless `seg_id` is that of the stored segment (or none is known)."""
    if st is not None and st.seg_id is not None and st.seg_id != seg_id:
        raise FrameRejected(f"{name}: seg_id {seg_id:#x} is not the stored segment's "
                            f"({st.seg_id:#x}): another segment of that name (a LOG holding "
                            f"two copies?)")


def check_seal(name: str, st: SegState, seal_nframes: int) -> None:
    """FrameRejected when a SEAL at frame seal_nframes - 1 contradicts the stored one."""
    if st.nframes is not None and st.nframes != seal_nframes:
        raise FrameRejected(f"{name}: SEAL at frame {seal_nframes - 1}, the store knows it at "
                            f"frame {st.nframes - 1}")


def check_before_seal(name: str, st: SegState | None, end: int) -> None:
    """FrameRejected when frames up to `end` run past the segment's stored SEAL."""
    if st is not None and st.nframes is not None and end > st.nframes:
        raise FrameRejected(f"{name}: frames past its SEAL (frame {st.nframes - 1})")


def check_kinds(name: str, st: SegState, heads) -> None:
    """Decoded frame heads against the stored SEAL: a SEAL exactly at its frame."""
    from blkrewind.formats.logframe import K_SEAL

    if st.nframes is None:
        return
    for h in heads:
        if (h.kind == K_SEAL) != (h.frame_no == st.nframes - 1):
            raise FrameRejected(f"{name}: kind {h.kind} at frame {h.frame_no}, its SEAL "
                                f"is frame {st.nframes - 1}")


def check_header(name: str, data, session: str, segno: int, host: str) -> dict:
    """A segment's HEADER frame body: it names this segment and `host`; its JSON."""
    try:
        meta = json.loads(data)
        ok = (isinstance(meta, dict) and meta.get("session") == session
              and meta.get("segno") == segno)
    except ValueError:
        ok = False
    if not ok:
        raise FrameRejected(f"{name}: its HEADER does not name this segment")
    if meta.get("host") != host:
        raise FrameRejected(f"{name}: its HEADER names host "
                            f"{str(meta.get('host'))[:80]!r}, not {host!r}")
    return meta


def host_error(name: str, session: str, session_info, devices, host: str) -> str | None:
    """Why a batch's R_SESSION (session_info: (json, time)) / R_DEVICE records do not belong to
    `host` and `session` (None: they do)."""
    if session_info:
        obj = session_info[0]
        if obj.get("host") not in (None, host):
            return f"{name}: its R_SESSION record names host {obj.get('host')!r}, not {host!r}"
        if obj.get("session") not in (None, session):
            return f"{name}: its R_SESSION record names session {obj.get('session')!r}"
    for d in devices:
        if d.get("host") not in (None, host):
            return f"{name}: its R_DEVICE record names host {d.get('host')!r}, not {host!r}"
    return None
