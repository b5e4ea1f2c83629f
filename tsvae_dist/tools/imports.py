"""Import-layering checker for tsvae_dist: stdlib only, it parses source with ``ast`` and imports no project module.

    python -m tsvae_dist.tools.imports [--root DIR] [--forbid-torch MODULE ...]

prints one ``path:line: message`` per violation and exits 1, else a one-line summary and exits 0.

Why: the package layout should tell the architecture. Each module belongs to a *unit*, its first component
under ``tsvae_dist`` (``tsvae_dist.data.loader`` -> ``data``, ``tsvae_dist.config`` -> ``config``), and the
units sit on floors (FLOORS below, lowest first; edit it there):

    0 errors                   3 config                  6 stages
    1 storage, runtime         4 train, fid, records     7 pipeline, cli, tools
    2 layout, data, models     5 report                  8 stage1, encode, stage2, evaluate, generate, aggregate
                                                           (thin ``python -m tsvae_dist.stage1`` entry modules)

Rules:
1. Every import counts, also those inside functions and under ``if TYPE_CHECKING:``: the project once hid an
   import circle behind function-local imports, and a circle hidden in local imports is still a circle.
   Relative imports are resolved; ``from pkg import name`` imports ``pkg.name`` if that is a module, else ``pkg``.
2. No import cycles. Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so those count as
   edges too, except the importer's own ancestors (already running when it is imported).
3. A module imports only its own unit or units on strictly lower floors; a unit missing from FLOORS is a
   violation, so a new unit gets a deliberate place. ``tsvae_dist/__init__.py`` imports nothing from the project.
4. tsvae_dist never imports the top-level ``shards`` package: the dataset builders' CLI builds on tsvae_dist,
   not the reverse.
5. Stage modules (``tsvae_dist/stages/*.py`` except ``__init__`` and ``_private`` ones) never import each
   other; they share code through a ``_private`` module or a lower floor.
6. ``--forbid-torch MODULE``: MODULE must not import torch transitively through module-level imports (this rule
   alone skips function-local and TYPE_CHECKING imports: they do not run when MODULE is imported).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

PACKAGE = "tsvae_dist"
FLOORS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("storage", "runtime"),
    ("layout", "data", "models"),
    ("config",),
    ("train", "fid", "records"),
    ("report",),
    ("stages",),
    ("pipeline", "cli", "tools"),
    ("stage1", "encode", "stage2", "evaluate", "generate", "aggregate"),
)
_STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}


class Violation(NamedTuple):
    path: str  # relative to the root, with forward slashes
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    scope: str = "module"  # "module", "function" or "TYPE_CHECKING"
    via: str = ""  # set when dst is a package whose __init__ runs because the import at `line` names `via`

    @property
    def module_level(self) -> bool:
        return self.scope == "module"


@dataclass
class Graph:
    root: Path
    modules: dict[str, str] = field(default_factory=dict)  # tsvae_dist module name -> path relative to root
    edges: list[Edge] = field(default_factory=list)  # between tsvae_dist modules, implied package edges included
    external: list[Edge] = field(default_factory=list)  # to non-stdlib modules outside tsvae_dist (torch, shards..)
    problems: list[Violation] = field(default_factory=list)  # unparsable files, relative imports above the package


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_type_checking(test: ast.expr) -> bool:  # `if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`
    return (test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)) == "TYPE_CHECKING"


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement in the tree, anywhere, with its scope."""
    stack: list[tuple[ast.AST, str]] = [(tree, "module")]
    while stack:
        node, scope = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, scope
        elif isinstance(node, ast.If) and scope == "module" and _is_type_checking(node.test):
            stack += [(n, "TYPE_CHECKING") for n in node.body] + [(n, scope) for n in node.orelse]
        else:
            if scope == "module" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                scope = "function"
            stack += [(n, scope) for n in ast.iter_child_nodes(node)]


