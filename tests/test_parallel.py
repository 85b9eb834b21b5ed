"""The parallel strategy is chosen once (rl/parallel.py) and no other module asks which backend runs. The
strategies' numbers (2 processes == 1, exact resume) are checked end to end in tests/test_trainer.py."""

from __future__ import annotations

import ast
from pathlib import Path

import torch

from rl.parallel import Single, build_parallel
from rl.sharding import SHARDINGS

REPO = Path(__file__).resolve().parents[1]
BACKEND_NAMES = {*SHARDINGS, "ddp", "zero"}
OWNERS = {"rl/parallel.py", "rl/sharding.py"}  # the strategies and their primitives


def backend_name_tests(path: Path) -> list[str]:
    """`x == "fsdp2"`-style comparisons and `x.startswith("zero")`-style calls on a backend name in `path`."""
    found = []
    label = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            names = [o.value for o in operands if isinstance(o, ast.Constant) and o.value in BACKEND_NAMES]
            if names:
                found.append(f"{label}:{node.lineno} compares with {names[0]!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            args = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if node.func.attr in ("startswith", "endswith") and any(a in BACKEND_NAMES for a in args):
                found.append(f"{label}:{node.lineno} .{node.func.attr}({args[0]!r})")
    return found


def test_no_module_but_the_strategies_compares_backend_names() -> None:
    files = [p for d in ("rl", "rollouts", "rewards", "scripts") for p in sorted((REPO / d).glob("*.py"))]
    found = [
        hit for p in files if p.relative_to(REPO).as_posix() not in OWNERS for hit in backend_name_tests(p)
    ]
    assert not found, "backend chosen by name outside rl/parallel.py:\n" + "\n".join(found)


def test_the_scan_finds_a_backend_test(tmp_path: Path) -> None:
    """The scan above can fail: it flags the two shapes the trainer used to test its backend with."""
    probe = tmp_path / "probe.py"
    probe.write_text('def f(s, e):\n    return s == "fsdp2" or s.startswith("zero") or e is None\n')
    assert len(backend_name_tests(probe)) == 2


def test_one_process_runs_the_single_strategy() -> None:
    """Without a multi-process launch every requested sharding resolves to the one-process strategy."""
    for sharding in ("auto", *SHARDINGS):
        parallel = build_parallel(sharding, "cpu", micro_batch=4, persistence_threshold=0)
        assert type(parallel) is Single and parallel.sharding == "none" and parallel.world == 1
        assert parallel.main and parallel.device == torch.device("cpu")
        assert parallel.all_sum(2.5) == 2.5 and parallel.gather("x") == ["x"]
