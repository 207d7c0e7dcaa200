"""Rebuild / `blkrewind restore` to regular files: byte-exact against the naive model of
tests/synth.py at every mark and chosen stamps; points (latest, stamps, times, marks) and
why a point is refused; devices; target rules. Loop and block-device targets are covered
by the end-to-end tests."""
from __future__ import annotations

import os
import random
from datetime import datetime, timezone

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from synth import SynthSession, cli_main, history, restored

from blkrewind.errors import NotRestorable, UserError
from blkrewind.formats import record
from blkrewind.replayer import points
from blkrewind.replayer.rebuild import _range_max, plan, scatter, visible_pieces
from blkrewind.replayer.store import Store


def ingest(capsys, log, store):
    rc, out, err = cli_main(capsys, "ingest", "--log", log, "--store", store)
    assert rc == 0, err


def restore(capsys, store, at, out, *extra, device="loop7"):
    return cli_main(capsys, "restore", "--store", store, "--device", device, "--at", at,
                    "--to", out, *extra)


def latest_plan(store, device="loop7"):
    """The rebuild plan of DEVICE at latest (metadata only, store closed after)."""
    st = Store.open(store)
    try:
        r = points.resolve(st, st.find_device(device), points.parse_point("latest"))
        return plan(st, r.session, r.dev, r.stamp, r.size_bytes)
    finally:
        st.close()


@pytest.fixture(scope="module")
def hist(tmp_path_factory):
    """One history shared by the point tests (read-only use)."""
    d = tmp_path_factory.mktemp("hist")
    s = history(d / "log", seed=31, nbios=200, marks=4, snapshots=4)
    from blkrewind.cli import main
    assert main(["ingest", "--log", str(d / "log"), "--store", str(d / "store")]) == 0
    return s, d / "store"


# ------------------------------------------------------------------ byte-exact restores
@pytest.mark.parametrize("seed,piece,size", [
    (41, 64 << 10, 4 << 20),
    (42, 1000, 2 << 20),          # pieces that end mid-sector, as odd O_DIRECT buffers give
    (43, 4096, 3 << 20 | 512),    # a device size that is not a multiple of 4 KiB
])
def test_restore_matches_the_model_everywhere(capsys, tmp_path, seed, piece, size):
    s = history(tmp_path / "log", seed=seed, nbios=250, marks=4, snapshots=6, piece=piece,
                size=size, chunk=128 << 10)
    store = tmp_path / "store"
    ingest(capsys, tmp_path / "log", store)
    for name, img in s.at_mark.items():
        assert restored(capsys, store, name, tmp_path) == img, name
    for stamp, img in s.at_stamp.items():
        assert restored(capsys, store, str(stamp), tmp_path) == img, stamp
    # every stamp of a stretch: prefix consistency, stamp by stamp
    assert s.baseline_end is not None, "the history has its baseline"
    model = bytearray(s.at_stamp[s.baseline_end])
    stamps = sorted(st for st in s.at_stamp if st >= s.baseline_end)
    assert restored(capsys, store, str(s.baseline_end), tmp_path) == bytes(model)
    assert restored(capsys, store, "latest", tmp_path) == bytes(s.image)
    assert len(stamps) >= 3


def test_every_stamp_of_a_short_history(capsys, tmp_path):
    """Replay the model bio by bio and compare a restore at each stamp."""
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=44, size=1 << 20, chunk=64 << 10, piece=3072)
    s.baseline()
    for _ in range(25):
        r = s.rng.random()
        if r < 0.6:
            s.random_write()
        elif r < 0.8:
            s.discard(512 * s.rng.randrange(0, 1024), 512 * s.rng.randrange(1, 512))
        else:
            s.write_zeroes(512 * s.rng.randrange(0, 1024), 512 * s.rng.randrange(1, 256))
        s.snapshot()
    s.end()
    store = tmp_path / "store"
    ingest(capsys, log, store)
    assert s.baseline_end is not None, "the history has its baseline"
    for stamp in range(s.baseline_end, s.last_stamp + 1):
        assert restored(capsys, store, str(stamp), tmp_path) == s.at_stamp[stamp], stamp


def test_restored_image_is_sparse_where_zero(capsys, tmp_path):
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=45, size=16 << 20, initial=bytes(16 << 20))
    s.baseline()
    s.write(0, s.rng.randbytes(1 << 20))
    s.end()
    store = tmp_path / "store"
    ingest(capsys, log, store)
    out = tmp_path / "sparse.img"
    rc, _, err = restore(capsys, store, "latest", out)
    assert rc == 0, err
    st = os.stat(out)
    assert st.st_size == 16 << 20
    assert st.st_blocks * 512 < 4 << 20  # the 15 MiB of zeroes were never written
    assert out.read_bytes() == bytes(s.image)


