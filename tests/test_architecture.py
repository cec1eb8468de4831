"""Structural rules of the source tree, checked by reading kdexp/ and hydra_plugins/ with `ast`.

Nothing here imports kdexp: the files are parsed, so the rules hold for every code path,
including imports inside functions that a test run may never reach. One test per rule:

  1. test_no_import_cycles     no cycles between kdexp modules (function-level imports count)
  2. test_layering             imports flow one way (LAYER_RULES, SHARED_LEAVES below)
  3. test_function_length      no function longer than MAX_FUNCTION_LINES
  4. test_one_epoch_loop       exactly one `for epoch ...` loop, in EPOCH_LOOP_HOME

Each failure lists every offender (file:line and the import or function) so all can be fixed in one go.
The tests/conftest.py of the suite imports torch; for a sub-second run of these rules alone:
    pytest tests/test_architecture.py -q -p no:cacheprovider -o addopts="" --noconftest
"""
import ast
import functools
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import pytest

# ---------------------------------------------------------------------------------------------
# Rule tables. A module name "kdexp.x" in these tables stands for kdexp.x and everything inside
# it (kdexp.engine = the engine package and all of kdexp.engine.*).
# ---------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "kdexp"
SOURCE_DIRS = ("kdexp", "hydra_plugins")  # rules 2 and 3 read both; the import graph is kdexp's alone

ENTRYPOINT = "kdexp.train"

# Modules anyone may import. To keep that safe they may import only each other.
SHARED_LEAVES = ("kdexp", "kdexp.errors", "kdexp.registry", "kdexp.seeding", "kdexp.io")

# (importers, modules they must not import, why). The layers, top to bottom:
# entrypoint kdexp.train -> kdexp.engine -> kdexp.config -> kdexp.methods -> kdexp.models, kdexp.losses
# (kdexp.data sits beside methods: engine and methods use it, models and losses don't).
LAYER_RULES: Tuple[Tuple[Tuple[str, ...], Tuple[str, ...], str], ...] = (
    (("kdexp", "hydra_plugins"), (ENTRYPOINT,),
     "kdexp.train is the entrypoint: nothing imports it"),
    (("kdexp.methods", "kdexp.models", "kdexp.losses", "kdexp.data"), ("kdexp.engine",),
     "the engine drives methods, models, losses and data, never the other way"),
    (("kdexp.models", "kdexp.losses", "kdexp.data"), ("kdexp.methods",),
     "methods are built on models, losses and data, never the other way"),
    (("kdexp.models", "kdexp.losses"), ("kdexp.data",),
     "models and losses know nothing of datasets"),
    (("kdexp.methods", "kdexp.models", "kdexp.data", "kdexp.losses"), ("kdexp.config",),
     "structured configs sit above methods (kdexp.config imports the method registry)"),
    (("kdexp.catalog",), ("kdexp.engine",),
     "listings and --help describe the registries: they need no engine"),
    (("kdexp.report",), ("kdexp.engine", "kdexp.methods", "kdexp.models", "kdexp.data", "kdexp.train"),
     "summaries and plots read metrics.json files: an installed kdexp reports without torch's import cost"),
)

MAX_FUNCTION_LINES = 70

EPOCH_LOOP_HOME = "kdexp/engine/fit.py"  # the one training loop over epochs
EPOCH_WORD = "epoch"  # a `for` loop whose target names contain this word is an epoch loop


# ---------------------------------------------------------------------------------------------
# Reading the tree
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    module: str  # dotted name; a package's __init__.py is the package itself
    rel: str  # path relative to ROOT, with forward slashes
    is_package: bool
    tree: ast.Module


