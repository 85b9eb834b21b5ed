"""Metrics logging: always a local `metrics.jsonl` (one JSON object per step), plus Weights & Biases
(offline unless configured online). `NullLogger` stands in where nothing should be written."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """`wandb_mode`: offline (default: files under output_dir/wandb, sync later with `wandb sync`), online,
    or disabled. `metrics.jsonl` is written in every mode."""

    wandb_mode: str = "offline"
    project: str = "softgrpo"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] | None = None

    def __post_init__(self) -> None:
        if self.wandb_mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb_mode={self.wandb_mode!r}: expected one of {WANDB_MODES}")


class Logger(Protocol):
    def log(self, metrics: dict[str, float | int], step: int) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    """Logs nothing (non-main ranks, dry runs)."""

    def log(self, metrics: dict[str, float | int], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def _jsonable(value: float | int) -> float | int | None:
    # JSON has no NaN/inf: write null so the file stays parseable by every reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends `{"step": s, **metrics}` lines to `output_dir/metrics.jsonl` (append mode, so a resumed run
    continues the same file) and forwards to W&B when enabled.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> log = MetricsLogger(d, LoggerConfig(wandb_mode="disabled"), run_config={})
    >>> log.log({"reward/mean": 0.5, "bad": float("nan")}, step=3); log.close()
    >>> open(f"{d}/metrics.jsonl").read()
    '{"step": 3, "reward/mean": 0.5, "bad": null}\\n'
    """

    def __init__(self, output_dir: str | Path, cfg: LoggerConfig, run_config: dict[str, Any]) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb = None
        if cfg.wandb_mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.run_name,
                tags=cfg.tags,
                mode=cfg.wandb_mode,
                dir=str(self.path.parent),
                config=run_config,
                resume="allow",
            )

    def log(self, metrics: dict[str, float | int], step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
