"""sweep_report gathers Hydra run directories into a table and a heatmap; unfinished runs are listed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl.sweep import find_runs, read_run

REPO = Path(__file__).resolve().parents[1]


def fake_run(root: Path, noise: str, temp: str, after: float | None) -> None:
    run = root / f"cot.noise_scale={noise},cot.temperature={temp}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(f"- cot.noise_scale={noise}\n- cot.temperature={temp}\n")
    if after is not None:
        block = lambda v: {"primary": "soft_sample", "soft_sample": {"pass@1": v, "pass@2": min(1.0, 2 * v)}}
        after_block = block(after)
        # the trainer's paired lift (mean over problems of after - before pass@1, and its standard error)
        after_block["soft_sample"]["lift_pass@1"] = {"mean": after - 0.1, "se": 0.02, "problems": 200}
        (run / "summary.json").write_text(json.dumps({"eval_before": block(0.1), "eval_after": after_block}))


def test_sweep_report_table_and_heatmap(tmp_path: Path) -> None:
    fake_run(tmp_path, "0.1", "0.5", 0.3)
    fake_run(tmp_path, "0.33", "0.5", 0.45)
    fake_run(tmp_path, "1.0", "0.5", None)  # crashed or still running
    runs = [read_run(p) for p in find_runs(tmp_path)]
    assert [r.status for r in runs] == ["done", "done", "incomplete"]
    assert runs[1].metrics == {
        "before/pass@1": 0.1,
        "before/pass@2": 0.2,
        "after/pass@1": 0.45,
        "after/pass@2": 0.9,
        "lift/pass@1": 0.45 - 0.1,
        "lift_se/pass@1": 0.02,
    }
    out = subprocess.run(
        [sys.executable, "scripts/sweep_report.py", str(tmp_path), "--x", "cot.noise_scale", "--y", "cot.temperature"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "| 0.33 | 0.5 | 0.100 | 0.200 | 0.450 | 0.900 | 0.350 | 0.020 | done |" in out.stdout
    assert "| 1.0 | 0.5 |  |  |  |  |  |  | incomplete |" in out.stdout
    assert (tmp_path / "sweep_heatmap.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "sweep.json").read_text())) == 3


def test_missing_mode_is_named(tmp_path: Path) -> None:
    fake_run(tmp_path, "0.1", "0.5", 0.3)
    with pytest.raises(KeyError, match="hard_greedy"):
        read_run(find_runs(tmp_path)[0], "hard_greedy")
