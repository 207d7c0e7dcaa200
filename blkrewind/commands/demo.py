"""Show the whole cycle on a scratch ext4 loop device (root).

Makes a 128 MiB ext4 file system on a new loop device, certificates for a
replayer and a traced host, starts `serve` on 127.0.0.1 (mutual TLS), traces
the device and ships its LOG there, writes and changes files with marks in
between, shows the replayer's status and a SQL query over the history,
restores the device as it was at the first mark onto a new loop device (all
through the running replayer), mounts that read-only and shows the earlier
content is back, then removes everything it made. Touches no other device.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO

from blkrewind.errors import UserError


def _stderr(p: subprocess.Popen) -> IO:
    """The stderr pipe of a process this demo started with stderr=PIPE."""
    if p.stderr is None:
        raise ValueError(f"{p.args!r} was started without stderr=PIPE")
    return p.stderr

EXAMPLES = """\
  sudo blkrewind demo
  sudo blkrewind demo --keep --dir /var/tmp/blkrewind-demo
"""


def add_arguments(p):
    p.add_argument("--keep", action="store_true", help="keep the work directory (LOG, store) at the end")
    p.add_argument("--dir", metavar="DIR", help="work directory (default: a new one under /var/tmp)")


class _Demo:
    def __init__(self, workdir: str):
        self.w = workdir
        self.loops: list[str] = []
        self.mounts: list[str] = []
        self.tracer: subprocess.Popen | None = None
        self.server: subprocess.Popen | None = None

    @staticmethod
    def step(msg: str) -> None:
        print(f"\n==> {msg}", flush=True)

    @staticmethod
    def sh(*cmd: str, capture: bool = False) -> str:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"{' '.join(cmd)} failed: {(r.stderr or r.stdout).strip()}")
        return r.stdout if capture else ""

    def blkrewind(self, *args: str, capture: bool = False) -> str:
        cmd = [sys.executable, "-m", "blkrewind.cli", *args]
        print("   $ blkrewind " + " ".join(args), flush=True)
        r = subprocess.run(cmd, capture_output=capture, text=True)
        if r.returncode != 0:
            raise UserError(f"blkrewind {args[0]} failed (exit {r.returncode})"
                            + (f": {r.stderr.strip()}" if capture else ""))
        return r.stdout if capture else ""

    def losetup(self, image: str) -> str:
        dev = self.sh("losetup", "--find", "--show", image, capture=True).strip()
        self.loops.append(dev)
        return dev

    def mount(self, dev: str, where: str, *opts: str) -> None:
        os.makedirs(where, exist_ok=True)
        self.sh("mount", *opts, dev, where)
        self.mounts.append(where)

    def umount(self, where: str) -> None:
        self.sh("umount", where)
        self.mounts.remove(where)

    @staticmethod
    def _echo(p: subprocess.Popen, prefix: str) -> None:
        for line in _stderr(p):
            print("   " + prefix + line.rstrip(), flush=True)

    @staticmethod
    def _wait_line(p: subprocess.Popen, what: str, who: str, timeout: float = 120) -> str:
        """Echo p's stderr until a line holding `what`; returns that line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = _stderr(p).readline()
            if not line:
                raise UserError(f"{who} exited early: see the message above")
            print("   " + line.rstrip(), flush=True)
            if what in line:
                return line
        raise UserError(f"{who} did not say {what!r} within {timeout:.0f} s")

    def mark(self, mnt: str, name: str) -> None:
        """A quiesced point: freeze the file system, mark, thaw."""
        self.sh("fsfreeze", "--freeze", mnt)
        try:
            self.blkrewind("mark", name, "--log", self.log)  # this demo's tracer only
        finally:
            self.sh("fsfreeze", "--unfreeze", mnt)

    def cleanup(self) -> None:
        for p in (self.tracer, self.server):  # the tracer first: it drains to the server
            if p and p.poll() is None:
                p.send_signal(2)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for m in reversed(self.mounts):
            subprocess.run(["umount", m], capture_output=True)
        for d in reversed(self.loops):
            subprocess.run(["losetup", "-d", d], capture_output=True)

    def run(self) -> None:
        w = self.w
        image, log, store, mnt = (os.path.join(w, n) for n in ("disk.img", "log", "store", "mnt"))
        self.log = log
        self.step("a 128 MiB ext4 file system on a new loop device")
        with open(image, "wb") as f:
            f.truncate(128 << 20)
        dev = self.losetup(image)
        self.sh("mkfs.ext4", "-q", "-F", dev)
        self.mount(dev, mnt)
        print(f"   {dev} mounted on {mnt}")

        self.step("a replayer on this host: certificates, then `serve` on 127.0.0.1 (mutual TLS)")
        tls = os.path.join(w, "tls")
        self.blkrewind("tls", "init", tls, "--hosts", "replayer=127.0.0.1,demo-host")
        print(f"   $ blkrewind serve --store {store} --listen 127.0.0.1:0 "
              f"--tls {tls}/replayer &")
        self.server = subprocess.Popen(
            [sys.executable, "-m", "blkrewind.cli", "serve", "--store", store, "--listen",
             "127.0.0.1:0", "--tls", os.path.join(tls, "replayer")],
            stderr=subprocess.PIPE, text=True)
        line = self._wait_line(self.server, "listening on", "the replayer")
        threading.Thread(target=self._echo, args=(self.server, "replayer: "),
                         daemon=True).start()   # keep its log flowing (and shown)
        port = line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1]
        ship = f"127.0.0.1:{port}"

        self.step(f"trace {dev} into the LOG {log} and ship it to the replayer at {ship}")
        print(f"   $ blkrewind trace --device {dev} --log {log} --ship {ship} "
              f"--tls {tls}/demo-host &")
        self.tracer = subprocess.Popen(
            [sys.executable, "-m", "blkrewind.cli", "trace", "--device", dev, "--log", log,
             "--ship", ship, "--tls", os.path.join(tls, "demo-host")],
            stderr=subprocess.PIPE, text=True)
        self._wait_line(self.tracer, "baseline of", "the tracer")

        self.step("version 1 of the files, then a mark")
        with open(os.path.join(mnt, "story.txt"), "w") as f:
            f.write("Once upon a time, version ONE of this story was written.\n")
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(mnt, "data.bin"), "wb") as f:
            f.write(os.urandom(8 << 20))
            os.fsync(f.fileno())
        self.mark(mnt, "v1")

        self.step("change everything: rewrite, append, delete, trim; then a second mark")
        with open(os.path.join(mnt, "story.txt"), "w") as f:
            f.write("Version TWO replaced the story.\n")
            f.flush()
            os.fsync(f.fileno())
        os.unlink(os.path.join(mnt, "data.bin"))
        with open(os.path.join(mnt, "new.txt"), "w") as f:
            f.write("a file that did not exist at v1\n")
        self.sh("sync")
        self.sh("fstrim", mnt)
        self.mark(mnt, "v2")
        self.umount(mnt)

        self.step("stop the tracer (SIGINT): it waits until the replayer has stored everything")
        self.tracer.send_signal(2)
        for line in _stderr(self.tracer):
            print("   " + line.rstrip())
        if self.tracer.wait(60) != 0:
            raise UserError("the tracer did not stop cleanly")

        self.step("the replayer's view: per host and device, watermark and lag")
        self.blkrewind("status", "--store", store)

        self.step("who wrote what (SQL over the history)")
        self.blkrewind("sql", "--store", store,
                       "SELECT comm, op, count(*) AS bios, sum(length) // 1024 AS kib "
                       "FROM writes GROUP BY ALL ORDER BY kib DESC LIMIT 8")

        self.step("restore the device as it was at mark v1 onto a new loop device")
        out = self.blkrewind("restore", "--store", store, "--device", dev, "--at", "v1", "--loop",
                             capture=True)
        restored = out.strip().splitlines()[-1]
        self.loops.append(restored)
        print(f"   restored onto {restored}")
        rmnt = os.path.join(w, "restored")
        self.mount(restored, rmnt, "-o", "ro,noload")
        story = open(os.path.join(rmnt, "story.txt")).read()
        print(f"   story.txt at v1: {story.strip()!r}")
        print(f"   data.bin present again: {os.path.exists(os.path.join(rmnt, 'data.bin'))}, "
              f"new.txt absent: {not os.path.exists(os.path.join(rmnt, 'new.txt'))}")
        if "ONE" not in story or not os.path.exists(os.path.join(rmnt, "data.bin")):
            raise UserError("the restored file system does not hold version 1")
        self.step("done: the earlier content is back. Cleaning up.")
        self.umount(rmnt)


def run(args) -> int:
    if os.geteuid() != 0:
        raise UserError("the demo must run as root (it makes loop devices and traces one)")
    for tool in ("mkfs.ext4", "losetup", "fsfreeze", "fstrim"):
        if not shutil.which(tool):
            raise UserError(f"{tool} is missing (./bootstrap.sh installs it)")
    made = args.dir is None
    workdir = args.dir or tempfile.mkdtemp(prefix="blkrewind-demo-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    demo = _Demo(workdir)
    try:
        demo.run()
    finally:
        demo.cleanup()
        if made and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            print(f"work directory kept: {workdir}")
    return 0
