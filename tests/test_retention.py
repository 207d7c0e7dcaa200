"""LOG retention without shipping (issue 13): `ingest --delete-ingested` deletes only the LOG
segments the store holds whole and durably -- never the newest, never a damaged or unsealed
one -- and every point restores exactly afterwards; beside a running tracer (BPF) the LOG
stays bounded while the history stays whole."""
from __future__ import annotations

import os
import random

import pytest
from synth import SynthSession
from tracerproc import TraceProc, cli, copy_device, direct_writes, same_file


def _synth_log(log, seed: int, writes: int, marks: int) -> SynthSession:
    """A 2 MiB device's history in 128 KiB LOG segments (many of them), ended cleanly."""
    s = SynthSession(str(log), seed=seed, size=2 << 20, segment_bytes=128 << 10,
                     chunk=128 << 10, piece=16 << 10)
    s.baseline()
    s.workload(writes, marks=marks, snapshots=0)
    s.end()
    return s


def test_delete_ingested_keeps_what_the_store_lacks(tmp_path):
    log, store = tmp_path / "log", tmp_path / "store"
    _synth_log(log, 51, 40, marks=2)
    segs = sorted(log.glob("*.brlog"))
    assert len(segs) > 10
    victim = segs[len(segs) // 2]
    os.truncate(victim, victim.stat().st_size - 500)  # damaged: it must stay
    r = cli("ingest", "--log", log, "--store", store, "--delete-ingested", check=False)
    assert r.returncode == 3, r
    left = sorted(p.name for p in log.glob("*.brlog"))
    assert victim.name in left and segs[-1].name in left
    # every other segment was held whole by the store, and is gone
    assert len(left) == 2, left
    # the LOG as it is now ingests again into the same store: nothing new, nothing lost
    r = cli("ingest", "--log", log, "--store", store, check=False)
    assert r.returncode == 3 and "already in the store" in r.stdout
    # a whole LOG: only its newest segment stays, and the points restore exactly
    log2, store2 = tmp_path / "log2", tmp_path / "store2"
    s2 = _synth_log(log2, 52, 40, marks=2)
    n = len(list(log2.glob("*.brlog")))
    r = cli("ingest", "--log", log2, "--store", store2, "--delete-ingested")
    assert f"deleted {n - 1} LOG segment(s)" in r.stdout, r.stdout
    assert len(list(log2.glob("*.brlog"))) == 1
    out = tmp_path / "x.img"
    for name, img in s2.at_mark.items():
        cli("restore", "--store", store2, "--device", "loop7", "--at", name, "--to", out,
            "--force")
        assert out.read_bytes() == img, name
    cli("restore", "--store", store2, "--device", "loop7", "--at", "latest", "--to", out,
        "--force")
    assert out.read_bytes() == bytes(s2.image)


@pytest.mark.bpf
def test_delete_ingested_beside_a_running_tracer(make_loop, tmp_path):
    dev = make_loop(32, fill="random")
    log, store = tmp_path / "log", tmp_path / "store"
    rng = random.Random(53)
    with TraceProc([dev], log, "--segment-mb", "1", "--ring-mb", "4") as tr:
        for _ in range(3):
            direct_writes(dev, rng, 40, 400)
            cli("mark", f"m{_}", "--log", log)
            cli("ingest", "--log", log, "--store", store, "--delete-ingested")
            # a running session keeps a ring buffer's worth (4 MiB) of its newest segments
            # (a tracer continuing it after a crash reads them back), plus what rotated since
            kept = sum(p.stat().st_size for p in log.glob("*.brlog"))
            assert kept < 8 << 20, kept
        tr.kill()   # a crash: the capture stays attached, the session may be continued
    cli("ingest", "--log", log, "--store", store, "--delete-ingested")
    with TraceProc([dev], log, "--segment-mb", "1", "--ring-mb", "4", wait_for="live") as tr:
        assert "continued" in tr.stderr, tr.stderr
        direct_writes(dev, rng, 40, 400)
        cli("mark", "after", "--log", log)
        copy_device(dev, tmp_path / "final.img")
        assert tr.stop() == 0, tr.stderr
    cli("ingest", "--log", log, "--store", store, "--delete-ingested")
    assert len(list(log.glob("*.brlog"))) == 1
    out = tmp_path / "x.img"
    cli("restore", "--store", store, "--device", dev, "--at", "latest", "--to", out)
    assert same_file(out, tmp_path / "final.img")


SYSTEMD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "systemd")


