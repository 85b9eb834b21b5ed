"""Typed statistics of one training step, and how each one merges across processes.

- `UpdateStats`: what the learner measured in one update (rl/learner.py), per process. Each field declares its
  merge rule in its definition, and only there (`summed`, `shared`, `weighted_by(count field)`, `averaged`),
  and `merge_stats` applies the rules: N processes' records merge into what one process holding the whole
  batch would have measured.
- `StepSample`: the per-rollout facts of one step that the metrics need (rewards, statuses, lengths), small
  enough to gather from every process; `StepSample.merge` concatenates them.
- `StepStats`: the logged metrics of one step (metrics.jsonl / W&B, under the names `as_metrics` gives), from
  the global `StepSample` and the merged `UpdateStats` (`step_stats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from rewards import STATUSES, Result
from rl.advantages import AdvantageConfig, compute_advantages
from rl.logprobs import SequenceLogProbs, log_prob_gap
from rl.loss import LossOutput
from rollouts.record import THINK_END_REASONS, Rollouts

MERGE_RULES = ("sum", "shared", "weighted", "averaged")


def summed(default: Any = 0.0) -> Any:
    """Merged by adding: each process holds its part of a global sum (loss terms already divided by the global
    normaliser)."""
    return field(default=default, metadata={"merge": "sum"})


def count() -> Any:
    """A step count behind a weighted mean: merged by adding, not logged."""
    return field(default=0, metadata={"merge": "sum", "logged": False})


def shared(default: Any = 0.0) -> Any:
    """Equal on every process (computed after the gradients were summed): merged by taking process 0's."""
    return field(default=default, metadata={"merge": "shared"})


def weighted_by(count: str, default: float = 0.0) -> Any:
    """A per-step mean, merged weighted by each process's `count` field (the steps it averaged over)."""
    return field(default=default, metadata={"merge": "weighted", "weight": count})


def averaged(default: float = math.nan) -> Any:
    """Measured by each process on its own share (no global equivalent): merged as the plain mean."""
    return field(default=default, metadata={"merge": "averaged"})


def weighted_mean(pairs: list[tuple[float, float]]) -> float:
    """Σ value·weight / Σ weight over (value, weight) pairs; 0 when the weights sum to 0.

    >>> weighted_mean([(1.0, 1), (4.0, 2)]), weighted_mean([(5.0, 0)])
    (3.0, 0.0)
    """
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else 0.0


def merge_stats(parts: list[Any]) -> Any:
    """One record of the same type from every process's record, field by field under each field's rule.

    >>> merged = merge_stats([UpdateStats(gap_cot=0.25, scored_cot=1, lr=0.1),
    ...                       UpdateStats(gap_cot=0.625, scored_cot=2, lr=0.1)])
    >>> merged.gap_cot, merged.scored_cot, merged.lr
    (0.5, 3, 0.1)
    """
    values: dict[str, Any] = {}
    for f in fields(parts[0]):
        column = [getattr(p, f.name) for p in parts]
        rule = f.metadata.get("merge")
        if rule == "sum":
            values[f.name] = sum(column)
        elif rule == "shared":
            values[f.name] = column[0]
        elif rule == "weighted":
            weight = f.metadata["weight"]
            values[f.name] = weighted_mean([(getattr(p, f.name), getattr(p, weight)) for p in parts])
        elif rule == "averaged":
            values[f.name] = sum(column) / len(column)
        else:
            raise TypeError(f"{type(parts[0]).__name__}.{f.name}: no merge rule (one of {MERGE_RULES})")
    return type(parts[0])(**values)


