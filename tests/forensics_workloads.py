"""Workloads of the detector's evaluation (tests/test_detector.py, bench/bench_detector.py): a
file system with mixed content, attacks (AES in place, into new files then deleting the
originals, slowly) and benign work (gzip/zstd of logs, copying media and archives, SQLite under
load, fio writing random data). Each runs as a real process on a real mounted loop device."""
from __future__ import annotations

import ctypes
import hashlib
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path


def syncfs(path) -> None:
    """Write back the file system holding path (only it: a global sync waits for every file
    system of the machine, a stuck one of another test included)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed")
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)

WORDS = ("error warning info debug request response user session timeout retry connect "
         "disk block write read flush commit journal inode page cache kernel device").split()

ATTACK = r"""
import os, sys, time
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
mode, delay, paths = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
key, nonce = os.urandom(32), os.urandom(16)
for p in paths:
    with open(p, "rb") as f:
        data = f.read()
    enc = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    out = enc.update(data) + enc.finalize()
    if mode == "inplace":
        with open(p, "r+b") as f:
            f.write(out)
            f.flush()
            os.fsync(f.fileno())
    elif mode == "buffered":     # in place through the page cache: the flusher writes back
        with open(p, "r+b") as f:
            f.write(out)
    elif mode == "truncate":     # truncated and written again (cat tmp > file)
        with open(p, "wb") as f:
            f.write(out)
            f.flush()
            os.fsync(f.fileno())
    elif mode == "viatmp":       # a new file renamed over the original
        with open(p + ".tmp", "wb") as f:
            f.write(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(p + ".tmp", p)
    else:
        with open(p + ".locked", "wb") as f:
            f.write(out)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(p)
    if delay:
        time.sleep(delay)
"""


def log_text(rng: random.Random, n: int) -> bytes:
    lines = []
    size = 0
    while size < n:
        ln = (f"2026-12-04T01:{rng.randrange(60):02d}:{rng.randrange(60):02d} "
              f"{' '.join(rng.choice(WORDS) for _ in range(rng.randrange(4, 12)))} "
              f"id={rng.randrange(10**6)}\n")
        lines.append(ln)
        size += len(ln)
    return "".join(lines).encode()[:n]


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def populate(mnt: Path, rng: random.Random, *, docs: int = 24, doc_kib=(16, 256),
             media: int = 4, media_kib: int = 512) -> list[Path]:
    """Documents (text logs, a SQLite database, zip archives of text) and media (random data
    like jpeg). Returns the documents an attack goes for."""
    d = mnt / "docs"
    d.mkdir()
    (mnt / "media").mkdir()
    (mnt / "logs").mkdir()
    files = []
    for i in range(docs):
        p = d / f"doc{i:03d}.txt"
        _write(p, log_text(rng, 1024 * rng.randrange(*doc_kib)))
        files.append(p)
    db = d / "app.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t (v) VALUES (?)",
                    [(log_text(rng, 200).decode(),) for _ in range(3000)])
    con.commit()
    con.close()
    files.append(db)
    for i in range(3):
        p = d / f"archive{i}.zip"
        with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("a.txt", log_text(rng, 200 << 10))
        files.append(p)
    for i in range(media):
        _write(mnt / "media" / f"photo{i}.jpg", b"\xff\xd8\xff\xe0" + rng.randbytes(media_kib << 10))
    for i in range(6):
        _write(mnt / "logs" / f"app{i}.log", log_text(rng, 1024 * rng.randrange(128, 512)))
    syncfs(mnt)
    return files


def checksums(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def attack(mode: str, files: list[Path], delay: float = 0.0) -> subprocess.Popen:
    """Start the attacker (a separate process): 'inplace', 'buffered' (in place, no fsync:
    written back by the flusher), 'truncate' (truncate and write), 'viatmp' (a new file
    renamed over the original) or 'newfiles' (FILE.locked, the original deleted)."""
    return subprocess.Popen([sys.executable, "-c", ATTACK, mode, str(delay),
                             *map(str, files)])


def attack_workers(mode: str, files: list[Path], *, per: int = 2, parallel: int = 4,
                   delay: float = 0.0) -> subprocess.Popen:
    """The attacker spread over processes: `xargs -P parallel -n per` runs one attacker
    process (attack()'s script, `mode`) per `per` files, `parallel` at a time; each stays
    below the detector's per-process thresholds."""
    p = subprocess.Popen(["xargs", "-0", "-P", str(parallel), "-n", str(per), sys.executable,
                          "-c", ATTACK, mode, str(delay)], stdin=subprocess.PIPE)
    assert p.stdin is not None
    p.stdin.write(b"".join(str(f).encode() + b"\0" for f in files))
    p.stdin.close()
    return p


SHELL_ATTACK = ('openssl enc -aes-256-ctr -K "$KEY" -iv "$IV" -in "$1" -out "$1.tmp" '
                '&& cat "$1.tmp" > "$1" && rm "$1.tmp"')


def attack_shell(files: list[Path], *, parallel: int = 4) -> subprocess.Popen:
    """The attacker as a shell loop over the files, `parallel` at a time (`xargs -P`): per
    file `openssl enc` into FILE.tmp, `cat FILE.tmp > FILE` (truncated and written again,
    through the page cache: no fsync), the temporary file removed."""
    env = dict(os.environ, KEY=os.urandom(32).hex(), IV=os.urandom(16).hex())
    p = subprocess.Popen(["xargs", "-0", "-P", str(parallel), "-n", "1", "sh", "-c",
                          SHELL_ATTACK, "sh"], stdin=subprocess.PIPE, env=env)
    assert p.stdin is not None
    p.stdin.write(b"".join(str(f).encode() + b"\0" for f in files))
    p.stdin.close()
    return p


def benign_compress(mnt: Path) -> None:
    """gzip and zstd of the logs (each replaces its input), as logrotate does."""
    logs = sorted((mnt / "logs").glob("*.log"))
    for i, p in enumerate(logs):
        if i % 2:
            subprocess.run(["gzip", "-6", str(p)], check=True)
        else:
            subprocess.run(["zstd", "-q", "--rm", str(p)], check=True)
    syncfs(mnt)


def benign_copy_media(mnt: Path, rng: random.Random) -> None:
    """Copy the media files and make a tar.gz-like archive of them (random data)."""
    out = mnt / "backup"
    out.mkdir(exist_ok=True)
    for p in sorted((mnt / "media").glob("*")):
        subprocess.run(["cp", str(p), str(out / p.name)], check=True)
    _write(out / "bundle.tar.zst", rng.randbytes(1 << 20))
    syncfs(mnt)


def benign_sqlite(mnt: Path, rng: random.Random, seconds: float = 3.0) -> None:
    """A database under load: updates, inserts and deletes, committed one by one."""
    con = sqlite3.connect(mnt / "docs" / "app.sqlite")
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        con.execute("UPDATE t SET v = ? WHERE id = ?", (log_text(rng, 200).decode(),
                                                       rng.randrange(1, 3000)))
        con.execute("INSERT INTO t (v) VALUES (?)", (log_text(rng, 300).decode(),))
        con.commit()
    con.close()
    syncfs(mnt)


def benign_fio(mnt: Path, size_mib: int = 16) -> None:
    """fio writing random data (refilled buffers) to a file, twice over (random over
    random the second time)."""
    for rw in ("write", "randwrite"):
        subprocess.run(["fio", "--name=rnd", f"--filename={mnt / 'fio.dat'}", f"--rw={rw}",
                        "--bs=64k", f"--size={size_mib}M", "--refill_buffers", "--direct=1",
                        "--output=/dev/null"], check=True)
    syncfs(mnt)


PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/usr/lib/postgresql/15/bin"),
             key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
DEB_CACHE = Path("/var/cache/blkrewind-test/apt-bookworm")   # bootstrap's package cache
DEB_DOWNLOAD = Path("/var/cache/blkrewind-test/apt-detector")
APT_SMALL = ("libssl3_", "binutils-common_", "linux-libc-dev_")
APT_FULL = APT_SMALL + ("libpython3.11-stdlib_", "libc6-dev_", "iso-codes_")


def have_postgres() -> bool:
    return (PG_BIN / "postgres").exists() and shutil.which("runuser") is not None and \
        _user_exists("postgres")


def _user_exists(name: str) -> bool:
    import pwd
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def benign_postgres(mnt: Path, seconds: float = 5.0, scale: int = 2) -> None:
    """PostgreSQL under load: a cluster on the traced file system (initdb), pgbench's tables
    (pgbench -i) and its TPC-B-like transactions from 2 clients for `seconds`."""
    (mnt / "pg").mkdir()
    shutil.chown(mnt / "pg", "postgres", "postgres")
    # the mount point may sit in a directory only root can enter (pytest's tmp_path): the
    # cluster's directory is bound where the postgres user reaches it
    sock = Path(tempfile.mkdtemp(prefix="pg-"))
    os.chmod(sock, 0o755)
    data = sock / "data"
    data.mkdir()
    subprocess.run(["mount", "--bind", str(mnt / "pg"), str(data)], check=True)
    shutil.chown(sock, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]
    pg = [*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U",
                        "postgres"], check=True, capture_output=True)
        subprocess.run([*pg, "-w", "-l", str(sock / "log"), "-o",
                        f"-k {sock} -c listen_addresses='' -p 5432", "start"], check=True,
                       capture_output=True)
        try:
            bench = [*as_pg, str(PG_BIN / "pgbench"), "-h", str(sock), "-p", "5432",
                     "-U", "postgres"]
            subprocess.run([*bench, "-q", "-i", "-s", str(scale), "postgres"], check=True,
                           capture_output=True)
            subprocess.run([*bench, "-c", "2", "-T", str(max(1, round(seconds))), "postgres"],
                           check=True, capture_output=True)
        finally:
            subprocess.run([*pg, "-m", "fast", "-w", "stop"], capture_output=True)
    finally:
        subprocess.run(["umount", str(data)], capture_output=True)
        if not os.path.ismount(data):
            shutil.rmtree(sock, ignore_errors=True)
    syncfs(mnt)


def apt_debs(names=APT_SMALL) -> list[Path]:
    """Debian packages whose file names start with these prefixes: from the test cache, apt's
    own cache, or else fetched once with `apt-get download` (the distribution's versions)."""
    out = []
    for pre in names:
        hit = sorted([*DEB_CACHE.glob(f"{pre}*.deb"), *DEB_DOWNLOAD.glob(f"{pre}*.deb"),
                      *Path("/var/cache/apt/archives").glob(f"{pre}*.deb")])
        if not hit:
            DEB_DOWNLOAD.mkdir(parents=True, exist_ok=True)
            pkg = pre.rstrip("_")
            if pkg == "libpython3.11-stdlib":   # the newest python's on other releases
                pkg = "libpython3-stdlib"
            subprocess.run(["apt-get", "download", pkg], cwd=DEB_DOWNLOAD, check=True,
                           capture_output=True)
            hit = sorted(DEB_DOWNLOAD.glob("*.deb"), key=lambda p: p.stat().st_mtime)[-1:]
        out.append(hit[-1])
    return out


def benign_apt(mnt: Path, debs: list[Path]) -> None:
    """What apt does when it installs packages: the .deb files downloaded into its cache
    (compressed: random data in new files), each unpacked into the root (dpkg-deb -x:
    binaries, headers, scripts, compressed docs), unpacked again over itself (a reinstall:
    every file replaced), then the cache cleaned (apt clean)."""
    cache = mnt / "var" / "cache" / "apt" / "archives"
    root = mnt / "sysroot"
    cache.mkdir(parents=True)
    root.mkdir()
    for d in debs:
        shutil.copyfile(d, cache / d.name)
    syncfs(mnt)
    for _ in range(2):
        for d in debs:
            subprocess.run(["dpkg-deb", "-x", str(cache / d.name), str(root)], check=True)
        syncfs(mnt)
    for d in debs:
        (cache / d.name).unlink()
    syncfs(mnt)


# ------------------------------------------------------------------ cgroups (systemd units)
def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on
    a hybrid set-up): the hierarchy whose ids bpf_get_current_cgroup_id returns."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return Path(left.split()[4])
    return None