def _exec_start(unit: str) -> str:
    """The unit's ExecStart= command line, its continuation lines joined."""
    text = open(os.path.join(SYSTEMD, unit)).read().replace("\\\n", " ")
    return next(ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("ExecStart="))


def test_the_deployment_without_shipping(tmp_path):
    """The units for a tracer that does not ship: trace@NAME without --ship when SHIP is
    empty, and ingest@NAME(.timer) running `ingest --delete-ingested` as documented; the units
    pass `systemd-analyze verify`, and the ingest unit's command, run as systemd runs it
    with its env file, trims the LOG."""
    import shlex
    import shutil
    import subprocess

    from tracerproc import BLKREWIND, ROOT

    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    units = tmp_path / "units"
    units.mkdir()
    names = {"blkrewind-ingest@.service": "blkrewind-ingest@data.service",
             "blkrewind-ingest@.timer": "blkrewind-ingest@data.timer",
             "blkrewind-trace@.service": "blkrewind-trace@data.service",
             "blkrewind-serve.service": "blkrewind-serve.service"}
    for src, dst in names.items():  # (verify wants the binary to exist)
        text = open(os.path.join(SYSTEMD, src)).read()
        (units / dst).write_text(text.replace("/usr/local/sbin/blkrewind", "/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                        *[str(units / n) for n in names.values()]],
                       capture_output=True, text=True, env=dict(os.environ,
                                                                SYSTEMD_LOG_LEVEL="notice"))
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    # trace@: SHIP and TLS empty -> no --ship, no --tls (the sh line, with echo for exec)
    cmd = shlex.split(_exec_start("blkrewind-trace@.service").replace("$$", "$"))
    assert cmd[:2] == ["/bin/sh", "-c"]
    line = cmd[2].replace("exec /usr/local/sbin/blkrewind", "echo")
    env = {"PATH": os.environ["PATH"], "DEVICES": "/dev/a /dev/b", "LOG": "/l", "SHIP": "",
           "TLS": "", "TRACE_OPTS": "--segment-mb 8"}
    out = subprocess.run(["/bin/sh", "-c", line], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["trace", "--device", "/dev/a", "--device", "/dev/b", "--log",
                                  "/l", "--segment-mb", "8"], out
    env.update(SHIP="r:7420", TLS="/etc/t")
    out = subprocess.run(["/bin/sh", "-c", line], env=env, capture_output=True, text=True)
    assert out.stdout.split()[7:] == ["--ship", "r:7420", "--tls", "/etc/t", "--segment-mb",
                                      "8"], out
    # ingest@: its command with the example env file's variables pointed at a LOG here
    log, store = tmp_path / "log", tmp_path / "store"
    s = _synth_log(log, 53, 30, marks=1)
    n = len(list(log.glob("*.brlog")))
    example = open(os.path.join(SYSTEMD, "ingest.env.example")).read()
    assert "LOG=" in example and "STORE=" in example and "INGEST_OPTS=" in example
    argv = []
    for w in _exec_start("blkrewind-ingest@.service").split():
        w = {"${LOG}": str(log), "${STORE}": str(store)}.get(w, w)
        if w == "$INGEST_OPTS":
            argv += ["--jobs", "1"]
        elif w == "/usr/local/sbin/blkrewind":
            argv += BLKREWIND
        else:
            assert "$" not in w, w
            argv.append(w)
    r = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r
    assert f"deleted {n - 1} LOG segment(s)" in r.stdout, r.stdout
    assert len(list(log.glob("*.brlog"))) == 1
    out = tmp_path / "x.img"
    cli("restore", "--store", store, "--device", "loop7", "--at", "latest", "--to", out)
    assert out.read_bytes() == bytes(s.image)
