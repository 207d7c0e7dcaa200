"""Which Debian archive the tests that fetch Debian packages use (tests/test_fresh_root.py,
tests/vm/kernels.py): BLKREWIND_DEBIAN_MIRROR / BLKREWIND_DEBIAN_SECURITY if set, else the
archive this machine's own apt sources name (deb822 .sources files and sources.list), so the
tests go wherever the machine's apt goes and name no host of their own."""
from __future__ import annotations

import glob
import os


def _apt_uris() -> list[str]:
    uris: list[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip().lower() == "uris":
                    uris += val.split()
    for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            words = [w for w in line.split("#", 1)[0].split() if not w.startswith("[")]
            if len(words) >= 2 and words[0] == "deb":
                uris.append(words[1])
    return [u.rstrip("/") for u in uris if u.startswith(("http://", "https://"))]


def _pick(env: str, tail: str) -> str:
    if os.environ.get(env):
        return os.environ[env].rstrip("/")
    for u in _apt_uris():
        if u.rsplit("/", 1)[-1] == tail:
            return u
    raise RuntimeError(f"no Debian archive ending in /{tail} in this machine's apt sources: "
                       f"set {env}")


def mirror() -> str:
    return _pick("BLKREWIND_DEBIAN_MIRROR", "debian")


def security() -> str:
    return _pick("BLKREWIND_DEBIAN_SECURITY", "debian-security")