def test_cost_follows_the_device_not_the_history(capsys, tmp_path):
    """1000 overwrites of the same 64 KiB: the plan writes the device once."""
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=46, size=1 << 20, chunk=256 << 10)
    s.baseline()
    for _ in range(1000):
        s.write(128 << 10, s.rng.randbytes(64 << 10))
    s.end()
    store = tmp_path / "store"
    ingest(capsys, log, store)
    pl = latest_plan(store)
    assert pl.extents >= 1000
    assert pl.data_bytes + pl.zero_bytes == 1 << 20
    assert len(pl.d_off) <= 20  # a few pieces per baseline chunk, not one per write
    assert restored(capsys, store, "latest", tmp_path) == bytes(s.image)


# ------------------------------------------------------------ the interval structure
def _naive(size, starts, ends):
    owner = np.full(size, -1, np.int64)
    for i, (a, e) in enumerate(zip(starts, ends)):
        a, e = min(max(a, 0), size), min(max(e, 0), size)
        if e > a:
            owner[a:e] = i
    return owner


@pytest.mark.parametrize("seed", range(30))
def test_visible_pieces_match_a_naive_painter(seed):
    rng = random.Random(seed)
    size = rng.choice([1, 7, 100, 4096, 5000])
    n = rng.randrange(0, 60)
    starts = np.array([rng.randrange(-10, size + 5) for _ in range(n)], np.int64)
    ends = starts + np.array([rng.choice([0, 1, 2, 3, 50, size]) for _ in range(n)], np.int64)
    ps, pe, w = visible_pieces(size, starts, ends)
    assert ps[0] == 0 and pe[-1] == size and (ps[1:] == pe[:-1]).all() and (pe > ps).all()
    got = np.repeat(w, pe - ps)
    assert (got == _naive(size, starts.tolist(), ends.tolist())).all()
    assert (w[1:] != w[:-1]).all()  # neighbours with one owner are merged


def test_range_max_large_levels():
    m = 1 << 12
    lo = np.array([0, 5, 100, 0, 4000], np.int64)
    hi = np.array([m, 6, 3000, 1, m], np.int64)
    val = np.array([1, 9, 4, 7, 2], np.int64)
    want = np.full(m, -1)
    for a, e, v in zip(lo, hi, val):
        want[a:e] = np.maximum(want[a:e], v)
    assert (_range_max(m, lo, hi, val) == want).all()


# ---------------------------------------------------------------------------- points
@pytest.mark.parametrize("text,kind,value", [
    ("latest", "latest", None),
    ("123", "stamp", 123),
    ("stamp:77", "stamp", 77),
    ("mark:latest", "mark", "latest"),
    ("before-upgrade", "mark", "before-upgrade"),
    ("mark:2026", "mark", "2026"),
    ("2026-11-25T11:40:00+00:00", "time", 1795606800 * 10**9),
    ("time:2026-11-25T11:40:00.123456789Z", "time", 1795606800 * 10**9 + 123456789),
    ("2026-11-25 11:40:00,5+01:00", "time", (1795606800 - 3600) * 10**9 + 500_000_000),
])
def test_parse_point(text, kind, value):
    p = points.parse_point(text)
    assert (p.kind, p.value) == (kind, value)


def test_parse_point_naive_time_is_local():
    t = 1795606800
    local = datetime.fromtimestamp(t).isoformat()  # naive, in this machine's zone
    assert points.parse_point(local).value == t * 10**9


@pytest.mark.parametrize("text", ["stamp:x", "time:yesterday", "mark:", ""])
def test_parse_point_errors(text):
    with pytest.raises(UserError):
        points.parse_point(text)


