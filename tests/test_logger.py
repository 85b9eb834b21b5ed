"""rl/logger.py: reading metrics.jsonl back and the training-curve plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rl.logger import (
    LoggerConfig,
    MetricsLogger,
    drop_rows_after,
    plot_training_curves,
    read_metrics,
    wandb_run_id,
)


def test_metrics_round_trip_and_curves(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, LoggerConfig(wandb_mode="disabled"), {})
    for step in range(1, 7):
        # cot_grad_norm is measured every few steps only (NaN -> null in the file)
        logger.log({"reward_mean": step / 10, "cot_grad_norm": 1.0 if step % 3 == 0 else math.nan}, step=step)
    logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[0]["cot_grad_norm"] is None and rows[2]["cot_grad_norm"] == 1.0
    plotted = plot_training_curves(rows, tmp_path / "curves.png")
    # only keys with at least one finite value get a panel, in the order of `keys`
    assert plotted == ["reward_mean", "cot_grad_norm"]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert plot_training_curves(rows, tmp_path / "none.png", keys=("absent",)) == []
    assert not (tmp_path / "none.png").exists()


def test_read_metrics_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
        read_metrics(path)


def test_a_run_directory_keeps_one_wandb_run_id(tmp_path: Path) -> None:
    """A resumed run continues the same W&B run: the id is made once and read back from the run directory."""
    first = wandb_run_id(tmp_path)
    assert len(first) == 12 and wandb_run_id(tmp_path) == first
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
    other = tmp_path / "other"
    other.mkdir()
    assert wandb_run_id(other) != first  # another run directory, another run


def test_rows_past_the_resumed_step_are_dropped_and_the_rest_kept_verbatim(tmp_path: Path) -> None:
    """After a crash at step 3 and a resume from the checkpoint of step 2, the logger appends steps 3.. again:
    the old rows of step 3 (the step's metrics and its periodic evaluation row) must go first, the rest stay."""
    path = tmp_path / "metrics.jsonl"
    logger = MetricsLogger(tmp_path, LoggerConfig(wandb_mode="disabled"), {})
    for step in (1, 2, 3):
        logger.log({"reward_mean": step / 10}, step=step)
    logger.log({"eval/soft_sample/pass@1": 0.5}, step=3)
    logger.close()
    kept = read_metrics(path)[:2]
    assert drop_rows_after(path, 2) == 2 and read_metrics(path) == kept
    assert drop_rows_after(path, 2) == 0 and drop_rows_after(tmp_path / "none.jsonl", 0) == 0
