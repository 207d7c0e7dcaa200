"""Long jobs run in the background while the rest of the suite runs: guests under software
emulation, and the fresh Debian roots of tests/test_fresh_root.py (mostly apt, pip and disk).

A guest keeps one core busy for minutes (QEMU without KVM) while most of the suite waits on
loop devices, fsyncs and sockets: CI's two cores sat half idle (37 min of CPU in a 37 min
run). So the jobs of the tests marked `vm` (the fresh roots, the kernel matrix, the power
cut) are started when the session starts, one at a time beside the other tests, and the VM tests
run last, each taking its guest's result and doing the host's part (ingest, restores).

A VM test module defines

    def submit_vm_jobs(bg: Background, tmp_path_factory) -> None

which queues its guests with bg.submit(key, fn) (and bg.on_close(fn) for what must be undone
at the session's end); its fixtures then take bg.result(key, timeout). A module whose
prerequisites are missing says so with bg.unavailable(module, reason): its fixture fails (CI)
or skips with that reason.

BLKREWIND_VM_PARALLEL: guests at once (default: 1 beside other tests, 2 when only VM tests
run).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import kernels as vm


class Background:
    def __init__(self, workers: int):
        self.workers = max(1, workers)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="vm")
        self._jobs: dict[str, Future] = {}
        self._closers: list[Callable[[], list[str]]] = []
        self._unavailable: dict[str, str] = {}
        self.data: dict[str, Any] = {}  # what a module's tests need of its jobs
        self.fetch_lock = threading.Lock()  # one apt at a time

    def submit(self, key: str, fn: Callable[..., Any], *args: Any) -> None:
        self._jobs[key] = self._pool.submit(fn, *args)

    def result(self, key: str, timeout: float) -> Any:
        return self._jobs[key].result(timeout)

    def kernel(self, series: str):
        """The cached (or downloaded) kernel image of a series, one download at a time."""
        with self.fetch_lock:
            return vm.fetch(series, log=lambda m: None)

    def unavailable(self, module: str, reason: str | None = None) -> str | None:
        if reason is not None:
            self._unavailable[module] = reason
        return self._unavailable.get(module)

    def on_close(self, fn: Callable[[], list[str]]) -> None:
        self._closers.append(fn)

    def close(self) -> list[str]:
        """Stop what is queued, kill the guests still running, undo what the jobs left
        (loop devices); returns the problems met."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        vm.kill_all()
        problems: list[str] = []
        for fn in self._closers:
            problems += fn()
        return problems


def workers(only_vm_tests: bool) -> int:
    env = os.environ.get("BLKREWIND_VM_PARALLEL")
    if env:
        return int(env)
    return 2 if only_vm_tests else 1