class Cgroup:
    """A cgroup v2 of this test's own (a service's unit, as systemd makes one): processes
    started with `preexec_fn=cg.enter` run in it, and so do their children. close() kills
    what is left in it (only processes this test started are there) and removes it."""

    def __init__(self, name: str):
        root = cgroup2_root()
        if root is None:
            raise RuntimeError("no cgroup v2 hierarchy mounted")
        self.path = root / f"blkrewind-test-{name}-{os.getpid()}"
        self.path.mkdir()
        self.id = os.stat(self.path).st_ino   # the cgroup id (kernfs inode number)

    def enter(self) -> None:
        """(preexec_fn) move the calling process into the cgroup."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    def pids(self) -> list[int]:
        return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]

    def close(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {left} do not leave {self.path}")
            time.sleep(0.1)
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SERVICE = r"""
import random, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import forensics_workloads as wl
mnt, rng = Path(sys.argv[2]), random.Random(int(sys.argv[3]))
wl.benign_compress(mnt)
wl.benign_copy_media(mnt, rng)
wl.benign_sqlite(mnt, rng, seconds=float(sys.argv[4]))
wl.benign_fio(mnt, size_mib=8)
if sys.argv[5] == "1":
    wl.benign_apt(mnt, wl.apt_debs())
if sys.argv[6] == "1" and wl.have_postgres():
    wl.benign_postgres(mnt, seconds=float(sys.argv[4]), scale=1)
