"""The training loop on the tiny base model: the learner agrees with the rollouts at the first step, a killed
run resumes to exactly the uninterrupted result, 2 processes equal 1, and SIGTERM checkpoints."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl.config import TrainConfig, compose, to_object
from rl.logprobs import log_prob_gap, sequence_log_probs
from rl.trainer import Trainer
from tests.conftest import die_after_step, load_script

REPO = Path(__file__).resolve().parents[1]


def small_run(tiny_base: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a run small enough for CPU tests, but with real rollouts, rewards and updates."""
    return [
        f"model.path={tiny_base}", f"output_dir={out}", "trainer.eval_modes=[]", "logger.wandb_mode=disabled",
        "reward.workers=1", "reward.spare_workers=0", "trainer.prompts_per_step=4", "trainer.rollout_chunk=2",
        "rl.group_size=4", "cot.max_think_tokens=24", "cot.max_answer_tokens=10", "rl.optim.warmup_steps=0",
        "rl.optim.lr=1e-3", "reward.format_weight=0.5", *extra,
    ]  # fmt: skip


def make_trainer(overrides: list[str]) -> Trainer:
    cfg = to_object(compose("train", overrides), TrainConfig)
    return load_script("train").build_trainer(cfg)


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_prompts_are_drawn_in_the_seeded_epoch_order_shuffled_once_per_epoch() -> None:
    # the order runs have always drawn in (so a resumed or reproduced run draws the same prompts): position p of
    # the stream is problem order_e[p mod n] of epoch e = p div n, order_e = range(n) shuffled by
    # random.Random(f"{seed}-epoch-{e}"); the permutation is computed once per epoch, not once per prompt
    from rl.data import Problem
    from rl.trainer import draw_prompts, epoch_order

    problems = [Problem(str(i), "q", ("1",), "t") for i in range(37)]

    def reference(seed: int, position: int) -> str:
        epoch, index = divmod(position, len(problems))
        order = list(range(len(problems)))
        random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
        return problems[order[index]].uid

    epoch_order.cache_clear()
    drawn = [p.uid for p in draw_prompts(problems, 3, 30, 16)]  # positions 30..45: epochs 0 and 1
    assert drawn == [reference(3, q) for q in range(30, 46)]
    assert epoch_order.cache_info().misses == 2  # one shuffle per epoch for 16 prompts
    assert [p.uid for p in draw_prompts(problems, 4, 30, 16)] != drawn  # the seed matters


@pytest.mark.parametrize("cot", ["soft", "fuzzy", "hard", "multiplex", "gumbel"])
def test_first_step_learner_matches_rollout_log_probs(tiny_base: Path, tmp_path: Path, cot: str) -> None:
    """At step 0 the learner's teacher-forced log-probs equal the engine's behaviour log-probs (float32). A gap
    of whole nats would mean rollout and learner compute different μ (DESIGN.md, Numerics)."""
    trainer = make_trainer(small_run(tiny_base, tmp_path, f"cot={cot}"))
    rollouts, _ = trainer.rollout(0)
    with torch.no_grad():
        new = sequence_log_probs(trainer.model, rollouts, trainer.cfg.cot, trainer.cfg.rl.logprobs)
    gap = log_prob_gap(rollouts, new)
    assert rollouts.cot_mask.any() and rollouts.answer_action_mask.any()
    # Gaussian log-probs here are O(d) = O(100) nats; float32 agreement is ~1e-5 of that
    assert gap.cot < 1e-3, gap
    assert gap.answer < 1e-4, gap


