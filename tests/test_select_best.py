"""Model selection (trainer.select_best, the paper's "the best checkpoint is the one tested") and the evaluation
CoT cap (trainer.eval_max_think_tokens), on the tiny base model. The evaluations are scripted: each returns a
chosen primary pass@1 and records the weights it was shown, so the step that must be selected is known and the
weights in best/, final/ and the after-evaluation can be compared with the ones evaluated at that step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from rl.config import TrainConfig, compose, to_object
from rl.evaluation import ModeSummary
from rl.model import read_profile
from rl.trainer import Selection, Trainer
from tests.conftest import die_after_step
from tests.test_trainer import make_trainer, params, small_run


def selecting_run(tiny_base: Path, out: Path, *extra: str) -> list[str]:
    """The trainer tests' small run, evaluated in hard_greedy after every step and selecting by it."""
    evaluation = [
        "trainer.eval_modes=[hard_greedy]", "trainer.eval_primary=hard_greedy", "trainer.eval_every=1",
        "trainer.select_best=true", "trainer.eval_problems=2", "trainer.eval_n=1",
    ]  # fmt: skip
    return [a for a in small_run(tiny_base, out, *evaluation, *extra) if a != "trainer.eval_modes=[]"]


def scripted_summary(name: str, pass1: float) -> ModeSummary:
    return ModeSummary(
        mode=name, n=1, problems=2, pass_at={1: pass1}, mean_cot_len=0.0, mean_answer_len=0.0, think_end={},
        reward_status={}, sigma=0.0, seconds=0.0, rollouts_per_s=0.0, per_problem_pass1=[pass1, pass1],
        cot_entropy_by_position=[], samples_at_position=[],
    )  # fmt: skip


