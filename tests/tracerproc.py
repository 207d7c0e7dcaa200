"""Drive `blkrewind trace` as a user would: a separate process, stopped with SIGINT."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLKREWIND = [sys.executable, "-m", "blkrewind.cli"]


def cli(*args, check=True, timeout=300, input=None) -> subprocess.CompletedProcess:
    r = subprocess.run([*BLKREWIND, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, input=input, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"blkrewind {' '.join(map(str, args))} exited {r.returncode}\n"
                             f"stdout: {r.stdout}\nstderr: {r.stderr}")
    return r


class TraceProc:
    def __init__(self, devices, log, *extra, wait_for="baseline", start_timeout=120.0):
        args = [*BLKREWIND, "trace"]
        for d in devices:
            args += ["--device", str(d)]
        args += ["--log", str(log), *map(str, extra)]
        self.devices = list(devices)
        self.lines: list[str] = []
        self.p = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=ROOT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        want = len(self.devices) if wait_for == "baseline" else 1
        key = "baseline of" if wait_for == "baseline" else "capture live"
        deadline = time.monotonic() + start_timeout
        while sum(key in ln for ln in self.lines) < want:
            if self.p.poll() is not None:
                self._reader.join(5)
                raise AssertionError(f"tracer did not start (exit {self.p.returncode}):\n"
                                     + self.stderr)
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"tracer did not start within {start_timeout:.0f} s "
                                     f"(killed):\n" + self.stderr)
            time.sleep(0.02)

    def _read(self):
        assert self.p.stderr is not None, "started with stderr=PIPE"
        for line in self.p.stderr:
            self.lines.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout=120) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            # what it hangs in: every thread's stack on its stderr (blkrewind's cli registers
            # faulthandler on SIGUSR1), which the caller reports
            if self.p.poll() is None:
                self.p.send_signal(signal.SIGUSR1)
                time.sleep(2)
            raise
        self._reader.join(5)
        return rc

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.p.poll() is None:
            try:
                self.stop(60)
            except subprocess.TimeoutExpired:
                self.kill()


def sh(*cmd, check=True) -> str:
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))}: {r.stderr or r.stdout}")
    return r.stdout


def write_file(path, rng, n: int) -> None:
    """A file of n random bytes, written and fsynced."""
    import os
    with open(path, "wb") as f:
        f.write(rng.randbytes(n))
        f.flush()
        os.fsync(f.fileno())


def direct_writes(path, rng, count: int, slots: int, size: int = 64 << 10) -> None:
    """count O_DIRECT writes of size random bytes into an existing file or device, each at a
    random one of its first `slots` size-aligned offsets, then fsync."""
    import mmap
    import os
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)
        for _ in range(count):
            buf.seek(0)
            buf.write(rng.randbytes(size))
            os.pwrite(fd, buf, rng.randrange(0, slots) * size)
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_device(dev, out) -> None:
    sh("dd", f"if={dev}", f"of={out}", "bs=1M", "iflag=direct", "status=none")


def same_file(a, b) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def first_difference(a, b) -> str:
    return subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True).stdout.strip()


def run_on_pty(args, env=None, timeout=120) -> str:
    """Run `blkrewind ARGS` with stdout and stderr on a pseudo-terminal (as a user at a
    terminal sees it); asserts it exits 0; returns everything it wrote there."""
    import os
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen([*BLKREWIND, *map(str, args)], cwd=ROOT, stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:   # EIO: the other side closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        assert p.wait(timeout) == 0, out
        os.close(master)
    return out.decode(errors="replace")