"""


def benign_service(mnt: Path, cg: Cgroup, *, seed: int = 0, seconds: float = 2.0,
                   apt: bool = True, postgres: bool = True) -> None:
    """The benign set as one service would run it, every program in one cgroup: gzip/zstd of
    its logs, a copy of its media and an archive, its SQLite database under load, fio's
    random data, apt unpacking packages, a PostgreSQL cluster under pgbench."""
    subprocess.run([sys.executable, "-c", SERVICE, str(Path(__file__).parent), str(mnt),
                    str(seed), str(seconds), "1" if apt else "0", "1" if postgres else "0"],
                   check=True, preexec_fn=cg.enter)


MIXED_ATTACK = r"""
i=0
for f in "$@"; do
  case $((i % 3)) in
  0) "$PY" -c "$ATTACK" inplace 0 "$f" ;;
  1) openssl enc -aes-256-ctr -K "$KEY" -iv "$IV" -in "$f" -out "$f.tmp" &&
     dd if="$f.tmp" of="$f" bs=64k conv=notrunc,fsync status=none && rm "$f.tmp" ;;
  2) openssl enc -aes-256-ctr -K "$KEY" -iv "$IV" -in "$f" -out "$f.tmp" &&
     cat "$f.tmp" 1<> "$f" && sync "$f" && rm "$f.tmp" ;;
  esac || exit 1
  i=$((i + 1))
done
"""


def attack_mixed(files: list[Path], cg: Cgroup) -> subprocess.Popen:
    """The attacker as a script whose pieces are programs of different names, one process
    per file, all in the cgroup: in turn python (cryptography, in place, fsync), `openssl
    enc` into FILE.tmp then `dd conv=notrunc,fsync` over the file, `openssl enc` then `cat
    FILE.tmp 1<> FILE` (in place, no truncation) and `sync FILE`. Per 9 files each name
    has 3 processes of one file each: neither a process (3 places) nor the workers of a name
    (6) reach their thresholds."""
    env = dict(os.environ, KEY=os.urandom(32).hex(), IV=os.urandom(16).hex(), ATTACK=ATTACK,
               PY=sys.executable)
    return subprocess.Popen(["sh", "-c", MIXED_ATTACK, "sh", *map(str, files)], env=env,
                            preexec_fn=cg.enter)
