"""pass@k: the unbiased estimator of Chen et al. (2021) and its aggregation over problems."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct: `1 - C(n-c, k) / C(n, k)`.

    Computed as `1 - prod_{i=n-c+1}^{n} (1 - k/i)`, which equals the ratio of binomials but never forms
    them (C(n, k) overflows a float for n in the hundreds).

    >>> pass_at_k(10, 0, 1), round(pass_at_k(10, 3, 1), 12), pass_at_k(10, 10, 5)  # pass@1 = c/n
    (0.0, 0.3, 1.0)
    >>> round(pass_at_k(4, 1, 2), 6)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


@dataclass(frozen=True)
class PassAtK:
    """Mean pass@k over the problems that could be judged with at least k samples.

    `problems[k]` is how many problems entered the mean for `k`; `skipped[k]` how many did not (fewer than
    k judged samples: a None reward is not a failure).
    """

    values: dict[int, float]
    problems: dict[int, int]
    skipped: dict[int, int]


def pass_at_k_per_problem(rewards: Sequence[float | None], k: int) -> float | None:
    """pass@k of one problem from its samples' correctness rewards (1.0 correct, 0.0 not, None unjudged).
    None when fewer than k samples were judged.

    >>> round(pass_at_k_per_problem([1.0, 0.0, None, 0.0], 2), 12)  # n=3 judged, c=1: 1 - C(2,2)/C(3,2)
    0.666666666667
    >>> pass_at_k_per_problem([None, 1.0], 2) is None
    True
    """
    judged = [r for r in rewards if r is not None]
    bad = [r for r in judged if r not in (0.0, 1.0)]
    if bad:
        raise ValueError(f"pass@k needs correctness rewards in {{0.0, 1.0}}, got {bad[:5]}")
    if len(judged) < k:
        return None
    return pass_at_k(len(judged), int(sum(judged)), k)


def aggregate_pass_at_k(rewards_per_problem: Sequence[Sequence[float | None]], ks: Sequence[int]) -> PassAtK:
    """Mean pass@k over problems, for each k in `ks`.

    >>> table = aggregate_pass_at_k([[1.0, 0.0], [0.0, 0.0], [None, None]], ks=[1, 2])
    >>> table.values, table.problems, table.skipped
    ({1: 0.25, 2: 0.5}, {1: 2, 2: 2}, {1: 1, 2: 1})
    """
    values: dict[int, float] = {}
    problems: dict[int, int] = {}
    skipped: dict[int, int] = {}
    for k in ks:
        per_problem = [pass_at_k_per_problem(r, k) for r in rewards_per_problem]
        judged = [p for p in per_problem if p is not None]
        problems[k] = len(judged)
        skipped[k] = len(per_problem) - len(judged)
        values[k] = sum(judged) / len(judged) if judged else float("nan")
    return PassAtK(values=values, problems=problems, skipped=skipped)


@dataclass(frozen=True)
class PairedLift:
    """after - before of a per-problem score over the problems judged in both evaluations, with the standard
    error of that mean (sample standard deviation of the per-problem differences / sqrt(problems)). Pairing by
    problem removes the spread of problem difficulty from the error, which an unpaired comparison keeps."""

    mean: float
    se: float
    problems: int


def paired_lift(before: Sequence[float | None], after: Sequence[float | None]) -> PairedLift:
    """The paired lift of per-problem scores (e.g. pass@1 = c/n), problem i of `before` against problem i of
    `after`; problems unjudged (None) in either are left out. Fewer than 2 paired problems: se is NaN.

    >>> lift = paired_lift([0.0, 0.5, 1.0, None], [0.5, 0.5, 1.0, 1.0])  # diffs 0.5, 0, 0: mean 1/6
    >>> lift.problems, round(lift.mean * 6, 12), round(lift.se * 6, 12)  # variance (1/9+1/36+1/36)/2 = 1/12
    (3, 1.0, 1.0)
    """
    if len(before) != len(after):
        raise ValueError(
            f"paired_lift: {len(before)} problems before, {len(after)} after; pair them by problem"
        )
    diffs = [a - b for b, a in zip(before, after, strict=True) if a is not None and b is not None]
    m = len(diffs)
    if m == 0:
        return PairedLift(float("nan"), float("nan"), 0)
    mean = sum(diffs) / m
    if m < 2:
        return PairedLift(mean, float("nan"), m)
    variance = sum((d - mean) ** 2 for d in diffs) / (m - 1)
    return PairedLift(mean, (variance / m) ** 0.5, m)
