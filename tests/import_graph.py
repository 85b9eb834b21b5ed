"""The import graph of the project's packages (rl, rollouts, rewards), read from the source with `ast`, and the
import circles in it.

Run `python -m tests.import_graph [ROOT]` (or `python tests/import_graph.py [ROOT]`) from the repository root to
print the graph, one line per module (`module -> dep1, dep2`, sorted), then every circle with the file:line of
each import that makes it; the exit status is 1 when there is a circle. ROOT defaults to this repository.

What counts as an edge `a -> b` ("running module a may run module b"):

- Every import statement anywhere in the file: module level, under `if`/`try`, in class bodies, and inside
  functions and methods (lazy imports: they run at call time, and a circle closed by one bites then, or as soon
  as someone moves the import to the top). `importlib.import_module("x.y")` and `__import__("x.y")` with a
  literal absolute name count as `import x.y`.
- Not the imports in the body of `if TYPE_CHECKING:` (or `if typing.TYPE_CHECKING:`): they never execute, so
  they cannot make a circle at run time (`include_type_checking=True` counts them too). The `else:` branch of
  such an `if` does execute and counts.
- `import a.b.c` is an edge to `a.b.c`; `from a.b import c` is an edge to the module `a.b.c` when that file
  exists (a submodule), else to `a.b` (c is a name defined in it). `from a import *` is an edge to `a`. Relative
  imports are resolved against the importing module's package (`from . import x`, `from ..y import z`).
- Package `__init__` files: importing `a.b.c` first executes `a/__init__.py` and `a/b/__init__.py`. So the
  import also gets an (implicit) edge to each of those packages, except the packages that contain the importer
  itself: those have necessarily started executing before the importer did (they are in `sys.modules`, so the
  import does not run them again). Both halves matter. The implicit edges are real: if `rl/trainer.py` imports
  `rewards.pool` and `rewards/__init__.py` imports `rl.trainer`, then `import rl.trainer` runs
  `rewards/__init__`, which finds `rl.trainer` half initialised. And skipping the enclosing packages avoids a
  false circle for the usual layout where `rewards/__init__.py` re-exports `rewards.pool`, which imports
  `rewards.config`.
- Only modules of the given packages are nodes; an import of a project module that has no file (a stale name)
  goes to its longest prefix that has one.

A package's `__init__.py` is the node named after the package (`rewards`), a module file is `rewards.pool`.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("rl", "rollouts", "rewards")
"""The project's packages: the nodes of the graph are their modules."""

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ImportEdge:
    """One reason for `source -> target`: the import statement at `path:line` (path relative to the root)."""

    source: str
    target: str
    path: str
    line: int
    statement: str
    function: str | None = None
    """The enclosing function (`Class.method`) of a lazy import; None at module level."""
    via: str | None = None
    """For an implicit edge to a package `__init__`: the module whose import runs it; else None."""
    type_checking: bool = False

    @property
    def lazy(self) -> bool:
        return self.function is not None

    def where(self) -> str:
        """`path:line` and what kind of import, for a failure message."""
        kind = f"lazy, in {self.function}()" if self.lazy else "module level"
        if self.type_checking:
            kind += ", TYPE_CHECKING only"
        text = self.statement if len(self.statement) <= 100 else self.statement[:97] + "..."
        if self.via is not None:
            return (
                f"{self.path}:{self.line} ({kind}; runs package {self.target} to import {self.via}: {text})"
            )
        return f"{self.path}:{self.line} ({kind}: {text})"


def find_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under root/<package> (packages that are absent are
    skipped). `pkg/__init__.py` is `pkg`, `pkg/sub/x.py` is `pkg.sub.x`."""
    modules: dict[str, Path] = {}
    for package in packages:
        base = root / package
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _literal_import_call(node: ast.Call) -> str | None:
    """The module name of `importlib.import_module("x.y")` / `import_module("x.y")` / `__import__("x.y")` with
    a literal absolute name, else None."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return arg.value
    return None


class _ImportCollector(ast.NodeVisitor):
    """Walks every node of one module, recording its imports with their line and context."""

    def __init__(self, module: str, is_package: bool, modules: Mapping[str, Path], roots: set[str]):
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.roots = roots
        self.scope: list[str] = []  # enclosing classes and functions
        self.functions = 0  # how many of them are functions
        self.type_checking = 0
        # (target, line, statement, function, type_checking): targets still to be closed over their packages
        self.found: list[tuple[str, int, str, str | None, bool]] = []

    # context -------------------------------------------------------------------------------------------------

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.scope.append(getattr(node, "name", "<lambda>"))
        self.functions += 1
        self.generic_visit(node)
        self.functions -= 1
        self.scope.pop()

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function
    visit_Lambda = _visit_function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.visit(node.test)
        self.type_checking += 1
        for child in node.body:
            self.visit(child)
        self.type_checking -= 1
        for child in node.orelse:
            self.visit(child)

    # imports -------------------------------------------------------------------------------------------------

    def _add(self, target: str, node: ast.AST, statement: str) -> None:
        if target.split(".")[0] not in self.roots:
            return  # not a project module
        while target and target not in self.modules:  # a stale name: its longest prefix that has a file
            target = target.rpartition(".")[0]
        if target:
            function = ".".join(self.scope) if self.functions else None
            self.found.append((target, node.lineno, statement, function, self.type_checking > 0))

    def visit_Import(self, node: ast.Import) -> None:
        statement = ast.unparse(node)
        for alias in node.names:
            self._add(alias.name, node, statement)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        statement = ast.unparse(node)
        if node.level:
            parts = self.package.split(".") if self.package else []
            if node.level - 1 > len(parts) - 1:
                return  # beyond the top-level package: an ImportError at run time, no edge
            parts = parts[: len(parts) - (node.level - 1)]
            if node.module:
                parts.append(node.module)
            base = ".".join(parts)
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if alias.name != "*" and sub in self.modules else base, node, statement)

    def visit_Call(self, node: ast.Call) -> None:
        name = _literal_import_call(node)
        if name is not None:
            self._add(name, node, ast.unparse(node))
        self.generic_visit(node)


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(
    root: Path, packages: Iterable[str] = PACKAGES, include_type_checking: bool = False
) -> list[ImportEdge]:
    """Every edge of the import graph of the packages under root, one per import statement (and per implicit
    package `__init__` it runs), in file order. See the module docstring for what counts."""
    root = Path(root)
    packages = tuple(packages)
    modules = find_modules(root, packages)
    edges: list[ImportEdge] = []
    for module, path in modules.items():
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        collector = _ImportCollector(module, path.name == "__init__.py", modules, set(packages))
        collector.visit(tree)
        own_packages = {module, *_ancestors(module)}
        for target, line, statement, function, type_checking in collector.found:
            if type_checking and not include_type_checking:
                continue
            common = dict(source=module, path=rel, line=line, statement=statement, function=function)
            edges.append(ImportEdge(target=target, type_checking=type_checking, **common))
            for package in _ancestors(target):
                if package not in own_packages and package in modules:
                    edges.append(
                        ImportEdge(target=package, via=target, type_checking=type_checking, **common)
                    )
    return list(
        dict.fromkeys(edges)
    )  # one per statement and target (`from a import b, c` gives one edge to a)


