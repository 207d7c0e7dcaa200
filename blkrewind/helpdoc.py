"""Help as a manual, from one source (the argparse parser of blkrewind/cli.py), CLI layer.

- `HelpFormatter`: every option's help ends with its default (when the text does not already
  give it); descriptions keep their layout.
- `epilog(module)`: a subcommand's "Examples:" (the module's EXAMPLES) and "Exit status:"
  (EXIT_CODES below, from blkrewind/errors.py, plus the module's EXIT_STATUS additions).
- `manpage(parser)`: blkrewind(1) in roff, every subcommand with its options, examples and the
  exit codes; `completion(parser)`: a static bash completion script. Both walk the parser, so
  a new subcommand in COMMANDS gets its section and its completion without further code.

  python -m blkrewind.helpdoc man [FILE]          the man page (stdout without FILE)
  python -m blkrewind.helpdoc completion [FILE]   the bash completion script
  python -m blkrewind.helpdoc install [--prefix /usr/local]
        both, to PREFIX/share/man/man1/blkrewind.1 and
        PREFIX/share/bash-completion/completions/blkrewind (bootstrap.sh runs this)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import sys
import textwrap

from blkrewind import __version__
from blkrewind.errors import CorruptLog, NotRestorable, StoreError, UserError

INTERNAL_ERROR = 70      # blkrewind/cli.py main(): an unexpected exception
INTERRUPTED = 128        # + the signal's number: 130 SIGINT, 143 SIGTERM, 129 SIGHUP

# The exit codes of every subcommand (a module's EXIT_STATUS adds or refines its own).
EXIT_CODES: list[tuple[int, str]] = [
    (0, "success"),
    (UserError.exit_code, "bad usage or input: a wrong option or value, an unknown device or "
                          "point, a missing LOG or store, not root (one line on stderr)"),
    (CorruptLog.exit_code, "a LOG segment is corrupt (a damaged frame, not a torn tail)"),
    (StoreError.exit_code, "the store cannot be used (missing, damaged, busy, full)"),
    (NotRestorable.exit_code, "the point cannot be rebuilt exactly (before the history, "
                              "pruned, or in a gap the history has)"),
    (INTERNAL_ERROR, "internal error, a bug (BLKREWIND_DEBUG=1 shows the traceback)"),
    (INTERRUPTED + 2, "interrupted by SIGINT (129 SIGHUP, 143 SIGTERM: 128 + the signal); a "
                        "half-written result is removed, or said"),
]

WIDTH = 90

MORE = ("More: `man blkrewind`, docs/user-guide.md (how to use it), docs/operations.md "
        "(deployment, monitoring), docs/internals.md (how it works).")


# ------------------------------------------------------------------------------ --help
def default_text(action: argparse.Action) -> str | None:
    """The default of an option as its help shows it; None: nothing to show (no value,
    a flag, help/version)."""
    d = action.default
    if d is None or d is argparse.SUPPRESS or isinstance(d, bool) or action.required:
        return None
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    if isinstance(d, float):
        return f"{d:g}"
    if isinstance(d, (list, tuple)):
        return " ".join(map(str, d)) if d else None
    return str(d)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions and epilogs as written; appends "(default: X)" to an option's help
    unless it already names its default value."""

    def _get_help_string(self, action):
        h = action.help or ""
        d = default_text(action)
        if d is not None and h is not argparse.SUPPRESS and not mentions_default(
                h % {**vars(action), "prog": ""} if "%" in h else h, d):
            h = f"{h} (default: {d.replace('%', '%%')})" if h else f"default: {d}"
        return h


def mentions_default(help_text: str, default: str) -> bool:
    """Does an option's (expanded) help text name its default value?"""
    return bool(re.search(r"\bdefault\b", help_text)) and bool(
        re.search(r"(?<![\w.-])" + re.escape(default) + r"(?![\w])", help_text))


def exit_status(extra: dict[int, str] | None = None) -> list[tuple[int, str]]:
    codes = dict(EXIT_CODES)
    for k, v in (extra or {}).items():
        codes[k] = v
    return sorted(codes.items())


def _exit_block(extra: dict[int, str] | None = None) -> str:
    return "Exit status:\n" + "\n".join(
        textwrap.fill(t, WIDTH, initial_indent=f"  {c:<4d} ", subsequent_indent=" " * 7)
        for c, t in exit_status(extra))