@pytest.mark.slow  # CI time: the README grid command runs cot=multiplex through the whole script
def test_mixture_mode_trains_and_evaluates_every_mixture_mode(tiny_base: Path, tmp_path: Path) -> None:
    """cot=gumbel through the whole script: a training step (its loss, statistics, checkpoint) and the evaluation
    of the four mixture inference modes, each with its pass@1 and lift in summary.json."""
    out = tmp_path / "run"
    modes = "trainer.eval_modes=[gumbel_sample,multiplex_sample,multiplex_greedy,gumbel_greedy]"
    cfg = small_run(tiny_base, out, "cot=gumbel", "trainer.max_steps=1", modes, "trainer.eval_primary=gumbel_sample",
                    "trainer.eval_problems=3", "trainer.eval_n=2")  # fmt: skip
    cmd = [sys.executable, "scripts/train.py", *[a for a in cfg if not a.startswith("trainer.eval_modes=[]")]]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["noise_ratio"] == 0.0
    after = json.loads((out / "summary.json").read_text())["eval_after"]
    for mode in ("gumbel_sample", "multiplex_sample", "multiplex_greedy", "gumbel_greedy"):
        assert len(after[mode]["per_problem_pass@1"]) == 3 and after[mode]["lift_pass@1"]["problems"] == 3


