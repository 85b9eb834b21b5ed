"""A model path is read-only; a softgrpo model directory says which prompt format and CoT limits it was trained
with, and the entry scripts apply that over the recipe (rl/model.py, rl/config.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rl.config import EvaluateConfig, TrainConfig, compose, to_object
from rl.model import (
    PROFILE_FILE,
    TINY_BASE_DIR,
    ModelConfig,
    ModelProfile,
    apply_profile,
    check_model_path,
    is_tiny_base,
    load_policy,
    read_profile,
)
from rl.prompts import PromptConfig


def test_a_missing_local_path_fails_in_seconds_naming_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/fnal", "./final", str(tmp_path / "a" / "b"), "runs/x/final"):
        start = time.time()
        with pytest.raises(FileNotFoundError, match=f"model.path='{path}' does not exist"):
            load_policy(ModelConfig(path=path))
        assert time.time() - start < 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_model_path("empty")
    check_model_path("Qwen/Qwen2.5-3B-Instruct")  # a hub id is left to the hub


def test_the_tiny_base_has_one_home() -> None:
    assert is_tiny_base(str(TINY_BASE_DIR)) and not is_tiny_base("runs/x/final")
    assert ModelConfig().path == str(TINY_BASE_DIR)


def test_loading_never_builds_a_missing_tiny_base(tmp_path: Path, monkeypatch) -> None:
    """load_policy on the tiny base directory, when it is missing, fails; it does not build it."""
    monkeypatch.setattr("rl.model.TINY_BASE_DIR", tmp_path / "tiny_base")
    with pytest.raises(FileNotFoundError, match="scripts/make_tiny_base.py"):
        load_policy(ModelConfig(path=str(tmp_path / "tiny_base")))
    assert not (tmp_path / "tiny_base").exists()


def _profiled_dir(tmp_path: Path) -> Path:
    model_dir = tmp_path / "final"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    prompt = PromptConfig(instruction="Box it.", think_start="<t>", think_end="</t>", use_chat_template=False)
    rms = {"entry": 0.5, "row": 2.0}
    ModelProfile(prompt, 40, 12, rms, "softgrpo train step 9 (cot=soft)").save(model_dir)
    return model_dir


def test_a_profile_round_trips_and_a_broken_one_is_named(tmp_path: Path) -> None:
    model_dir = _profiled_dir(tmp_path)
    profile = read_profile(model_dir)
    assert profile is not None and (profile.max_think_tokens, profile.max_answer_tokens) == (40, 12)
    assert profile.prompt.think_end == "</t>" and read_profile(tmp_path) is None
    assert profile.embedding_rms == {"entry": 0.5, "row": 2.0}
    (model_dir / PROFILE_FILE).write_text(json.dumps({"prompt": {}}))
    with pytest.raises(ValueError, match=f"{PROFILE_FILE}: not a readable model profile"):
        read_profile(model_dir)


def test_the_profile_overrides_the_recipe_and_the_command_line_overrides_the_profile(tmp_path: Path) -> None:
    model_dir = _profiled_dir(tmp_path)
    overrides = [f"model.path={model_dir}"]
    raw = compose("evaluate", overrides)  # model=tiny's recipe: 48 + 16, no instruction, <think>
    note = apply_profile(raw.model, overrides)
    cfg = to_object(raw, EvaluateConfig)
    assert (cfg.infer.max_think_tokens, cfg.infer.max_answer_tokens) == (40, 12)  # evaluate thinks as trained
    assert cfg.model.prompt == PromptConfig("Box it.", None, "<t>", "</t>", False)
    assert "softgrpo train step 9" in note and "40 + 12" in note
    explicit = [*overrides, "model.max_think_tokens=7", "model.prompt.instruction=Go."]
    raw = compose("train", explicit)
    note = apply_profile(raw.model, explicit)
    cfg = to_object(raw, TrainConfig)
    assert (cfg.cot.max_think_tokens, cfg.cot.max_answer_tokens) == (7, 12)
    assert (cfg.model.prompt.instruction, cfg.model.prompt.think_end) == ("Go.", "</t>")
    assert "kept from the command line: model.prompt.instruction, model.max_think_tokens" in note


def test_a_directory_without_a_profile_keeps_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    raw = compose("evaluate", [f"model.path={tmp_path}"])
    before = OmegaConf.to_container(raw.model)
    assert apply_profile(raw.model, []) is None and OmegaConf.to_container(raw.model) == before


def test_train_and_evaluate_take_the_cot_limits_from_the_model() -> None:
    train = to_object(compose("train"), TrainConfig)
    evaluate = to_object(compose("evaluate"), EvaluateConfig)
    assert (train.cot.max_think_tokens, train.cot.max_answer_tokens) == (48, 16)
    assert (evaluate.infer.max_think_tokens, evaluate.infer.max_answer_tokens) == (48, 16)
    big = to_object(compose("evaluate", ["model=qwen2.5-3b"]), EvaluateConfig)
    assert (big.infer.max_think_tokens, big.infer.max_answer_tokens) == (
        512,
        32,
    )  # the paper's evaluation budget
    own = to_object(compose("train", ["cot.max_think_tokens=20"]), TrainConfig)
    assert own.cot.max_think_tokens == 20  # an explicit setting still wins


def test_a_profile_with_worked_examples_applies_over_a_recipe(tmp_path: Path) -> None:
    """A trained model's prompt with few-shot `examples` (read back from JSON as mappings) sets the typed config."""
    from rl.prompts import Example

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    prompt = PromptConfig("Box it.", examples=[Example("1+1?", "2 </t>")], think_end="</t>")
    ModelProfile(prompt, 40, 12, {"entry": 0.5, "row": 2.0}, "softgrpo train step 3").save(model_dir)
    overrides = [f"model.path={model_dir}"]
    raw = compose("evaluate", overrides)
    apply_profile(raw.model, overrides)
    assert to_object(raw, EvaluateConfig).model.prompt.examples == [Example("1+1?", "2 </t>")]
