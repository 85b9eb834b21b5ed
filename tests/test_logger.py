"""rl/logger.py: reading metrics.jsonl back and the training-curve plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rl.logger import LoggerConfig, MetricsLogger, plot_training_curves, read_metrics


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
