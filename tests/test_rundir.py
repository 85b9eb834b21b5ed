"""A run directory belongs to one configuration (rl/rundir.py): resume when the saved config agrees except for
the resumable keys, refuse otherwise before touching anything, start over only when asked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from rl.rundir import RUN_FILES, RunDirError, config_differences, plan_run


def _config(**changes: object) -> dict:
    cfg = {
        "cot": {"mode": "soft", "noise_scale": 0.33},
        "rl": {"optim": {"lr": 5e-5}},
        "trainer": {"max_steps": 72, "eval_every": 0, "save_every": 50, "resume": "auto"},
        "logger": {"wandb_mode": "offline", "tags": None},
        "output_dir": "outputs/train",
    }
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return cfg


def _used_dir(tmp_path: Path, **changes: object) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(_config(**changes)))
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run / "summary.json").write_text("{}")
    (run / "best").mkdir()  # trainer.select_best's selected policy
    (run / "best" / "selected.json").write_text("{}")
    return run


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def test_an_empty_or_missing_directory_starts_fresh(tmp_path: Path) -> None:
    plan = plan_run(tmp_path / "new", yaml.safe_dump(_config()), "auto")
    assert (plan.resume, plan.overwrite) == (False, False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")  # a file the run does not own is no run
    assert not plan_run(tmp_path / "other", yaml.safe_dump(_config()), "never").resume


def test_the_same_config_resumes_and_resumable_keys_may_change(tmp_path: Path) -> None:
    run = _used_dir(tmp_path)
    assert plan_run(run, yaml.safe_dump(_config()), "auto").resume
    longer = _config(
        trainer__max_steps=200, trainer__eval_every=10, trainer__save_every=5, logger__wandb_mode="online"
    )
    longer["output_dir"] = str(run.resolve())
    assert plan_run(run, yaml.safe_dump(longer), "auto").resume


def test_another_config_is_refused_naming_every_key_with_both_values(tmp_path: Path) -> None:
    run = _used_dir(tmp_path)
    before = _tree_digest(run)
    with pytest.raises(RunDirError) as err:
        plan_run(run, yaml.safe_dump(_config(cot__mode="fuzzy", rl__optim__lr=1e-3)), "auto")
    message = str(err.value)
    assert "cot.mode: 'soft' (saved) -> 'fuzzy' (now)" in message
    assert "rl.optim.lr: 5e-05 (saved) -> 0.001 (now)" in message
    assert "noise_scale" not in message and "trainer.resume=overwrite" in message
    assert _tree_digest(run) == before  # refused before touching anything


def test_a_key_present_on_one_side_only_is_a_difference() -> None:
    saved, now = _config(), _config()
    del now["cot"]["noise_scale"]
    assert config_differences(saved, now) == [("cot.noise_scale", 0.33, "<absent>")]


def test_never_refuses_a_used_directory_and_overwrite_clears_only_run_files(tmp_path: Path) -> None:
    run = _used_dir(tmp_path)
    (run / "mine.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="already holds a run .*trainer.resume=never"):
        plan_run(run, yaml.safe_dump(_config()), "never")
    plan = plan_run(run, yaml.safe_dump(_config(cot__mode="hard")), "overwrite")
    assert plan.overwrite and not plan.resume
    plan.clear()
    assert not any((run / name).exists() for name in RUN_FILES)
    assert (run / "mine.txt").read_text() == "keep me"


def test_run_files_without_a_config_are_not_resumed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match="no config.yaml"):
        plan_run(run, yaml.safe_dump(_config()), "auto")
