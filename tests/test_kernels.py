"""The capture on every kernel it claims: Debian's 5.10, 6.1, 6.12 and the newest 7.x under
QEMU, and the BPF object as each clang from 14 on builds it.

The matrix (test_kernel_matrix) boots each kernel with software emulation (tests/vm/kernels.py:
Debian's packages, cached in /var/cache/blkrewind-test/kernels, downloaded when missing),
runs the tracer in the guest (tests/vm/guest.py: ext4 on a loop device, marks, an 8 MiB ring
overflowed by O_DIRECT bursts and resynced), then ingests the guest's LOG here and restores at
every mark and at `latest`, byte for byte against the guest's O_DIRECT copies.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "vm"))

import kernels as vm  # noqa: E402
from conftest import background_jobs, in_ci  # noqa: E402
from tracerproc import cli, first_difference, same_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# series -> words of the one-line refusal where the capture is refused (else it must work):
# none since the legacy programs (bpf/legacy.h) run where the modern ones cannot (5.10)
EXPECT_REFUSAL: dict[str, str] = {}
# series -> the program variant its guest must load (tracer/features.py variant())
EXPECT_VARIANT = {"5.10": "legacy"}
GUEST_TIMEOUT = 900


def _need(what: str, ok: bool) -> None:
    if ok:
        return
    if in_ci():
        pytest.fail(f"{what} (CI=true: failing instead of skipping)", pytrace=False)
    pytest.skip(what)


def _results_file() -> Path:
    return Path(os.environ.get("BLKREWIND_KERNEL_RESULTS", "/tmp/blkrewind-kernel-matrix.json"))


def _record(series: str, release: str, result: str, seconds: float) -> None:
    """The matrix's table (README: Requirements), one row per kernel, kept across runs."""
    f = _results_file()
    try:
        rows = json.loads(f.read_text())
    except (OSError, ValueError):
        rows = {}
    rows[series] = {"release": release, "result": result, "seconds": round(seconds, 1),
                    "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    f.write_text(json.dumps(rows, indent=1))


def submit_vm_jobs(bg, tmp_path_factory, items) -> None:
    """Queues the guest of every series selected (items: this module's tests in the session;
    tests/vm/background.py): (kimg, out, CompletedProcess, seconds) once done."""
    if shutil.which("qemu-system-x86_64") is None:
        bg.unavailable(__name__, "qemu-system-x86_64 is missing")
        return
    try:
        vm.vng()
    except vm.VmError as e:
        bg.unavailable(__name__, str(e))
        return
    base = tmp_path_factory.mktemp("guests")

    def run(series):
        kimg = bg.kernel(series)
        t0 = time.monotonic()
        out = base / series
        r = vm.run_guest(kimg, out, [sys.executable, "tests/vm/guest.py", str(out)],
                         timeout=GUEST_TIMEOUT)
        return kimg, out, r, time.monotonic() - t0

    selected = {it.callspec.params["series"] for it in items
                if getattr(it, "originalname", "") == "test_kernel_matrix"}
    for s in vm.SERIES:
        if s in selected:
            bg.submit(f"kernel-{s}", run, s)


@pytest.fixture(scope="module")
def guests(vm_background):
    return background_jobs(vm_background, __name__)


@pytest.mark.bpf
@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.parametrize("series", vm.SERIES)
def test_kernel_matrix(series, guests, tmp_path):
    # queued behind the guests before it (one at a time beside the suite)
    kimg, out, r, guest_s = guests.result(f"kernel-{series}",
                                          (GUEST_TIMEOUT + 120) * len(vm.SERIES))
    t0 = time.monotonic()  # the host's part (ingest, restores) comes on top of guest_s
    release = kimg.name.removeprefix("vmlinuz-")
    res_file = out / "result.json"
    assert res_file.exists(), f"{release}: the guest wrote no result (vng exit " \
                              f"{r.returncode}); console tail:\n{r.stdout[-3000:]}"
    res = json.loads(res_file.read_text())
    assert res["release"] == release
    if series in EXPECT_REFUSAL:
        refused = res.get("refused", "")
        assert not res["ok"] and EXPECT_REFUSAL[series] in refused, res.get("error")
        lines = [ln for ln in refused.splitlines() if ln.strip()]
        assert len(lines) == 1 and release in lines[0] and "Traceback" not in refused, refused
        _record(series, release, "refused: " + lines[0].split("error: ", 1)[-1],
                guest_s + time.monotonic() - t0)
        return
    assert res["ok"], f"{release}: {res.get('error')}\n{res.get('traceback', '')}\n" \
                      f"tracer:\n{res.get('trace_stderr', '')}"
    stats = res["trace_stats"]
    assert stats["drops"] > 0, f"{release}: the ring never overflowed: {stats}"
    variant = "legacy" if "legacy programs" in res.get("trace_head", "") else "modern"
    assert variant == EXPECT_VARIANT.get(series, "modern"), res["trace_stderr"]
    assert "records lost" in res["trace_stderr"], res["trace_stderr"]
    # the host side: ingest the guest's LOG, restore at every mark and latest
    store = tmp_path / "store"
    cli("ingest", "--log", out / "log", "--store", store, timeout=600)
    loss = json.loads(cli("sql", "--store", store, "SELECT * FROM loss", "--format",
                          "json").stdout)
    assert loss and max(x["drops"] for x in loss) > 0, loss
    # who dirtied buffered writes (issue 12): dirtier_btf attached, and the flusher's or
    # fsfreeze's writeback bios name the guest's writer
    dirtied = json.loads(cli("sql", "--store", store, "SELECT count(*) AS n FROM writes WHERE "
                             "dirty_pid IS NOT NULL AND dirty_pid != pid", "--format",
                             "json").stdout)[0]["n"]
    assert dirtied > 0, f"{release}: no write attributed to its dirtier"
    for name, copy in res["copies"].items():
        img = tmp_path / f"restored-{name}.img"
        cli("restore", "--store", store, "--device", res["device"], "--at", name, "--to", img,
            timeout=600)
        assert same_file(img, out / copy), \
            f"{release}: restore at {name} differs: {first_difference(img, out / copy)}"
        img.unlink()
    _record(series, release, f"pass, {variant} programs (marks "
            f"{', '.join(k for k in res['copies'] if k != 'latest')}"
            f", latest; {stats['drops']} records lost and resynced)",
            guest_s + time.monotonic() - t0)


# ------------------------------------------------------------------------------------------
_CLANGS = [f"clang-{v}" for v in range(14, 22) if shutil.which(f"clang-{v}")]


@pytest.mark.bpf
@pytest.mark.parametrize("clang", _CLANGS or ["clang-14"])
def test_programs_verify_with_every_clang(clang, tmp_path):
    """Every program of the object loads on this kernel whichever clang built it (clang 14,
    Debian 12's default, once built a capture the verifier gave up on after 1M insns)."""
    _need(f"{clang} is missing", shutil.which(clang) is not None)
    sys.path.insert(0, str(ROOT / "bpf"))
    import build

    from blkrewind.tracer import libbpf as L
    obj = build.build(tmp_path, force=True, quiet=True, clang=clang)
    t0 = time.monotonic()
    with L.BpfObject(str(obj), max_entries={"rb": 1 << 20}) as o:
        for p in ("capture_btf", "capture_raw", "rqdone_btf", "rqdone_raw", "point", "reader",
                  "dirtier_btf"):
            assert o.prog_fd(p) >= 0
    # the legacy variant (bpf/legacy.h): dirtier_page_raw is for kernels before 5.17 and
    # does nothing here, but it loads
    with L.BpfObject(str(tmp_path / build.LEGACY_NAME), max_entries={"rb": 1 << 20}) as o:
        for p in ("capture_raw", "capture_raw_q", "rqdone_raw", "biodone_raw", "point",
                  "reader", "dirtier_folio_raw", "dirtier_page_raw"):
            assert o.prog_fd(p) >= 0
    assert time.monotonic() - t0 < 120


@pytest.mark.bpf
def test_the_variant_follows_the_kernel_and_the_legacy_one_can_be_forced(monkeypatch):
    """features.variant() loads the modern programs where the kernel has what they use (as
    this one does); BLKREWIND_BPF_VARIANT=legacy loads the legacy ones here too (the tests
    that take the bpf_variant fixture run both), whose block_bio_queue program is the one
    the tracepoint's arity takes: (bio) from 5.11 on."""
    from blkrewind.tracer import capture, features
    monkeypatch.delenv(features.VARIANT_ENV, raising=False)
    assert features.variant() == ("modern", "") and features.modern_missing() == []
    assert features.missing_feature() is None
    monkeypatch.setenv(features.VARIANT_ENV, "legacy")
    assert features.variant()[0] == "legacy"
    with capture.Capture(ring_bytes=1 << 20, dirty_regions=4) as cap:
        assert cap.variant == "legacy" and "claim_map" in cap.fd
        assert cap.path.endswith("blkrewind-legacy.bpf.o")
        cap.attach()
        assert cap.attached_progs["queue"] == "capture_raw", cap.attached_progs
        assert cap.counters()["unstamped"] == 0


BROKEN = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
char LICENSE[] SEC("license") = "GPL";
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
     __type(key, __u32); __type(value, __u8[64]); } m SEC(".maps");
