#!/usr/bin/env bash
# Set up blkrewind on a fresh Debian 12 / 13 or Ubuntu 22.04 / 24.04 machine (as root), then run it.
#
#   sudo ./bootstrap.sh demo            set up, then `blkrewind demo`
#   sudo ./bootstrap.sh test [ARGS]     set up, then the test suite (ARGS go to pytest,
#                                       paths relative to the repository root)
#   sudo ./bootstrap.sh setup           set up only
#
# Idempotent: each step does nothing when its work is already done. Needs no TTY and no stdin.
#
# Environment:
#   PYTHON=python3.X               the interpreter for .venv (default: the first python3 >= 3.11)
#   BLKREWIND_SKIP_BPF_BUILD=1     development only: skip building the BPF object
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=$ROOT/.venv
STAMP=$VENV/.blkrewind-install.sha256
LINK=/usr/local/sbin/blkrewind
export DEBIAN_FRONTEND=noninteractive
# Root's tools live in the sbin directories (mkfs.ext4, losetup, bpftool, modprobe); `su`
# without `-` and some sudo set-ups keep a user's PATH without them.
for d in /usr/local/sbin /usr/sbin /sbin; do
    case ":$PATH:" in *":$d:"*) ;; *) PATH=$PATH:$d ;; esac
done
export PATH

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }

# Run a command with its output kept; show the output only if it fails.
quietly() {
    local out rc=0
    out=$("$@" 2>&1 </dev/null) || rc=$?
    if [ "$rc" -ne 0 ]; then
        printf '%s\n' "$out" | tail -n 40 >&2
        printf 'bootstrap: (%s exited %d)\n' "$*" "$rc" >&2
    fi
    return "$rc"
}

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

mode=${1:-}
case "$mode" in
    demo|test|setup) shift ;;
    -h|--help) usage 0 ;;
    *) usage ;;
esac

[ "$(id -u)" -eq 0 ] || die "run as root: sudo ./bootstrap.sh $mode (it installs packages and traces block devices)"
cd "$ROOT"

