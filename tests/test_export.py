"""`blkrewind export`: a point served over NBD by nbdkit, read with nbdcopy/nbdinfo.

Histories: synthetic ones (tests/synth.py: every stamp's image known) for random stamps, many
concurrent readers, an export during `serve` ingesting and during `prune`; real traced ext4
and xfs histories (tests/instant_hist.py) at every mark and at latest.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from conftest import assert_one_line_error, need_root, run_cli
from instant_hist import Export, free_port, fs_history, nbdcopy, wait_until
from synth import cli_main, history

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None and os.environ.get("CI") != "true",
                                reason="nbdkit not installed")


def ingest(capsys, log, store):
    rc, _, err = cli_main(capsys, "ingest", "--log", log, "--store", store)
    assert rc == 0, err


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth")
    s = history(base / "log", seed=71, nbios=400, size=6 << 20, piece=4096, marks=3,
                snapshots=6)
    run_cli("ingest", "--log", base / "log", "--store", base / "store")
    return s, base / "store"


def test_export_equals_the_model_at_stamps_and_marks(synth_store, tmp_path):
    s, store = synth_store
    rng = random.Random(3)
    stamps = rng.sample(sorted(s.at_stamp), min(3, len(s.at_stamp)))
    pts = [(str(st), s.at_stamp[st]) for st in stamps]
    pts += [(m, img) for m, img in list(s.at_mark.items())[:2]]
    pts.append(("latest", bytes(s.image)))
    exports = [Export("--store", store, "--device", "loop7", "--at", p) for p, _ in pts]
    try:  # several exports of different points at once
        for (p, want), ex in zip(pts, exports):
            out = tmp_path / "out.img"
            nbdcopy(ex.uri, out)
            assert out.read_bytes() == want, f"export at {p} differs from the model"
            out.unlink()
    finally:
        for ex in exports:
            rc, err = ex.stop()
            assert rc == 0, err
    assert not any(Path("/run/blkrewind/exports").glob("synth_loop7-*-" + str(exports[0].p.pid)))


def test_many_concurrent_random_readers(synth_store, tmp_path):
    """8 threads reading random ranges (512 B .. 1 MiB) through an nbdfuse file of the export
    (each read an NBD request to nbdkit), beside 4 nbdcopy runs (4 connections, 64 requests in
    flight each)."""
    need_root()
    s, store = synth_store
    want = bytes(s.image)
    fdir = tmp_path / "fuse"
    fdir.mkdir()
    with Export("--store", store, "--device", "loop7", "--at", "latest") as ex:
        sock = ex.uri.split("socket=", 1)[1]
        fuse = subprocess.Popen(["nbdfuse", "-r", "-P", str(tmp_path / "fuse.pid"),
                                 str(fdir / "image"), "--unix", sock],
                                stderr=subprocess.PIPE)
        try:
            from instant_hist import wait_until
            wait_until(lambda: (tmp_path / "fuse.pid").exists(), what="nbdfuse")
            errors: list[str] = []

            def reader(seed: int) -> None:
                rng = random.Random(seed)
                fd = os.open(fdir / "image", os.O_RDONLY)
                try:
                    for _ in range(60):
                        n = rng.choice([512, 4096, 65536, 1 << 20])
                        off = rng.randrange(0, len(want) - n) // 512 * 512
                        if os.pread(fd, n, off) != want[off:off + n]:
                            errors.append(f"bytes {off}..{off + n} differ")
                            return
                finally:
                    os.close(fd)

            def copier(i: int) -> None:
                out = tmp_path / f"copy{i}.img"
                nbdcopy(ex.uri, out)
                if out.read_bytes() != want:
                    errors.append(f"nbdcopy {i} differs")

            ts = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
            ts += [threading.Thread(target=copier, args=(i,)) for i in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert not errors, errors[:3]
        finally:
            subprocess.run(["fusermount3", "-u", str(fdir)], check=False)
            fuse.wait(30)


def test_export_over_tcp_loopback_and_nbdinfo(synth_store):
    s, store = synth_store
    port = free_port()
    with Export("--store", store, "--device", "loop7", "--at", "latest", "--listen",
                f"127.0.0.1:{port}") as ex:
        assert ex.uri == f"nbd://127.0.0.1:{port}"
        info = subprocess.run(["nbdinfo", "--json", ex.uri], capture_output=True, text=True,
                              check=True).stdout
        assert f'"export-size": {len(s.image)}' in info
        assert '"is_read_only": true' in info


def test_writable_export_keeps_the_store_unchanged(synth_store, tmp_path):
    s, store = synth_store
    sums = {p: p.read_bytes() for p in (store / "payload").rglob("*") if p.is_file()}
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(len(s.image)))
    with Export("--store", store, "--device", "loop7", "--at", "latest", "--writable") as ex:
        nbdcopy(str(junk), ex.uri)   # overwrite every byte through the overlay
        out = tmp_path / "back.img"
        nbdcopy(ex.uri, out)
        assert out.read_bytes() == junk.read_bytes()
    with Export("--store", store, "--device", "loop7", "--at", "latest") as ex:
        out = tmp_path / "out.img"
        nbdcopy(ex.uri, out)
        assert out.read_bytes() == bytes(s.image)
    assert {p: p.read_bytes() for p in (store / "payload").rglob("*") if p.is_file()} == sums
    assert "all match" in run_cli("verify", "--store", store).stderr


def test_bad_input_one_line_each(synth_store, tmp_path):
    s, store = synth_store
    base = ["export", "--store", store, "--device", "loop7"]
    cp = run_cli(*base, "--at", "nosuchmark", check=False)
    assert_one_line_error(cp, "nosuchmark")
    cp = run_cli(*base, "--at", str(max(s.at_stamp) + 10**6), check=False)
    assert_one_line_error(cp, "after session")
    open_ = history(tmp_path / "log", seed=73, nbios=30, size=1 << 20, end=False)
    run_cli("ingest", "--log", tmp_path / "log", "--store", tmp_path / "open")
    cp = run_cli("export", "--store", tmp_path / "open", "--device", "loop7", "--at",
                 str(open_.next_stamp + 100), check=False)
    assert_one_line_error(cp, "past the consistent watermark")
    cp = run_cli(*base, "--at", "latest", "--listen", "10.1.2.3:10809", check=False)
    assert_one_line_error(cp, "needs --tls")
    cp = run_cli(*base, "--at", "latest", "--listen", "nohost", check=False)
    assert_one_line_error(cp, "IP address")
    cp = run_cli("export", "--store", tmp_path / "none", "--device", "x", "--at", "latest",
                 check=False)
    assert_one_line_error(cp, "no store")


def test_export_during_serve_and_prune(tmp_path):
    """While `serve` holds the store the export reads it through serve's query socket; a
    prune (run by the server) folds the exported point away and deletes payload files: the
    running export still serves its point byte for byte; a new export of it is refused."""
    from test_server import ServerProc

    s = history(tmp_path / "log", seed=72, nbios=300, size=4 << 20, piece=4096, marks=3,
                snapshots=0)
    store = tmp_path / "store"
    run_cli("ingest", "--log", tmp_path / "log", "--store", store)
    mark = next(iter(s.at_mark))
    srv = ServerProc(tmp_path, store, None)
    try:
        with Export("--store", store, "--device", "loop7", "--at", mark) as ex:
            out = tmp_path / "out.img"
            nbdcopy(ex.uri, out)
            assert out.read_bytes() == s.at_mark[mark]
            r = run_cli("prune", "--store", store, "--device", "loop7", "--keep", "0s")
            assert "pruned" in r.stderr, r.stderr
            out.unlink()
            nbdcopy(ex.uri, out)
            assert out.read_bytes() == s.at_mark[mark], "the export changed under a prune"
        cp = run_cli("export", "--store", store, "--device", "loop7", "--at",
                     str(s.marks[mark][-1]), check=False)
        assert_one_line_error(cp, "pruned")
        with Export("--store", store, "--device", "loop7", "--at", "latest") as ex:
            out.unlink()
            nbdcopy(ex.uri, out)
            assert out.read_bytes() == bytes(s.image)
    finally:
        srv.stop()


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_export_of_a_traced_file_system_equals_restore(fstype, tmp_path):
    need_root()
    h = fs_history(tmp_path / "h", fstype)
    for p in [*h.copies, "latest"]:
        with Export("--store", h.store, "--device", h.name, "--at", p) as ex:
            out = tmp_path / "out.img"
            nbdcopy(ex.uri, out)
            want = h.copies[p] if p in h.copies else h.final
            assert subprocess.run(["cmp", out, want]).returncode == 0, f"export at {p} differs"
            out.unlink()


def test_tls_export_needs_a_client_certificate_of_the_ca(synth_store, tmp_path):
    """--listen with --tls: TLS 1.3 and a client certificate of the same CA (blkrewind tls
    init); plain NBD and TLS without a client certificate are refused."""
    s, store = synth_store
    run_cli("tls", "init", tmp_path / "ca", "--hosts", "srv=127.0.0.1,cli")
    cdir, nocert = tmp_path / "client", tmp_path / "nocert"
    cdir.mkdir()
    nocert.mkdir()
    for src, dst in (("ca.pem", "ca-cert.pem"), ("cert.pem", "client-cert.pem"),
                     ("key.pem", "client-key.pem")):
        (cdir / dst).symlink_to(tmp_path / "ca" / "cli" / src)
    (nocert / "ca-cert.pem").symlink_to(tmp_path / "ca" / "cli" / "ca.pem")
    port = free_port()
    with Export("--store", store, "--device", "loop7", "--at", "latest", "--listen",
                f"127.0.0.1:{port}", "--tls", tmp_path / "ca" / "srv") as ex:
        assert ex.uri == f"nbds://127.0.0.1:{port}"
        out = tmp_path / "out.img"
        nbdcopy(f"{ex.uri}/?tls-certificates={cdir}", out)
        assert out.read_bytes() == bytes(s.image)
        for uri in (f"nbd://127.0.0.1:{port}", f"{ex.uri}/?tls-certificates={nocert}"):
            p = subprocess.run(["nbdinfo", "--no-content", uri], capture_output=True, timeout=30)
            assert p.returncode != 0, uri


@pytest.mark.bpf
def test_export_while_serve_ingests_a_shipping_tracer(make_loop, tmp_path):
    """A traced loop device ships its frames over mutual TLS to `serve`; a writer keeps
    writing, so serve keeps ingesting, while the mark is exported and read with nbdcopy: the
    export equals `restore` at the mark (through the server) and the copy taken at the mark."""
    import time

    from test_server import ServerProc
    from tracerproc import TraceProc, copy_device, direct_writes, same_file

    run_cli("tls", "init", tmp_path / "tls", "--hosts", "replayer=127.0.0.1,hosta")
    store = tmp_path / "store"
    loop = make_loop(size_mb=32)
    key = f"hosta:{os.path.basename(loop.path)}"
    srv = ServerProc(tmp_path, store, tmp_path / "tls" / "replayer")
    stop = threading.Event()
    writer = None
    try:
        with TraceProc([loop.path], tmp_path / "log", "--tls", tmp_path / "tls" / "hosta",
                       "--ship", f"127.0.0.1:{srv.port}", "--segment-mb", "4") as t:
            rng = random.Random(11)
            direct_writes(loop.path, rng, 24, slots=512)
            run_cli("mark", "m1", "--log", tmp_path / "log")
            copy_device(loop.path, tmp_path / "m1.img")

            def keep_writing():
                wrng = random.Random(12)
                while not stop.is_set():
                    direct_writes(loop.path, wrng, 4, slots=512)
                    time.sleep(0.05)

            writer = threading.Thread(target=keep_writing)
            writer.start()

            def records() -> int:
                return int(run_cli("sql", "--store", store, "--format", "csv",
                                   "SELECT count(*) FROM records").stdout.split()[1])

            deadline = time.monotonic() + 60
            while True:   # the mark reaches the store when serve has ingested its frame
                try:
                    ex = Export("--store", store, "--device", key, "--at", "m1")
                    break
                except AssertionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            with ex:
                before = records()
                nbdcopy(ex.uri, tmp_path / "export.img")
                run_cli("restore", "--store", store, "--device", key, "--at", "m1", "--to",
                        tmp_path / "restored.img")
                wait_until(lambda: records() > before, 30, "serve ingesting more records")
                assert same_file(tmp_path / "export.img", tmp_path / "restored.img")
                assert same_file(tmp_path / "export.img", tmp_path / "m1.img")
                (tmp_path / "export.img").unlink()
                nbdcopy(ex.uri, tmp_path / "export.img")   # again, after more was ingested
                assert same_file(tmp_path / "export.img", tmp_path / "m1.img")
            stop.set()
            writer.join(30)
            assert t.stop() == 0, t.stderr
    finally:
        stop.set()
        if writer is not None:
            writer.join(30)
        srv.stop()