@functools.lru_cache(maxsize=None)
def sources() -> Dict[str, Source]:
    """Every .py file under SOURCE_DIRS, parsed, by module name."""
    assert (ROOT / PACKAGE).is_dir(), f"{ROOT / PACKAGE} not found"
    out = {}
    for top in SOURCE_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            parts = list(rel.with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            out[".".join(parts)] = Source(".".join(parts), rel.as_posix(), is_package,
                                          ast.parse(path.read_text(encoding="utf-8"), filename=str(rel)))
    return out


def inside(module: str, prefix: str) -> bool:
    """module is `prefix` or lives inside package `prefix`."""
    return module == prefix or module.startswith(prefix + ".")


def inside_any(module: str, prefixes: Sequence[str]) -> bool:
    return any(inside(module, p) for p in prefixes)


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:`."""
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def walk(tree: ast.AST, skip_type_checking: bool = False) -> Iterator[Tuple[ast.AST, Tuple[str, ...], bool]]:
    """Yield (node, scope, in_def) for every node in source order: scope is the names of the
    enclosing classes and functions, in_def whether any of them is a function (the node then runs
    when called, not at import time). skip_type_checking leaves out `if TYPE_CHECKING:` bodies."""
    stack = [(tree, (), False)]
    while stack:
        node, scope, in_def = stack.pop()
        yield node, scope, in_def
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scope + (node.name,)
            in_def = in_def or not isinstance(node, ast.ClassDef)
        if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            children = list(node.orelse)
        else:
            children = list(ast.iter_child_nodes(node))
        stack.extend((child, scope, in_def) for child in reversed(children))


def where(scope: Tuple[str, ...], in_def: bool) -> str:
    return f"in {'.'.join(scope)}()" if in_def else "top level"


# ---------------------------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Import:
    """One import statement and the kdexp modules it names."""
    module: str  # the importing module
    rel: str
    line: int
    where: str  # "top level" or "in f()"
    text: str  # the statement on one line
    targets: Tuple[str, ...]  # kdexp modules it imports directly, resolved

    def __str__(self) -> str:
        return f"{self.rel}:{self.line} ({self.where}): {self.text}"


def _from_base(src: Source, node: ast.ImportFrom) -> Optional[str]:
    """The absolute module of a `from X import ...` (relative imports resolved); None when a
    relative import climbs above the top package."""
    if node.level == 0:
        return node.module
    package = src.module.split(".") if src.is_package else src.module.split(".")[:-1]
    if node.level - 1 >= len(package):
        return None
    base = ".".join(package[:len(package) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _targets(src: Source, node: ast.AST, modules: Set[str]) -> List[str]:
    """The modules an Import/ImportFrom statement imports directly (parents are added by the caller)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _from_base(src, node)
    if base is None:
        return []
    # `from kdexp.x import y` imports the submodule kdexp.x.y when there is one, else takes
    # the attribute y of kdexp.x
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


@functools.lru_cache(maxsize=None)
def imports() -> Tuple[Import, ...]:
    """Every import of a kdexp module in SOURCE_DIRS, at any depth, except under `if TYPE_CHECKING:`."""
    modules = set(sources())
    out = []
    for src in sources().values():
        for node, scope, in_def in walk(src.tree, skip_type_checking=True):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [t for t in _targets(src, node, modules) if inside(t, PACKAGE)]
            if targets:
                out.append(Import(src.module, src.rel, node.lineno, where(scope, in_def),
                                  ast.unparse(node), tuple(dict.fromkeys(targets))))
    return tuple(out)


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    imp: Import
    via: Optional[str] = None  # for an implied edge to a parent package: the submodule imported

    def describe(self) -> str:
        return f"{self.dst} (parent package of {self.via})" if self.via else self.dst


def import_edges() -> List[Edge]:
    """The kdexp import graph's edges. Importing kdexp.a.b runs kdexp.a's __init__ first, so it
    is also an edge to kdexp.a, unless the importer lives inside kdexp.a (then kdexp.a is already
    being imported: siblings importing each other is no cycle through their package)."""
    edges: Dict[Tuple[str, str, int], Edge] = {}
    for imp in imports():
        if not inside(imp.module, PACKAGE):
            continue
        for target in imp.targets:
            edges.setdefault((imp.module, target, imp.line), Edge(imp.module, target, imp))
            parts = target.split(".")
            for n in range(len(parts) - 1, 0, -1):
                parent = ".".join(parts[:n])
                if not inside(imp.module, parent):
                    edges.setdefault((imp.module, parent, imp.line), Edge(imp.module, parent, imp, via=target))
    return list(edges.values())


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's strongly connected components (each sorted), iterative."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    comps = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                comps.append(sorted(comp))
    return comps


def shortest_cycle(graph: Dict[str, Set[str]], start: str, members: Set[str]) -> List[str]:
    """A shortest path start -> ... -> start inside `members` (breadth first)."""
    prev: Dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, ())):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return path[::-1] + [start]
            if child in members and child not in prev:
                prev[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is on no cycle")  # unreachable for a component's member


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------

def fail(headline: str, lines: Sequence[str]) -> None:
    """Fail with the headline and every offender, one per line (no traceback: the list is the point)."""
    pytest.fail(headline + "\n" + "\n".join(f"  {line}" for line in lines), pytrace=False)


def test_no_import_cycles():
    edges = import_edges()
    graph: Dict[str, Set[str]] = {m: set() for m in sources() if inside(m, PACKAGE)}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    cycles = [c for c in strongly_connected(graph) if len(c) > 1 or c[0] in graph[c[0]]]
    report = []
    for n, comp in enumerate(sorted(cycles), 1):
        members = set(comp)
        if len(comp) == 1:
            report.append(f"cycle {n}: {comp[0]} imports itself")
        else:
            report.append(f"cycle {n}: {len(comp)} modules: {', '.join(comp)}")
            report.append(f"  e.g. {' -> '.join(shortest_cycle(graph, comp[0], members))}")
        # the import statements inside the component, each with the members it reaches
        by_statement: Dict[Import, List[Edge]] = {}
        for e in edges:
            if e.src in members and e.dst in members:
                by_statement.setdefault(e.imp, []).append(e)
        for imp in sorted(by_statement, key=lambda i: (i.rel, i.line)):
            reached = ", ".join(e.describe() for e in by_statement[imp])
            report.append(f"  {imp}\n      -> {reached}")
    if cycles:
        fail(f"{len(cycles)} import cycle(s) among kdexp modules (imports inside functions count; "
             "`if TYPE_CHECKING:` ones don't):", report)


def layering_violations() -> List[str]:
    out = []
    for imp in imports():
        for target in imp.targets:
            if imp.module in SHARED_LEAVES and target not in SHARED_LEAVES:
                out.append(f"{imp}\n      {imp.module} -> {target}: a shared leaf "
                           f"({', '.join(SHARED_LEAVES)}) may import only the other shared leaves")
            if target in SHARED_LEAVES:
                continue
            for importers, forbidden, why in LAYER_RULES:
                # (a layer importing from within itself is never a layering question)
                if (inside_any(imp.module, importers) and inside_any(target, forbidden)
                        and not inside_any(imp.module, forbidden)):
                    out.append(f"{imp}\n      {imp.module} -> {target}: {why}")
    return out


def test_layering():
    out = layering_violations()
    if out:
        fail(f"{len(out)} import(s) against the layering:", out)


def test_function_length():
    long = []
    for src in sources().values():
        for node, scope, _ in walk(src.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                # lineno is the `def` line (decorators excluded); a nested function counts in its
                # parent's length as well as on its own
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{src.rel}:{node.lineno} {'.'.join(scope + (node.name,))} ({length} lines)")
    if long:
        fail(f"{len(long)} function(s) over {MAX_FUNCTION_LINES} lines (def line to last line):", long)


def test_one_epoch_loop():
    home, elsewhere = [], []
    for src in sources().values():
        if not inside(src.module, PACKAGE):
            continue
        for node, scope, in_def in walk(src.tree):
            if not isinstance(node, (ast.For, ast.AsyncFor)):
                continue
            # the target may be a tuple: `for i, epoch in enumerate(...)`
            if any(isinstance(n, ast.Name) and EPOCH_WORD in n.id.lower() for n in ast.walk(node.target)):
                kind = "async for" if isinstance(node, ast.AsyncFor) else "for"
                loop = f"{src.rel}:{node.lineno} ({where(scope, in_def)}): {kind} {ast.unparse(node.target)} in ..."
                (home if src.rel == EPOCH_LOOP_HOME else elsewhere).append(loop)
    problems = []
    if len(home) != 1:
        problems.append(f"{EPOCH_LOOP_HOME} should hold exactly one epoch loop, it holds {len(home)}:")
        problems += [f"  {loop}" for loop in home]
    if elsewhere:
        problems.append(f"{len(elsewhere)} epoch loop(s) outside {EPOCH_LOOP_HOME} (train through its fit loop instead):")
        problems += [f"  {loop}" for loop in elsewhere]
    if problems:
        fail(f"there must be exactly one epoch loop (a `for` over a name containing {EPOCH_WORD!r}), "
             f"in {EPOCH_LOOP_HOME}:", problems)