def graph_of(edges: Iterable[ImportEdge], modules: Iterable[str] = ()) -> dict[str, set[str]]:
    """module -> the modules it imports; every module of `modules` is a key, with or without imports."""
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    return graph


def project_imports(
    root: Path, packages: Iterable[str] = PACKAGES, include_type_checking: bool = False
) -> dict[str, set[str]]:
    """Each project module (dotted name; a package's `__init__` as the package name) -> the project modules it
    imports, module-level and lazy alike (see the module docstring for the rules)."""
    packages = tuple(packages)
    return graph_of(import_edges(root, packages, include_type_checking), find_modules(Path(root), packages))


def strongly_connected_components(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative), each component sorted; components in no particular order."""
    succ = {node: sorted(set(targets)) for node, targets in graph.items()}
    for targets in list(succ.values()):
        for target in targets:
            succ.setdefault(target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(succ):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if i < len(succ[node]):
                work.append((node, i + 1))
                child = succ[node][i]
                if child not in index:
                    work.append((child, 0))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def _shortest_path(succ: Mapping[str, Iterable[str]], start: str, goal: str, allowed: set[str]) -> list[str]:
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])
            return path[::-1]
        for child in sorted(succ.get(node, ())):
            if child in allowed and child not in previous:
                previous[child] = node
                queue.append(child)
    raise AssertionError(f"{goal} is not reachable from {start} within its component")  # pragma: no cover


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import circles: each a path `[a, b, ..., a]` (first node repeated at the end; a self-import is
    `[a, a]`). For every strongly connected component of more than one module, each edge `u -> v` inside it
    gets the shortest circle through it (u, v, then the shortest way back to u), so every import that takes
    part in a circle shows in at least one reported path; duplicates are dropped. Each circle starts at its
    smallest module; the list is sorted. Empty when the graph has no circle."""
    succ = {node: set(targets) for node, targets in graph.items()}
    cycles: set[tuple[str, ...]] = set()
    for node, targets in succ.items():
        if node in targets:
            cycles.add((node, node))
    for component in strongly_connected_components(succ):
        if len(component) < 2:
            continue
        members = set(component)
        for u in component:
            for v in sorted(succ.get(u, ()) & members):
                if v == u:
                    continue
                loop = [u, *_shortest_path(succ, v, u, members)[:-1]]
                k = loop.index(min(loop))
                loop = loop[k:] + loop[:k]
                cycles.add((*loop, loop[0]))
    return [list(cycle) for cycle in sorted(cycles, key=lambda c: (len(c), c))]


def describe_cycle(cycle: list[str], edges: Iterable[ImportEdge]) -> str:
    """`a -> b -> a` followed by one line per edge with the file:line of every import that makes it."""
    by_pair: dict[tuple[str, str], list[ImportEdge]] = defaultdict(list)
    for edge in edges:
        by_pair[edge.source, edge.target].append(edge)
    lines = [" -> ".join(cycle)]
    for source, target in zip(cycle[:-1], cycle[1:], strict=True):
        lines.append(f"  {source} -> {target}:")
        lines.extend(f"    {edge.where()}" for edge in by_pair.get((source, target), []))
    return "\n".join(lines)


def format_graph(graph: Mapping[str, Iterable[str]]) -> str:
    """One line per module, sorted: `module -> dep1, dep2` (nothing after the arrow when it imports none)."""
    return "\n".join(f"{module} -> {', '.join(sorted(graph[module]))}".rstrip() for module in sorted(graph))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0]).resolve() if argv else REPO_ROOT
    edges = import_edges(root)
    graph = graph_of(edges, find_modules(root))
    n_edges = sum(len(targets) for targets in graph.values())
    print(f"# import graph of {', '.join(PACKAGES)} under {root}: {len(graph)} modules, {n_edges} edges")
    print("# (lazy and module-level imports; TYPE_CHECKING-only imports left out)")
    print(format_graph(graph))
    cycles = find_cycles(graph)
    print(f"\n# import circles: {len(cycles)}")
    for cycle in cycles:
        print(describe_cycle(cycle, edges))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