SEC("raw_tp")
int broken(__u64 *ctx)
{
	__u32 k = 0;
	__u8 *v = bpf_map_lookup_elem(&m, &k);
	if (!v)
		return 0;
	return v[ctx[0]];  /* unbounded index: the verifier refuses */
}
"""


@pytest.mark.bpf
def test_rejected_program_shows_the_verifier_log(tmp_path):
    from blkrewind.tracer import capture
    from blkrewind.tracer import libbpf as L
    vmlinux_h = ROOT / "bpf" / "build" / "vmlinux.h"
    assert vmlinux_h.exists()
    src = tmp_path / "broken.bpf.c"
    src.write_text(BROKEN)
    obj = tmp_path / "broken.bpf.o"
    clang = shutil.which("clang") or _CLANGS[-1]
    subprocess.run([clang, "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86",
                    "-I", str(vmlinux_h.parent), "-c", str(src), "-o", str(obj)], check=True)
    with pytest.raises(L.BpfError) as ei:
        L.BpfObject(str(obj))
    msg = capture.load_error(ei.value)
    lines = msg.splitlines()
    assert os.uname().release in lines[0] and "broken" in lines[0], msg
    assert 2 <= len(lines) <= 1 + L.VERIFIER_TAIL_LINES, msg
    assert "math between map_value pointer and register" in msg, msg  # the verifier's words
    assert "see the kernel log" not in msg
