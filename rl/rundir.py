"""A run directory belongs to one configuration.

`python scripts/train.py` writes everything into `output_dir` (default `outputs/train`): `config.yaml` (the
resolved configuration), `metrics.jsonl`, `checkpoints/`, `summary.json`, plots, W&B files, `best/` and `final/`. Rerunning
the same command there resumes it (`trainer.resume=auto`). At start, before any model is loaded and before a
file is touched, `plan_run` compares the configuration with the one saved there:

- the same, except for `RESUMABLE` keys (run length, evaluation and checkpoint cadence, logging, and where the
  run lives): resume. Extending `trainer.max_steps` stretches the cosine decay to the new end from the
  resumed step on;
- anything else differs: refused, naming each differing key with both values. Another configuration needs
  another `output_dir`, or `trainer.resume=overwrite`, which deletes the run's own files and starts over;
- `trainer.resume=never`: start fresh, and refuse a directory that already holds a run.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

CONFIG_FILE = "config.yaml"
RESUMABLE = (
    "output_dir",
    "trainer.max_steps",
    "trainer.eval_every",
    "trainer.save_every",
    "trainer.keep_last",
    "trainer.diag_every",
    "trainer.engine",  # the engines draw the same noise and differ in float rounding only
    "trainer.resume",
    "logger.",  # every logger key: W&B mode, project, names, tags
)
"""Keys that may differ between a run directory's saved configuration and a run resuming it."""
BEST_DIR = "best"
"""`output_dir/best/`: the policy `trainer.select_best` selected (rl/trainer.py), written through `best.tmp` and
`best.old`."""
RUN_FILES = (
    CONFIG_FILE,
    BEST_DIR,
    f"{BEST_DIR}.tmp",
    f"{BEST_DIR}.old",
    "metrics.jsonl",
    "checkpoints",
    "summary.json",
    "final",
    "wandb",
    "wandb_run_id",
    "passk.png",
    "curves.png",
)
"""What a training run writes into its directory (and `trainer.resume=overwrite` deletes)."""
RESUME_MODES = ("auto", "never", "overwrite")


class RunDirError(ValueError):
    """The run directory cannot be used for this configuration; nothing was touched."""


@dataclass(frozen=True)
class RunPlan:
    """`resume`: continue the run saved in `path`; `overwrite`: delete its files first (`clear`)."""

    path: Path
    resume: bool
    overwrite: bool

    def clear(self) -> None:
        """Delete the run's own files (RUN_FILES), nothing else in the directory."""
        for name in RUN_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping; lists are values.

    >>> flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
    {'a.b': 1, 'a.c': [1, 2], 'd': None}
    """
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every non-resumable key whose values differ ('<absent>' when a
    key is missing on one side).

    >>> config_differences({"cot": {"mode": "soft"}, "trainer": {"max_steps": 5}},
    ...                    {"cot": {"mode": "fuzzy"}, "trainer": {"max_steps": 9}})
    [('cot.mode', 'soft', 'fuzzy')]
    """
    a, b = flatten(saved), flatten(current)
    missing = "<absent>"
    return [
        (key, a.get(key, missing), b.get(key, missing))
        for key in sorted(set(a) | set(b))
        if not resumable(key) and a.get(key, missing) != b.get(key, missing)
    ]


def used(path: Path) -> list[str]:
    """The run files present in `path`."""
    return [name for name in RUN_FILES if (path / name).exists()]


def config_yaml(cfg: Any) -> str:
    """The resolved configuration as the run directory keeps it (`config.yaml`), from the typed config."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def plan_run(path: str | Path, config_yaml: str, resume: str) -> RunPlan:
    """Decide how a run with the resolved configuration `config_yaml` starts in `path` (module docstring).
    Reads only; raises `RunDirError` naming what stands in the way."""
    if resume not in RESUME_MODES:
        raise RunDirError(f"trainer.resume={resume!r}: expected one of {RESUME_MODES}")
    path = Path(path)
    present = used(path)
    if resume == "overwrite":
        return RunPlan(path, resume=False, overwrite=bool(present))
    if not present:
        return RunPlan(path, resume=False, overwrite=False)
    if resume == "never":
        raise RunDirError(
            f"output_dir={path} already holds a run ({', '.join(present)}) and trainer.resume=never: choose "
            "another output_dir, or trainer.resume=overwrite to delete that run and start over"
        )
    saved_file = path / CONFIG_FILE
    if not saved_file.is_file():
        raise RunDirError(
            f"output_dir={path} holds run files ({', '.join(present)}) but no {CONFIG_FILE}, so it cannot be "
            "resumed safely: choose another output_dir, or trainer.resume=overwrite to delete them"
        )
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    differences = config_differences(saved, yaml.safe_load(config_yaml) or {})
    if differences:
        lines = "\n".join(f"  {key}: {old!r} (saved) -> {new!r} (now)" for key, old, new in differences)
        allowed = ", ".join(r + "*" if r.endswith(".") else r for r in RESUMABLE)
        raise RunDirError(
            f"output_dir={path} holds a run with another configuration:\n{lines}\n"
            f"A resumed run may change only {allowed}. Choose another output_dir, or trainer.resume=overwrite "
            "to delete that run and start over."
        )
    return RunPlan(path, resume=True, overwrite=False)
