"""Gathering a Hydra multirun sweep into a table and a heatmap.

Each run directory (`multirun/<date>/<job number>/`) holds `.hydra/overrides.yaml` (what was swept) and
`summary.json` (written by the trainer). A run without a summary (still running, or crashed) is listed with
its status instead of being dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class SweepRun:
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float | None]  # e.g. {"before/pass@1": ..., "after/pass@1": ..., "lift/pass@1": ...}
    status: str  # done | incomplete


def read_run(path: Path, metric_mode: str | None = None) -> SweepRun:
    """One run directory. `metric_mode`: which inference mode's pass@k to read (None = the run's primary)."""
    overrides_file = path / ".hydra" / "overrides.yaml"
    if not overrides_file.exists():
        raise FileNotFoundError(f"{path}: no .hydra/overrides.yaml (not a Hydra run directory?)")
    overrides = {}
    for item in yaml.safe_load(overrides_file.read_text()) or []:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    summary_file = path / "summary.json"
    if not summary_file.exists() or "eval_after" not in json.loads(summary_file.read_text()):
        return SweepRun(path, overrides, {}, "incomplete")
    summary = json.loads(summary_file.read_text())
    metrics: dict[str, float | None] = {}
    for tag in ("eval_before", "eval_after"):
        block = summary[tag]
        mode = metric_mode or block["primary"]
        if mode not in block:
            raise KeyError(
                f"{summary_file}: no {mode!r} in {tag} (evaluated: {[k for k in block if '@' not in k]})"
            )
        for key, value in block[mode].items():
            if key.startswith("pass@"):
                metrics[f"{tag[5:]}/{key}"] = value
        lift = block[mode].get("lift_pass@1")  # after-blocks: paired lift over the same problems
        if lift is not None:
            metrics["lift/pass@1"], metrics["lift_se/pass@1"] = lift["mean"], lift["se"]
    return SweepRun(path, overrides, metrics, "done")


def find_runs(root: Path) -> list[Path]:
    """Every Hydra run directory under `root` (any depth), sorted."""
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {root} does not exist")
    return sorted(p.parent.parent for p in root.rglob(".hydra/overrides.yaml"))


def markdown_table(runs: list[SweepRun], metric_keys: list[str]) -> str:
    """One row per run: every swept key, then the metrics.

    >>> r = SweepRun(Path("a"), {"cot.noise_scale": "0.1"}, {"after/pass@1": 0.5}, "done")
    >>> print(markdown_table([r], ["after/pass@1"]))
    | cot.noise_scale | after/pass@1 | status |
    |---|---|---|
    | 0.1 | 0.500 | done |
    """
    keys = sorted({k for r in runs for k in r.overrides})
    lines = [
        "| " + " | ".join([*keys, *metric_keys, "status"]) + " |",
        "|" + "---|" * (len(keys) + len(metric_keys) + 1),
    ]
    for r in runs:
        cells = [r.overrides.get(k, "") for k in keys]
        cells += ["" if r.metrics.get(m) is None else f"{r.metrics[m]:.3f}" for m in metric_keys]
        lines.append("| " + " | ".join([*cells, r.status]) + " |")
    return "\n".join(lines)


def heatmap(runs: list[SweepRun], x_key: str, y_key: str, metric: str, path: Path) -> None:
    """A heatmap of `metric` over two swept keys (cells without a finished run stay blank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    def order(values: set[str]) -> list[str]:
        try:
            return sorted(values, key=float)
        except ValueError:
            return sorted(values)

    xs = order({r.overrides[x_key] for r in runs if x_key in r.overrides})
    ys = order({r.overrides[y_key] for r in runs if y_key in r.overrides})
    grid = np.full((len(ys), len(xs)), np.nan)
    for r in runs:
        if x_key in r.overrides and y_key in r.overrides and r.metrics.get(metric) is not None:
            grid[ys.index(r.overrides[y_key]), xs.index(r.overrides[x_key])] = r.metrics[metric]
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 2.5, 0.9 * len(ys) + 2))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set_xticks(range(len(xs)), xs)
    ax.set_yticks(range(len(ys)), ys)
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    for i in range(len(ys)):
        for j in range(len(xs)):
            if not np.isnan(grid[i, j]):
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="w" if grid[i, j] < 0.6 else "k",
                )
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_title(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