@dataclass
class UpdateStats:
    """The learner's statistics of one update (its first PPO pass; grad norm and lr of that pass's step)."""

    noise_ratio: float = weighted_by("scored_cot")  # ‖h - μ‖ / ‖μ‖ per CoT step (soft / fuzzy); 0 for hard
    gap_cot: float = weighted_by("scored_cot")  # mean |rollout - learner| log-prob per CoT step (nats)
    gap_answer: float = weighted_by("scored_answer")
    clip_fraction: float = weighted_by("loss_steps")
    kl_cot: float = weighted_by("loss_cot")
    kl_answer: float = weighted_by("loss_answer")
    loss: float = summed()
    cot_term: float = summed()
    answer_term: float = summed()
    grad_norm: float = shared()
    # ‖∇ unweighted CoT term‖ (first micro-batch, first pass) every `diag_every` steps, else NaN
    cot_grad_norm: float = averaged()
    lr: float = shared()
    skipped: bool = shared(False)  # a pass's optimizer step was skipped (non-finite loss or gradient)
    scored_cot: int = count()  # CoT steps the learner scored
    scored_answer: int = count()
    loss_cot: int = count()  # CoT steps in the loss (judged rows)
    loss_answer: int = count()
    loss_steps: int = count()  # loss_cot + loss_answer

    def as_metrics(self) -> dict[str, float]:
        """Every field but the step counts, under its own name."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self) if f.metadata.get("logged", True)}


def noise_ratio(scored: list[tuple[Rollouts, SequenceLogProbs]]) -> float:
    """Mean over CoT steps of ‖h_t - μ_t‖ / ‖μ_t‖: how loud the exploration noise is next to the mixture
    (0 for hard CoT). μ_t is the learner's, from the same forward pass as the loss."""
    num, count = 0.0, 0
    for part, new in scored:
        if new.mu is None or part.cot_inputs is None:
            continue
        mu = new.mu.detach().float()  # [N, T, d]
        ratio = (part.cot_inputs.to(mu.device) - mu).norm(dim=-1) / mu.norm(dim=-1).clamp(min=1e-12)  # [N, T]
        num += float(ratio[new.cot_mask].sum())
        count += int(new.cot_mask.sum())
    return num / count if count else 0.0


def loss_stats(
    outs: list[LossOutput], scored: list[tuple[Rollouts, SequenceLogProbs]], grad_norm: float, lr: float
) -> UpdateStats:
    """The update's statistics from its micro-batches' `LossOutput`s and (rollouts, learner log-probs) pairs:
    terms are summed (each was already divided by the global normaliser), per-step means are weighted by each
    micro-batch's step count."""
    cot_steps = [int(new.cot_mask.sum()) for _, new in scored]
    answer_steps = [int(new.answer_mask.sum()) for _, new in scored]
    gaps = [log_prob_gap(part, new) for part, new in scored]
    return UpdateStats(
        noise_ratio=noise_ratio(scored),
        loss=sum(float(o.loss.detach()) for o in outs),
        cot_term=sum(o.cot_term for o in outs),
        answer_term=sum(o.answer_term for o in outs),
        clip_fraction=weighted_mean([(o.clip_fraction, o.num_cot_steps + o.num_answer_steps) for o in outs]),
        kl_cot=weighted_mean([(o.kl_cot, o.num_cot_steps) for o in outs]),
        kl_answer=weighted_mean([(o.kl_answer, o.num_answer_steps) for o in outs]),
        gap_cot=weighted_mean([(g.cot, n) for g, n in zip(gaps, cot_steps, strict=True)]),
        gap_answer=weighted_mean([(g.answer, n) for g, n in zip(gaps, answer_steps, strict=True)]),
        grad_norm=grad_norm,
        lr=lr,
        scored_cot=sum(cot_steps),
        scored_answer=sum(answer_steps),
        loss_cot=sum(o.num_cot_steps for o in outs),
        loss_answer=sum(o.num_answer_steps for o in outs),
        loss_steps=sum(o.num_cot_steps + o.num_answer_steps for o in outs),
    )