# ------------------------------------------------------------------ 1. packages
installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
# Never `cmd | grep -q` under pipefail: grep exits at its first match and the writer dies of
# SIGPIPE (exit 141), which fails the pipeline at random. Capture the output, then match it.
has_candidate() {
    local out
    out=$(apt-cache policy "$1" 2>/dev/null) || return 1
    [[ $out == *"Candidate: "[!\(]* ]]
}
# The major version of a package's candidate (clang 1:14.0-55.7~deb12u1 -> 14), or nothing.
candidate_major() {
    local out
    out=$(apt-cache policy "$1" 2>/dev/null) || return 0
    [[ $out =~ Candidate:\ ([0-9]+:)?([0-9]+) ]] && printf '%s\n' "${BASH_REMATCH[2]}"
    return 0
}
# clang 14 (Debian 12's and Ubuntu 22.04's default) has compiled the capture into a program the
# verifier gave up on (over 1M instructions): a newer one where the archive has it (Debian 12:
# clang-16 and clang-19). bpf/build.py uses the newest clang-N on PATH.
# Prints the clang-N package to install (the newest of 16..19 with a candidate) when no
# clang >= 16 is on PATH and the distribution's default clang is older; else nothing.
newer_clang() {
    local v def
    for v in 21 20 19 18 17 16; do command -v "clang-$v" >/dev/null 2>&1 && return 0; done
    def=$(candidate_major clang)
    [ -n "$def" ] && [ "$def" -ge 16 ] && return 0
    for v in 19 18 17 16; do
        if has_candidate "clang-$v"; then printf 'clang-%s\n' "$v"; return 0; fi
    done
    return 0
}
bpftool_works() { command -v bpftool >/dev/null 2>&1 && bpftool version >/dev/null 2>&1; }
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

pick_python() {
    local c
    for c in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$c" >/dev/null 2>&1 && python_ok "$c"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

step_packages() {
    command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        || die "this script needs a Debian or Ubuntu system (dpkg/apt); install by hand: clang (>= 16) llvm libbpf-dev bpftool e2fsprogs xfsprogs fio util-linux mount python3 (>= 3.11) kmod ca-certificates"
    # Everything the build, the demo and the tools run, named even where a usual install has
    # it already: a minimal root (debootstrap --variant=minbase, a container image) has not.
    # ca-certificates: pip's TLS to PyPI; mount: losetup, mount; util-linux: fsfreeze, fstrim;
    # man-db, groff-base, bash-completion: the man page and completion installed in step 4.
    # nbdkit, nbdkit-plugin-python, fuse3: `export` and `mount` (instant access); libnbd-bin:
    # nbdinfo/nbdcopy, NBD clients for an export, and nbdfuse (a package of its own where the
    # distribution split it off: see need_nbdfuse).
    local want=(clang llvm libbpf-dev e2fsprogs xfsprogs fio util-linux mount fdisk python3-venv
                kmod iproute2 ca-certificates man-db groff-base bash-completion
                nbdkit nbdkit-plugin-python fuse3 libnbd-bin)
    # Only what the test suite needs besides (`bootstrap.sh test`): prometheus (the metrics
    # test scrapes with a real server); debootstrap, zstd (tests/test_fresh_root.py; zstd also
    # a benign workload of the ransomware detector's tests; postgresql: another, PostgreSQL
    # under pgbench, tests/forensics_workloads.py);
    # qemu-system-x86, busybox-static: the kernel matrix (tests/test_kernels.py, virtme-ng).
    [ "$mode" = test ] && want+=(prometheus debootstrap zstd postgresql qemu-system-x86 busybox-static)
    local missing=() p
    for p in "${want[@]}"; do installed "$p" || missing+=("$p"); done
    local need_bpftool=0 need_python=0 need_nbdfuse=0 clang_pkg
    bpftool_works || need_bpftool=1
    pick_python >/dev/null || need_python=1
    command -v nbdfuse >/dev/null 2>&1 || need_nbdfuse=1
    clang_pkg=$(newer_clang)
    if [ ${#missing[@]} -eq 0 ] && [ $need_bpftool -eq 0 ] && [ $need_python -eq 0 ] \
        && [ $need_nbdfuse -eq 0 ] && [ -z "$clang_pkg" ]; then
        say "[1/5] packages: all present"
        return
    fi
    local apt=(apt-get -y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef
               -o Dpkg::Options::=--force-confold)
    say "[1/5] packages: apt-get update"
    quietly "${apt[@]}" update || die "apt-get update failed (network or apt sources?)"
    # Decided again with fresh package lists (a new machine may have none yet).
    clang_pkg=$(newer_clang)
    if [ -n "$clang_pkg" ]; then missing+=("$clang_pkg"); fi
    # Debian (and newer Ubuntu) have a bpftool package; Ubuntu ships it in linux-tools-*.
    if [ $need_bpftool -eq 1 ] && has_candidate bpftool; then missing+=(bpftool); fi
    # nbdfuse: in libnbd-bin (Debian 12), a package of its own elsewhere.
    if [ $need_nbdfuse -eq 1 ] && has_candidate nbdfuse; then missing+=(nbdfuse); fi
    if [ ${#missing[@]} -gt 0 ]; then
        say "[1/5] packages: installing ${missing[*]}"
        quietly "${apt[@]}" install --no-install-recommends "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
        for p in "${missing[@]}"; do installed "$p" || die "package $p is still not installed after apt-get install"; done
    fi
    if [ $need_bpftool -eq 1 ]; then
        if ! bpftool_works; then
            quietly "${apt[@]}" install --no-install-recommends linux-tools-common "linux-tools-$(uname -r)" \
                || quietly "${apt[@]}" install --no-install-recommends linux-tools-common linux-tools-generic \
                || true
        fi
        bpftool_works || say "warning: bpftool is still missing or does not run for kernel $(uname -r); the BPF build needs it"
    fi
    command -v nbdfuse >/dev/null 2>&1 \
        || say "warning: nbdfuse is still missing: \`blkrewind mount\` needs it (export does not)"
    if [ $need_python -eq 1 ] && ! pick_python >/dev/null; then
        # Ubuntu 22.04's python3 is 3.10; its archive has python3.11 next to it.
        quietly "${apt[@]}" install --no-install-recommends python3.11 python3.11-venv || true
    fi
}

# ------------------------------------------------------------------ 2. venv
step_venv() {
    local py
    if [ -x "$VENV/bin/python" ] && python_ok "$VENV/bin/python"; then
        py=$VENV/bin/python
    else
        py=$(pick_python) || die "blkrewind needs Python >= 3.11; found $(python3 --version 2>&1 || echo 'no python3'). On Ubuntu 22.04: apt-get install python3.11 python3.11-venv, then run again (or set PYTHON=/path/to/python3.11)"
        if [ -e "$VENV" ]; then
            say "[2/5] venv: $VENV is broken or too old, recreating it with $py"
            quietly "$py" -m venv --clear "$VENV" || die "$py -m venv failed (install the python3-venv package for $py)"
        else
            quietly "$py" -m venv "$VENV" || die "$py -m venv failed (install the python3-venv package for $py)"
        fi
    fi
    local want have=""
    want=$( { sha256sum pyproject.toml; "$VENV/bin/python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
    [ -f "$STAMP" ] && have=$(cat "$STAMP")
    if [ "$want" = "$have" ] && [ -x "$VENV/bin/blkrewind" ]; then
        say "[2/5] venv: .venv up to date ($("$VENV/bin/python" --version 2>&1))"
        return
    fi
    say "[2/5] venv: pip install -e '.[test]' into .venv ($("$VENV/bin/python" --version 2>&1))"
    quietly "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input -e '.[test]' \
        || die "pip install -e '.[test]' failed (see above)"
    printf '%s\n' "$want" >"$STAMP"
}

# ------------------------------------------------------------------ 3. BPF object
step_bpf() {
    if [ "${BLKREWIND_SKIP_BPF_BUILD:-}" = 1 ]; then
        say "[3/5] bpf: skipped (BLKREWIND_SKIP_BPF_BUILD=1, for development only)"
        return
    fi
    [ -f bpf/build.py ] || die "bpf/build.py is missing: cannot build the BPF object (for development only, BLKREWIND_SKIP_BPF_BUILD=1 skips this step)"
    [ -e /sys/kernel/btf/vmlinux ] || die "/sys/kernel/btf/vmlinux is missing: blkrewind needs a kernel with BTF (CONFIG_DEBUG_INFO_BTF=y, >= 5.10)"
    local out
    out=$("$VENV/bin/python" bpf/build.py 2>&1 </dev/null) || {
        printf '%s\n' "$out" | tail -n 40 >&2
        die "building the BPF object failed (bpf/build.py, see above)"
    }
    say "[3/5] ${out##*$'\n'}"
}

# ------------------------------------------------------------------ 4. command link
step_link() {
    # the project's modules byte-compiled once: every command imports them, and where the
    # environment says PYTHONDONTWRITEBYTECODE (some CI and container images do) they were
    # compiled again at each start (~0.4 s of `mount`'s or `restore`'s start-up)
    "$VENV/bin/python" -m compileall -q -j0 blkrewind tracer replayer analytics >/dev/null \
        || say "warning: could not byte-compile the project's modules"
    # the man page and the bash completion, generated from the CLI's own parser
    "$VENV/bin/python" -m blkrewind.helpdoc install --prefix /usr/local >/dev/null \
        || say "warning: could not install the man page and bash completion under /usr/local/share"
    if [ "$(readlink "$LINK" 2>/dev/null)" = "$VENV/bin/blkrewind" ]; then
        say "[4/5] link: $LINK -> .venv/bin/blkrewind"
        return
    fi
    if [ -e "$LINK" ] && [ ! -L "$LINK" ]; then
        die "$LINK exists and is not a symlink: remove it and run again"
    fi
    mkdir -p "$(dirname "$LINK")"
    ln -sfn "$VENV/bin/blkrewind" "$LINK"
    say "[4/5] link: $LINK -> .venv/bin/blkrewind (created)"
}

# ------------------------------------------------------------------ 5. loop devices
step_loop() {
    [ -d /sys/module/loop ] || modprobe loop >/dev/null 2>&1 || true
    if [ ! -e /dev/loop-control ]; then
        mknod -m 0600 /dev/loop-control c 10 237 2>/dev/null || true
    fi
    [ -c /dev/loop-control ] || die "/dev/loop-control is missing and could not be made: loop devices are needed (modprobe loop)"
    say "[5/5] loop: /dev/loop-control present"
}

step_packages
step_venv
step_bpf
step_link
step_loop

case "$mode" in
    setup)
        say "ready: blkrewind is $LINK"
        ;;
    demo)
        exec "$VENV/bin/blkrewind" demo "$@"
        ;;
    test)
        rc=0
        "$VENV/bin/python" -m pytest "$@" </dev/null || rc=$?
        if [ "$rc" -eq 5 ]; then
            say "error: pytest collected no tests ($*): that is a failure, not a pass" >&2
            exit 1
        fi
        exit "$rc"
        ;;
esac
