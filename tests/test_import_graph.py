"""No import circle in rl/, rollouts/, rewards/, lazy (function-level) imports included; and the walker of
tests/import_graph.py catches the circles it should (synthetic trees under tmp_path), so that the real-tree test
can fail. Print today's graph and circles with `python -m tests.import_graph`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.import_graph import (
    PACKAGES,
    REPO_ROOT,
    describe_cycle,
    find_cycles,
    format_graph,
    graph_of,
    import_edges,
    project_imports,
    strongly_connected_components,
)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return root


def run_import(root: Path, module: str) -> subprocess.CompletedProcess[str]:
    """`import module` in a fresh interpreter whose first path entry is root."""
    return subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=root, capture_output=True, text=True, timeout=60
    )


# the real tree ---------------------------------------------------------------------------------------------------


def test_project_has_no_import_circle():
    edges = import_edges(REPO_ROOT)
    graph = project_imports(REPO_ROOT)
    # The walker saw the project (an empty graph has no circle either).
    assert set(PACKAGES) <= graph.keys()
    assert sum(len(targets) for targets in graph.values()) >= 20, format_graph(graph)
    cycles = find_cycles(graph)
    report = "\n\n".join(describe_cycle(cycle, edges) for cycle in cycles)
    assert not cycles, (
        f"{len(cycles)} import circle(s) in {', '.join(PACKAGES)} (lazy imports count; "
        f"`python -m tests.import_graph` prints the whole graph):\n\n{report}"
    )


# the walker, on synthetic trees ----------------------------------------------------------------------------------


def test_lazy_function_level_cycle_is_caught(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "lazy/__init__.py": "",
            "lazy/a.py": """
                from lazy.b import helper

                X = helper()
                """,
            "lazy/b.py": """
                class Thing:
                    def method(self):
                        from lazy.a import X

                        return X


                def helper():
                    return Thing().method()
                """,
        },
    )
    graph = project_imports(root, ("lazy",))
    assert graph == {"lazy": set(), "lazy.a": {"lazy.b"}, "lazy.b": {"lazy.a"}}
    assert find_cycles(graph) == [["lazy.a", "lazy.b", "lazy.a"]]
    (back,) = [e for e in import_edges(root, ("lazy",)) if e.source == "lazy.b"]
    assert (back.path, back.line, back.function, back.lazy) == ("lazy/b.py", 3, "Thing.method", True)
    text = describe_cycle(["lazy.a", "lazy.b", "lazy.a"], import_edges(root, ("lazy",)))
    assert "lazy/a.py:1 (module level" in text and "lazy/b.py:3 (lazy, in Thing.method()" in text
    # and the circle is real: it bites when the function runs during the import
    result = run_import(root, "lazy.a")
    assert result.returncode != 0 and "partially initialized module 'lazy.a'" in result.stderr


def test_lazy_importlib_call_counts(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "dyn/__init__.py": "",
            "dyn/a.py": "import dyn.b\n",
            "dyn/b.py": """
                import importlib


                def load():
                    return importlib.import_module("dyn.a")
                """,
        },
    )
    assert find_cycles(project_imports(root, ("dyn",))) == [["dyn.a", "dyn.b", "dyn.a"]]


def test_relative_import_cycle_is_caught(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "rel/__init__.py": "",
            "rel/a.py": "from .sub.c import C\n\nA = C\n",
            "rel/sub/__init__.py": "",
            "rel/sub/c.py": "from .. import b\n\nC = 1\n",  # `from .. import b`: the submodule rel.b
            "rel/b.py": "from .a import A\n\nB = A\n",
        },
    )
    graph = project_imports(root, ("rel",))
    assert graph["rel.a"] == {"rel.sub.c", "rel.sub"}  # rel.sub's __init__ runs too (rel's has already)
    assert graph["rel.sub.c"] == {"rel.b"}
    assert graph["rel.b"] == {"rel.a"}
    assert find_cycles(graph) == [["rel.a", "rel.sub.c", "rel.b", "rel.a"]]


def test_from_package_import_submodule_cycle_is_caught(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "sm/__init__.py": "",
            "sm/a.py": "from sm import b\n",  # b is a submodule: the edge goes to sm.b, not sm
            "sm/b.py": "from sm import a\n",
            "sm/c.py": "from sm import a, b\n",
        },
    )
    graph = project_imports(root, ("sm",))
    assert graph == {"sm": set(), "sm.a": {"sm.b"}, "sm.b": {"sm.a"}, "sm.c": {"sm.a", "sm.b"}}
    assert find_cycles(graph) == [["sm.a", "sm.b", "sm.a"]]


def test_from_package_import_name_cycle_goes_through_init(tmp_path):
    """`from pkg import NAME` (not a submodule) reads pkg/__init__.py, which here imports the importer."""
    root = write_tree(
        tmp_path,
        {
            "ini/__init__.py": "VERSION = 1\nfrom ini.a import A\n",
            "ini/a.py": "from ini import VERSION\n\nA = VERSION\n",
        },
    )
    graph = project_imports(root, ("ini",))
    assert graph == {"ini": {"ini.a"}, "ini.a": {"ini"}}
    assert find_cycles(graph) == [["ini", "ini.a", "ini"]]


def test_implicit_package_init_cycle_across_packages_is_caught(tmp_path):
    """Importing beta.util runs beta/__init__.py, which imports alpha.core: a real circle that no import
    statement spells out (alpha.core never names the package beta)."""
    root = write_tree(
        tmp_path,
        {
            "alpha/__init__.py": "",
            "alpha/core.py": "from beta.util import Z\n\nY = Z\n",
            "beta/__init__.py": "from beta.api import thing\n",
            "beta/api.py": "from alpha.core import Y\n\nthing = Y\n",
            "beta/util.py": "Z = 1\n",
        },
    )
    graph = project_imports(root, ("alpha", "beta"))
    assert graph["alpha.core"] == {"beta.util", "beta"}
    assert find_cycles(graph) == [["alpha.core", "beta", "beta.api", "alpha.core"]]
    edge = next(e for e in import_edges(root, ("alpha", "beta")) if e.target == "beta")
    assert edge.via == "beta.util" and "runs package beta to import beta.util" in edge.where()
    result = run_import(root, "alpha.core")
    assert result.returncode != 0 and "partially initialized module 'alpha.core'" in result.stderr


def test_plain_tree_has_no_false_cycle(tmp_path):
    """A diamond, a package __init__ that re-exports submodules which import their siblings (rewards/ does
    this), relative and `from pkg import submodule` imports one way only, a nested package, an import that
    only runs under TYPE_CHECKING, and imports of outside modules: no circle, and the tree imports fine."""
    root = write_tree(
        tmp_path,
        {
            "plain/__init__.py": """
                from plain.api import run
                from plain.base import BASE

                __all__ = ["BASE", "run"]
                """,
            "plain/base.py": "import os\n\nBASE = os.sep\n",
            "plain/left.py": "from plain.base import BASE\n\nLEFT = BASE\n",
            "plain/right.py": "from .base import BASE\n\nRIGHT = BASE\n",
            "plain/api.py": """
                from __future__ import annotations

                from typing import TYPE_CHECKING

                from plain import left, right
                from plain.deep.leaf import LEAF

                if TYPE_CHECKING:
                    from plain import run as _run  # never executes
                else:
                    import json


                def run():
                    from plain.base import BASE  # lazy, but plain.base imports nothing back

                    return left.LEFT + right.RIGHT + BASE + LEAF + json.dumps(1)
                """,
            "plain/deep/__init__.py": "",
            "plain/deep/leaf.py": "from .. import base\n\nLEAF = base.BASE\n",
            "user/__init__.py": "",
            "user/main.py": "import plain.api\nfrom plain import run\n",
        },
    )
    graph = project_imports(root, ("plain", "user"))
    assert graph["plain"] == {"plain.api", "plain.base"}
    assert graph["plain.api"] == {"plain.left", "plain.right", "plain.deep", "plain.deep.leaf", "plain.base"}
    assert graph["plain.deep.leaf"] == {"plain.base"}
    assert graph["user.main"] == {"plain", "plain.api"}
    assert find_cycles(graph) == []
    assert run_import(root, "user.main").returncode == 0
    assert run_import(root, "plain.left").returncode == 0


def test_type_checking_imports_are_left_out_unless_asked(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "tc/__init__.py": "",
            "tc/a.py": "from tc.b import B\n",
            "tc/b.py": """
                import typing

                if typing.TYPE_CHECKING:
                    from tc.a import A

                B = 1
                """,
        },
    )
    assert find_cycles(project_imports(root, ("tc",))) == []
    with_tc = project_imports(root, ("tc",), include_type_checking=True)
    assert find_cycles(with_tc) == [["tc.a", "tc.b", "tc.a"]]


# the cycle finder -----------------------------------------------------------------------------------------------


def test_find_cycles_reports_every_edge_of_a_tangle_and_self_loops():
    graph = {
        "a": {"b"},
        "b": {"c", "a"},
        "c": {"a"},
        "d": {"d", "a"},
        "e": {"f"},
        "f": set(),
    }
    assert find_cycles(graph) == [["d", "d"], ["a", "b", "a"], ["a", "b", "c", "a"]]
    assert sorted(map(sorted, strongly_connected_components(graph))) == [["a", "b", "c"], ["d"], ["e"], ["f"]]


def test_find_cycles_on_a_long_chain_and_acyclic_graph():
    n = 3000  # deep enough to break a recursive Tarjan
    chain = {f"m{i}": {f"m{i + 1}"} for i in range(n)}
    assert find_cycles(chain) == []
    chain[f"m{n}"] = {"m0"}
    (cycle,) = find_cycles(chain)
    assert cycle[0] == cycle[-1] == "m0" and len(cycle) == n + 2


def test_graph_of_keeps_modules_without_imports():
    assert graph_of([], ["x", "y"]) == {"x": set(), "y": set()}
    assert format_graph({"b": {"z", "a"}, "a": set()}) == "a ->\nb -> a, z"


def test_main_prints_graph_and_cycles(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "rl/__init__.py": "",
            "rl/x.py": "from rl.y import Y\n",
            "rl/y.py": "def f():\n    from rl.x import X\n",
            "rollouts/__init__.py": "",
            "rewards/__init__.py": "",
        },
    )
    script = REPO_ROOT / "tests" / "import_graph.py"
    result = subprocess.run(
        [sys.executable, str(script), str(root)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "rl.x -> rl.y\nrl.y -> rl.x\n" in result.stdout
    assert "rl.x -> rl.y -> rl.x" in result.stdout
    assert "rl/y.py:2 (lazy, in f(): from rl.x import X)" in result.stdout
