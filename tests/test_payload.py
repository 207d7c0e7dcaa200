"""Direct payload reads (replayer/payload.py) and the restore's direct path (rebuild.py
`_execute_direct`): the row places found by walking the pages equal what pyarrow decodes, for
one page per row group (older stores) and many (ingest's PAGE_BYTES); a damaged page is an
error (its CRC), never wrong bytes, in `restore` and in an image's reads; a compressed row
group is left to pyarrow; pieces that cross the direct path's windows and a device size that
is not a multiple of 4 KiB come out exact. Real LOGs, real Parquet files."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from synth import cli_main, history
from test_rebuild import ingest, latest_plan, restore

from blkrewind.errors import StoreError
from blkrewind.replayer import payload, rebuild
from blkrewind.replayer.image import Image
from blkrewind.replayer.ingest import payload as ingest_payload
from blkrewind.replayer.payload import PayloadFile
from blkrewind.replayer.payloadstore import PAYLOAD_SCHEMA


def _table(rows: list[bytes]) -> pa.Table:
    n = len(rows)
    return pa.Table.from_arrays([pa.array(np.zeros(n, np.uint16)), pa.array(np.zeros(n, np.uint64)),
                                 pa.array(np.arange(n, dtype=np.uint64)),
                                 pa.array(np.zeros(n, np.uint32)), pa.array(rows, pa.binary())],
                                schema=PAYLOAD_SCHEMA)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("kw", [{}, {"data_page_size": 64 << 10, "write_batch_size": 1}],
                         ids=["one-page", "pages"])
def test_row_places_equal_pyarrow(tmp_path, kw, native, monkeypatch):
    if native and payload._native_walk is None:
        pytest.skip("replayer/pieces.c is not built: run .venv/bin/python bpf/build.py")
    if not native:
        monkeypatch.setattr(payload, "_native_walk", None)
    rng = np.random.default_rng(3)
    groups = [[rng.bytes(4096) for _ in range(40)],                      # one length
              [rng.bytes(int(k)) for k in rng.integers(1, 70000, 30)],   # any lengths
              [b"", rng.bytes(10), b""]]
    path = tmp_path / "p.parquet"
    with pq.ParquetWriter(path, PAYLOAD_SCHEMA, compression="none", use_dictionary=False,
                          write_statistics=False, write_page_checksum=True, **kw) as w:
        for g in groups:
            w.write_table(_table(g), row_group_size=len(g))
    pf = PayloadFile(str(path))
    slow = PayloadFile(str(path))
    _footer_equals_pyarrow(path)
    try:
        for rg, g in enumerate(groups):
            r = pf.rows(rg)
            assert r is not None and len(r.pos) == len(g)
            # the pages found alike by comparing bytes (payload._Template) are the pages
            # found by parsing every header
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(payload._Template, "of", classmethod(lambda *a: None))
                r2 = slow.rows(rg)
            assert r2 is not None and np.array_equal(r2.spans, r.spans)
            for a, b in ((r.pos, r2.pos), (r.ln, r2.ln), (r.page, r2.page)):
                assert np.array_equal(a, b)
            if kw and rg == 0:
                assert len(r.spans) > 1
            pos = pf.place(rg, np.arange(len(g)), np.zeros(len(g), np.int64), r.ln)
            assert [bytes(pf.view[p:p + n]) for p, n in zip(pos.tolist(), r.ln.tolist())] == g
        with pytest.raises(StoreError, match="shorter"):
            pf.place(0, np.array([0]), np.array([1]), np.array([4096]))
    finally:
        pf.close()
        slow.close()


def test_compressed_row_groups_are_left_to_pyarrow(tmp_path):
    path = tmp_path / "c.parquet"
    with pq.ParquetWriter(path, PAYLOAD_SCHEMA, compression="lz4", use_dictionary=False,
                          write_page_checksum=True) as w:
        w.write_table(_table([b"a" * 5000] * 3), row_group_size=3)
    pf = PayloadFile(str(path))
    try:
        assert pf.rows(0) is None
    finally:
        pf.close()


def _store(capsys, tmp_path, monkeypatch, **kw):
    """A history stored without compression (lz4 row groups are pyarrow's, as before)."""
    monkeypatch.setattr(ingest_payload, "COMPRESSION", "none")
    log = tmp_path / "log"
    s = history(log, seed=48, nbios=300, piece=1536, **kw)
    store = tmp_path / "store"
    ingest(capsys, log, store)
    return s, store


def test_direct_restore_across_windows_and_an_odd_size(capsys, tmp_path, monkeypatch):
    s, store = _store(capsys, tmp_path, monkeypatch, size=(3 << 20) + 1536)
    monkeypatch.setattr(rebuild, "DIRECT_WINDOW", 64 << 10)   # many pieces cross a window
    pl = latest_plan(store)
    out = tmp_path / "d.img"
    t = rebuild.open_target(str(out), pl.size, False)
    try:
        assert rebuild.execute(pl, t, method="direct")["method"] == "direct"
    finally:
        os.close(t.fd)
    assert out.read_bytes() == bytes(s.image)


def _damage(pl) -> None:
    """Flip a byte of the payload the plan's largest data piece shows."""
    k = int(np.argmax(pl.d_len))
    path = pl.files[int(pl.d_file[k])]
    pf = PayloadFile(path)
    try:
        at = int(pf.place(int(pl.d_rg[k]), pl.d_idx[k:k + 1], pl.d_src[k:k + 1],
                          pl.d_len[k:k + 1])[0]) + int(pl.d_len[k]) // 2
    finally:
        pf.close()
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x55]))


