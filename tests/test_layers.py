"""The packages' layers (docs/internals.md, "Map"): every import, read from the source (ast,
imports inside functions included), goes down or sideways, never up, and no modules import each
other in a circle.

    floor      blkrewind (its __init__), blkrewind.formats.*, blkrewind.errors, blkrewind.osutil,
               blkrewind.tlsconf: the formats both sides share and small OS helpers
    tracer     blkrewind.tracer.*: capture, LOG writer, shipper
    replayer   blkrewind.replayer.*: server, ingest, store, rebuild, export
    analytics  blkrewind.analytics.*: views, report, output formats
    cli        blkrewind.cli, blkrewind.cliargs, blkrewind.helpdoc, blkrewind.metrics,
               blkrewind.commands.*

tracer and replayer are the two sides of the wire: they meet in the floor only (neither
imports the other). Tests, bench/ and bpf/build.py sit above everything and are not checked.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blkrewind",)
# the folders of the design card, at the top of the repository: blkrewind.X
SUBPACKAGES = ("tracer", "replayer", "analytics")
FLOOR, TRACER, REPLAYER, ANALYTICS, CLI = range(5)
LAYER_NAMES = ("floor", "tracer", "replayer", "analytics", "cli")
CLI_MODULES = {"blkrewind.cli", "blkrewind.cliargs", "blkrewind.helpdoc", "blkrewind.metrics"}

# Import edges that break a rule today, each with why it is not fixed yet. An entry that no
# longer exists fails the test (remove it).
KNOWN_CYCLES: dict[frozenset[str], str] = {
    frozenset({"blkrewind.cli", "blkrewind.helpdoc"}):
        "cli builds its parser with helpdoc's formatter; `python -m blkrewind.helpdoc` (bootstrap.sh) "
        "writes the man page from cli's parser: both in the cli layer, inside functions",
}
KNOWN_UP_EDGES: dict[tuple[str, str], str] = {}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES + SUBPACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = p.relative_to(ROOT).with_suffix("").parts
            if pkg in SUBPACKAGES:
                parts = ("blkrewind",) + parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def layer(mod: str) -> int:
    top = mod.split(".")[1] if mod.count(".") else ""
    if top == "tracer":
        return TRACER
    if top == "replayer":
        return REPLAYER
    if top == "analytics":
        return ANALYTICS
    if mod in CLI_MODULES or mod == "blkrewind.commands" or mod.startswith("blkrewind.commands."):
        return CLI
    return FLOOR


def imports(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `mod` imports, anywhere in its source."""
    is_pkg = path.name == "__init__.py"
    out = set()

    def add(name: str) -> None:
        # the longest known module that name is, or is inside (a name imported from it)
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != mod:
            out.add(name)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                add(f"{src}.{a.name}" if f"{src}.{a.name}" in known else src)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def cycles(g: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out = []
    for root in sorted(g):
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(frozenset(comp))
    return out


def test_the_graph_is_read():
    g = graph()
    assert "blkrewind.formats.logframe" in g["blkrewind.tracer.log"]
    assert "blkrewind.formats.logframe" in g["blkrewind.replayer.ingest.sink"]
    assert "blkrewind.replayer.integrity" in g["blkrewind.replayer.ingest.sink"]  # and integrity imports no ingest
    assert not any(d.startswith("blkrewind.replayer.ingest") for d in g["blkrewind.replayer.integrity"])
    assert layer("blkrewind.formats.wire") == FLOOR and layer("blkrewind.commands.trace") == CLI


def test_no_import_goes_up_a_layer():
    bad = []
    for mod, deps in sorted(graph().items()):
        for dep in sorted(deps):
            up = layer(dep) > layer(mod)
            across = {layer(mod), layer(dep)} == {TRACER, REPLAYER}
            if (up or across) and (mod, dep) not in KNOWN_UP_EDGES:
                bad.append(f"{mod} ({LAYER_NAMES[layer(mod)]}) imports {dep} "
                           f"({LAYER_NAMES[layer(dep)]})")
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)
    g = graph()
    stale = [e for e in KNOWN_UP_EDGES if e[1] not in g.get(e[0], ())]
    assert not stale, f"KNOWN_UP_EDGES lists edges that are gone: {stale}"


