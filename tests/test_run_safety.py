"""Runs a user can trust (issue 11), end to end on the tiny base model: a crash and resume logs every step once
and survives a corrupt newest checkpoint; a used run directory refuses another configuration without touching
anything; settings that would fail late fail at start; SIGTERM says what happened."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rl.config import EvaluateConfig, TrainConfig, compose, to_object
from rl.rundir import RunDirError
from tests.conftest import die_after_step
from tests.test_trainer import make_trainer, small_run

REPO = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    """sha256 over every file's name and bytes under `path`."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def steps_logged(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_crash_resume_logs_every_step_once_and_skips_a_corrupt_checkpoint(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Checkpoints after steps 1, 2, 3; the process dies at the start of step 4 (3 rows logged). The newest
    checkpoint is then truncated on disk and a foreign folder sits beside it: resume skips step 3 with a warning
    naming it, continues from step 2, and metrics.jsonl ends with steps 1..4, each once."""
    out = tmp_path / "run"
    run = small_run(tiny_base, out, "trainer.max_steps=4", "trainer.save_every=1", "trainer.keep_last=3")
    first = make_trainer(run)
    die_after_step(first, 3)  # as kill -9 would leave it: rows 1..3 logged, checkpoints 1..3 written
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert steps_logged(out) == [1, 2, 3]
    weights = out / "checkpoints" / "step_000003" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a crash mid-copy, a full disk
    (out / "checkpoints" / "step_000004.bad").mkdir()  # a name the trainer does not own
    capsys.readouterr()
    second = make_trainer(run)
    assert second.state.step == 2 and second.resumed_from.name == "step_000002"
    warning = capsys.readouterr().out
    assert "skipping checkpoint" in warning and "step_000003" in warning and "model.safetensors" in warning
    second.run()
    assert steps_logged(out) == [1, 2, 3, 4]


def test_a_used_run_directory_refuses_another_config_and_keeps_its_files(
    tiny_base: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    base = small_run(tiny_base, out, "cot=soft", "trainer.max_steps=1")
    make_trainer(base).run()
    before = digest(out)
    with pytest.raises(RunDirError) as err:  # the README's rerun with another CoT mode
        make_trainer([*base, "cot=fuzzy"])
    assert "cot.mode: 'soft' (saved) -> 'fuzzy' (now)" in str(err.value)
    with pytest.raises(RunDirError) as err:  # overrides a resume would silently have ignored
        make_trainer([*base, "rl.optim.lr=1e-2", "cot.noise_scale=1.0"])
    assert "rl.optim.lr: 0.001 (saved) -> 0.01 (now)" in str(err.value)
    assert "cot.noise_scale: 0.33 (saved) -> 1.0 (now)" in str(err.value)
    with pytest.raises(RunDirError, match="already holds a run"):
        make_trainer([*base, "trainer.resume=never"])
    assert digest(out) == before  # every refusal before anything was written
    done = make_trainer(base)  # the same run again: complete, nothing to do
    assert done.run()["train"]["steps"] == 1 and digest(out) == before
    longer = make_trainer([*base, "trainer.max_steps=2"])  # run length may change on resume
    assert longer.run()["train"]["steps"] == 2 and steps_logged(out) == [1, 2]
    fresh = make_trainer([*base, "cot=hard", "trainer.resume=overwrite"])
    assert fresh.state.step == 0 and not (out / "checkpoints").exists() and not (out / "final").exists()


def test_settings_that_would_fail_late_fail_at_start_naming_the_key() -> None:
    for override, key in [
        ("trainer.save_every=0", "trainer.save_every=0"),
        ("trainer.eval_n=0", "trainer.eval_n=0"),
        ("trainer.eval_every=-1", "trainer.eval_every=-1"),
    ]:
        with pytest.raises(ValueError, match=key):
            to_object(compose("train", [override]), TrainConfig)
    with pytest.raises(ValueError, match=r"unknown config keys \['trainer.max_stepz'\]"):
        to_object(compose("train", ["+trainer.max_stepz=3"]), TrainConfig)
    for override in ("n=0", "batch_size=0"):  # evaluate.py: named as its own key, not as rl.group_size
        with pytest.raises(ValueError, match=f"{override}, " if override == "n=0" else override):
            to_object(compose("evaluate", [override]), EvaluateConfig)


def test_an_empty_split_fails_before_the_model_loads(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split 'train' has no problems"):
        make_trainer(small_run(tiny_base, tmp_path, "data.limit=0", "model.path=/nonexistent/model"))


def test_a_warmup_longer_than_the_run_is_shortened_with_a_note(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    trainer = make_trainer(small_run(tiny_base, tmp_path, "trainer.max_steps=8", "rl.optim.warmup_steps=10"))
    assert "warming up over 0 steps" in capsys.readouterr().out
    assert trainer.sched.get_last_lr()[0] == pytest.approx(1e-3)  # no warmup: the full lr from step 0


def test_sigterm_before_the_first_step_says_no_checkpoint_was_written(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    trainer = make_trainer(small_run(tiny_base, out, "trainer.max_steps=3"))
    evaluate = trainer.evaluator.block

    def signalled_during(*args, **kwargs):  # SIGTERM arrives while the pre-training evaluation runs
        trainer.on_sigterm(15, None)
        return evaluate(*args, **kwargs)

    trainer.evaluator.block = signalled_during
    with pytest.raises(SystemExit) as exit_:
        trainer.run()
    assert exit_.value.code == 143
    said = capsys.readouterr().out
    assert "no training step was taken, no checkpoint written" in said and "written at step" not in said
    assert not (out / "checkpoints").exists()


def test_the_tiny_base_build_is_the_same_on_any_thread_count_and_processor(tmp_path: Path) -> None:
    """The pinned build (rl/tiny_base.py) from two calling environments that differ in thread count and in the
    CPU kernels torch picks (as two users' machines do) gives identical weights. Unpinned, the kernels alone
    change the rounding (measured: different weights after two SFT steps), so the test fails if the pinning is
    lost. (Thread counts above the core count cannot be forced through the environment on a 2-core machine; the
    pinning sets one thread in the child whatever the caller has.)"""
    over = ["sft.steps=2", "eval_problems=4", "synthetic.num_train=200"]
    callers = {"a": {"OMP_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default"}, "b": {"OMP_NUM_THREADS": "2"}}
    sums = []
    for name, caller in callers.items():
        out = tmp_path / name
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")} | caller
        cmd = [sys.executable, "scripts/make_tiny_base.py", f"output_dir={out}", *over]
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
        sums.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert sums[0] == sums[1]


def test_evaluating_a_trained_policy_reads_it_only_and_thinks_as_it_was_trained(
    tiny_base: Path, tmp_path: Path
) -> None:
    """The README's evaluate example on a run's final/: the directory is byte for byte unchanged, and the
    evaluation uses the CoT limits the run trained with (its profile), not the tiny recipe's 48 + 16, and the
    run's σ, so it reproduces the run's own after-training evaluation problem for problem."""
    out = tmp_path / "run"
    evals = ["trainer.eval_modes=[soft_sample]", "trainer.eval_problems=4", "trainer.eval_n=2"]
    train = [sys.executable, "scripts/train.py", *small_run(tiny_base, out, "trainer.max_steps=1", *evals)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    final = out / "final"
    before = digest(final)
    start = time.time()
    evaluate = [sys.executable, "scripts/evaluate.py", f"model.path={final}", "data.limit=4", "n=2",
                f"output_dir={tmp_path / 'eval'}"]  # fmt: skip
    done = subprocess.run(evaluate, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.time() - start < 120  # no tiny base was built into final/ (that takes minutes)
    assert digest(final) == before
    assert "prompt format and CoT limits 24 + 10" in done.stdout  # small_run trains with 24 + 10
    saved = (tmp_path / "eval" / "config.yaml").read_text()
    assert "max_think_tokens: 24" in saved and "max_answer_tokens: 10" in saved
    run_after = json.loads((out / "summary.json").read_text())["eval_after"]["soft_sample"]
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert evaluated["per_problem_pass1"] == run_after["per_problem_pass@1"]
    mistyped = subprocess.run([*evaluate[:2], f"model.path={out / 'fnal'}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert mistyped.returncode != 0 and f"model.path='{out / 'fnal'}' does not exist" in mistyped.stderr
    assert not (out / "fnal").exists()


def test_kill_9_then_rerun_logs_every_step_exactly_once(tiny_base: Path, tmp_path: Path) -> None:
    """The issue's reproduction as a user meets it: `kill -9` once 3 steps are logged (checkpoints every 2), then
    the same command again. Before: steps [1, 2, 3, 3, 4, 5, 6]. Now each step once, in order."""
    out = tmp_path / "run"
    cmd = [sys.executable, "scripts/train.py",
           *small_run(tiny_base, out, "trainer.max_steps=6", "trainer.save_every=2")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    killed_at = len(metrics.read_text().splitlines())
    assert 3 <= killed_at < 6, f"killed after {killed_at} steps: the test did not interrupt the run"
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
