"""Metrics logging: always a local `metrics.jsonl` (one JSON object per step), plus Weights & Biases
(offline unless configured online). `NullLogger` stands in where nothing should be written."""

from __future__ import annotations

import json
import math
import os
import uuid
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
    continues the same file, after `drop_rows_after` removed the steps it will redo) and forwards to W&B when
    enabled, under the run id kept in `output_dir/wandb_run_id`: a resumed run continues the same W&B run, which
    keeps the first value logged for a step.

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
                id=wandb_run_id(self.path.parent),
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


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of the run in `run_dir`: made once and kept in `run_dir/wandb_run_id`."""
    file = run_dir / "wandb_run_id"
    if file.is_file():
        return file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    file.write_text(run_id + "\n")
    return run_id


def drop_rows_after(path: str | Path, step: int) -> int:
    """Rewrite the metrics.jsonl at `path` (atomically) without its rows past `step`: the steps a resumed run
    will redo. A last line cut short (the process killed mid-write) goes too; any other malformed line is an
    error naming it. Returns the number of rows dropped (0 when there is no file).

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> _ = p.write_text("".join(json.dumps({"step": s}) + "\\n" for s in (1, 2, 3, 3)) + '{"step": 4, "lo')
    >>> drop_rows_after(p, 2), [r["step"] for r in read_metrics(p)]
    (3, [1, 2])
    """
    path = Path(path)
    if not path.exists():
        return 0
    text = path.read_text()
    lines = text.splitlines()
    cut_short = bool(lines) and not text.endswith("\n") and not _parses(lines[-1])
    rows = read_metrics_lines(lines[:-1] if cut_short else lines, path)
    keep = [r for r in rows if r["step"] <= step]
    if len(keep) == len(rows) and not cut_short:
        return 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    os.replace(tmp, path)
    return len(rows) - len(keep) + cut_short


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


CURVES = ("reward_mean", "cot_len", "cot_entropy", "grad_norm", "cot_grad_norm", "gap_cot")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a malformed line is an error naming the file and line."""
    return read_metrics_lines(Path(path).read_text().splitlines(), path)


def read_metrics_lines(lines: list[str], path: str | Path) -> list[dict[str, Any]]:
    """The rows of the lines of the metrics.jsonl at `path` (named in errors)."""
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not JSON ({err})") from err
    return rows


def plot_training_curves(
    rows: list[dict[str, Any]], path: str | Path, keys: tuple[str, ...] = CURVES, smooth: int = 5
) -> list[str]:
    """One panel per metric in `keys` present in `rows` (raw values faint, a trailing mean over `smooth` steps
    bold; null / NaN values are gaps). Returns the keys plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(_finite(r.get(k)) for r in rows)]
    if not present:
        return []
    cols = min(3, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, present, strict=False):
        points = [(r["step"], float(r[key])) for r in rows if _finite(r.get(key))]
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, alpha=0.3, lw=1)
        mean = [
            sum(values[max(0, i - smooth + 1) : i + 1]) / len(values[max(0, i - smooth + 1) : i + 1])
            for i in range(len(values))
        ]
        ax.plot(steps, mean, lw=2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return present


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
