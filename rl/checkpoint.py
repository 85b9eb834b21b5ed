"""Checkpoints: written atomically (a temporary directory, then one rename), verifiable by their manifest, the
last K kept, and found again by `resume=auto`.

A checkpoint directory `checkpoints/step_000040/` holds the policy (`save_pretrained`, so any checkpoint also
deploys with ordinary tools), `trainer_state.pt` (optimizer, scheduler, every RNG, the data position, σ and the
counters) and, written last, `manifest.json`: every other file of the checkpoint, its path relative to the
checkpoint, its size in bytes and its sha256. A checkpoint is complete only when it verifies
(`verify_checkpoint`): the manifest is there and every file, and no other, is on disk with its listed size and
sha256. The rename only makes the write atomic for the directory name; the manifest also catches what the rename
cannot: a file cut short or overwritten later (a full disk, a copy interrupted, a crash before the data reached
the disk). Resume takes the newest checkpoint that verifies (`latest_verified_checkpoint`) and says which newer
ones it skipped and why. Only directories named exactly `step_<digits>` are checkpoints; anything else under
the root (a `*.tmp` interrupted mid-write, `step_000004.bad` set aside by hand, stray files) is ignored.

`trainer_state.pt` names the sharding that wrote it, and a checkpoint resumes only under that sharding (the
error says so). What each sharding stores is decided by its strategy in rl/parallel.py:
- `none`: the optimizer state as `optimizer.state_dict()` (keyed by index);
- `fsdp2`: whole model and optimizer state dicts gathered first; the optimizer state is keyed by parameter name;
- `zero2` / `zero3`: every process writes its part of the partitioned AdamW state (and, under zero3, of the float32
  master weights) with DeepSpeed's `save_checkpoint` into a staging folder that moves into the checkpoint as
  `deepspeed/`; `model/` holds the whole weights.

A LoRA run (rl/lora.py) writes the adapters merged into a plain copy as `model/` (so the checkpoint still deploys
as it is) and the adapter tensors themselves in `trainer_state.pt`; it resumes from the run's frozen base weights
and those adapters, exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl.lora import load_adapters

PREFIX = "step_"
NAME = re.compile(rf"{PREFIX}(\d+)", re.ASCII)  # a checkpoint's directory name, matched whole
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
HASH_CHUNK = 1 << 20  # bytes read at a time when hashing: checkpoint files can be GBs
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
    """Checkpoint directories under `root` (named exactly `step_<digits>`), oldest first; anything else there is
    ignored. Complete ones are those that verify (`latest_verified_checkpoint`)."""
    if not root.is_dir():
        return []
    owned = [(int(m.group(1)), p) for p in root.iterdir() if (m := NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(owned)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(path: Path) -> dict[str, Path]:
    """Every file under `path` except the manifest, keyed by its POSIX path relative to `path`."""
    found = {f.relative_to(path).as_posix(): f for f in path.rglob("*") if f.is_file()}
    found.pop(MANIFEST, None)
    return dict(sorted(found.items()))


def _write_manifest(path: Path) -> None:
    """Write `path/manifest.json`: size and sha256 of every other file under `path`."""
    files = {rel: {"size": f.stat().st_size, "sha256": _sha256(f)} for rel, f in _files(path).items()}
    (path / MANIFEST).write_text(json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1) + "\n")


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is complete: its manifest parses and lists exactly the files on disk, each with its size
    and sha256. Otherwise the first reason found, naming the file. Sizes are checked before any hashing."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (interrupted or written by an older version)"
    try:
        listed = json.loads(manifest.read_text())["files"]
        expected = {rel: (int(entry["size"]), str(entry["sha256"])) for rel, entry in listed.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # bad JSON, bad UTF-8 or the wrong shape
        return f"{MANIFEST} does not parse: {type(err).__name__}: {err}"
    on_disk = _files(path)
    for rel, (size, _) in expected.items():
        if rel not in on_disk:
            return f"{rel}: missing (listed in the manifest)"
        if (actual := on_disk[rel].stat().st_size) != size:
            return f"{rel}: size {actual} != {size} in the manifest"
    if extra := sorted(set(on_disk) - set(expected)):
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        return f"{extra[0]}: not in the manifest{more}"
    for rel, (_, sha256) in expected.items():
        if _sha256(on_disk[rel]) != sha256:
            return f"{rel}: sha256 mismatch"
    return None


def latest_verified_checkpoint(root: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint under `root` that verifies (None: there is none). Each newer one that does not is
    skipped with a warning naming it and the reason; the older ones are not read at all."""
    for path in reversed(checkpoint_dirs(root)):
        if (reason := verify_checkpoint(path)) is None:
            return path
        warn(f"[softgrpo] skipping checkpoint {path}: {reason}; resuming from the previous one")
    return None