def test_a_damaged_page_is_an_error_in_restore_and_in_reads(capsys, tmp_path, monkeypatch):
    s, store = _store(capsys, tmp_path, monkeypatch)
    pl = latest_plan(store)
    _damage(pl)
    rc, _, err = restore(capsys, store, "latest", tmp_path / "x.img")
    assert rc != 0 and "Traceback" not in err and "checksum" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.img").exists()
    img = Image(pl)
    try:
        with pytest.raises(StoreError, match="checksum"):
            for off in range(0, img.size, 1 << 20):
                img.read(off, min(1 << 20, img.size - off))
    finally:
        img.close()
    rc, _, err = cli_main(capsys, "verify", "--store", store)
    assert rc != 0


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_copy_pieces(native, monkeypatch):
    """copy_pieces in C (replayer/pieces.c) and in Python copy the same bytes; a piece outside
    its buffer is an error, never a copy."""
    if native and payload._native_copy is None:
        pytest.skip("replayer/pieces.c is not built: run .venv/bin/python bpf/build.py")
    if not native:
        monkeypatch.setattr(payload, "_native_copy", None)
    rng = np.random.default_rng(5)
    srcs = [rng.bytes(int(n)) for n in (100000, 5000, 70000)]
    views = [memoryview(s) for s in srcs] + [None]    # an unused slot may be None
    k = 200
    n = rng.integers(0, 3000, k)
    f = rng.integers(0, 3, k)
    s_off = np.array([int(rng.integers(0, len(srcs[j]) - m + 1)) for j, m in zip(f, n)])
    d_off = np.cumsum(n) - n          # disjoint, in order
    dst = bytearray(int(n.sum()) + 10)
    payload.copy_pieces(dst, d_off, views, f, s_off, n)
    want = b"".join(srcs[j][a:a + m] for j, a, m in zip(f.tolist(), s_off.tolist(), n.tolist()))
    assert bytes(dst[:len(want)]) == want
    if native:
        for bad in (dict(n=n + np.where(np.arange(k) == 7, 10 ** 6, 0)),       # past its source
                    dict(d_off=d_off + len(dst)),                              # past dst
                    dict(f=np.where(np.arange(k) == 3, 3, f))):                # a None slot
            args = dict(d_off=d_off, f=f, s_off=s_off, n=n) | bad
            with pytest.raises(ValueError):
                payload.copy_pieces(dst, args["d_off"], views, args["f"], args["s_off"],
                                    args["n"])
        with pytest.raises(ValueError):
            payload.copy_pieces(bytes(len(dst)), d_off, views, f, s_off, n)