@dataclass
class StepSample:
    """Per-rollout facts of one step that the metrics need: small enough to gather from every process."""

    rewards: list[float | None]
    statuses: list[str]
    group_index: list[int]
    cot_len: list[int]
    answer_len: list[int]
    think_end: list[int]
    entropy_sum: float  # Σ H(p_t) over real CoT steps
    entropy_steps: int

    @staticmethod
    def of(rollouts: Rollouts, rewards: list[float | None], results: list[Result]) -> StepSample:
        return StepSample(
            rewards=list(rewards),
            statuses=[r.status for r in results],
            group_index=rollouts.group_index.tolist(),
            cot_len=rollouts.cot_lengths.tolist(),
            answer_len=rollouts.answer_lengths.tolist(),
            think_end=rollouts.think_end.tolist(),
            entropy_sum=float(rollouts.cot_entropy[rollouts.cot_mask].sum()),
            entropy_steps=int(rollouts.cot_mask.sum()),
        )

    @staticmethod
    def merge(parts: list[StepSample]) -> StepSample:
        """One sample of all processes' rollouts (group indices offset so that groups stay distinct)."""
        merged = StepSample([], [], [], [], [], [], 0.0, 0)
        for p in parts:
            offset = max(merged.group_index, default=-1) + 1
            merged.rewards += p.rewards
            merged.statuses += p.statuses
            merged.group_index += [g + offset for g in p.group_index]
            merged.cot_len += p.cot_len
            merged.answer_len += p.answer_len
            merged.think_end += p.think_end
            merged.entropy_sum += p.entropy_sum
            merged.entropy_steps += p.entropy_steps
        return merged


@dataclass
class StepStats:
    """Per-step metrics, logged to metrics.jsonl / W&B under these names (see `as_metrics`)."""

    reward_mean: float
    reward_std: float
    reward_status: dict[str, int]
    adv_mean: float
    adv_std: float
    adv_abs_mean: float
    cot_len: float
    answer_len: float
    think_end: dict[str, float]  # fraction of rollouts per reason
    cot_entropy: float
    update: UpdateStats  # logged under its own field names (`UpdateStats.as_metrics`)
    tokens_per_s: float
    step_time: float

    def as_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, UpdateStats):
                out.update(value.as_metrics())
            elif isinstance(value, dict):
                out.update({f"{f.name}/{k}": float(v) for k, v in value.items()})
            else:
                out[f.name] = float(value)
        return out


def step_stats(
    sample: StepSample, update: UpdateStats, adv_cfg: AdvantageConfig, seconds: float
) -> StepStats:
    """The metrics of one step from its (global) rollout facts and (merged) update statistics."""
    judged = torch.tensor([r for r in sample.rewards if r is not None], dtype=torch.float32)
    adv = compute_advantages(sample.rewards, torch.tensor(sample.group_index), adv_cfg)
    adv_vals = adv.values[adv.mask]
    cot_len = torch.tensor(sample.cot_len, dtype=torch.float32)
    ans_len = torch.tensor(sample.answer_len, dtype=torch.float32)
    n = len(sample.rewards)
    reasons = torch.bincount(torch.tensor(sample.think_end), minlength=len(THINK_END_REASONS)).float()
    tokens = float(cot_len.sum() + ans_len.sum())
    return StepStats(
        reward_mean=float(judged.mean()) if judged.numel() else float("nan"),
        reward_std=float(judged.std(unbiased=False)) if judged.numel() else float("nan"),
        reward_status={s: sample.statuses.count(s) for s in STATUSES},
        adv_mean=float(adv_vals.mean()) if adv_vals.numel() else 0.0,
        adv_std=float(adv_vals.std(unbiased=False)) if adv_vals.numel() else 0.0,
        adv_abs_mean=float(adv_vals.abs().mean()) if adv_vals.numel() else 0.0,
        cot_len=float(cot_len.mean()),
        answer_len=float(ans_len.mean()),
        think_end={r: float(reasons[i] / n) for i, r in enumerate(THINK_END_REASONS)},
        cot_entropy=sample.entropy_sum / sample.entropy_steps if sample.entropy_steps else 0.0,
        update=update,
        tokens_per_s=tokens / seconds,
        step_time=seconds,
    )
