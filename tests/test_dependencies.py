"""The dependency ranges in pyproject.toml are tested ranges.

Every core dependency has a floor and a ceiling; requirements/floor.txt pins exactly the floors (its header
says how the whole suite is run on them); the environment running these tests lies inside every range; and
the list names what the project imports, no more (an unused dependency is an untested one) and no less.
No network: pyproject.toml, floor.txt and the installed distributions' metadata only.
"""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# The code whose imports the dependency list covers.
PROJECT_PACKAGES = ("rl", "rollouts", "rewards", "scripts")
# Extras whose floors requirements/floor.txt pins as well (the floor run installs .[dev]).
FLOOR_EXTRAS = ("dev",)


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(extra: str | None = None) -> dict[str, Requirement]:
    project = _project()
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs}


def _floor(req: Requirement) -> Version | None:
    """The lower bound of `req`: the version of its one `>=` (or `==`) clause, None when it has none."""
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    return lows[0] if len(lows) == 1 else None


def _floor_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in (ROOT / "requirements" / "floor.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # exactly one clause, and it is ==
        assert spec.operator == "==", f"floor.txt pins with ==, not {line!r}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"floor.txt pins {req.name} twice"
        pins[name] = Version(spec.version)
    return pins


CORE = _requirements()


def test_trl_is_not_a_dependency() -> None:
    # Listed once but imported nowhere: an unused dependency is an untested one.
    assert "trl" not in CORE


@pytest.mark.parametrize("name", sorted(CORE))
def test_every_core_dependency_has_a_floor_and_a_ceiling(name: str) -> None:
    req = CORE[name]
    ops = [s.operator for s in req.specifier]
    assert ops.count(">=") == 1, f"{req}: needs exactly one >= floor"
    assert ops.count("<") == 1, f"{req}: needs exactly one < ceiling (below the next breaking release)"
    (ceiling,) = [Version(s.version) for s in req.specifier if s.operator == "<"]
    assert _floor(req) < ceiling, f"{req}: empty range"


def test_floor_txt_pins_exactly_the_floors() -> None:
    pins = _floor_pins()
    expected = {name: _floor(req) for name, req in CORE.items()}
    for extra in FLOOR_EXTRAS:
        for name, req in _requirements(extra).items():
            assert _floor(req) is not None, f"[{extra}] {req}: needs a >= floor"
            expected.setdefault(name, _floor(req))
    assert set(pins) == set(expected), (
        f"floor.txt pins {sorted(set(pins) - set(expected))} that pyproject doesn't list, "
        f"and misses {sorted(set(expected) - set(pins))}"
    )
    wrong = {name: (str(pins[name]), str(expected[name])) for name in pins if pins[name] != expected[name]}
    assert not wrong, f"floor.txt pin != pyproject floor (pin, floor): {wrong}"


def test_installed_versions_lie_in_the_ranges() -> None:
    outside = {}
    for name, req in CORE.items():
        installed = metadata.version(name)  # a core dependency that isn't installed fails here, by name
        if not req.specifier.contains(installed, prereleases=True):
            outside[name] = (installed, str(req.specifier))
    for extra in FLOOR_EXTRAS:
        for name, req in _requirements(extra).items():
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue  # an extra need not be installed
            if not req.specifier.contains(installed, prereleases=True):
                outside[name] = (installed, str(req.specifier))
    assert not outside, f"installed versions outside pyproject's ranges (installed, range): {outside}"


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files importing it, over the project's code, stdlib and the project's own left out."""
    local = set(PROJECT_PACKAGES) | {"tests"}
    for package in PROJECT_PACKAGES:  # scripts import their siblings (scripts/_bootstrap.py) by bare name
        local |= {p.stem for p in (ROOT / package).glob("*.py")}
        local |= {p.name for p in (ROOT / package).iterdir() if p.is_dir()}
    found: dict[str, set[str]] = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_dependency_list_is_what_the_code_imports() -> None:
    imported = _third_party_imports()
    extras = {name for extra in _project()["optional-dependencies"] for name in _requirements(extra)}
    module_to_dists = metadata.packages_distributions()
    provided: dict[str, set[str]] = {}  # dist -> its modules the code imports
    unlisted = {}
    for module, files in sorted(imported.items()):
        dists = {canonicalize_name(d) for d in module_to_dists.get(module, [])}
        if not dists and canonicalize_name(module) in extras:  # an extra that is not installed here (vllm)
            dists = {canonicalize_name(module)}
        for dist in dists:
            provided.setdefault(dist, set()).add(module)
        if not dists & (set(CORE) | extras):
            unlisted[module] = sorted(files)
    assert not unlisted, f"imported but not a listed dependency (module: files): {unlisted}"
    unused = sorted(set(CORE) - set(provided))
    assert not unused, f"core dependencies the code never imports (drop them, or import them): {unused}"
