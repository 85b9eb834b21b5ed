"""scripts/paired_lift.py: the paired lift between evaluate.py folders, derived by hand on three problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import load_script


def write_eval(folder: Path, mode: str, rewards: dict[str, list[float]]) -> None:
    (folder / mode).mkdir(parents=True)
    rows = [{"uid": uid, "samples": [{"reward": r} for r in rs]} for uid, rs in rewards.items()]
    (folder / mode / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_lift_pairs_problems_by_uid_and_derives_the_standard_error(tmp_path: Path) -> None:
    # per-problem pass@1 before 0, 1/2, 1 and after 1/2, 1/2, 1 (after listed in another order, with n = 4):
    # differences 1/2, 0, 0, mean 1/6; sample variance ((1/3)^2 + 2 (1/6)^2) / 2 = 1/12; SE sqrt(1/12 / 3) = 1/6
    write_eval(tmp_path / "base", "hard_sample", {"a": [0, 0], "b": [1, 0], "c": [1, 1]})
    write_eval(tmp_path / "run", "hard_sample", {"c": [1, 1, 1, 1], "a": [1, 0, 0, 1], "b": [0, 1, 1, 0]})
    paired = load_script("paired_lift")
    (row,) = paired.lifts(tmp_path / "base", [tmp_path / "run"], ["hard_sample"])
    assert row["problems"] == 3 and row["lift"] == pytest.approx(1 / 6) and row["se"] == pytest.approx(1 / 6)
    assert row["pass@1_before"] == pytest.approx(0.5) and row["pass@1_after"] == pytest.approx(2 / 3)
    assert "| +0.167 ± 0.167 | +1.0 |" in paired.markdown([row])


def test_different_problems_are_refused_naming_both_folders(tmp_path: Path) -> None:
    write_eval(tmp_path / "base", "m", {"a": [1], "b": [0]})
    write_eval(tmp_path / "run", "m", {"a": [1], "z": [0]})
    with pytest.raises(ValueError, match=r"base/m and .*run/m evaluated different problems"):
        load_script("paired_lift").lifts(tmp_path / "base", [tmp_path / "run"], ["m"])
