"""scripts/evaluate.py end to end on the tiny model: outputs, their fields, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/evaluate.py", *args], cwd=REPO, capture_output=True, text=True
    )


@pytest.mark.parametrize("mode", ["soft_sample", "hard_greedy"])
def test_evaluate_writes_samples_summary_and_plot(tiny_base: Path, tmp_path: Path, mode: str) -> None:
    out = tmp_path / mode
    done = evaluate(f"model.path={tiny_base}", "data=synthetic", "data.limit=12", f"infer={mode}", "n=4",
                    f"output_dir={out}", "reward.workers=1", "reward.spare_workers=0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    for row in rows:
        assert set(row) >= {"prompt_ids", "answer", "samples"} and len(row["samples"]) == 4
        for s in row["samples"]:
            assert set(s) >= {"cot_top1_ids", "answer_ids", "text", "reward", "think_end"}
            assert s["text"] == tok.decode(s["cot_top1_ids"] + s["answer_ids"])
            assert s["answer_ids"][0] == tok.convert_tokens_to_ids(
                "</think>"
            )  # the answer phase opens with it
            assert s["reward"] in (0.0, 1.0)
    summary = json.loads((out / "summary.json").read_text())
    # pass@k for every power of two k <= n, by the unbiased estimator over the rows' rewards
    assert sorted(k for k in summary if k.startswith("pass@")) == ["pass@1", "pass@2", "pass@4"]
    correct = [sum(s["reward"] for s in row["samples"]) for row in rows]
    assert summary["pass@1"] == pytest.approx(sum(c / 4 for c in correct) / 12)
    assert summary["pass@4"] == pytest.approx(sum(c > 0 for c in correct) / 12)
    assert summary["per_problem_pass1"] == pytest.approx([c / 4 for c in correct])  # in row order
    assert sum(summary["think_end"].values()) == 48
    assert (out / "passk.png").stat().st_size > 1000 and (out / "config.yaml").exists()
    if mode == "hard_greedy":  # greedy: the n samples of a problem are identical
        assert all(len({json.dumps(s["answer_ids"]) for s in row["samples"]}) == 1 for row in rows)


def test_missing_model_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    done = evaluate(f"model.path={missing}", f"output_dir={tmp_path / 'o'}")
    assert done.returncode != 0 and str(missing) in done.stderr


def test_unknown_mode_is_named(tmp_path: Path) -> None:
    done = evaluate("infer=lukewarm", f"output_dir={tmp_path / 'o'}")
    assert done.returncode != 0 and "lukewarm" in done.stderr
