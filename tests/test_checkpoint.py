"""Checkpoints name the sharding that wrote them and resume only under it (rl/checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rl.checkpoint import TrainState, load_checkpoint, save_checkpoint
from tests.arch import tiny_causal_lm


class _NoTokenizer:
    def save_pretrained(self, path: Path) -> None:
        pass


def _parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = tiny_causal_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _write(root: Path, sharding: str) -> Path:
    model, opt, sched = _parts()
    return save_checkpoint(root, model, _NoTokenizer(), opt, sched, TrainState(step=3), 2, sharding=sharding)


def test_a_checkpoint_resumes_under_the_sharding_that_wrote_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "none")
    model, opt, sched = _parts()
    assert load_checkpoint(path, model, opt, sched, sharding="none").step == 3
    with pytest.raises(ValueError, match="written with none sharding.*this run: zero3"):
        load_checkpoint(path, model, opt, sched, sharding="zero3")


def test_a_deepspeed_checkpoint_needs_the_engine(tmp_path: Path) -> None:
    path = _write(tmp_path, "zero3")
    model, opt, sched = _parts()
    with pytest.raises(ValueError, match="zero3 checkpoint .* needs the run's DeepSpeed engine"):
        load_checkpoint(path, model, opt, sched, sharding="zero3")


@pytest.mark.parametrize("legacy,meaning", [("plain", "none"), ("full", "fsdp2"), ("deepspeed", "zero2")])
def test_checkpoints_from_before_the_sharding_name_are_read_by_their_format(
    tmp_path: Path, legacy: str, meaning: str
) -> None:
    path = _write(tmp_path, "none")
    blob = torch.load(path / "trainer_state.pt", weights_only=False)
    del blob["sharding"]
    blob["optimizer_format"] = legacy
    torch.save(blob, path / "trainer_state.pt")
    model, opt, sched = _parts()
    other = "fsdp2" if meaning != "fsdp2" else "none"
    with pytest.raises(ValueError, match=f"written with {meaning} sharding"):
        load_checkpoint(path, model, opt, sched, sharding=other)
