"""Stamped points and marks from several threads at once (tracer/capture.py `point`).

A mark comes from the control socket's thread while the resync and the baseline emit their
points from theirs; `point` passes its input and its stamp through one map slot, so two
callers at once could emit one's record twice and return its stamp to the other: a mark
`blkrewind mark` reported durable was then missing from the LOG (seen in CI's power-cut test,
a mark made while a resync ran: its stamp was a resync point's).
"""
from __future__ import annotations

import threading

import pytest


@pytest.mark.bpf
def test_points_from_many_threads_each_reach_the_ring_once_with_their_stamp():
    from blkrewind.formats import record
    from blkrewind.tracer import capture
    from blkrewind.tracer.ringbuf import RingConsumer

    threads, each = 6, 150
    with capture.Capture(ring_bytes=4 << 20, dirty_regions=4, dirtier=False) as cap:
        ring = RingConsumer(cap.fd["rb"], cap.ring_bytes)
        while ring.take()[1]:
            pass
        got: dict[str, int] = {}
        lock = threading.Lock()
        start = threading.Barrier(threads)

        def emit(t: int) -> None:
            start.wait()
            for j in range(each):
                name = f"t{t}-{j}"
                rtype = record.R_MARK if j % 2 else record.R_POINT
                stamp, ok = cap.point(rtype, name.encode())
                assert ok
                with lock:
                    got[name] = stamp
        ts = [threading.Thread(target=emit, args=(t,)) for t in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        seen: dict[str, int] = {}
        while True:
            span, n = ring.take()
            if not n:
                break
            for h, payload in record.iter_records(span):
                if h.rtype in (record.R_MARK, record.R_POINT):
                    name = bytes(payload).decode()
                    assert name not in seen, f"{name} emitted twice"
                    seen[name] = h.stamp
                    j = int(name.split("-")[1])
                    assert h.rtype == (record.R_MARK if j % 2 else record.R_POINT), name
        assert len(got) == threads * each
        assert seen == got     # every point once, with the stamp its caller was given
        assert len(set(got.values())) == len(got)