def test_kill_and_resume_equals_straight_run(tiny_base: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, a kill, a resume, 2 more steps: parameter for parameter."""
    straight = make_trainer(
        small_run(tiny_base, tmp_path / "a", "trainer.max_steps=4", "trainer.save_every=100")
    )
    start = params(straight.model)
    straight.run()
    end = params(straight.model)
    assert any(not torch.equal(start[k], end[k]) for k in start), (
        "the run did not update the model: test is vacuous"
    )
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000  # training curves from metrics.jsonl

    run_b = small_run(tiny_base, tmp_path / "b", "trainer.max_steps=4", "trainer.save_every=2")
    first = make_trainer(run_b)
    die_after_step(first, 2)  # the process dies at the start of step 3 (after checkpoint 2)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert (tmp_path / "b" / "checkpoints" / "step_000002").is_dir()
    second = make_trainer(run_b)  # resume=auto finds step 2
    assert second.state.step == 2 and second.resumed_from is not None
    second.run()
    for name, value in params(second.model).items():
        torch.testing.assert_close(value, end[name], rtol=0, atol=0, msg=name)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]


def _load_final(out: Path) -> dict[str, torch.Tensor]:
    return _load_final_from(out / "final")


def _load_final_from(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def expected_local_fraction(base: dict[str, torch.Tensor], sharding: str) -> float:
    """Parameter elements process 0 of 2 holds, derived from the shapes: fsdp2 splits each decoder-layer tensor
    along dim 0 (process 0 takes ceil(d0 / 2) rows) and replicates the rest; zero3 with persistence threshold 0
    gives every tensor a flat partition of ceil(n / 2) elements; none and zero2 replicate everything."""
    total = sum(t.numel() for t in base.values())
    if sharding == "fsdp2":
        held = sum(
            -(-t.shape[0] // 2) * (t.numel() // t.shape[0]) if ".layers." in k else t.numel()
            for k, t in base.items()
        )
    elif sharding == "zero3":
        held = sum(-(-t.numel() // 2) for t in base.values())
    else:
        held = total
    return held / total


# zero2 runs with -m slow (CI time, ~100 s: zero3 partitions the same DeepSpeed optimizer state, and the
# parameters on top)
@pytest.mark.parametrize(
    "sharding", ["none", "fsdp2", pytest.param("zero2", marks=pytest.mark.slow), "zero3"]
)
def test_two_processes_equal_one(tiny_base: Path, tmp_path: Path, sharding: str) -> None:
    """`accelerate launch` with 2 CPU processes and the same global batch gives the 1-process parameters, with
    replicated parameters, with fsdp2-sharded decoder layers (sum-reduce-scattered gradients, sharded AdamW
    state, whole checkpoint and final model gathered), with DeepSpeed ZeRO-2 (partitioned gradients and AdamW
    state, DeepSpeed's own reduction and clipping) and with ZeRO-3 (every parameter partitioned too: persistence
    threshold 0; generation on the refreshed whole copy, the learner's head and E gathered by DeepSpeed)."""
    common = small_run(
        tiny_base, tmp_path, "trainer.max_steps=2", "trainer.device=cpu", f"trainer.sharding={sharding}",
        "trainer.zero3_persistence_threshold=0",
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = [sys.executable, "scripts/train.py", *[a for a in common if not a.startswith("output_dir")],
           f"output_dir={tmp_path / 'one'}"]  # fmt: skip
    subprocess.run(one, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    two = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu2.yaml",
           "scripts/train.py", *[a for a in common if not a.startswith("output_dir")],
           f"output_dir={tmp_path / 'two'}"]  # fmt: skip
    done = subprocess.run(two, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = _load_final(tmp_path / "one"), _load_final(tmp_path / "two")
    base = _load_final_from(tiny_base)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["train"]["processes"] == 2 and summary["train"]["sharding"] == sharding
    assert summary["train"]["local_param_fraction"] == pytest.approx(expected_local_fraction(base, sharding))
    # Same rollouts (randomness keyed by step and prompt index) and the same global normaliser, so the summed
    # gradients agree to float32 rounding (the logged grad norms below agree to 1e-5; dumped gradients agreed to
    # 3e-6 of each tensor's largest entry under zero2 and zero3). Adam's first step moves an entry by
    # lr·g/(|g| + eps) ≈ ±lr, so an entry whose gradient is within rounding of zero may move anywhere in [-lr, lr]
    # in either run: float32 agreement bounds no single entry beyond the possible movement (2 steps × lr). It does
    # bound how many such entries there are and the updates overall. Hence: no entry beyond the possible
    # movement, at most 1 entry in 1e5 beyond 1% of it (measured: 0 to 1 of 1.16M), and per tensor the two runs'
    # updates identical to 1e-4 of their size (measured: at most 5e-6).
    lr, steps = 1e-3, 2
    moved = 0.0
    outliers = entries = 0
    for name in a:
        diff = (a[name] - b[name]).abs()
        assert float(diff.max()) <= lr * steps, name
        outliers += int((diff > 0.01 * lr * steps).sum())
        entries += diff.numel()
        moved_here = float((a[name] - base[name]).abs().sum())
        moved += moved_here
        assert float(diff.sum()) <= 1e-4 * moved_here + 1e-9, name
    assert outliers <= entries // 100_000, (
        f"{outliers} of {entries} entries differ by > 1% of the possible movement"
    )
    assert moved > 0, "the runs did not update the model: the comparison would be vacuous"
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(one, two, strict=True):  # metrics describe the global batch in both runs
        # step 1 rolls out from identical parameters; step 2 from parameters equal to Adam rounding (above)
        rel = 1e-6 if x["step"] == 1 else 1e-4
        # noise_ratio: a per-step mean over the learner's μ, merged across processes weighted by step counts
        keys = (
            "reward_mean",
            "reward_std",
            "cot_len",
            "answer_len",
            "adv_abs_mean",
            "cot_entropy",
            "noise_ratio",
        )
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=rel, abs=1e-9), key
        assert x["grad_norm"] == pytest.approx(
            y["grad_norm"], rel=1e-4
        )  # step 2 starts from Adam-rounded params
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-3, abs=1e-7)


def test_summary_holds_every_mode_before_and_after_with_the_paired_lift(
    tiny_base: Path, tmp_path: Path
) -> None:
    """summary.json: eval_before / eval_after with pass@1 and pass@k of the primary mode and of every listed mode,
    per-problem pass@1, and after training each mode's lift over the same problems with its paired error."""
    out = tmp_path / "run"
    modes = "trainer.eval_modes=[hard_greedy,soft_sample]"
    cfg = small_run(tiny_base, out, "cot=soft", "trainer.max_steps=1", modes, "trainer.eval_problems=6",
                    "trainer.eval_n=2")  # fmt: skip
    cmd = [sys.executable, "scripts/train.py", *[a for a in cfg if not a.startswith("trainer.eval_modes=[]")]]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for tag in ("eval_before", "eval_after"):
        block = summary[tag]
        assert block["primary"] == "soft_sample" and block["pass@1"] == block["soft_sample"]["pass@1"]
        assert block["pass@k"] == {
            "pass@1": block["soft_sample"]["pass@1"],
            "pass@2": block["soft_sample"]["pass@2"],
        }
        for mode in ("hard_greedy", "soft_sample"):
            per_problem = block[mode]["per_problem_pass@1"]
            assert len(per_problem) == 6 and all(p in (0.0, 0.5, 1.0) for p in per_problem)  # c / 2 samples
            assert block[mode]["pass@1"] == pytest.approx(sum(per_problem) / 6)
    for mode in ("hard_greedy", "soft_sample"):
        before = summary["eval_before"][mode]["per_problem_pass@1"]
        after = summary["eval_after"][mode]["per_problem_pass@1"]
        diffs = [a - b for a, b in zip(after, before, strict=True)]
        mean = sum(diffs) / 6
        se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 5 / 6)
        lift = summary["eval_after"][mode]["lift_pass@1"]
        assert lift["problems"] == 6 and lift["mean"] == pytest.approx(mean, abs=1e-12)
        assert lift["se"] == pytest.approx(se, abs=1e-12)
        assert "lift_pass@1" not in summary["eval_before"][mode]
    final = json.loads(done.stdout.strip().splitlines()[-1])  # the script's last line
    assert final["lift_pass@1"] == summary["eval_after"]["soft_sample"]["lift_pass@1"]