def _targets(node: ast.Import | ast.ImportFrom, name: str, is_pkg: bool, modules: dict[str, str]) -> list[str] | None:
    """Absolute module names the statement imports; None for a relative import above the top package."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        if node.level - 1 >= len(package):
            return None
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _add(graph: Graph, src: str, target: str, line: int, scope: str) -> None:
    if target != PACKAGE and not target.startswith(PACKAGE + "."):
        if target.split(".")[0] not in _STDLIB:
            graph.external.append(Edge(src, target, line, scope))
        return
    while target not in graph.modules and "." in target:  # a name that is no module: its longest module prefix
        target = target.rsplit(".", 1)[0]
    if target not in graph.modules:
        return
    if target != src:
        graph.edges.append(Edge(src, target, line, scope))
    parts = target.split(".")
    for i in range(1, len(parts)):
        package = ".".join(parts[:i])
        if package in graph.modules and package != src and not src.startswith(package + "."):
            graph.edges.append(Edge(src, package, line, scope, via=target))


def collect(root: str | Path) -> Graph:
    """Parse every tsvae_dist/**.py under root into the import graph."""
    graph = Graph(Path(root))
    for path in sorted((graph.root / PACKAGE).rglob("*.py")):
        rel = path.relative_to(graph.root)
        parts = [*rel.parent.parts, rel.stem]
        if all(p.isidentifier() for p in parts):
            graph.modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = rel.as_posix()
    for name, rel in list(graph.modules.items()):
        try:
            tree = ast.parse((graph.root / rel).read_text(encoding="utf-8"), filename=rel)
        except (SyntaxError, UnicodeDecodeError) as exc:
            graph.problems.append(Violation(rel, getattr(exc, "lineno", None) or 0, f"cannot parse: {exc}"))
            continue
        for node, scope in _imports(tree):
            targets = _targets(node, name, rel.endswith("/__init__.py"), graph.modules)
            if targets is None:
                graph.problems.append(Violation(rel, node.lineno, f"relative import goes above the {PACKAGE} package"))
            for target in targets or ():
                _add(graph, name, target, node.lineno, scope)
    graph.edges = sorted(set(graph.edges), key=_order)
    graph.external = sorted(set(graph.external), key=_order)
    return graph


def _order(e: Edge) -> tuple[str, int, str, str]:
    return e.src, e.line, e.dst, e.via


def _describe(e: Edge) -> str:
    where = {"module": "", "function": ", in a function", "TYPE_CHECKING": ", under TYPE_CHECKING"}[e.scope]
    return f"{e.src} (line {e.line}{where}{f', via {e.via}' if e.via else ''})"


def _cycles(graph: Graph) -> list[Violation]:
    succ: dict[str, dict[str, Edge]] = {m: {} for m in graph.modules}
    for e in sorted(graph.edges, key=lambda e: (bool(e.via), e.scope != "module", e.line)):
        succ[e.src].setdefault(e.dst, e)  # per pair, prefer a direct, module-level, early import
    reach: dict[str, set[str]] = {}
    for m in graph.modules:
        seen: set[str] = set()
        todo = list(succ[m])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += succ[n]
        reach[m] = seen
    out, done = [], set()
    for start in sorted(graph.modules):
        component = {n for n in reach[start] if start in reach[n]}  # contains start only when it is on a cycle
        if start in done or len(component) < 2:
            continue
        done |= component
        prev: dict[str, Edge] = {}
        queue = deque([start])
        while start not in prev:  # shortest cycle through start, inside its component
            for dst, e in succ[queue.popleft()].items():
                if dst in component and dst not in prev:
                    prev[dst] = e
                    queue.append(dst)
        hops = [prev[start]]
        while hops[-1].src != start:
            hops.append(prev[hops[-1].src])
        hops.reverse()
        text = " -> ".join(_describe(e) for e in hops)
        out.append(Violation(graph.modules[start], hops[0].line, f"import cycle: {text} -> {start}"))
    return out


def _torch_chain(graph: Graph, start: str) -> tuple[list[str], Edge] | None:
    """Shortest chain of module-level imports from start (and its packages) to a module importing torch."""
    torch_at: dict[str, Edge] = {}
    for e in graph.external:
        if e.module_level and (e.dst == "torch" or e.dst.startswith("torch.")):
            torch_at.setdefault(e.src, e)
    parts = start.split(".")
    seeds = [start] + [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if p in graph.modules]
    prev: dict[str, str | None] = dict.fromkeys(seeds)
    queue = deque(seeds)
    while queue:
        n = queue.popleft()
        if n in torch_at:
            chain = [n]
            while (before := prev[chain[-1]]) is not None:
                chain.append(before)
            return ([start] if chain[-1] != start else []) + chain[::-1], torch_at[n]
        for e in graph.edges:
            if e.src == n and e.module_level and e.dst not in prev:
                prev[e.dst] = n
                queue.append(e.dst)
    return None


def _check(graph: Graph, floors: Sequence[Sequence[str]], forbid_torch: Sequence[str]) -> list[Violation]:
    floor_of = {u: i for i, units in enumerate(floors) for u in units}
    out = list(graph.problems)
    unlisted = {unit(m): m for m in sorted(graph.modules, reverse=True) if unit(m) not in {*floor_of, "__init__"}}
    out += [Violation(graph.modules[m], 1, f"unit {u} has no floor in FLOORS (tsvae_dist/tools/imports.py)")
            for u, m in unlisted.items()]
    stages = {m for m, rel in graph.modules.items() if m.count(".") == 2 and m.startswith(f"{PACKAGE}.stages.")
              and not rel.endswith("/__init__.py") and not m.rsplit(".", 1)[1].startswith("_")}
    for e in (e for e in graph.edges if not e.via):  # implied package edges share the unit of the imported module
        su, du = unit(e.src), unit(e.dst)
        sf, df, bad = floor_of.get(su, -1), floor_of.get(du, -1), []
        if su == "__init__":
            bad.append(f"{e.src} imports {e.dst}: tsvae_dist/__init__.py may import nothing from the project")
        elif su != du and min(sf, df) >= 0 and df >= sf:
            where = "the same floor (another unit)" if df == sf else "a higher floor"
            bad.append(f"{e.src} ({su}, floor {sf}) imports {e.dst} ({du}, floor {df}), on {where}: "
                       "import only your own unit or lower floors")
        if e.src in stages and e.dst in stages:
            bad.append(f"stage module {e.src} imports stage module {e.dst}: stages never import each other "
                       "(share code via a stages._private module)")
        out += [Violation(graph.modules[e.src], e.line, msg) for msg in bad]
    out += [Violation(graph.modules[e.src], e.line, f"{e.src} imports {e.dst}: tsvae_dist must not import the "
                      "shards CLI (only shards may import tsvae_dist)")
            for e in graph.external if e.dst == "shards" or e.dst.startswith("shards.")]
    out += _cycles(graph)
    for start in forbid_torch:
        if start not in graph.modules:
            raise ValueError(f"--forbid-torch: no module {start} under {graph.root}")
        if found := _torch_chain(graph, start):
            chain, e = found
            out.append(Violation(graph.modules[e.src], e.line, f"{start} imports torch at module level: "
                                                               f"{' -> '.join(chain)}, which imports {e.dst}"))
    return sorted(set(out))


def check(
    root: str | Path, floors: Sequence[Sequence[str]] = FLOORS, forbid_torch: Sequence[str] = ()
) -> list[Violation]:
    """All violations under root (see the module docstring), sorted by path and line."""
    return _check(collect(root), floors, forbid_torch)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsvae_dist.tools.imports", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2],
                        help="repository root holding tsvae_dist/ (default: the one this file is in)")
    parser.add_argument("--forbid-torch", action="append", default=[], metavar="MODULE",
                        help="fail if MODULE imports torch through module-level imports (repeatable)")
    args = parser.parse_args(argv)
    if not (args.root / PACKAGE).is_dir():
        parser.error(f"no {PACKAGE}/ under {args.root}")
    graph = collect(args.root)
    try:
        violations = _check(graph, FLOORS, args.forbid_torch)
    except ValueError as exc:
        parser.error(str(exc))
    for v in violations:
        print(v)
    print(f"imports: {len(graph.modules)} modules, {len(violations)} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