def test_points_resolve_and_refuse(capsys, hist, tmp_path):
    s, store = hist
    st = Store.open(store)
    try:
        dev = st.find_device("loop7")
        assert dev.device == "synth:loop7"
        for spec in ("synth:loop7", "loop7", "/dev/loop7"):
            assert st.find_device(spec) == dev
        with pytest.raises(UserError, match="no device 'sdz'.*known: synth:loop7"):
            st.find_device("sdz")
        r = points.resolve(st, dev, points.parse_point("latest"))
        assert r.stamp == s.last_stamp and r.size_bytes == s.size
        # before the baseline finished
        with pytest.raises(NotRestorable, match="before the baseline of synth:loop7 finished"):
            points.resolve(st, dev, points.parse_point(str(s.baseline_end - 1)))
        with pytest.raises(NotRestorable, match="before synth:loop7 was traced"):
            points.resolve(st, dev, points.parse_point(str(s.stamp_base - 5)))
        with pytest.raises(NotRestorable, match="after session .* ended"):
            points.resolve(st, dev, points.parse_point(str(s.last_stamp + 1)))
        # marks
        with pytest.raises(NotRestorable, match="no mark named 'nope'; marks: m1, m2, m3, m4"):
            points.resolve(st, dev, points.parse_point("nope"))
        # times: a mark's time lands on the mark's stamp (or a later stamp of the same time)
        name = "m2"
        stamp = s.marks[name][0]
        t = s.time_of[stamp]
        iso = datetime.fromtimestamp(t // 10**9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") \
            + f".{t % 10**9:09d}Z"
        r = points.resolve(st, dev, points.parse_point(iso))
        assert r.stamp == max(x for x, tx in s.time_of.items() if tx <= t)
        # just before a stamp's time: the stamp before it
        r2 = points.resolve(st, dev, points.Point("time", t - 1, "t"))
        assert r2.stamp == max(x for x, tx in s.time_of.items() if tx <= t - 1)
        # outside every restorable interval
        with pytest.raises(NotRestorable, match="before synth:loop7 was traced"):
            points.resolve(st, dev, points.Point("time", s.time_of[s.stamp_base] - 10**9, "t"))
        with pytest.raises(NotRestorable, match="before the baseline of synth:loop7 finished"):
            points.resolve(st, dev, points.Point("time", s.time_of[s.baseline_end] - 1, "t"))
        with pytest.raises(NotRestorable, match="outside every restorable interval"):
            points.resolve(st, dev, points.Point("time", s.time_of[s.last_stamp] + 10**12, "t"))
    finally:
        st.close()
    # a time restores what the model held at the stamp it lands on
    out = tmp_path / "t.img"
    rc, _, err = restore(capsys, store, iso, out)
    assert rc == 0, err
    want = s.at_mark[name] if r.stamp == stamp else None
    if want is not None:
        assert out.read_bytes() == want


def test_point_errors_on_the_command_line(hist, tmp_path):
    s, store = hist
    out = tmp_path / "x.img"
    assert_one_line_error(run_cli("restore", "--store", store, "--device", "loop7", "--at",
                                  "nosuchmark", "--to", out, check=False),
                          "no mark named 'nosuchmark'", "marks: m1")
    assert_one_line_error(run_cli("restore", "--store", store, "--device", "loop7", "--at",
                                  s.baseline_end - 1, "--to", out, check=False),
                          "before the baseline")
    assert_one_line_error(run_cli("restore", "--store", store, "--device", "/dev/blkrewind-nope",
                                  "--at", "latest", "--to", out, check=False),
                          "no device", "known: synth:loop7 (/dev/loop7)")
    assert_one_line_error(run_cli("restore", "--store", store, "--device", "loop7", "--at",
                                  "time:not-a-time", "--to", out, check=False), "ISO 8601")
    assert not out.exists()


# ---------------------------------------------------------------------------- targets
def test_target_rules(capsys, hist, tmp_path):
    s, store = hist
    out = tmp_path / "img"
    rc, _, err = restore(capsys, store, "latest", out)
    assert rc == 0, err
    assert out.read_bytes() == bytes(s.image)
    # an existing file needs --force; with it, leftovers of the old content vanish
    out.write_bytes(b"\xEE" * (s.size + 12345))
    rc, _, err = restore(capsys, store, "latest", out)
    assert rc != 0 and "exists" in err and "--force" in err
    assert out.read_bytes()[:10] == b"\xEE" * 10
    rc, _, err = restore(capsys, store, "latest", out, "--force")
    assert rc == 0, err
    assert out.read_bytes() == bytes(s.image)
    # not a file or block device; a missing directory
    rc, _, err = restore(capsys, store, "latest", "/dev/null", "--force")
    assert rc != 0 and "neither a regular file nor a block device" in err
    rc, _, err = restore(capsys, store, "latest", tmp_path / "no" / "such" / "img")
    assert rc != 0 and "does not exist" in err
    r = run_cli("restore", "--store", store, "--device", "loop7", "--at", "latest", "--to",
                tmp_path / "img", check=False)
    assert_one_line_error(r, "exists", "--force")
    # restore refuses before the target is touched when the point is bad
    rc, _, err = restore(capsys, store, "nosuchmark", tmp_path / "new.img")
    assert rc == 5 and not (tmp_path / "new.img").exists()


def test_multi_device_session(capsys, tmp_path):
    """Two devices in one session: each restores to its own content."""
    log = tmp_path / "log"
    a = SynthSession(str(log), seed=47, size=2 << 20)
    # a second device in the same session: same stamps counter, different dev
    b_dev = record.kdev(7, 8)
    b_img = bytearray(os.urandom(1 << 20))
    a._user(record.json_record(record.R_DEVICE, {
        "name": "loop8", "path": "/dev/loop8", "dev": b_dev, "size_bytes": 1 << 20,
        "host": "synth"}, seq=a._useq(), dev=b_dev))
    a.baseline()
    for off in range(0, 1 << 20, 256 << 10):
        seq = a._useq()
        a._user(record.make_record(bytes(b_img[off:off + (256 << 10)]), rtype=record.R_BASE,
                                   seq=seq, aux=seq, dev=b_dev, sector=off // 512,
                                   bio_size=256 << 10, ktime_ns=a.tick()))
    stamp, kt = a._stamp()
    a._kernel(record.json_record(record.R_POINT, {"what": "baseline_end", "dev": b_dev},
                                 stamp=stamp, seq=a._kseq(), ktime_ns=kt))
    a.workload(50, marks=1, snapshots=0)
    # a write to loop8 in the middle of loop7's history
    stamp, kt = a._stamp()
    data = os.urandom(8192)
    a._kernel(record.make_record(data, rtype=record.R_BIO, stamp=stamp, seq=a._kseq(),
                                 ktime_ns=kt, sector=16, dev=b_dev, bio_size=8192,
                                 flags=record.F_FIRST | record.F_LAST, op=record.OP_WRITE))
    b_img[16 * 512:16 * 512 + 8192] = data
    a.workload(20, marks=0, snapshots=0)
    a.end()
    store = tmp_path / "store"
    ingest(capsys, log, store)
    assert restored(capsys, store, "latest", tmp_path, device="loop7") == bytes(a.image)
    assert restored(capsys, store, "latest", tmp_path, device="synth:loop8") == bytes(b_img)
    # loop8 is restorable only from its own baseline end
    rc, _, err = restore(capsys, store, str(a.baseline_end), tmp_path / "x.img",
                         device="loop8")
    assert rc == 5 and "before the baseline of synth:loop8" in err


def test_both_write_paths_and_a_target_that_keeps_old_bytes(capsys, tmp_path):
    """The direct path, pwritev and the window buffer give the same image; on a target that is
    not freshly truncated (as a block device) the zero pieces are written, not skipped."""
    from blkrewind.replayer.rebuild import Target, execute, open_target

    log = tmp_path / "log"
    s = history(log, seed=48, nbios=300, size=3 << 20, piece=1536)
    store = tmp_path / "store"
    ingest(capsys, log, store)
    pl = latest_plan(store)
    assert pl.zero_bytes > 0
    for method in ("direct", "pwritev", "buffer"):
        out = tmp_path / f"{method}.img"
        t = open_target(str(out), pl.size, False)
        try:
            assert execute(pl, t, method=method)["method"] == method
        finally:
            os.close(t.fd)
        assert out.read_bytes() == bytes(s.image), method
    for chosen in (None, "pwritev"):
        old = tmp_path / "old.img"
        old.write_bytes(b"\xEE" * pl.size)
        fd = os.open(old, os.O_RDWR)
        try:
            res = execute(pl, Target(str(old), fd, is_block=False, created=False, sparse=False),
                          method=chosen)
        finally:
            os.close(fd)
        assert res["method"] == (chosen or "direct")
        assert old.read_bytes() == bytes(s.image)


# ------------------------------------------------------------ resync chunks, write errors
def test_write_error_then_resync(capsys, tmp_path):
    """A write whose completion carries an error is applied as captured: before the resync's
    end the range holds what the bio tried to write; from Re on what the device really held
    (the resync chunk). Bios after Rs lie on top of the chunk."""
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=71, size=1 << 20, chunk=64 << 10)
    s.baseline()
    s.workload(20, marks=0, snapshots=0)
    c = s.checkpoint()
    data = s.rng.randbytes(16 << 10)
    bad = s.failed_write(128 << 10, data, error=10)
    tried = s.snapshot()
    assert s.at_stamp[tried][128 << 10:(128 << 10) + len(data)] == data
    s.write(4096, s.rng.randbytes(8192))
    before = s.snapshot()
    over = s.rng.randbytes(4096)
    rs, re_ = s.resync(c, "write error",
                       between=lambda x: x.write((128 << 10) + 8192, over))
    s.mark("after")
    s.workload(10, marks=0, snapshots=0)
    s.end()
    store = tmp_path / "store"
    ingest(capsys, log, store)
    # no gap: every stamp is restorable, the failed write is shown as captured until Re
    rc, out, err = cli_main(capsys, "sql", "--store", store,
                            "SELECT * FROM completions WHERE error != 0", "--format", "json")
    assert rc == 0 and f"{bad}" in out and '"error": 10' in out
    rc, out, err = cli_main(capsys, "sql", "--store", store, "SELECT * FROM gaps",
                            "--format", "csv")
    assert rc == 0 and len(out.strip().splitlines()) == 1  # header only
    assert restored(capsys, store, str(tried), tmp_path) == s.at_stamp[tried]
    assert restored(capsys, store, str(before), tmp_path) == s.at_stamp[before]
    img_re = restored(capsys, store, str(re_), tmp_path)
    assert img_re == s.at_stamp[re_]
    assert img_re[(128 << 10) + 8192:(128 << 10) + 8192 + 4096] == over   # a bio after Rs
    assert img_re[128 << 10:(128 << 10) + 8192] != data[:8192]             # the device's data
    assert restored(capsys, store, "after", tmp_path) == s.at_mark["after"]
    assert restored(capsys, store, "latest", tmp_path) == bytes(s.image)
    # between Rs and Re: what the bios wrote (the resync is not finished)
    rc, _, err = restore(capsys, store, str(rs), tmp_path / "rs.img")
    assert rc == 0, err
    assert (tmp_path / "rs.img").read_bytes()[128 << 10:(128 << 10) + len(data)] == data