def epilog(mod) -> str:
    """The end of a subcommand's --help: Examples (mod.EXAMPLES), Exit status."""
    parts = []
    ex = (getattr(mod, "EXAMPLES", "") or "").strip("\n")
    if ex:
        parts.append("Examples:\n" + ex)
    parts.append(_exit_block(getattr(mod, "EXIT_STATUS", None)))
    parts.append(textwrap.fill(MORE, WIDTH))
    return "\n\n".join(parts)


def dress(parser: argparse.ArgumentParser, mod) -> None:
    """The parsers of a subcommand's own actions (tls init): the same formatter and epilog."""
    for _, sp, _ in leaf_parsers(parser):
        sp.formatter_class = HelpFormatter
        if not sp.epilog:
            sp.epilog = epilog(mod)


TOP_DESCRIPTION = """\
blkrewind keeps the whole write history of Linux block devices, so that a device can be
rebuilt exactly as it was at any moment: continuous data protection (CDP). A tracer (eBPF in
the kernel) captures every write with its data into a local LOG; the LOG is shipped to a
replayer host (or ingested there later), which stores the history; from it you restore a
device at a time, a stamp or a named mark, and query who wrote what with SQL.

Common flows:
  protect a device       blkrewind trace --device /dev/sdb --log /var/lib/blkrewind/log \\
                             --ship replayer:7420 --tls /etc/blkrewind/tls
  receive and store      blkrewind serve --store /srv/blkrewind --listen 0.0.0.0:7420 \\
                             --tls /etc/blkrewind/tls
  mark a known-good point blkrewind mark before-upgrade
  see the lag (RPO)      blkrewind status            (on the replayer: --store DIR)
  rebuild a device       blkrewind restore --store S --device db1:sdb --at before-upgrade \\
                             --to /tmp/sdb.img
  ask the history        blkrewind sql --store S "SELECT comm, sum(length) FROM writes GROUP BY 1"
  try it on a scratch device: blkrewind demo   (root)

`blkrewind COMMAND --help` describes a command, its options and defaults, with examples."""


def top_epilog() -> str:
    return _exit_block() + "\n\n" + textwrap.fill(MORE, WIDTH)


# ------------------------------------------------------------------------------ walking
def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """[(name, parser, one-line help)] of a parser's subcommands, in order."""
    out = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sp in a.choices.items():
                out.append((name, sp, helps.get(name) or ""))
    return out


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, argparse._SubParsersAction) and a.help is not argparse.SUPPRESS]


def leaf_parsers(parser, prefix=()):
    """Every command path with its parser: (("trace",), p), (("tls", "init"), p), ..."""
    for name, sp, help_ in subcommands(parser):
        path = (*prefix, name)
        yield path, sp, help_
        yield from leaf_parsers(sp, path)


# ------------------------------------------------------------------------------ man page
def _roff(text: str) -> str:
    """Escape text for roff: backslashes, leading dots/quotes, dashes in option names."""
    text = text.replace("\\", "\\e")
    lines = []
    for ln in text.split("\n"):
        if ln.startswith((".", "'")):
            ln = "\\&" + ln
        lines.append(ln)
    return "\n".join(lines)


def _opt(s: str) -> str:
    return _roff(s).replace("-", "\\-")


def _paragraphs(text: str) -> str:
    """Plain paragraphs are filled; indented blocks (examples, tables) are kept as they are."""
    out = []
    for para in re.split(r"\n\s*\n", text.strip("\n")):
        lines = para.split("\n")
        if all(ln.startswith((" ", "\t")) for ln in lines if ln.strip()) or \
                any(ln.startswith("  ") for ln in lines[1:]):
            out.append(".PP\n.RS 2\n.nf\n" + _roff("\n".join(lines)) + "\n.fi\n.RE")
        else:
            out.append(".PP\n" + _roff(" ".join(ln.strip() for ln in lines)))
    return "\n".join(out)


def _metavar(a: argparse.Action) -> str:
    """The action's metavar (a str: no action here has a tuple metavar), else its dest."""
    return a.metavar if isinstance(a.metavar, str) and a.metavar else (a.dest or "")


def _invocation(a: argparse.Action, fmt: HelpFormatter) -> str:
    if not a.option_strings:
        return "\\fI" + _opt(_metavar(a)) + "\\fR"
    if a.nargs == 0:
        return ", ".join("\\fB" + _opt(o) + "\\fR" for o in a.option_strings)
    mv = fmt._format_args(a, a.dest.upper())
    return ", ".join(f"\\fB{_opt(o)}\\fR \\fI{_opt(mv)}\\fR" for o in a.option_strings)


