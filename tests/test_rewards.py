"""Unit tests for the pure parts of `rewards`: extraction, the in-process judge per status, the format
reward, reward combination and pass@k. No worker processes here (see test_rewards_pool.py)."""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path

import pytest

from rewards import (
    STATUSES,
    Result,
    RewardConfig,
    aggregate_pass_at_k,
    answer_phase,
    combine_rewards,
    format_reward,
    gold_candidates,
    gsm8k_gold,
    judge,
    last_boxed,
    normalize_gold,
    pass_at_k,
    pass_at_k_per_problem,
    status_counts,
)

CFG = RewardConfig(workers=1)


# --- extraction -------------------------------------------------------------------------------------------


def test_answer_phase_uses_last_delimiter() -> None:
    text = "<think>a</think>b</think>c"
    assert answer_phase(text, "</think>") == "c"
    assert answer_phase(text, "<end>") == text  # absent delimiter: whole text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{1} then \boxed{2}", "2"),  # the last box wins
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),  # nested braces
        (r"\fbox{7}", "7"),
        (r"$\boxed 12$", "12"),  # no braces: next token, stopping at $
        (r"\boxed {3}", "3"),  # space before the brace
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces do not close the group
        (r"\boxed{a\\}", r"a\\"),  # `\\` is a line break, so the `}` after it closes
        (r"\boxedx{5}", None),  # not the \boxed control word
        (r"\boxed{1} \boxed{2", None),  # last box unclosed: no fallback to the earlier one
        ("no box at all", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_last_boxed_thousands_of_nested_braces_is_linear() -> None:
    depth = 20_000  # far past Python's recursion limit: the scanner must not recurse
    text = r"\boxed{" + "{" * depth + "1" + "}" * depth + "}"
    assert last_boxed(text) == "{" * depth + "1" + "}" * depth


def test_gold_normalisation() -> None:
    assert normalize_gold(" 1,450,000 ") == "1450000"  # GSM8K thousands separators
    assert normalize_gold("-2,125.50") == "-2125.50"
    assert normalize_gold("1,2") == "1,2"  # not groups of three: a list, untouched
    assert normalize_gold("$x^2$") == "x^2"  # OlympiadBench $-delimited
    assert normalize_gold("$1$ or $2$") == "$1$ or $2$"  # inner $: not a single math span
    assert gold_candidates(["$2$", "3"]) == ("2", "3")
    with pytest.raises(TypeError, match="sequence of str"):
        gold_candidates([1, 2])  # type: ignore[list-item]


def test_gsm8k_gold() -> None:
    assert gsm8k_gold("work\n#### 1,450,000") == "1,450,000"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker")


# --- one test per status (in-process judge; the pool adds timeout and error) ---------------------------


def test_status_ok_equivalent_forms() -> None:
    # 1/2 == 0.5 == \frac{2}{4}: math-verify compares values, not strings.
    for completion in [r"\boxed{0.5}", r"\boxed{\frac{2}{4}}", r"<think>\boxed{9}</think> so \boxed{1/2}"]:
        assert judge(completion, r"\frac{1}{2}", CFG) == Result(1.0, "ok")


def test_status_wrong() -> None:
    assert judge(r"\boxed{3}", "2", CFG) == Result(0.0, "wrong")
    # The CoT's box does not count: only the answer phase is read.
    assert judge(r"<think>\boxed{2}</think>\boxed{3}", "2", CFG).status == "wrong"
    too_long = judge(r"\boxed{" + "1" * (CFG.max_answer_chars + 1) + "}", "1", CFG)
    assert (too_long.reward, too_long.status) == (0.0, "wrong") and "too_long" in too_long.detail


def test_status_no_answer() -> None:
    for completion in ["The answer is 2.", r"\boxed{}", r"\boxed{2}</think> the answer is 2"]:
        assert judge(completion, "2", CFG) == Result(0.0, "no_answer"), completion


def test_status_gold_unparseable_is_none_not_zero() -> None:
    for gold in ["", "   ", ["", "$$"]]:
        result = judge(r"\boxed{2}", gold, CFG)
        assert result.reward is None and result.status == "gold_unparseable", gold


def test_gold_list_any_match() -> None:
    assert judge(r"\boxed{3}", ["$2$", "$3$"], CFG).status == "ok"
    assert judge(r"\boxed{4}", ["$2$", "$3$"], CFG).status == "wrong"


def test_code_like_answer_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    for code in [f"__import__('os').system('touch {marker}')", f"exec(\"open('{marker}', 'w')\")"]:
        assert judge(r"\boxed{" + code + "}", "0", CFG).status == "wrong"
    assert not marker.exists()


def test_status_counts_has_all_statuses() -> None:
    counts = status_counts([Result.of("wrong"), Result.of("error"), Result.of("error")])
    assert list(counts) == list(STATUSES)
    assert counts == {"ok": 0, "wrong": 1, "no_answer": 0, "timeout": 0, "gold_unparseable": 0, "error": 2}
    with pytest.raises(ValueError, match="unknown status"):
        Result.of("maybe")


# --- format reward and combination ------------------------------------------------------------------------


def test_format_reward_cases() -> None:
    completions = [
        r"<think>x</think>\boxed{1}",  # well formed
        r"x</think>\boxed{1}",  # <think> in the prompt: fine
        r"<think>x</think>1",  # no box
        r"<think>x</think></think>\boxed{1}",  # two think ends
        r"</think><think>\boxed{1}",  # start after end
        r"\boxed{1}",  # no delimiter at all
    ]
    assert format_reward(completions, ["1"] * 6, CFG) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_combine_rewards() -> None:
    # 1.0*1 + 0.5*1 = 1.5; 1.0*0 + 0.5*1 = 0.5; None in a weighted term -> None.
    assert combine_rewards([[1.0, 0.0, None], [1.0, 1.0, 1.0]], [1.0, 0.5]) == [1.5, 0.5, None]
    with pytest.raises(ValueError, match="differ in length"):
        combine_rewards([[1.0], [1.0, 0.0]], [1.0, 1.0])


# --- pass@k -----------------------------------------------------------------------------------------------


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    """Definition: the fraction of k-subsets of the n samples that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(("n", "c", "k"), [(5, 0, 1), (5, 1, 1), (6, 2, 3), (8, 3, 4), (7, 6, 2), (4, 4, 4)])
def test_pass_at_k_matches_definition(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_matches_exact_binomials() -> None:
    # C(1000, 32) ~ 1e60: the product form must agree with exact integer arithmetic.
    n, c, k = 1000, 7, 32
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, rel=1e-12)  # pass@1 is the success rate


def test_pass_at_k_rejects_bad_arguments() -> None:
    for n, c, k in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError, match=f"n={n}, c={c}, k={k}"):
            pass_at_k(n, c, k)


def test_pass_at_k_aggregation() -> None:
    per_problem = [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, None, 0.0], [None, None, None, None]]
    # problem 0: pass@1 = 1/4, pass@2 = 1 - C(3,2)/C(4,2) = 1/2
    # problem 1 (n=3 judged, c=2): pass@1 = 2/3, pass@2 = 1 - C(1,2)/C(3,2) = 1
    # problem 2: nothing judged -> skipped, never counted as a failure
    table = aggregate_pass_at_k(per_problem, ks=[1, 2, 4])
    assert table.values[1] == pytest.approx((1 / 4 + 2 / 3) / 2)
    assert table.values[2] == pytest.approx((1 / 2 + 1) / 2)
    assert table.values[4] == pytest.approx(1.0)  # only problem 0 has 4 judged samples, and it has a hit
    assert table.problems == {1: 2, 2: 2, 4: 1} and table.skipped == {1: 1, 2: 1, 4: 2}
    with pytest.raises(ValueError, match="correctness rewards"):
        pass_at_k_per_problem([1.1, 0.0], 1)