def test_resync_rereads_larger_aux_wins(capsys, tmp_path):
    """Two chunks of one resync over the same range: the larger aux (a re-read) wins;
    both lie over the bios before Rs and under those after Re."""
    log = tmp_path / "log"
    s = SynthSession(str(log), seed=72, size=1 << 20, chunk=64 << 10)
    s.baseline()
    c = s.checkpoint()
    s.write(0, s.rng.randbytes(64 << 10), drop_piece=0)
    rs, re_ = s.resync(c, "ring full")
    fresh = s.rng.randbytes(64 << 10)
    seq = s._useq()
    s._user(record.make_record(fresh, rtype=record.R_BASE, stamp=rs, seq=seq, aux=10**9,
                               dev=s.dev, sector=0, bio_size=len(fresh), ktime_ns=s.tick()))
    s.image[0:len(fresh)] = fresh
    at_re = bytes(s.image)
    top = s.write(4096, s.rng.randbytes(4096))
    s.end()
    store = tmp_path / "store"
    ingest(capsys, log, store)
    assert restored(capsys, store, str(re_), tmp_path) == at_re
    assert restored(capsys, store, str(top), tmp_path) == bytes(s.image)
    rc, _, err = restore(capsys, store, str(rs), tmp_path / "x.img")
    assert rc == 5 and "in a gap" in err


@pytest.mark.parametrize("unit", [4096, 512, 100])
def test_scatter_matches_piece_by_piece_copy(unit):
    """scatter (vectorised: rows of the pieces' common power-of-two block as void items;
    piece by piece below SCATTER_MIN_BLOCK) writes exactly what a copy per piece writes."""
    rng = np.random.default_rng(unit)
    slots = 512
    src = rng.integers(0, 256, slots * unit * 2, dtype=np.uint8)
    lens = rng.integers(1, 4, 200) * unit
    d_off = np.cumsum(lens + rng.integers(0, 3, 200) * unit) - lens   # disjoint, holes
    perm = rng.permutation(200)
    d_off, lens = d_off[perm], lens[perm]
    s_off = rng.integers(0, (len(src) - 4 * unit) // unit, 200) * unit
    size = int((d_off + lens).max())
    for dst in (np.zeros(size, np.uint8), np.zeros(size + 7, np.uint8)[7:]):
        assert not dst.any()
        want = np.zeros(size, np.uint8)
        for a, b, n in zip(d_off.tolist(), s_off.tolist(), lens.tolist()):
            want[a:a + n] = src[b:b + n]
        scatter(dst, d_off, src, s_off, lens)
        assert np.array_equal(dst, want)