def _footer_equals_pyarrow(path) -> None:
    """payload._Footer (the thrift parser that spares the read path pyarrow) reads what
    pyarrow reads of each row group's `data` column chunk."""
    md = pq.ParquetFile(path).metadata
    col = [md.schema.column(i).name for i in range(md.num_columns)].index("data")
    b = path.read_bytes()
    fts = [payload._Footer.read(b)]
    if payload._native_chunks is not None:   # the C reader (pieces.c) and the Python one
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(payload, "_native_chunks", None)
            fts.append(payload._Footer.read(b))
    for ft in fts:
        assert ft.has_data and ft.num_row_groups == md.num_row_groups
        for rg in range(md.num_row_groups):
            c, d = md.row_group(rg).column(col), ft.row_group(rg).column(0)
            for a in payload._Chunk.__slots__:
                assert getattr(c, a) == getattr(d, a), (rg, a)


def _chunks(ft) -> list:
    return [None if c is None else [getattr(c, a) for a in payload._Chunk.__slots__]
            for c in ft.chunks]


def test_footer_native_reader_on_damaged_footers(tmp_path):
    """pieces.c br_parquet_chunks on footers with bytes changed or cut: never a read outside
    the buffer (the process would die), and whatever it returns is what the Python parser
    reads of the same bytes."""
    if payload._native_chunks is None:
        pytest.skip("replayer/pieces.c is not built: run .venv/bin/python bpf/build.py")
    rng = np.random.default_rng(5)
    path = tmp_path / "p.parquet"
    with pq.ParquetWriter(path, PAYLOAD_SCHEMA, compression="none", use_dictionary=False,
                          write_page_checksum=True) as w:
        for _ in range(4):
            w.write_table(_table([rng.bytes(100) for _ in range(10)]), row_group_size=10)
    good = path.read_bytes()
    flen = int.from_bytes(good[-8:-4], "little")
    p0 = len(good) - 8 - flen
    ok = 0
    for trial in range(3000):
        d = bytearray(good)
        if trial % 3 == 2:      # the footer's length word points at fewer bytes: a cut footer
            cut = int(rng.integers(1, flen))
            d[-8:-4] = (flen - cut).to_bytes(4, "little")
        for _ in range(int(rng.integers(1, 4))):
            d[p0 + int(rng.integers(0, flen))] = int(rng.integers(0, 256))
        b = bytes(d)
        got = payload._Footer._read_native(b, len(b) - 8 - int.from_bytes(b[-8:-4], "little"),
                                           len(b) - 8)
        if got is None:
            continue
        ok += 1
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(payload, "_native_chunks", None)
            assert _chunks(got) == _chunks(payload._Footer.read(b)), trial
    assert ok > 100     # (many changes leave a footer that still parses: they were compared)


def test_footer_of_compressed_and_dictionary_files(tmp_path):
    rng = np.random.default_rng(9)
    rows = [rng.bytes(3000) for _ in range(50)] + [b"x" * 4096] * 50
    for i, kw in enumerate([{"compression": "lz4", "use_dictionary": False},
                            {"compression": "none", "use_dictionary": True},
                            {"compression": "zstd", "use_dictionary": False}]):
        path = tmp_path / f"p{i}.parquet"
        with pq.ParquetWriter(path, PAYLOAD_SCHEMA, write_statistics=False,
                              write_page_checksum=True, **kw) as w:
            w.write_table(_table(rows), row_group_size=40)
        _footer_equals_pyarrow(path)
