"""Checkpoints name the sharding that wrote them and resume only under it; a manifest makes them verifiable, and
resume takes the newest that verifies (rl/checkpoint.py)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rl.checkpoint import (
    TrainState,
    checkpoint_dirs,
    latest_verified_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from tests.arch import tiny_causal_lm


class _NoTokenizer:
    def save_pretrained(self, path: Path) -> None:
        pass


def _parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    model = tiny_causal_lm()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _write(root: Path, sharding: str, step: int = 3, keep_last: int = 2) -> Path:
    model, opt, sched = _parts()
    return save_checkpoint(
        root,
        model,
        _NoTokenizer(),
        None if sharding.startswith("zero") else opt.state_dict(),  # DeepSpeed keeps zero's AdamW state
        sched,
        TrainState(step=step),
        keep_last,
        sharding=sharding,
    )


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


# ---------------------------------------------------------------- manifest, verification, resume


def _two(root: Path) -> tuple[Path, Path]:
    """An older and a newer checkpoint, both kept."""
    return _write(root, "none", step=4), _write(root, "none", step=6)


def _resume(root: Path) -> tuple[Path | None, list[str]]:
    warnings: list[str] = []
    return latest_verified_checkpoint(root, warn=warnings.append), warnings


def test_the_manifest_lists_every_file_with_its_size_and_sha256(tmp_path: Path) -> None:
    path = _write(tmp_path, "none")
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    on_disk = {f.relative_to(path).as_posix(): f for f in path.rglob("*") if f.is_file()}
    del on_disk["manifest.json"]  # it does not list itself
    assert {"model/model.safetensors", "model/config.json", "trainer_state.pt"} <= set(on_disk)
    expected = {
        rel: {"size": len(f.read_bytes()), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
        for rel, f in on_disk.items()
    }
    assert manifest == expected
    # written last: no file of the checkpoint is newer than it
    newest = max(f.stat().st_mtime_ns for f in on_disk.values())
    assert (path / "manifest.json").stat().st_mtime_ns >= newest
    assert verify_checkpoint(path) is None
    assert _resume(tmp_path) == (path, [])


def test_a_truncated_model_in_the_newest_checkpoint_resumes_from_the_previous_one(tmp_path: Path) -> None:
    older, newer = _two(tmp_path)
    weights = newer / "model" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:1200])  # a copy or a disk that stopped short
    found, warnings = _resume(tmp_path)
    assert found == older
    assert warnings == [
        f"[softgrpo] skipping checkpoint {newer}: model/model.safetensors: size 1200 != {size} in the manifest; "
        "resuming from the previous one"
    ]


def test_a_garbled_trainer_state_of_the_same_size_fails_its_sha256(tmp_path: Path) -> None:
    older, newer = _two(tmp_path)
    state = newer / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[100:116] = b"garbagegarbage!!"  # same size, so only the hash can tell
    state.write_bytes(bytes(data))
    assert verify_checkpoint(newer) == "trainer_state.pt: sha256 mismatch"
    found, warnings = _resume(tmp_path)
    assert found == older
    assert len(warnings) == 1
    assert str(newer) in warnings[0] and "trainer_state.pt: sha256 mismatch" in warnings[0]


def test_a_checkpoint_without_a_manifest_is_skipped(tmp_path: Path) -> None:
    older, newer = _two(tmp_path)
    (newer / "manifest.json").unlink()  # interrupted before it, or written by an older version
    found, warnings = _resume(tmp_path)
    assert found == older
    assert len(warnings) == 1
    assert str(newer) in warnings[0] and "no manifest.json" in warnings[0]


@pytest.mark.parametrize(
    "damage,reason",
    [
        (lambda p: (p / "model" / "extra.bin").write_bytes(b"x"), "model/extra.bin: not in the manifest"),
        (lambda p: (p / "model" / "config.json").unlink(), "model/config.json: missing"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json does not parse"),
        (lambda p: (p / "manifest.json").write_text("[]"), "manifest.json does not parse"),
    ],
    ids=["unlisted-file", "missing-file", "bad-json", "wrong-shape"],
)
def test_verification_names_the_file_that_does_not_match(
    tmp_path: Path, damage: Callable[[Path], object], reason: str
) -> None:
    path = _write(tmp_path, "none")
    damage(path)
    assert reason in verify_checkpoint(path)


def test_when_no_checkpoint_verifies_resume_finds_none_and_says_why_for_each(tmp_path: Path) -> None:
    older, newer = _two(tmp_path)
    for path in (older, newer):
        (path / "manifest.json").unlink()
    found, warnings = _resume(tmp_path)
    assert found is None
    assert len(warnings) == 2
    assert str(newer) in warnings[0] and str(older) in warnings[1]
    assert _resume(tmp_path / "absent") == (None, [])


def test_only_step_digits_directories_are_checkpoints(tmp_path: Path) -> None:
    three = _write(tmp_path, "none", step=3)
    (tmp_path / "step_000004.bad").mkdir()  # set aside by hand
    (tmp_path / "step_abc").mkdir()
    (tmp_path / "step_000005.tmp").mkdir()  # interrupted mid-write
    (tmp_path / "step_000009").write_text("a file, not a checkpoint")
    (tmp_path / "notes").mkdir()
    ten = _write(tmp_path, "none", step=10)  # sorted by step number, and pruning lists the same way
    assert checkpoint_dirs(tmp_path) == [three, ten]
    assert latest_verified_checkpoint(tmp_path, warn=pytest.fail) == ten
    _write(tmp_path, "none", step=11, keep_last=1)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000011"]
    assert {p.name for p in tmp_path.iterdir()} == {
        "step_000004.bad", "step_abc", "step_000005.tmp", "step_000009", "notes", "step_000011",
    }  # fmt: skip


def test_pruning_keeps_the_checkpoint_just_written_when_a_broken_newer_one_sorts_last(tmp_path: Path) -> None:
    _write(tmp_path, "none", step=6, keep_last=1)  # later found broken: the run resumed from step 4 ...
    written = _write(tmp_path, "none", step=5, keep_last=1)  # ... and wrote step 5
    assert written.is_dir() and verify_checkpoint(written) is None


def test_load_names_the_checkpoint_whose_trainer_state_is_garbage(tmp_path: Path) -> None:
    path = _write(tmp_path, "none")
    (path / "trainer_state.pt").write_bytes(b"this is not a checkpoint\n" * 10)
    model, opt, sched = _parts()
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path}: cannot read trainer_state.pt")):
        load_checkpoint(path, model, opt, sched, sharding="none")


def test_load_names_the_checkpoint_whose_weights_are_truncated(tmp_path: Path) -> None:
    path = _write(tmp_path, "none")
    weights = path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1200])
    model, opt, sched = _parts()
    expected = re.escape(f"checkpoint {path}: cannot read model/model.safetensors")
    with pytest.raises(ValueError, match=expected):
        load_checkpoint(path, model, opt, sched, sharding="none")
