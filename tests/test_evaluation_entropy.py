"""The CoT entropy profile of an evaluation (paper Fig. 4): mean H(p_t) at each CoT index over the samples that
reached it, its sample counts, the deterministic-mode repeats, summary.json and entropy.png end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl.evaluation import _summarize, entropy_by_position, plot_entropy_by_position

REPO = Path(__file__).resolve().parents[1]


def test_mean_at_each_position_is_over_the_samples_that_reached_it() -> None:
    # four samples with CoT lengths 3, 2, 1, 0; a shorter CoT is padding past its end and must not count
    #   t=0: (0.5 + 1.5 + 1.0) / 3 = 1.0   over 3 samples (the empty CoT has no step 0)
    #   t=1: (1.0 + 2.0) / 2       = 1.5   over 2
    #   t=2: 1.5 / 1               = 1.5   over 1
    means, counts = entropy_by_position([[0.5, 1.0, 1.5], [1.5, 2.0], [1.0], []])
    assert means == pytest.approx([1.0, 1.5, 1.5])
    assert counts == [3, 2, 1]


def test_no_cot_steps_give_an_empty_profile() -> None:
    assert entropy_by_position([[], []]) == ([], [])
    assert entropy_by_position([]) == ([], [])


def _row(entropies: list[list[float]]) -> dict:
    """A samples.jsonl-shaped row whose samples have the given per-step entropies."""
    return {
        "samples": [
            {"cot_top1_ids": [7] * len(e), "answer_ids": [1, 2], "reward": 0.0, "think_end": "token",
             "cot_entropy": e}
            for e in entropies
        ]
    }  # fmt: skip


def test_deterministic_repeats_count_each_copy_and_keep_the_mean() -> None:
    # a deterministic mode rolls out once per problem and repeats the sample n = 4 times; counting the copies
    # weights each rollout by n, the same for every rollout, so the means are those of the two rollouts alone:
    #   t=0: (4·2.0 + 4·1.0) / 8 = 1.5 = (2.0 + 1.0) / 2;  t=1: 4·3.0 / 4 = 3.0;  counts 4× those of one copy
    once = [[2.0, 3.0], [1.0]]
    rows = [_row([e] * 4) for e in once]
    summary = _summarize(rows, [], "hard_greedy", 4, 0.0, seconds=1.0, generated=2)
    assert summary.cot_entropy_by_position == pytest.approx([1.5, 3.0])
    assert summary.samples_at_position == [8, 4]
    means, counts = entropy_by_position(once)
    assert summary.cot_entropy_by_position == pytest.approx(means)
    assert summary.samples_at_position == [4 * c for c in counts]


def test_plot_draws_several_profiles_of_different_lengths(tmp_path: Path) -> None:
    curves = {"base": [2.0, 1.8, 1.5, 1.4], "soft trained": [1.9, 1.7], "hard trained": [0.4, 0.2, 0.1]}
    plot_entropy_by_position(curves, tmp_path / "with_counts.png", counts={"base": [8, 8, 6, 2]})
    plot_entropy_by_position(curves, tmp_path / "plain.png", title="base vs trained")
    assert (tmp_path / "with_counts.png").stat().st_size > 1000
    assert (tmp_path / "plain.png").stat().st_size > 1000


def evaluate(out: Path, tiny_base: Path, mode: str, n: int) -> dict:
    """scripts/evaluate.py on the tiny base, shrunk to 12 synthetic problems; returns summary.json."""
    done = subprocess.run(
        [sys.executable, "scripts/evaluate.py", f"model.path={tiny_base}", "data=synthetic", "data.limit=12",
         f"infer={mode}", f"n={n}", f"output_dir={out}", "reward.workers=1", "reward.spare_workers=0"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("mode", ["soft_sample", "hard_greedy"])
def test_evaluate_writes_the_entropy_profile_and_plot(tiny_base: Path, tmp_path: Path, mode: str) -> None:
    out = tmp_path / mode
    summary = evaluate(out, tiny_base, mode, n=4)
    assert (out / "entropy.png").stat().st_size > 1000
    samples = [s for x in (out / "samples.jsonl").read_text().splitlines() for s in json.loads(x)["samples"]]
    assert len(samples) == 48
    assert all(len(s["cot_entropy"]) == len(s["cot_top1_ids"]) for s in samples)  # one H per real CoT step
    assert all(h >= 0 for s in samples for h in s["cot_entropy"])
    means, counts = summary["cot_entropy_by_position"], summary["samples_at_position"]
    longest = max(len(s["cot_entropy"]) for s in samples)
    assert len(means) == len(counts) == longest > 0
    # the first entry: the plain mean of step 0's entropy over every sample that has a step 0
    first = [s["cot_entropy"][0] for s in samples if s["cot_entropy"]]
    assert counts[0] == len(first) and means[0] == pytest.approx(sum(first) / len(first))
    for t in range(longest):  # and so on at every position
        at_t = [s["cot_entropy"][t] for s in samples if len(s["cot_entropy"]) > t]
        assert counts[t] == len(at_t) and means[t] == pytest.approx(sum(at_t) / len(at_t)), t


def test_greedy_profile_over_n_copies_equals_the_single_rollout_profile(
    tiny_base: Path, tmp_path: Path
) -> None:
    """hard_greedy with n=4 repeats each problem's one rollout 4 times: the same means as n=1, 4× the counts."""
    one = evaluate(tmp_path / "n1", tiny_base, "hard_greedy", n=1)
    four = evaluate(tmp_path / "n4", tiny_base, "hard_greedy", n=4)
    assert four["cot_entropy_by_position"] == pytest.approx(one["cot_entropy_by_position"])
    assert four["samples_at_position"] == [4 * c for c in one["samples_at_position"]]