def save_checkpoint(
    root: Path,
    model: Any,
    tokenizer: Any,
    optimizer_state: dict[str, Any] | None,
    scheduler: Any,
    state: TrainState,
    keep_last: int,
    sharding: str = "none",
    model_state: dict[str, torch.Tensor] | None = None,
    extra_dirs: dict[str, Path] | None = None,
    profile: Any = None,
    adapters: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `root/step_{state.step}` atomically and delete all but the newest `keep_last` checkpoints.
    `optimizer_state`: what `trainer_state.pt` keeps of the optimizer (None: it lives in an extra folder, as
    DeepSpeed's partitions do); `model_state`: a whole state dict gathered from a sharded model (None: the live
    `model`'s); `extra_dirs`: folders written elsewhere (a DeepSpeed engine checkpoint) moved in under the given
    names; `adapters`: a LoRA run's adapter tensors (rl/lora.py; `model` is then the merged plain copy). The
    parallel strategy (rl/parallel.py) decides each."""
    final = root / f"{PREFIX}{state.step:06d}"
    tmp = root / f"{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model", state_dict=model_state)
    tokenizer.save_pretrained(tmp / "model")
    if profile is not None:  # rl.model.ModelProfile: the prompt format and CoT limits the policy trains with
        profile.save(tmp / "model")
    for name, src in (extra_dirs or {}).items():
        os.replace(src, tmp / name)
    torch.save(
        {
            "optimizer": optimizer_state,
            "sharding": sharding,
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "state": asdict(state),
            "adapters": adapters,
        },
        tmp / "trainer_state.pt",
    )
    _write_manifest(tmp)  # last: a checkpoint without it, or whose files do not match it, is incomplete
    if final.exists():  # a re-run of the same step (after a resume) replaces it
        shutil.rmtree(final)
    os.replace(tmp, final)  # the commit point: a crash before this leaves only a *.tmp, ignored on resume
    # `final` may not be the newest: after resuming past a checkpoint that failed to verify, that broken newer one
    # still sorts last; the one just written is kept whatever its rank
    for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
        if old != final:
            shutil.rmtree(old)
    return final


@dataclass
class LoadedCheckpoint:
    """A checkpoint's files, read and checked against the run's sharding; restored by the parallel strategy."""

    path: Path
    weights: dict[str, torch.Tensor]  # model/*.safetensors
    optimizer: Any  # trainer_state.pt's optimizer state (None when DeepSpeed keeps it)
    blob: dict[str, Any]  # trainer_state.pt


def read_checkpoint(path: Path, sharding: str) -> LoadedCheckpoint:
    """Read checkpoint `path` for a run with `sharding`. It does not verify `path` (`latest_verified_checkpoint`
    does); a file it cannot deserialise is a ValueError naming the checkpoint and the file, and a checkpoint
    written under another sharding is refused, naming both."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted((path / "model").glob("*.safetensors")):
        try:
            weights.update(load_file(shard))
        # what a truncated or garbled file raised when tried: header too small, file not fully covered, bad JSON
        except SafetensorError as err:
            raise ValueError(f"checkpoint {path}: cannot read {shard.relative_to(path)}: {err}") from err
    if not weights:
        raise FileNotFoundError(f"checkpoint {path} has no model/*.safetensors")
    try:
        blob = torch.load(path / "trainer_state.pt", weights_only=False)
    # what a truncated or garbled file raised when tried: EOFError (empty), RuntimeError (zip archive cut or
    # corrupt), OSError (cut inside a record; or the file is missing), UnpicklingError (bad opcode), ValueError /
    # UnicodeDecodeError (a garbled length or string)
    except (EOFError, RuntimeError, OSError, pickle.UnpicklingError, ValueError) as err:
        raise ValueError(f"checkpoint {path}: cannot read trainer_state.pt: {err}") from err
    # checkpoints written before the sharding was recorded by name say it as an optimizer format
    legacy = {"plain": "none", "full": "fsdp2", "deepspeed": "zero2"}
    written = blob.get("sharding") or legacy[blob.get("optimizer_format", "plain")]
    if written != sharding:
        raise ValueError(
            f"checkpoint {path} was written with {written} sharding; resume it under the same sharding "
            f"(this run: {sharding})"
        )
    return LoadedCheckpoint(path, weights, blob["optimizer"], blob)


def check_model_keys(path: Path, model: Any, missing: list[str], unexpected: list[str]) -> None:
    """A checkpoint's weights must name exactly the model's parameters (a tied output head is saved once)."""
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def restore_run_state(loaded: LoadedCheckpoint, scheduler: Any) -> TrainState:
    """After the weights and optimizer: the schedule, every RNG, and the train state."""
    scheduler.load_state_dict(loaded.blob["scheduler"])
    set_rng_state(loaded.blob["rng"])
    return TrainState(**loaded.blob["state"])


def restore_whole(loaded: LoadedCheckpoint, model: Any, optimizer: torch.optim.Optimizer) -> None:
    """Load the weights and the index-keyed optimizer state of a `none` checkpoint into a whole model."""
    if loaded.optimizer is None:  # the AdamW state is in DeepSpeed's partitions (zero2 / zero3)
        raise ValueError(
            f"{loaded.blob['sharding']} checkpoint {loaded.path}: loading it needs the run's DeepSpeed engine"
        )
    adapters = loaded.blob.get("adapters")  # absent in checkpoints from before LoRA existed
    if adapters is not None:  # model/ holds the merged copy; the base is the run's frozen start (rl/lora.py)
        load_adapters(model, adapters, f"checkpoint {loaded.path}")
    else:
        missing, unexpected = model.load_state_dict(loaded.weights, strict=False)
        check_model_keys(loaded.path, model, missing, unexpected)
    optimizer.load_state_dict(loaded.optimizer)


def load_checkpoint(
    path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, sharding: str = "none"
) -> TrainState:
    """Restore a checkpoint into a whole model in place: weights, optimizer, scheduler and RNGs; returns the
    train state. A sharded run restores through its strategy (rl/parallel.py), which calls the same pieces."""
    loaded = read_checkpoint(path, sharding)
    restore_whole(loaded, model, optimizer)
    return restore_run_state(loaded, scheduler)