def _usage(p: argparse.ArgumentParser) -> str:
    u = p.format_usage().strip()
    u = re.sub(r"^usage:\s*", "", u)
    return " ".join(u.split())


def manpage(parser: argparse.ArgumentParser, date: str | None = None) -> str:
    date = date or _dt.date.fromtimestamp(
        int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or _dt.datetime.now().timestamp()
    ).isoformat()
    fmt = HelpFormatter(parser.prog)
    out = [f'.TH BLKREWIND 1 "{date}" "blkrewind {__version__}" "User Commands"',
           ".SH NAME", "blkrewind \\- continuous data protection for Linux block devices",
           ".SH SYNOPSIS", "\\fBblkrewind\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
           ".SH DESCRIPTION", _paragraphs(parser.description or ""),
           ".SH COMMANDS"]
    for path, sp, help_ in leaf_parsers(parser):
        if subcommands(sp):     # a group of subcommands (tls): its actions follow
            out += [".TP", "\\fBblkrewind " + " ".join(path) + "\\fR \\fIACTION\\fR",
                    _roff(help_)]
            continue
        out += [".TP", "\\fBblkrewind " + " ".join(path) + "\\fR", _roff(help_)]
    for path, sp, help_ in leaf_parsers(parser):
        out.append(".SH " + _roff("blkrewind " + " ".join(path)).upper())
        out += [".PP", "\\fB" + _opt(_usage(sp)) + "\\fR"]
        if sp.description:
            out.append(_paragraphs(sp.description))
        opts = options(sp)
        if opts:
            out.append(".SS Options")
            for a in opts:
                h = HelpFormatter(sp.prog)._get_help_string(a) or ""
                if "%" in h:
                    h = h % {**vars(a), "prog": sp.prog}
                out += [".TP", _invocation(a, fmt), _roff(" ".join(h.split()))]
        if sp.epilog:
            for title, body in _sections(sp.epilog):
                if title == "Exit status":
                    continue          # one section for all, below
                out.append(".SS " + _roff(title))
                out.append(_paragraphs(body) if title != "Examples" else
                           ".PP\n.RS 2\n.nf\n" + _roff(body.strip("\n")) + "\n.fi\n.RE")
    out.append(".SH EXIT STATUS")
    for code, text in exit_status():
        out += [".TP", f"\\fB{code}\\fR", _roff(text)]
    out += [".PP", "Commands with their own meaning of a code (verify: 1 = a difference or "
            "damage; trace \\-\\- COMMAND: the command's status) say so in their section.",
            ".SH ENVIRONMENT", ".TP", "\\fBBLKREWIND_DEBUG\\fR=1",
            "show the traceback of an internal error", ".TP",
            "\\fBBLKREWIND_STORE_WAIT\\fR=SECONDS",
            "how long a command waits for a busy store or a server that is starting or "
            "stopping (default 10)", ".TP", "\\fBBLKREWIND_BPF_OBJECT\\fR=FILE",
            "the compiled BPF programs `trace` loads (default: bpf/build/blkrewind.bpf.o in "
            "the source tree)",
            ".SH SEE ALSO",
            "docs/user-guide.md, docs/operations.md, docs/internals.md, docs/protocol.md in the "
            "source tree; \\fBprometheus\\fR(1) for \\fB\\-\\-metrics\\fR."]
    return "\n".join(out) + "\n"


