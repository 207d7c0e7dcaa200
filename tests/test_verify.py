"""`blkrewind verify`: a replica streamed from a real store compared with a real loop
device (equal -> 0; flipped bytes -> 1 naming the exact ranges), the traced path as the
default live device (with BPF), and `verify --store` finding a damaged Parquet file."""
from __future__ import annotations

import os

import pytest
from synth import SynthSession, cli_main
from tracerproc import TraceProc, cli


def _put(dev: str, off: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, data, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _synth_store(tmp_path, capsys):
    log, store = tmp_path / "log", tmp_path / "store"
    s = SynthSession(str(log), seed=81, size=8 << 20, chunk=256 << 10, piece=16 << 10)
    s.baseline()
    s.workload(150, marks=2, snapshots=0)
    s.end()
    rc, _, err = cli_main(capsys, "ingest", "--log", log, "--store", store)
    assert rc == 0, err
    return s, store


def test_verify_against_a_loop_device(capsys, tmp_path, make_loop):
    s, store = _synth_store(tmp_path, capsys)
    loop = make_loop(size_mb=8)
    _put(loop.path, 0, bytes(s.image))
    args = ["verify", "--store", store, "--device", "loop7", "--live", loop.path]
    rc, out, err = cli_main(capsys, *args)
    assert rc == 0, out + err
    assert out.startswith("equal:") and "8.0 MiB compared" in out
    # flip bytes: two neighbouring bytes (one range) and a run across a 1 MiB boundary
    img = bytearray(s.image)
    for off in (12345, 12346):
        img[off] ^= 0xFF
    a = (1 << 20) - 100
    img[a:a + 300] = bytes(b ^ 0x5A for b in img[a:a + 300])
    _put(loop.path, 0, bytes(img))
    rc, out, err = cli_main(capsys, *args)
    assert rc == 1, out + err
    assert out.startswith("differs:") and "2 range(s), 302 bytes" in out, out
    assert "bytes 12345..12346 (2 bytes)" in out
    assert f"bytes {a}..{a + 299} (300 bytes)" in out
    # an older point differs from the device; a mark restores what the model held then
    _put(loop.path, 0, s.at_mark["m1"])
    rc, out, err = cli_main(capsys, "verify", "--store", store, "--device", "loop7", "--at",
                            "m1", "--live", loop.path)
    assert rc == 0, out + err
    # bad input: exit >= 2, one line
    rc, out, err = cli_main(capsys, "verify", "--store", store, "--device", "nope")
    assert rc >= 2 and "no device" in err
    rc, out, err = cli_main(capsys, "verify", "--store", store, "--device", "loop7", "--live",
                            tmp_path / "missing")
    assert rc >= 2 and "cannot open" in err


def test_verify_store_finds_a_damaged_parquet_file(capsys, tmp_path):
    s, store = _synth_store(tmp_path, capsys)
    rc, out, err = cli_main(capsys, "verify", "--store", store)
    assert rc == 0, out + err
    files = sorted(p for p in (store / "payload").rglob("*.parquet"))
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    rc, out, err = cli_main(capsys, "verify", "--store", store)
    assert rc != 0
    assert victim.name in out


@pytest.mark.bpf
def test_verify_a_traced_device(tmp_path, make_loop):
    """Trace a real device, ingest, verify against the traced path itself."""
    loop = make_loop(size_mb=32, fill="random")
    log, store = tmp_path / "log", tmp_path / "store"
    with TraceProc([loop.path], log) as t:
        fd = os.open(loop.path, os.O_WRONLY)
        try:
            for k in range(20):
                os.pwrite(fd, os.urandom(64 << 10), (k * 997 % 400) * 65536)
            os.fsync(fd)
        finally:
            os.close(fd)
        assert t.stop() == 0
    cli("ingest", "--log", log, "--store", store)
    r = cli("verify", "--store", store, "--device", loop.path, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(loop.path, "rb") as f:  # every byte changed: one range (a fixed pattern would
        f.seek(5 << 20)                # leave the random bytes it happens to equal)
        old = f.read(4096)
    _put(loop.path, 5 << 20, bytes(b ^ 0xFF for b in old))
    r = cli("verify", "--store", store, "--device", loop.path, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "bytes 5242880..5246975 (4096 bytes)" in r.stdout
