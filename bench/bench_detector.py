"""The ransomware detector's evaluation on real traced loop devices (root, BPF).

    .venv/bin/python bench/bench_detector.py [--fs ext4,xfs] [--only NAME,...] [--keep DIR]

For each file system and scenario: a new loop device with mixed content (text logs and
documents, a SQLite database, zip archives, jpeg-like random files: tests/forensics_workloads.py),
`blkrewind trace`, the scenario as a separate process, stop, ingest, `blkrewind suspects`.

attacks (must be detected within 10 s of their start; the clean point must restore every
document with its checksum):
  inplace    AES-CTR (python cryptography) over each document, in place, fsync per file
  newfiles   AES-CTR into DOC.locked, fsync, then the original is deleted
  slow       inplace, one file a second
  newfiles_discard  newfiles on a file system mounted with -o discard
  newfiles_slow  newfiles, one file a second
  truncate   AES-CTR written back over each truncated document (cat tmp > file), fsync
  viatmp     AES-CTR into DOC.tmp, fsync, renamed over the original
  buffered   inplace without fsync, written back by the flusher (traced with --dirtier: the
             episode is the attacker's, not the kworker's)
  workers    inplace spread over processes: `xargs -P 4 -n 2`, one attacker process per two
             documents (each below the per-process thresholds)
  workers_newfiles  newfiles the same way
  workers_shell  a shell loop under `xargs -P 4`: per document `openssl enc` into DOC.tmp,
             `cat DOC.tmp > DOC` (through the page cache, written back by the flusher:
             traced with --dirtier), rm DOC.tmp
  cgroup_mixed  9 documents in place by a script in a cgroup of its own, one process per
             document, by turns python, `openssl enc` + `dd conv=notrunc`, `openssl enc` +
             `cat tmp 1<> doc` (each name below its workers group's thresholds: the cgroup
             group's; traced with --dirtier)
benign (must not alarm):
  compress   gzip / zstd of the logs (each replaces its input)
  media      copying media files and a random-data archive
  sqlite     SQLite under load (updates, inserts, commits) for 5 s
  fio        fio writing random data (refill_buffers), sequentially then at random over it
  compress_discard  compress on a file system mounted with -o discard
  postgres   PostgreSQL 15: initdb, pgbench -i -s 4, pgbench 2 clients for 5 s
  apt        apt installing packages: 6 cached Debian packages copied into var/cache/apt,
             unpacked (dpkg-deb -x) twice over, the cache cleaned
  service    all of the above but the discard and fio's 32 MiB (apt's 3 small packages, 8 MiB
             of fio), one after the other in one cgroup of their own, as one systemd unit
             would (traced with --dirtier: buffered output is its writer's, in the cgroup)

Prints one line per scenario and a summary; exit status 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import forensics_workloads as wl  # noqa: E402
from tracerproc import TraceProc, cli, sh  # noqa: E402

SIZE_MB = {"ext4": 256, "xfs": 320}
ATTACKS = ("inplace", "newfiles", "slow", "newfiles_discard", "newfiles_slow", "truncate",
           "viatmp", "buffered", "workers", "workers_newfiles", "workers_shell", "cgroup_mixed")
BENIGN = ("compress", "media", "sqlite", "fio", "compress_discard", "postgres", "apt",
          "service")
DIRTIER = ("buffered", "workers_shell", "cgroup_mixed", "service")   # traced with --dirtier


def _ns(s: str) -> int:
    return int(datetime.fromisoformat(s).timestamp() * 1e9)


def run_one(fs: str, name: str, base: Path) -> dict:
    rng = random.Random(f"{fs}-{name}")
    d = base / f"{fs}-{name}"
    d.mkdir()
    img = d / "dev.img"
    with open(img, "wb") as f:
        f.truncate(SIZE_MB[fs] << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                         text=True, check=True).stdout.strip()
    mnt, log, store = d / "mnt", d / "log", d / "store"
    mnt.mkdir()
    res: dict[str, Any] = {"fs": fs, "scenario": name, "kind": "attack" if name in ATTACKS else "benign"}
    try:
        sh(f"mkfs.{fs}", "-q", "-f" if fs == "xfs" else "-F", dev)
        sh("mount", *(["-o", "discard"] if name.endswith("_discard") else []), dev, mnt)
        try:
            files = wl.populate(mnt, rng)
            with TraceProc([dev], log, *(["--dirtier"] if name in DIRTIER else [])) as t:
                time.sleep(1.0)
                before = wl.checksums(mnt)
                t0 = time.time_ns()
                if name == "cgroup_mixed":
                    with wl.Cgroup("attack") as cg:
                        p = wl.attack_mixed(files[:9], cg)
                        assert p.wait(600) == 0
                elif name == "service":
                    with wl.Cgroup("service") as cg:
                        wl.benign_service(mnt, cg, seed=3, seconds=5.0)
                elif name == "workers_shell":
                    p = wl.attack_shell(files, parallel=4)
                    assert p.wait(600) == 0
                    wl.syncfs(mnt)
                elif name.startswith("workers"):
                    p = wl.attack_workers("newfiles" if name.endswith("newfiles") else "inplace",
                                          files, per=2, parallel=4)
                    assert p.wait(600) == 0
                elif name in ATTACKS:
                    mode = ("newfiles" if name.startswith("newfiles") else
                            name if name in ("truncate", "viatmp", "buffered") else "inplace")
                    p = wl.attack(mode, files,
                                  delay=1.0 if name in ("slow", "newfiles_slow") else 0.0)
                    assert p.wait(600) == 0
                    if name == "buffered":
                        wl.syncfs(mnt)
                elif name.startswith("compress"):
                    wl.benign_compress(mnt)
                elif name == "media":
                    wl.benign_copy_media(mnt, rng)
                elif name == "sqlite":
                    wl.benign_sqlite(mnt, rng, seconds=5.0)
                elif name == "fio":
                    wl.benign_fio(mnt, size_mib=32)
                elif name == "postgres":
                    wl.benign_postgres(mnt, seconds=5.0, scale=4)
                elif name == "apt":
                    wl.benign_apt(mnt, wl.apt_debs(wl.APT_FULL))
                res["run_s"] = round((time.time_ns() - t0) / 1e9, 1)
                time.sleep(1.0)
                assert t.stop() == 0, t.stderr
        finally:
            sh("umount", mnt)
        cli("ingest", "--log", log, "--store", store)
        t1 = time.monotonic()
        r = cli("suspects", "--store", store, "--device", dev, "--format", "json", check=False)
        res["suspects_s"] = round(time.monotonic() - t1, 1)
        eps = json.loads(r.stdout)
        res["episodes"] = len(eps)
        if res["kind"] == "benign":
            res["ok"] = not eps
            if eps:
                res["what"] = eps[0]["processes"]
            return res
        if not eps:
            res["ok"] = False
            return res
        ep = eps[0]
        res["detect_s"] = round((_ns(ep["detected"]) - t0) / 1e9, 2)
        res["started_s"] = round((_ns(ep["started"]) - t0) / 1e9, 2)
        res["processes"] = ep["processes"]
        res["how"] = ep["kind"]
        # the clean point: do the documents pass their checksums?
        out = d / "clean.img"
        cli("restore", "--store", store, "--device", dev, "--at",
            f"stamp:{ep['clean_stamp']}", "--to", out)
        lo = subprocess.run(["losetup", "--find", "--show", str(out)], capture_output=True,
                            text=True, check=True).stdout.strip()
        rmnt = d / "rmnt"
        rmnt.mkdir()
        try:
            sh("mount", "-o", "ro", lo, rmnt)
            try:
                after = wl.checksums(rmnt)
            finally:
                sh("umount", rmnt)
        finally:
            subprocess.run(["losetup", "-d", lo])
        bad = sorted(k for k in before if after.get(k) != before[k])
        res["files_ok"] = f"{len(before) - len(bad)}/{len(before)}"
        res["ok"] = res["detect_s"] <= 10 and not bad and "kworker" not in ep["processes"]
        return res
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        subprocess.run(["losetup", "-d", dev])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fs", default="ext4,xfs")
    ap.add_argument("--only", default=",".join(ATTACKS + BENIGN))
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    a = ap.parse_args()
    base = Path(a.keep or tempfile.mkdtemp(prefix="bench-detector-"))
    base.mkdir(parents=True, exist_ok=True)
    out = []
    try:
        for fs in a.fs.split(","):
            for name in a.only.split(","):
                r = run_one(fs, name, base)
                out.append(r)
                print(json.dumps(r), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    att = [r for r in out if r["kind"] == "attack"]
    ben = [r for r in out if r["kind"] == "benign"]
    print(f"attacks detected within 10 s with clean files: {sum(r['ok'] for r in att)}/{len(att)}; "
          f"benign runs without alarm: {sum(r['ok'] for r in ben)}/{len(ben)}")
    return 0 if all(r["ok"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