def _sections(epilog_text: str) -> list[tuple[str, str]]:
    """'Title:\\nbody' blocks of an epilog; text before the first title is 'Notes'."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"\n\s*\n(?=[A-Z][A-Za-z ]*:\n)", epilog_text.strip("\n")):
        m = re.match(r"([A-Z][A-Za-z ]*):\n(.*)", block, re.S)
        if m:
            out.append((m.group(1), m.group(2)))
        elif block.strip() and not block.startswith("More:"):
            out.append(("Notes", block))
    return out


# ------------------------------------------------------------------------------ completion
def _value_kind(a: argparse.Action) -> str:
    if a.choices:
        return "words:" + " ".join(map(str, a.choices))
    mv = _metavar(a).upper()
    if "DIR" in mv:
        return "dirs"
    if mv in ("DEV", "DEVICE") and "block device" in (a.help or ""):
        return "devices"      # a device path (trace); a store's device name is not a file
    if "FILE" in mv or "PATH" in mv:
        return "files"
    return "none"


def completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script for `blkrewind` (complete -F _blkrewind blkrewind)."""
    cases = []

    def flags(p):
        return [o for a in options(p) for o in a.option_strings]

    def takes_value(p):
        return [(a, o) for a in options(p) if a.option_strings and a.nargs != 0
                for o in a.option_strings]

    for path, sp, _ in leaf_parsers(parser):
        key = " ".join(path)
        subs = [n for n, _, _ in subcommands(sp)]
        vals = []
        for a, o in takes_value(sp):
            kind = _value_kind(a)
            vals.append(f"            {o}) _blkrewind_value {kind!r}; return ;;")
        pos = [a for a in options(sp) if not a.option_strings]
        pos_kind = "dirs" if any("DIR" in (a.metavar or "") for a in pos) else "files"
        if any(a.nargs == argparse.REMAINDER for a in pos):
            pos_kind = "files"
        body = "\n".join(vals)
        cases.append(f"""        {key!r})
            case $prev in
{body}
            esac
            if [[ $cur == -* ]]; then
                COMPREPLY=($(compgen -W {' '.join(flags(sp))!r} -- "$cur"))
            else
                {'COMPREPLY=($(compgen -W ' + repr(' '.join(subs)) + ' -- "$cur"))' if subs
                 else ('_blkrewind_value ' + pos_kind if pos else 'COMPREPLY=()')}
            fi ;;""")
    top = " ".join(n for n, _, _ in subcommands(parser))
    groups = " ".join(" ".join(p) for p, sp, _ in leaf_parsers(parser) if subcommands(sp))
    return f"""# bash completion for blkrewind {__version__}
# Generated from its argparse parser by blkrewind/helpdoc.py: do not edit; regenerate with
#   python -m blkrewind.helpdoc completion FILE
_blkrewind_value() {{
    local kind=$1
    case $kind in
        words:*) COMPREPLY=($(compgen -W "${{kind#words:}}" -- "$cur")) ;;
        dirs) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur")) ;;
        files) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")) ;;
        devices) compopt -o filenames 2>/dev/null
            COMPREPLY=($(compgen -f -- "${{cur:-/dev/}}")) ;;
        *) COMPREPLY=() ;;
    esac
}}

_blkrewind() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local cmd="" i w groups={groups!r}
    COMPREPLY=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${{COMP_WORDS[i]}}
        if [[ $w == -- && -n $cmd ]]; then    # trace -- COMMAND [ARGS]
            if ((COMP_CWORD == i + 1)); then
                COMPREPLY=($(compgen -c -- "$cur"))
            else
                _blkrewind_value files
            fi
            return
        fi
        [[ $w == -* ]] && continue
        if [[ -z $cmd ]]; then
            cmd=$w
        elif [[ " $groups " == *" $cmd "* && $cmd != *" "* ]]; then
            cmd="$cmd $w"
        fi
    done
    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "-h --help --version" -- "$cur"))
        else
            COMPREPLY=($(compgen -W {top!r} -- "$cur"))
        fi
        return
    fi
    case $cmd in
{chr(10).join(cases)}
    esac
}}
complete -F _blkrewind blkrewind
"""


# ------------------------------------------------------------------------------ main
def _write(path: str | None, text: str) -> None:
    if path is None:
        sys.stdout.write(text)
        return
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    from blkrewind.cli import build_parser

    ap = argparse.ArgumentParser(prog="python -m blkrewind.helpdoc",
                                 description="Make blkrewind's man page and bash completion.")
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("man", "completion"):
        s = sub.add_parser(name)
        s.add_argument("out", nargs="?", metavar="FILE")
    s = sub.add_parser("install")
    s.add_argument("--prefix", default="/usr/local")
    args = ap.parse_args(argv)
    parser = build_parser()
    if args.what == "man":
        _write(args.out, manpage(parser))
    elif args.what == "completion":
        _write(args.out, completion(parser))
    else:
        man = os.path.join(args.prefix, "share/man/man1/blkrewind.1")
        comp = os.path.join(args.prefix, "share/bash-completion/completions/blkrewind")
        _write(man, manpage(parser))
        _write(comp, completion(parser))
        print(f"{man}\n{comp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
