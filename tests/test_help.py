"""Help as a manual (blkrewind/helpdoc.py): every subcommand's --help (including the ones
added later: the test walks COMMANDS), the man page rendered by man(1), the bash completion
loaded in a real bash."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blkrewind import helpdoc
from blkrewind.cli import COMMANDS, build_parser
from blkrewind.errors import CorruptLog, NotRestorable, StoreError, UserError

ROOT = Path(__file__).resolve().parents[1]
PARSER = build_parser()
LEAVES = [(" ".join(path), sp) for path, sp, _ in helpdoc.leaf_parsers(PARSER)
          if not helpdoc.subcommands(sp)]


def _expanded_help(sp: argparse.ArgumentParser, a: argparse.Action) -> str:
    h = helpdoc.HelpFormatter(sp.prog)._get_help_string(a) or ""
    return h % {**vars(a), "prog": sp.prog} if "%" in h else h


def test_every_command_is_documented():
    names = {p.split()[0] for p, _ in LEAVES}
    assert names == set(COMMANDS)


@pytest.mark.parametrize("path,sp", LEAVES, ids=[p for p, _ in LEAVES])
def test_subcommand_help_is_a_manual(path, sp, run_cli):
    cp = run_cli(*path.split(), "--help")
    text = cp.stdout
    assert cp.returncode == 0 and not cp.stderr
    # what it does: a description beyond the one-line summary
    assert sp.description and len(sp.description.strip()) > 40, path
    assert "\nExamples:\n" in text and "\nExit status:\n" in text, path
    # one block each, made by helpdoc from the module's EXAMPLES / EXIT_STATUS (a second,
    # hand-written in the docstring, drifted from the codes the command really returns)
    assert text.count("\nExamples:\n") == 1 and text.count("\nExit status:\n") == 1, path
    examples = text.split("\nExamples:\n", 1)[1].split("\n\n", 1)[0]
    assert f"blkrewind {path}" in examples, f"{path}: the examples do not run `blkrewind {path}`"
    for code, _ in helpdoc.exit_status():
        assert re.search(rf"^  {code}\s", text, re.M), f"{path}: exit code {code} not listed"
    for a in helpdoc.options(sp):
        if isinstance(a, argparse._HelpAction):
            continue
        h = _expanded_help(sp, a)
        name = a.option_strings[0] if a.option_strings else a.metavar or a.dest
        assert h.strip(), f"{path} {name}: no help"
        if a.option_strings:
            assert a.option_strings[0] in text, f"{path}: {name} not in --help"
        if a.option_strings and a.nargs != 0:
            # a value with a name that says what it is (a unit, DIR, FILE, ...)
            assert a.choices or a.metavar, \
                f"{path} {name}: give it a metavar (its unit or kind)"
        d = helpdoc.default_text(a)
        if d is not None:
            assert helpdoc.mentions_default(h, d), f"{path} {name}: default {d} not in {h!r}"
            assert d in " ".join(text.split()), f"{path} {name}: default {d} not shown"


def test_exit_codes_come_from_errors_module():
    codes = dict(helpdoc.EXIT_CODES)
    for cls in (UserError, CorruptLog, StoreError, NotRestorable):
        assert cls.exit_code in codes
    # cli.main's own codes
    src = (ROOT / "blkrewind" / "cli.py").read_text()
    assert f"return {helpdoc.INTERRUPTED} + signum" in src and f"return {helpdoc.INTERNAL_ERROR}" in src


def test_top_level_help_speaks_to_users(run_cli):
    text = run_cli("--help").stdout
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", text, re.M), name
    for word in ("Common flows", "Exit status", "docs/user-guide.md", "man blkrewind",
                 "blkrewind trace", "blkrewind restore"):
        assert word in text
    # no developer talk: module names and layout of the code
    for word in ("blkrewind/commands", "add_arguments", "module", ".py"):
        assert word not in text, word


def _manpage(tmp_path) -> Path:
    out = tmp_path / "blkrewind.1"
    subprocess.run([sys.executable, "-m", "blkrewind.helpdoc", "man", str(out)], check=True,
                   cwd=ROOT, timeout=60)
    return out


def test_man_page_renders(tmp_path):
    if shutil.which("man") is None or shutil.which("groff") is None:
        pytest.fail("man-db and groff are needed (bootstrap.sh installs them)")
    page = _manpage(tmp_path)
    # groff's own warnings (bad requests, escapes) on stderr
    w = subprocess.run(["groff", "-man", "-ww", "-z", str(page)], capture_output=True,
                       text=True, timeout=60)
    assert w.returncode == 0 and not w.stderr.strip(), w.stderr
    env = dict(os.environ, MANWIDTH="100", MAN_KEEP_FORMATTING="0", LC_ALL="C.UTF-8")
    r = subprocess.run(["man", "-l", "-P", "cat", str(page)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    text = re.sub(r".\x08", "", r.stdout)     # overstrikes, if any
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "EXIT STATUS", "SEE ALSO"):
        assert re.search(rf"^{section}$", text, re.M), section
    for path, sp in LEAVES:
        assert re.search(rf"^BLKREWIND {path.upper()}$", text, re.M), path
        for a in helpdoc.options(sp):
            if a.option_strings and not isinstance(a, argparse._HelpAction):
                assert a.option_strings[0] in text, f"{path} {a.option_strings[0]}"
    assert "--ring-mb MIB" in text and "(default 128)" in text
    assert "blkrewind restore --store /srv/blkrewind --device db1:sdb" in text
    for code, _ in helpdoc.exit_status():
        assert re.search(rf"^\s+{code}\s*$|^\s+{code}\s", text, re.M), code


def _completion(tmp_path) -> Path:
    out = tmp_path / "blkrewind.bash"
    subprocess.run([sys.executable, "-m", "blkrewind.helpdoc", "completion", str(out)],
                   check=True, cwd=ROOT, timeout=60)
    return out


def _complete(script: Path, words: list[str], bash_completion: bool = False) -> list[str]:
    """COMPREPLY of _blkrewind for the command line `words` (the last one is being typed)."""
    pre = ""
    if bash_completion:
        pre = "source /usr/share/bash-completion/bash_completion; "
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    cmd = (f"{pre}source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
           f"COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; _blkrewind; "
           f"printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c", cmd], capture_output=True,
                       text=True, timeout=30, cwd=script.parent)
    assert r.returncode == 0, r.stderr
    return [ln for ln in r.stdout.splitlines() if ln]


def test_bash_completion(tmp_path):
    script = _completion(tmp_path)
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                        f"source {script}; complete -p blkrewind"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "-F _blkrewind" in r.stdout, r.stdout + r.stderr
    assert set(_complete(script, ["blkrewind", ""])) == set(COMMANDS)
    assert _complete(script, ["blkrewind", "tr"]) == ["trace"]
    assert "--version" in _complete(script, ["blkrewind", "--"])
    opts = _complete(script, ["blkrewind", "trace", "--device", "/dev/null", "--"])
    assert {"--device", "--log", "--ring-mb", "--ship", "--metrics", "--help"} <= set(opts)
    assert _complete(script, ["blkrewind", "trace", "--ri"]) == ["--ring-mb"]
    assert _complete(script, ["blkrewind", "trace", "--fsync", ""]) == ["interval", "always",
                                                                          "never"]
    assert _complete(script, ["blkrewind", "status", "--format", "j"]) == ["json"]
    assert _complete(script, ["blkrewind", "tls", ""]) == ["init"]
    assert "--hosts" in _complete(script, ["blkrewind", "tls", "init", "--h"])
    # a DIR option completes directories
    (tmp_path / "logdir").mkdir()
    assert "logdir" in _complete(script, ["blkrewind", "ingest", "--log", "log"])
    # a PATH completes files; trace --device completes device paths
    assert "/dev/null" in _complete(script, ["blkrewind", "restore", "--to", "/dev/nu"])
    assert "/dev/null" in _complete(script, ["blkrewind", "trace", "--device", "/dev/nu"])
    assert _complete(script, ["blkrewind", "restore", "--device", "/dev/nu"]) == []
    # after `trace ... --`: a command
    assert "bash" in _complete(script, ["blkrewind", "trace", "--device", "x", "--", "bas"])
    # the same with Debian's bash-completion loaded (as in an interactive shell)
    if Path("/usr/share/bash-completion/bash_completion").exists():
        assert _complete(script, ["blkrewind", "pru"], bash_completion=True) == ["prune"]
        assert "--keep-marks" in _complete(script, ["blkrewind", "prune", "--keep-"],
                                           bash_completion=True)


def test_install_layout_is_found_by_man_and_bash_completion(tmp_path):
    """`python -m blkrewind.helpdoc install --prefix P` (bootstrap.sh: P=/usr/local) puts the
    page where man looks (P/share/man) and the script where bash-completion loads it on
    demand (P/share/bash-completion/completions, P/share being in XDG_DATA_DIRS)."""
    prefix = tmp_path / "usr-local"
    subprocess.run([sys.executable, "-m", "blkrewind.helpdoc", "install", "--prefix",
                    str(prefix)], check=True, cwd=ROOT, timeout=60, capture_output=True)
    r = subprocess.run(["man", "-M", str(prefix / "share" / "man"), "-P", "cat", "blkrewind"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, MANWIDTH="100", LC_ALL="C.UTF-8"))
    assert r.returncode == 0 and "EXIT STATUS" in r.stdout, r.stderr
    bc = Path("/usr/share/bash-completion/bash_completion")
    if not bc.exists():
        pytest.fail("bash-completion is needed (bootstrap.sh installs it)")
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                        f"source {bc}; export XDG_DATA_DIRS={prefix / 'share'}; "
                        f"__load_completion blkrewind && complete -p blkrewind"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "-F _blkrewind" in r.stdout, r.stdout + r.stderr
