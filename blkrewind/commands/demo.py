"""Show the whole cycle on a scratch ext4 loop device (root).

Makes a 128 MiB ext4 file system on a new loop device, traces it, writes and
changes files with marks in between, ingests the LOG into a store, restores
the device as it was at the first mark onto a new loop device, mounts that
read-only and shows the earlier content is back, runs a SQL query over the
history, then removes everything it made. Touches no other device.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from blkrewind.errors import UserError


def add_arguments(p):
    p.add_argument("--keep", action="store_true", help="keep the work directory (LOG, store)")
    p.add_argument("--dir", metavar="DIR", help="work directory (default: a new one under /var/tmp)")


class _Demo:
    def __init__(self, workdir: str):
        self.w = workdir
        self.loops: list[str] = []
        self.mounts: list[str] = []
        self.tracer: subprocess.Popen | None = None

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

    def mark(self, mnt: str, name: str) -> None:
        """A quiesced point: freeze the file system, mark, thaw."""
        self.sh("fsfreeze", "--freeze", mnt)
        try:
            self.blkrewind("mark", name)
        finally:
            self.sh("fsfreeze", "--unfreeze", mnt)

    def cleanup(self) -> None:
        if self.tracer and self.tracer.poll() is None:
            self.tracer.terminate()
            self.tracer.wait(30)
        for m in reversed(self.mounts):
            subprocess.run(["umount", m], capture_output=True)
        for d in reversed(self.loops):
            subprocess.run(["losetup", "-d", d], capture_output=True)

    def run(self) -> None:
        w = self.w
        image, log, store, mnt = (os.path.join(w, n) for n in ("disk.img", "log", "store", "mnt"))
        self.step("a 128 MiB ext4 file system on a new loop device")
        with open(image, "wb") as f:
            f.truncate(128 << 20)
        dev = self.losetup(image)
        self.sh("mkfs.ext4", "-q", "-F", dev)
        self.mount(dev, mnt)
        print(f"   {dev} mounted on {mnt}")

        self.step(f"trace {dev} into the LOG {log}")
        print(f"   $ blkrewind trace --device {dev} --log {log} &")
        self.tracer = subprocess.Popen(
            [sys.executable, "-m", "blkrewind.cli", "trace", "--device", dev, "--log", log],
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = self.tracer.stderr.readline()
            if not line:
                raise UserError("the tracer exited early: see the message above")
            print("   " + line.rstrip())
            if "baseline of" in line:
                break

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

        self.step("stop the tracer (SIGINT) and ingest the LOG into a store")
        self.tracer.send_signal(2)
        for line in self.tracer.stderr:
            print("   " + line.rstrip())
        if self.tracer.wait(60) != 0:
            raise UserError("the tracer did not stop cleanly")
        self.blkrewind("ingest", "--log", log, "--store", store)

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
