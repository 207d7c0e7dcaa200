"""Debian's kernels under QEMU: fetch, cache, boot with this checkout's tracer inside.

  python tests/vm/kernels.py fetch [SERIES...]      download + extract (default: all)
  python tests/vm/kernels.py run SERIES OUT         boot it, run tests/vm/guest.py OUT

SERIES: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), newest (the highest released
linux-image-amd64 of every suite Debian serves: bookworm/trixie backports, sid,
experimental; release candidates excluded).

Kernels come from Debian's archive with `apt-get download` through an apt configuration of
our own (sources list, state and cache under CACHE/apt: nothing on the host's apt is read
or changed, nothing is installed), then `dpkg -x` of the linux-image package (and of the
linux-binary/linux-modules packages newer kernels split it into), laid out as
CACHE/kernels/RELEASE/{boot/vmlinuz-RELEASE, lib/modules/RELEASE}. A series resolved in the
last week is used from the cache without any network access.

The guest: virtme-ng (`vng`, PyPI) with software emulation (--disable-kvm: this host's KVM
cannot run ordinary guests), the host's root shared read-only over 9p (so the guest runs
this checkout's .venv), the kernel's own modules (loop, ext4, 9p...) from the cache, and OUT
shared read-write. The guest writes OUT/result.json (tests/vm/guest.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("BLKREWIND_VM_CACHE", "/var/cache/blkrewind-test"))
KERNELS = CACHE / "kernels"
APT = CACHE / "apt"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITES = ["bullseye", "bookworm", "bookworm-backports", "trixie", "trixie-backports", "sid",
          "experimental"]
SECURITY_SUITES = ["bullseye-security", "bookworm-security", "trixie-security"]
SERIES = ["5.10", "6.1", "6.12", "newest"]
RESOLVE_MAX_AGE = 7 * 86400


class VmError(Exception):
    pass


def _sh(*cmd, cwd=None, timeout=900) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise VmError(f"{' '.join(map(str, cmd[:4]))}... exited {p.returncode}: "
                      f"{(p.stderr or p.stdout).strip()[-600:]}")
    return p.stdout


def _apt_opts() -> list[str]:
    return [f"-o=Dir::Etc::sourcelist={APT / 'sources.list'}", "-o=Dir::Etc::sourceparts=-",
            f"-o=Dir::State={APT / 'state'}", f"-o=Dir::Cache={APT / 'cache'}",
            "-o=Dir::State::status=/dev/null", "-o=APT::Architecture=amd64",
            "-o=Acquire::Languages=none", "-o=Debug::NoLocking=1",
            "-o=Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"]


def apt_update() -> None:
    for d in ("state/lists/partial", "cache/archives/partial"):
        (APT / d).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "tests"))
    import debmirror  # the archive this machine's apt uses (or BLKREWIND_DEBIAN_MIRROR)
    lines = [f"deb [signed-by={KEYRING}] {debmirror.mirror()} {s} main" for s in SUITES]
    lines += [f"deb [signed-by={KEYRING}] {debmirror.security()} {s} main"
              for s in SECURITY_SUITES]
    (APT / "sources.list").write_text("\n".join(lines) + "\n")
    _sh("apt-get", *_apt_opts(), "-q", "update", timeout=600)


def _stanzas(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.split("\n\n"):
        d = {}
        for line in block.splitlines():
            if ":" in line and not line.startswith(" "):
                k, _, v = line.partition(":")
                d[k] = v.strip()
        if d:
            out.append(d)
    return out


def _version_key(v: str):
    """Debian version order, enough for kernel versions (digits numerically, ~ sorts first)."""
    parts = re.findall(r"\d+|[a-z]+|~|[^\da-z~]", v.lower())
    return [(0, int(p)) if p.isdigit() else (-1, 0) if p == "~" else (1, p) for p in parts]


def resolve(series: str) -> dict:
    """{"version", "packages": [name=version...]} of a series, from the apt indexes."""
    text = _sh("apt-cache", *_apt_opts(), "show", "linux-image-amd64")
    cands = []
    for st in _stanzas(text):
        v = st.get("Version", "")
        if "~rc" in v or "~exp" in v:
            continue
        ok = v.startswith(series + ".") if series != "newest" else True
        if ok:
            cands.append(st)
    if not cands:
        raise VmError(f"Debian serves no linux-image-amd64 of series {series}")
    st = max(cands, key=lambda s: _version_key(s["Version"]))
    version = st["Version"]
    image = next(d.split()[0] for d in st["Depends"].split(",")
                 if d.strip().startswith("linux-image-"))
    pkgs = [f"{image}={version}"]
    # newer kernels split the image: vmlinuz in linux-binary-*, modules in linux-modules-*
    for st2 in _stanzas(_sh("apt-cache", *_apt_opts(), "show", f"{image}={version}")):
        for d in st2.get("Depends", "").split(","):
            name = d.strip().split()[0] if d.strip() else ""
            if re.match(r"linux-(binary|modules)-", name):
                pkgs.append(f"{name}={version}")
    return {"series": series, "version": version, "packages": pkgs, "resolved": time.time()}


def _layout(tree: Path) -> str:
    """Normalise an extracted tree to boot/vmlinuz-R + lib/modules/R; returns R."""
    mods = tree / "lib/modules"
    usr = tree / "usr/lib/modules"
    if usr.is_dir():  # merged-/usr packages (trixie on)
        mods.mkdir(parents=True, exist_ok=True)
        for m in usr.iterdir():
            shutil.move(str(m), mods / m.name)
        usr.rmdir()
    release = next(mods.iterdir()).name
    boot = tree / "boot"
    boot.mkdir(exist_ok=True)
    kimg = boot / f"vmlinuz-{release}"
    if not kimg.exists():
        inmods = mods / release / "vmlinuz"
        if not inmods.exists():
            raise VmError(f"no vmlinuz in the packages of {release}")
        shutil.copy(inmods, kimg)
    return release


def fetch(series: str, log=print) -> Path:
    """The kernel image of a series, downloaded and extracted into the cache when needed."""
    KERNELS.mkdir(parents=True, exist_ok=True)
    idx = KERNELS / f"series-{series}.json"
    info = None
    if idx.exists():
        info = json.loads(idx.read_text())
        kimg = KERNELS / info["release"] / "boot" / f"vmlinuz-{info['release']}"
        fresh = time.time() - info.get("resolved", 0) < RESOLVE_MAX_AGE
        if kimg.exists() and (KERNELS / info["release"] / ".complete").exists() and fresh:
            return kimg
    try:
        apt_update()
        want = resolve(series)
    except (VmError, subprocess.TimeoutExpired) as e:
        if info and (KERNELS / info["release"] / ".complete").exists():
            log(f"kernels: {series}: {e}; using the cached {info['release']}")
            return KERNELS / info["release"] / "boot" / f"vmlinuz-{info['release']}"
        raise
    if info and info["version"] == want["version"] and (KERNELS / info["release"] / ".complete").exists():
        info["resolved"] = want["resolved"]
        idx.write_text(json.dumps(info))
        return KERNELS / info["release"] / "boot" / f"vmlinuz-{info['release']}"
    debs = KERNELS / "debs"
    debs.mkdir(exist_ok=True)
    log(f"kernels: {series}: downloading {' '.join(want['packages'])}")
    _sh("apt-get", *_apt_opts(), "-q", "download", *want["packages"], cwd=debs, timeout=1800)
    tmp = KERNELS / f".extract-{series}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for p in want["packages"]:
            name, _, version = p.partition("=")
            deb = next(debs.glob(f"{name}_{version.replace(':', '%3a')}_*.deb"))
            _sh("dpkg", "-x", deb, tmp)
            deb.unlink()
        release = _layout(tmp)
        # drop what the guest never needs (docs, firmware links)
        shutil.rmtree(tmp / "usr/share", ignore_errors=True)
        dest = KERNELS / release
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        (dest / ".complete").write_text(want["version"] + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    idx.write_text(json.dumps({**want, "release": release}))
    return dest / "boot" / f"vmlinuz-{release}"


def vng() -> str:
    p = Path(sys.executable).parent / "vng"
    if p.exists():
        return str(p)
    found = shutil.which("vng")
    if not found:
        raise VmError("vng (virtme-ng) is missing: pip install -e '.[test]'")
    return found


_RUNNING: set[int] = set()  # process groups of the guests running now (kill_all)


def kill_all() -> None:
    """Kill every guest this process started that still runs (test teardown, Ctrl-C)."""
    for pgid in list(_RUNNING):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _RUNNING.discard(pgid)


def run_guest(kimg: Path, out: Path, guest_cmd: list[str], timeout: float = 900,
              memory: str = "1G", cpus: int = 2, extra: tuple[str, ...] = (),
              on_start=None) -> subprocess.CompletedProcess:
    """Boot kimg, run guest_cmd (as root, cwd = this checkout), power off. OUT is shared
    read-write; the console goes to OUT.console. qemu is killed on timeout or error (its
    own process group), so no VM outlives this call. on_start(pgid): called once vng (and
    qemu, in its process group) started; os.killpg(pgid, SIGKILL) is a power cut."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    cmd = [vng(), "--run", str(kimg), "--disable-kvm", "--force-9p", "--cpus", str(cpus),
           "--memory", memory, "--verbose", "--rodir", str(KERNELS), "--rwdir", str(out),
           "--cwd", str(ROOT), *extra, "--exec", " ".join(guest_cmd)]
    console = out.parent / (out.name + ".console")
    with open(console, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, cwd=ROOT, start_new_session=True)
        _RUNNING.add(p.pid)
        try:
            if on_start is not None:
                on_start(p.pid)
            rc = p.wait(timeout)
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(30)
            raise
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # anything of the group still there
            except ProcessLookupError:
                pass
            _RUNNING.discard(p.pid)
    return subprocess.CompletedProcess(cmd, rc, console.read_text(errors="replace"), "")


def main(argv: list[str]) -> int:
    if argv and argv[0] == "fetch":
        for s in argv[1:] or SERIES:
            print(s, fetch(s))
        return 0
    if len(argv) == 3 and argv[0] == "run":
        out = Path(argv[2]).resolve()
        t0 = time.monotonic()
        r = run_guest(fetch(argv[1]), out, [sys.executable, "tests/vm/guest.py", str(out)])
        print(f"vng exit {r.returncode} after {time.monotonic() - t0:.1f} s; "
              f"console: {out.parent / (out.name + '.console')}")
        res = out / "result.json"
        print(res.read_text() if res.exists() else "no result.json")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
