"""Checkpoints: written atomically (a temporary directory, then one rename), the last K kept, and found again
by `resume=auto`.

A checkpoint directory `checkpoints/step_000040/` holds the policy (`save_pretrained`, so any checkpoint also
deploys with ordinary tools) and `trainer_state.pt`: optimizer, scheduler, every RNG, the data position, σ
and the counters. A directory still named `*.tmp` was interrupted mid-write and is ignored.

`trainer_state.pt` names the sharding that wrote it (`rl.sharding`), and a checkpoint resumes only under that
sharding (the error says so):
- `none`: the optimizer state as `optimizer.state_dict()` (keyed by index);
- `fsdp2`: the trainer gathers whole model and optimizer state dicts first and passes them in; the optimizer
  state is keyed by parameter name;
- `zero2` / `zero3`: every process writes its part of the partitioned AdamW state (and, under zero3, of the float32
  master weights) with DeepSpeed's `save_checkpoint` into a staging folder that moves into the checkpoint as
  `deepspeed/`; the trainer passes in the whole weights for `model/`.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step_"
DEEPSPEED_TAG = "state"  # zero2: the DeepSpeed engine checkpoint sits in <checkpoint>/deepspeed/<tag>/


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resumed run needs to continue exactly."""

    step: int = 0  # optimizer steps completed
    consumed: int = 0  # training prompts drawn so far (the data position)
    rms: dict[str, float] = field(default_factory=dict)  # rms(E) of the starting embeddings, per kind
    sigma: float = 0.0  # σ of the training CoT, fixed for the run
    skipped_steps: int = 0  # non-finite loss or gradient: step skipped
    reward_status: dict[str, int] = field(default_factory=dict)  # cumulative reward statuses


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    done = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
    ]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def save_checkpoint(
    root: Path,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainState,
    keep_last: int,
    sharding: str = "none",
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write `root/step_{state.step}` atomically and delete all but the newest `keep_last` checkpoints.
    `model_state` / `optimizer_state`: whole state dicts gathered from a sharded model (None: read them here).
    `extra_dirs`: folders written elsewhere (a DeepSpeed engine checkpoint) moved in under the given names; with
    a `deepspeed` folder the optimizer state lives there."""
    final = root / f"{PREFIX}{state.step:06d}"
    tmp = root / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model", state_dict=model_state)
    tokenizer.save_pretrained(tmp / "model")
    extra_dirs = extra_dirs or {}
    for name, src in extra_dirs.items():
        os.replace(src, tmp / name)
    if "deepspeed" in extra_dirs:
        optimizer_blob = None
    elif optimizer_state is not None:
        optimizer_blob = optimizer_state
    else:
        optimizer_blob = optimizer.state_dict()
    torch.save(
        {
            "optimizer": optimizer_blob,
            "sharding": sharding,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "state": asdict(state),
        },
        tmp / "trainer_state.pt",
    )
    if final.exists():  # a re-run of the same step (after a resume) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit point: a crash before this leaves only a *.tmp, ignored on resume
    for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def load_checkpoint(
    path: Path,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    sharding: str = "none",
    engine: Any = None,
) -> TrainState:
    """Restore weights, optimizer, scheduler and RNGs in place from `path`; returns the train state.
    `sharding`: this run's (rl/sharding.py); `engine`: the zero2 / zero3 DeepSpeed engine (it restores weights,
    float32 master weights and its AdamW partition). Sharded loads are collective: every process calls this."""
    from safetensors.torch import load_file

    from rl.sharding import load_full_state_dicts

    weights = {}
    for shard in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_file(shard))
    if not weights:
        raise FileNotFoundError(f"checkpoint {path} has no model/*.safetensors")
    blob = torch.load(path / "trainer_state.pt", weights_only=False)
    # checkpoints written before the sharding was recorded by name say it as an optimizer format
    legacy = {"plain": "none", "full": "fsdp2", "deepspeed": "zero2"}
    written = blob.get("sharding") or legacy[blob.get("optimizer_format", "plain")]
    if written != sharding:
        raise ValueError(
            f"checkpoint {path} was written with {written} sharding; resume it under the same sharding "
            f"(this run: {sharding})"
        )
    if sharding.startswith("zero"):
        if engine is None:
            raise ValueError(f"{sharding} checkpoint {path}: loading it needs the run's DeepSpeed engine")
        engine.load_checkpoint(
            str(path / "deepspeed"),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        missing, unexpected = [], []
    elif sharding == "fsdp2":
        expected = set(model.state_dict())
        missing = sorted(expected - set(weights))
        unexpected = sorted(set(weights) - expected)
        load_full_state_dicts(
            model, optimizer, {k: v for k, v in weights.items() if k in expected}, blob["optimizer"]
        )
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied embeddings are saved once; any other mismatch means a different architecture
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    if sharding == "none":
        optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return TrainState(**blob["state"])