def test_sigterm_writes_a_checkpoint_then_exits(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "scripts/train.py", *small_run(tiny_base, out, "trainer.max_steps=500",
                                                            "trainer.save_every=1000")]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 143, output[-2000:]
    saved = sorted((out / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "trainer_state.pt").exists(), output[-2000:]
    steps = len(metrics.read_text().splitlines())
    assert saved[0].name == f"step_{steps:06d}"  # the checkpoint holds every step that was logged


# zero2 runs with -m slow (CI time: zero3 resumes from the same DeepSpeed engine checkpoint, with the parameter
# partitions on top)
@pytest.mark.parametrize("sharding", ["fsdp2", pytest.param("zero2", marks=pytest.mark.slow), "zero3"])
def test_sharded_resume_equals_straight_run(tiny_base: Path, tmp_path: Path, sharding: str) -> None:
    """Sharded, 2 processes: 3 steps straight == 2 steps, a stop, a resume, 1 more step. fsdp2 resumes from the
    gathered checkpoint (whole weights and name-keyed AdamW state loaded back into the shards); zero2 and zero3
    from DeepSpeed's engine checkpoint (float32 master weights and each process's AdamW partition; under zero3
    the parameter partitions too, and the generation copy is refreshed from them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(out: Path, *extra: str) -> None:
        # constant lr (min_lr_ratio 1): the schedule must not depend on max_steps, which differs between launches
        args = small_run(
            tiny_base,
            out,
            "trainer.device=cpu",
            f"trainer.sharding={sharding}",
            "trainer.zero3_persistence_threshold=0",
            "rl.optim.min_lr_ratio=1.0",
            *extra,
        )
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu2.yaml",
               "scripts/train.py", *args]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    launch(tmp_path / "a", "trainer.max_steps=3", "trainer.save_every=100")
    launch(tmp_path / "b", "trainer.max_steps=2", "trainer.save_every=2")
    launch(tmp_path / "b", "trainer.max_steps=3", "trainer.save_every=100")
    a, b = _load_final(tmp_path / "a"), _load_final(tmp_path / "b")
    base = _load_final_from(tiny_base)
    assert any(not torch.equal(a[k], base[k]) for k in a), "no update: the comparison would be vacuous"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