def test_no_import_cycles():
    found = set(cycles(graph()))
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    stale = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not stale, f"KNOWN_CYCLES lists cycles that are gone: {stale}"


def test_the_floor_imports_only_the_floor():
    """blkrewind.formats is imported by both sides: it reaches nothing but the floor (which
    test_no_import_goes_up_a_layer checks) and the standard library and third-party packages."""
    for mod, deps in graph().items():
        if mod.startswith("blkrewind.formats"):
            assert all(layer(d) == FLOOR for d in deps), (mod, deps)


# ----------------------------------------------------------------- SQL on internal tables
# Modules that still run SQL on the store's internal tables (replayer/store.py INTERNAL_TABLES),
# each with why; everything else goes through StoreReader/Store's named operations. An entry
# that no longer holds SQL fails the test (remove it).
KNOWN_SQL: dict[str, str] = {
    "blkrewind/commands/sql.py": "help text: example user queries for `blkrewind sql`",
}


def sql_on_internal_tables(path: Path) -> list[str]:
    """String literals (docstrings left out) of the module that name an internal table after
    FROM/JOIN/INTO/UPDATE/TABLE."""
    import re

    from blkrewind.replayer.store import INTERNAL_TABLES
    pat = re.compile(r"\b(?:FROM|JOIN|INTO|UPDATE|TABLE)\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?(?:%s)\b"
                     % "|".join(INTERNAL_TABLES))
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs and pat.search(n.value)]


def test_no_sql_on_internal_tables_outside_the_store():
    found = {}
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        if rel != "replayer/store.py" and sql_on_internal_tables(path):
            found[rel] = sql_on_internal_tables(path)[0]
    assert set(found) - set(KNOWN_SQL) == set(), {k: v for k, v in found.items()
                                                 if k not in KNOWN_SQL}
    assert set(KNOWN_SQL) - set(found) == set()   # moved: remove its entry


def source_files() -> list[tuple[Path, Path]]:
    """(path, path relative to ROOT) of every Python file of the checkout (tests, bench and
    bpf/build.py too), each once (not through the blkrewind/X symlinks)."""
    out = []
    for p in sorted(ROOT.glob("**/*.py")):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in (".venv", "build") or rel.parts[:2] == ("bpf", "build") \
                or rel.parts[0] == "blkrewind" and len(rel.parts) > 1 and rel.parts[1] in SUBPACKAGES:
            continue
        out.append((p, rel))
    return out


def test_only_the_store_reaches_its_connection():
    """Store's DuckDB connection and its lock are private to replayer/store.py (`_con`,
    `_mutex`): no other module, test or bench reaches them (the named operations, locked(),
    user_query(), query_cursor() and define_views() are the way in)."""
    bad = []
    for p, rel in source_files():
        if rel.as_posix() == "replayer/store.py":
            continue
        bad += [f"{rel}:{node.lineno}: .{node.attr}"
                for node in ast.walk(ast.parse(p.read_text(), str(p)))
                if isinstance(node, ast.Attribute) and node.attr in ("con", "_con", "mutex",
                                                                     "_mutex")]
    assert not bad, "the store's connection or lock reached from outside:\n" + "\n".join(bad)


def test_our_folders_are_imported_by_their_installed_names():
    """tracer/, replayer/ and analytics/ are blkrewind.tracer, ... (pyproject.toml): an import
    of a top-level `tracer` would load a second copy of its modules from a checkout and fail
    where the wheel is installed."""
    bad = []
    for p, rel in source_files():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bad += [f"{rel}:{node.lineno}: {n}" for n in names if n.split(".")[0] in SUBPACKAGES]
    assert not bad, "import blkrewind.X instead:\n" + "\n".join(bad)
    for sub in SUBPACKAGES:
        assert (ROOT / "blkrewind" / sub).resolve() == (ROOT / sub).resolve()