def script_evaluations(trainer: Trainer, pass1: dict[str, float]) -> dict[str, dict[str, torch.Tensor]]:
    """Make every evaluation of `trainer` return `pass1[tag]` ("before", "step 3", "after") for each mode, and
    return where the weights each one was shown are recorded (by tag)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}

    def evaluate(policy, names, pool, tag):
        seen[tag] = params(policy)
        return {name: scripted_summary(name, pass1[tag]) for name in names}

    trainer.evaluator.evaluate = evaluate
    return seen


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def assert_same(saved: dict[str, torch.Tensor], live: dict[str, torch.Tensor], what: str) -> None:
    """Every saved tensor equals the live one bit for bit (a tied output head is saved once)."""
    for name, value in saved.items():
        assert torch.equal(value, live[name]), f"{what}: {name}"


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_best_step_is_saved_evaluated_and_final(tiny_base: Path, tmp_path: Path) -> None:
    """pass@1 0.25 before, then 0.5, 0.75, 0.5, 0.75 after steps 1-4: step 2 is the first strict maximum (step
    4's tie does not displace it, and step 4, the last, is a candidate too). best/, the after-evaluation and
    final/ hold step 2's weights; the last weights stay in the step 4 checkpoint."""
    out = tmp_path / "run"
    trainer = make_trainer(
        selecting_run(tiny_base, out, "trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=0")
    )
    script = {"before": 0.25, "step 1": 0.5, "step 2": 0.75, "step 3": 0.5, "step 4": 0.75, "after": 0.6}
    seen = script_evaluations(trainer, script)
    summary = trainer.run()

    assert set(seen) == set(script)  # the last step was evaluated as a candidate
    assert differs(seen["step 2"], seen["step 4"]), "training did not move the weights: test is vacuous"
    selected = {"step": 2, "pass@1": 0.75, "by": "hard_greedy"}
    assert summary["selected"] == selected
    assert json.loads((out / "summary.json").read_text())["selected"] == selected
    assert json.loads((out / "best" / "selected.json").read_text()) == selected
    best = weights(out / "best")
    assert_same(best, seen["step 2"], "best/ vs the weights evaluated at step 2")
    assert_same(best, params(trainer.model), "best/ vs the policy after training")
    assert_same(weights(out / "checkpoints" / "step_000002" / "model"), seen["step 2"], "checkpoint 2")
    assert_same(weights(out / "checkpoints" / "step_000004" / "model"), seen["step 4"], "the last checkpoint")
    assert_same(best, seen["after"], "the after-evaluation's weights")
    assert summary["eval_after"]["pass@1"] == 0.6 and summary["eval_before"]["pass@1"] == 0.25
    assert_same(weights(out / "final"), seen["step 2"], "final/")
    assert read_profile(out / "final").written_by.startswith("softgrpo train step 2 ")
    assert not (out / "best.tmp").exists() and not (out / "best.old").exists()


def test_base_weights_are_selected_when_training_never_beats_them(tiny_base: Path, tmp_path: Path) -> None:
    """Step 0 is the first candidate: 0.5 before, 0.25 and 0.5 (a tie) after: the base model is tested."""
    out = tmp_path / "run"
    trainer = make_trainer(selecting_run(tiny_base, out, "trainer.max_steps=2", "trainer.save_every=100"))
    seen = script_evaluations(trainer, {"before": 0.5, "step 1": 0.25, "step 2": 0.5, "after": 0.5})
    summary = trainer.run()
    base = weights(tiny_base)
    assert differs(base, seen["step 2"]), "training did not move the weights: test is vacuous"
    assert summary["selected"] == {"step": 0, "pass@1": 0.5, "by": "hard_greedy"}
    for what, saved in (("best/", weights(out / "best")), ("final/", weights(out / "final"))):
        assert_same(saved, seen["before"], what)
        assert_same(base, {k: v for k, v in saved.items() if k in base}, f"{what} vs the base model")
    assert_same(base, seen["after"], "the after-evaluation's weights vs the base model")


def test_resume_keeps_the_selection(tiny_base: Path, tmp_path: Path) -> None:
    """Step 1 (0.8) is selected, the run dies at the start of step 3 (checkpoint 2), and resumes. Step 3 scores
    0.7: a run that had forgotten its selection would take it; this one keeps step 1 (best/selected.json)."""
    out = tmp_path / "run"
    overrides = selecting_run(tiny_base, out, "trainer.max_steps=4", "trainer.save_every=2")
    first = make_trainer(overrides)
    seen_first = script_evaluations(first, {"before": 0.1, "step 1": 0.8, "step 2": 0.3})
    die_after_step(first, 2)  # killed at the start of step 3
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert Selection.load(out / "best") == Selection(1, 0.8, "hard_greedy")

    second = make_trainer(overrides)
    assert second.state.step == 2 and second.resumed_from is not None
    seen_second = script_evaluations(second, {"step 3": 0.7, "step 4": 0.2, "after": 0.5})
    summary = second.run()
    assert set(seen_second) == {"step 3", "step 4", "after"}  # the pre-training evaluation was kept
    assert second.best == Selection(1, 0.8, "hard_greedy")
    assert summary["selected"] == {"step": 1, "pass@1": 0.8, "by": "hard_greedy"}
    assert differs(seen_first["step 1"], seen_second["step 3"]), "no update: test is vacuous"
    assert_same(weights(out / "best"), seen_first["step 1"], "best/ vs step 1")
    assert_same(weights(out / "best"), seen_second["after"], "the after-evaluation's weights")


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["trainer.select_best=true", "trainer.eval_every=0"], "trainer.eval_every=0"),
        (
            ["trainer.select_best=true", "trainer.eval_every=5", "trainer.eval_modes=[]"],
            "trainer.eval_modes=[]",
        ),
        (["trainer.eval_max_think_tokens=-1"], "trainer.eval_max_think_tokens=-1"),
    ],
)
def test_config_refusals_name_the_keys(overrides: list[str], named: str) -> None:
    """select_best without periodic evaluations has nothing to select from; a negative CoT cap means nothing."""
    cfg = compose("train", overrides)
    with pytest.raises(ValueError, match=re.escape(named)):
        to_object(cfg, TrainConfig)


def test_recipe_defaults_select_nothing_and_keep_the_training_cap() -> None:
    trainer = to_object(compose("train"), TrainConfig).trainer
    assert trainer.select_best is False and trainer.eval_max_think_tokens == 0


@pytest.mark.parametrize("cap, expected", [(40, 40), (0, 24)])
def test_eval_max_think_tokens_reaches_every_evaluation_mode(
    tiny_base: Path, tmp_path: Path, cap: int, expected: int
) -> None:
    """The evaluation modes think up to the evaluation cap (0: the training cap, 24 in `small_run`); training
    keeps its own, and the modes' other inherited limits are the training CoT's."""
    overrides = [
        a for a in small_run(tiny_base, tmp_path, "trainer.eval_modes=[hard_greedy,soft_sample]",
                             "trainer.eval_primary=soft_sample", f"trainer.eval_max_think_tokens={cap}")
        if a != "trainer.eval_modes=[]"
    ]  # fmt: skip
    trainer = make_trainer(overrides)
    assert set(trainer.evaluator.modes) == {"soft_sample", "hard_greedy"}
    for name, mode in trainer.evaluator.modes.items():
        assert mode.name == name and mode.max_think_tokens == expected, name
        assert mode.max_answer_tokens == 10, name
    assert trainer.cfg.cot.max_think_tokens == 24
    # and the trained model's profile says so, so that evaluate.py on final/ thinks as long as the run's own tests
    assert trainer.profile().max_think_tokens == expected
