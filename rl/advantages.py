"""Advantages from per-rollout rewards, grouped by prompt (DESIGN.md §1, Learner).

Estimators (one dispatch dict, `ESTIMATORS`):

- `grpo`: A_i = (r_i - mean_g) / (std + eps), where std is the UNBIASED (Bessel, n-1) standard deviation of
  the rewards of the row's group (`scale="group"`, DeepSeekMath / TRL), of all judged rewards in the batch
  (`scale="batch"`), or 1 (`scale="none"`: no division, identical to `dr_grpo`).
- `rloo`: A_i = r_i - mean of the other judged rewards of the group (leave-one-out; the paper's choice).
  Equal to n/(n-1) · (r_i - mean_g) for a group of n judged rewards.
- `dr_grpo`: A_i = r_i - mean_g, no std (Dr. GRPO; pair it with `LossConfig.aggregation="constant"`, which
  carries the constant normaliser instead).

Unjudged rewards (`None`: the verifier could not parse the gold answer) are never turned into 0. Such a row is
left out of every statistic (group mean, std, leave-one-out baseline, batch std), gets advantage 0 and
`mask=False`; the loss then excludes it entirely (its steps count in no denominator, it gets no KL term).
A judged row whose group has fewer than 2 judged rewards has no baseline: advantage 0, `mask=True` (it is
treated like a group whose rewards are all equal).

Shape legend: N rollouts, the G samples of one prompt share a `group_index`. Groups need not be contiguous.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SCALES = ("group", "batch", "none")


@dataclass
class AdvantageConfig:
    """`estimator`: grpo | rloo | dr_grpo; `scale` (grpo only): group | batch | none; `eps` added to the std."""

    estimator: str = "rloo"
    scale: str = "group"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"advantages.estimator={self.estimator!r}: expected one of {tuple(ESTIMATORS)}")
        if self.scale not in SCALES:
            raise ValueError(f"advantages.scale={self.scale!r}: expected one of {SCALES}")
        if self.eps < 0:
            raise ValueError(f"advantages.eps={self.eps}: must be >= 0")


@dataclass
class Advantages:
    """Per-rollout advantages and which rows take part in the loss."""

    values: torch.Tensor  # [N] float32, 0 on unjudged rows and on groups with < 2 judged rewards
    mask: torch.Tensor  # [N] bool, True where the reward was judged (not None)
    rewards: torch.Tensor  # [N] float32 rewards, 0 where unjudged (for logging with `mask`)

    @property
    def num_unjudged(self) -> int:
        return int((~self.mask).sum())

    def select(self, rows: slice) -> Advantages:
        """The rows in `rows` (for micro-batching)."""
        return Advantages(values=self.values[rows], mask=self.mask[rows], rewards=self.rewards[rows])


@dataclass
class _GroupStats:
    count: torch.Tensor  # [N] number of judged rewards in the row's group
    mean: torch.Tensor  # [N] mean judged reward of the row's group (0 when count == 0)


def _group_stats(r: torch.Tensor, judged: torch.Tensor, group_index: torch.Tensor) -> _GroupStats:
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    w = judged.to(r.dtype)  # [N]
    count = torch.zeros(num_groups, dtype=r.dtype).index_add(0, group_index, w)  # [num_groups]
    total = torch.zeros(num_groups, dtype=r.dtype).index_add(0, group_index, r * w)  # [num_groups]
    mean = total / count.clamp(min=1)
    return _GroupStats(count=count[group_index], mean=mean[group_index])


def _unbiased_std(x: torch.Tensor) -> torch.Tensor:
    return x.std(unbiased=True) if x.numel() >= 2 else torch.zeros((), dtype=x.dtype)


def grpo(
    r: torch.Tensor, judged: torch.Tensor, group_index: torch.Tensor, cfg: AdvantageConfig
) -> torch.Tensor:
    """(r - group mean) / (unbiased std + eps); which std follows `cfg.scale`.

    >>> cfg = AdvantageConfig(estimator="grpo", eps=0.0)
    >>> grpo(torch.tensor([1.0, 0.0]), torch.tensor([True, True]), torch.tensor([0, 0]), cfg)
    tensor([ 0.7071, -0.7071])
    """
    stats = _group_stats(r, judged, group_index)
    centred = r - stats.mean  # [N]
    if cfg.scale == "group":
        num_groups = int(group_index.max()) + 1
        sq = torch.zeros(num_groups, dtype=r.dtype).index_add(
            0, group_index, centred.pow(2) * judged
        )  # [groups]
        std = (sq[group_index] / (stats.count - 1).clamp(min=1)).sqrt()  # [N] unbiased group std
    elif cfg.scale == "batch":
        std = _unbiased_std(r[judged]).expand_as(r)  # [N]
    else:
        return centred
    denom = std + cfg.eps
    # a zero std means every reward of the group (batch) is equal: r - mean = 0, and 0 is the advantage
    return torch.where(denom > 0, centred / denom.clamp(min=torch.finfo(r.dtype).tiny), torch.zeros_like(r))


def rloo(
    r: torch.Tensor, judged: torch.Tensor, group_index: torch.Tensor, cfg: AdvantageConfig
) -> torch.Tensor:
    """r_i - mean of the other judged rewards in the group.

    >>> rloo(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([True] * 3), torch.tensor([0, 0, 0]), AdvantageConfig())
    tensor([ 1.0000, -0.5000, -0.5000])
    """
    stats = _group_stats(r, judged, group_index)
    n = stats.count
    baseline = (stats.mean * n - r) / (n - 1).clamp(min=1)  # [N] mean of the others
    return r - baseline


def dr_grpo(
    r: torch.Tensor, judged: torch.Tensor, group_index: torch.Tensor, cfg: AdvantageConfig
) -> torch.Tensor:
    """r - group mean (no std).

    >>> dr_grpo(torch.tensor([1.0, 0.0]), torch.tensor([True, True]), torch.tensor([0, 0]), AdvantageConfig())
    tensor([ 0.5000, -0.5000])
    """
    return r - _group_stats(r, judged, group_index).mean


Estimator = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AdvantageConfig], torch.Tensor]
ESTIMATORS: dict[str, Estimator] = {"grpo": grpo, "rloo": rloo, "dr_grpo": dr_grpo}


def compute_advantages(
    rewards: Sequence[float | None] | torch.Tensor, group_index: torch.Tensor, cfg: AdvantageConfig
) -> Advantages:
    """Rewards [N] (None = unjudged) grouped by `group_index` [N] -> `Advantages` (see module docstring).

    >>> adv = compute_advantages([1.0, None, 0.0, 0.0], torch.tensor([0, 0, 1, 1]), AdvantageConfig())
    >>> adv.values, adv.mask
    (tensor([0., 0., 0., 0.]), tensor([ True, False,  True,  True]))
    """
    if torch.is_tensor(rewards):
        r = rewards.detach().float().cpu()
        judged = torch.ones_like(r, dtype=torch.bool)
    else:
        judged = torch.tensor([x is not None for x in rewards], dtype=torch.bool)
        r = torch.tensor([0.0 if x is None else float(x) for x in rewards], dtype=torch.float32)
    gi = group_index.detach().cpu().long()
    if r.shape != gi.shape:
        raise ValueError(f"rewards has shape {tuple(r.shape)} but group_index has {tuple(gi.shape)}")
    bad = [i for i, x in enumerate(r.tolist()) if not math.isfinite(x)]
    if bad:
        raise ValueError(f"non-finite rewards at rows {bad}: {[r[i].item() for i in bad]}")
    if r.numel() == 0:
        return Advantages(values=r.clone(), mask=judged, rewards=r)
    values = ESTIMATORS[cfg.estimator](r, judged, gi, cfg)  # [N]
    count = _group_stats(r, judged, gi).count  # [N]
    values = torch.where(judged & (count >= 2), values, torch.zeros_like(values))
    return Advantages(values=values.to(group_index.device), mask=judged.to(group_index.device), rewards=r)
