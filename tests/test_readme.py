"""Every command the README shows runs as written (issue 11): each is read from the README's ```bash blocks and
run with the shell from the repository root, shrunk by overrides appended at its end (Hydra and argparse take the
last value) and with its relative output paths moved under a temporary directory. Commands that need a GPU, a
hub model or vLLM are composed and validated by Hydra (`--cfg job`) instead of run. A README command with no rule here
fails the suite, so a new one cannot go untested."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# a training run small enough for a test: 1 step of 2 prompts x 2 samples, short CoT, no evaluation, no W&B
TRAIN_SHRINK = (
    "trainer.max_steps=1 trainer.prompts_per_step=2 trainer.rollout_chunk=2 rl.group_size=2 "
    "trainer.eval_modes=[] model.max_think_tokens=8 model.max_answer_tokens=6 logger.wandb_mode=disabled "
    "reward.workers=1 reward.spare_workers=0"
)
TINY_BUILD_SHRINK = (
    "sft.steps=2 sft.batch_size=2 eval_problems=2 synthetic.num_train=20 arch.hidden_size=32 arch.num_layers=1 "
    "arch.num_heads=2 arch.intermediate_size=64"
)
GPU_LAUNCHES = ("ddp.yaml", "fsdp2.yaml", "zero2.yaml", "zero3.yaml")


def readme_commands() -> list[str]:
    """The shell commands of the README's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        joined = re.sub(r"\\\n\s*", "", block)
        commands += [
            line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
        ]
    return commands


def _hub_model(command: str) -> bool:
    return bool(re.search(r"\bmodel=(?!tiny\b)\S+", command))


def as_tested(command: str, tmp: Path) -> str | None:
    """The shell line the suite runs for a README `command` (None: not run here, see the rules), or an
    AssertionError for a command no rule covers."""
    if command.startswith(". .venv/bin/activate && python -m pytest"):
        return None  # the test command is this suite itself
    if command.startswith("pip install --no-deps"):
        return None  # a package install: .ci/run installs the same packages
    if command.startswith("python3 -m venv"):  # the install-and-run line: its run, shrunk (CI installs)
        return f"{command.rsplit('&&', 1)[1].strip()} {TRAIN_SHRINK} output_dir={tmp}/outputs/train"
    moved = (
        command.replace("runs/", f"{tmp}/runs/")
        .replace("out/eval", f"{tmp}/out/eval")
        .replace("multirun/<date>", f"{tmp}/multirun/sweep")
        .replace("completions.jsonl", f"{tmp}/completions.jsonl")
        .replace("scored.jsonl", f"{tmp}/scored.jsonl")
    )
    if command.startswith("accelerate launch"):
        config = re.search(r"--config_file (\S+)", command).group(1)
        assert (REPO / config).is_file(), config
        if config.endswith(GPU_LAUNCHES):  # needs GPUs: compose the training config it would run
            return f"python scripts/train.py {moved.split('scripts/train.py', 1)[1]} --cfg job"
        return f"{moved} {TRAIN_SHRINK}"
    if command.startswith("python scripts/train.py"):
        if _hub_model(command):
            return f"{moved} --cfg job"
        if " -m " in command:  # a sweep: 1-step jobs, each evaluated on 2 problems for the report
            evaluation = "trainer.eval_modes=[soft_sample] trainer.eval_problems=2 trainer.eval_n=2"
            return f"{moved} {TRAIN_SHRINK} {evaluation} hydra.sweep.dir={tmp}/multirun/sweep"
        return f"{moved} {TRAIN_SHRINK}"
    if command.startswith("python scripts/make_tiny_base.py"):
        return f"{moved} output_dir={tmp}/tiny_base {TINY_BUILD_SHRINK}"
    if command.startswith("python scripts/evaluate.py") and "engine=vllm" in command:
        return f"{moved} --cfg job"  # vLLM cannot be installed here: compose and validate the config only
    if command.startswith("python scripts/evaluate.py"):
        return f"{moved} data.limit=4 n=2 batch_size=4 model.max_think_tokens=16 trace_problems=1"
    if command.startswith("python scripts/evaluate_ood.py"):  # the fixtures, 2 problems each
        return f"{moved.replace('out/ood', f'{tmp}/out/ood')} limit=2"
    if command.startswith("python scripts/bench_rollout.py"):
        return f"{moved} --new-tokens 4 --repeats 1 --batch 2 --modes hard"  # one mode: one compile
    if command.startswith("python scripts/bench_learner.py"):
        return f"{moved} --repeats 1 {TRAIN_SHRINK}"
    if command.startswith("python scripts/paper_grid.py"):  # one 1-step run, evaluated on 2 problems x 8
        script = "python scripts/paper_grid.py"
        shrink = (
            TRAIN_SHRINK.replace("trainer.eval_modes=[] ", "") + " trainer.eval_problems=2 trainer.eval_n=8"
        )
        return f"{moved.replace(script, f'{script} {shrink}', 1)} --train multiplex --seeds 0 --infer hard_greedy multiplex_sample"
    if command.startswith("python scripts/grad_snr.py"):
        # the shrink goes first: `--prompts` takes every number after it
        script = "python scripts/grad_snr.py"
        return f"{moved.replace(script, f'{script} {TRAIN_SHRINK}', 1)} --batches 2 --prompts 2 --draws fresh"
    if command.startswith(
        ("python scripts/score.py", "python scripts/sweep_report.py", "python -m pytest -m gpu")
    ):
        return moved
    raise AssertionError(f"README command without a rule in tests/test_readme.py: {command}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("readme")
    rows = [{"completion": "</think>\\boxed{4}", "answer": "4"}, {"completion": "\\boxed{5}", "answer": "4"}]
    (tmp / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp


def test_the_readme_shows_the_two_quickstart_commands() -> None:
    commands = readme_commands()
    assert commands[0].startswith("python3 -m venv .venv") and commands[0].endswith("python scripts/train.py")
    assert commands[1] == ". .venv/bin/activate && python -m pytest"


@pytest.mark.parametrize("command", readme_commands(), ids=lambda c: c[:60])
def test_readme_command_runs_as_written(command: str, workdir: Path, tiny_base: Path) -> None:
    line = as_tested(command, workdir)
    if line is None:
        pytest.skip("not run here: the README's test command is this suite; a package install is .ci/run's")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python, accelerate: this venv's
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        line,
        shell=True,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        executable="/bin/bash",
    )
    assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
