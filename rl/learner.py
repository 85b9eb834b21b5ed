"""The update: from one step's rollouts and rewards to an optimizer step (DESIGN.md §1, Learner).

With rl/loss.py's numbered docstring (the objective and how it relates to GRPO and to the paper), this is the
whole algorithm after the rollouts:

1. Advantages per group of G samples of a prompt (`rl.advantages`: RLOO by default, the paper's choice).
2. The process's rollouts are cut into micro-batches of `micro_batch` rollouts (0 = one micro-batch).
3. `old` log-probs: with `num_iterations > 1`, the learner scores every micro-batch once before any update
   (no grad); with one iteration `old` is the current pass itself (ratio exactly 1). A frozen reference model's
   log-probs are scored the same way when `kl_coef > 0`.
4. `num_iterations` passes. Each pass first sums the loss normaliser over every micro-batch of every process
   (`loss_normalizer`, `Parallel.all_sum`), then for each micro-batch: the learner's log-probs with grad
   (`learner_log_probs`), `policy_loss` divided by that GLOBAL normaliser, and its backward
   (`Parallel.backward`). The strategy then sums gradients over processes, clips by the global norm and steps
   (`Parallel.step`). So micro-batching and the number of processes leave the update unchanged.
5. The learning-rate schedule advances once per update, after the passes.

Statistics (`UpdateStats`, rl/stats.py) describe the first pass: the loss terms, clip fraction and KL, the
rollout-vs-learner log-prob gap, the noise ratio, the pre-clip gradient norm and, every `diag_every` steps, the
gradient norm of the unweighted CoT term alone (`cot_grad_norm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from rl.advantages import AdvantageConfig, Advantages, compute_advantages
from rl.logprobs import LogProbConfig, SequenceLogProbs, sequence_log_probs
from rl.lora import LoraConfig
from rl.loss import LossConfig, loss_normalizer, policy_loss
from rl.optim import OptimConfig
from rl.parallel import Parallel
from rl.stats import UpdateStats, loss_stats
from rollouts.config import CotConfig
from rollouts.record import Rollouts


@dataclass
class RLConfig:
    """The RL algorithm: G samples per prompt, PPO iterations per batch, and the objective's pieces."""

    group_size: int = 8
    num_iterations: int = 1
    micro_batch: int = 0  # rollouts per forward/backward (0 = all of a process's rollouts at once)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logprobs: LogProbConfig = field(default_factory=LogProbConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # rank 0 = full fine-tuning (rl/lora.py)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"rl.group_size={self.group_size}: group advantages need at least 2 samples")
        if self.num_iterations < 1 or self.micro_batch < 0:
            raise ValueError(f"rl.num_iterations={self.num_iterations}, rl.micro_batch={self.micro_batch}")


def learner_log_probs(
    model: torch.nn.Module, rollouts: Rollouts, cot: CotConfig, cfg: LogProbConfig
) -> SequenceLogProbs:
    """The learner's log-probs of `rollouts` under `model` (the policy or the reference): the CoT config `cot`
    they were generated with, and its answer temperature / top-p."""
    return sequence_log_probs(
        model,
        rollouts,
        cot,
        cfg,
        answer_temperature=cot.answer_temperature,
        answer_top_p=cot.answer_top_p,
    )


def cot_grad_norm(
    model: torch.nn.Module,
    new: SequenceLogProbs,
    advantages: Advantages,
    cfg: LossConfig,
    *,
    old: SequenceLogProbs | None = None,
    ref: SequenceLogProbs | None = None,
    normalizer: float | None = None,
) -> float:
    """‖∇ CoT term‖ alone, UNWEIGHTED (cot_weight = gaussian_weight = 1): how hard the Gaussian (or hard-CoT)
    term would push, also when the recipe switches it off, for diagnosing soft training. Keeps `new`'s graph."""
    unweighted = replace(cfg, cot_weight=1.0, gaussian_weight=1.0)
    out = policy_loss(new, advantages, unweighted, old=old, ref=ref, normalizer=normalizer)
    if not out.cot_loss.requires_grad:
        return 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.cot_loss, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))


def update(
    model: torch.nn.Module,
    rollouts: Rollouts,
    rewards: list[float | None],
    cfg: RLConfig,
    cot: CotConfig,
    parallel: Parallel,
    scheduler: Any,
    *,
    ref: torch.nn.Module | None = None,
    diagnose: bool = False,
) -> UpdateStats:
    """One update on this process's `rollouts` and their `rewards` (see the module docstring); collective.
    `ref`: the frozen reference model (needed iff `cfg.loss.kl_coef > 0`); `diagnose`: measure `cot_grad_norm`."""
    adv = compute_advantages(rewards, rollouts.group_index, cfg.advantages)
    n = rollouts.num_rollouts
    size = cfg.micro_batch or n
    slices = [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]
    parts = [rollouts.select(s) for s in slices]
    part_adv = [adv.select(s) for s in slices]

    def score(m: torch.nn.Module, part: Rollouts) -> SequenceLogProbs:
        return learner_log_probs(m, part, cot, cfg.logprobs)

    with torch.no_grad():
        old = [score(model, p).detach() for p in parts] if cfg.num_iterations > 1 else [None] * len(parts)
        ref_lp = [score(ref, p).detach() for p in parts] if ref is not None else [None] * len(parts)
    stats = UpdateStats()
    diag = math.nan  # NaN (null in metrics.jsonl) when not measured
    skipped = False
    for iteration in range(cfg.num_iterations):
        # the normaliser depends only on masks and advantages: sum it over micro-batches and processes
        norm = parallel.all_sum(
            sum(loss_normalizer(p, a, cfg.loss) for p, a in zip(parts, part_adv, strict=True))
        )
        outs, scored = [], []
        for i, (part, a) in enumerate(zip(parts, part_adv, strict=True)):
            new = score(model, part)
            out = policy_loss(new, a, cfg.loss, old=old[i], ref=ref_lp[i], normalizer=norm)
            if iteration == 0 and i == 0 and diagnose:
                diag = cot_grad_norm(model, new, a, cfg.loss, old=old[i], ref=ref_lp[i], normalizer=norm)
            parallel.backward(out.loss)
            outs.append(out)
            scored.append((part, new))
        result = parallel.step(sum(float(o.loss.detach()) for o in outs), cfg.optim.grad_clip)
        skipped = skipped or result.skipped
        if iteration == 0:
            stats = loss_stats(outs, scored, result.grad_norm, result.lr)
    scheduler.step()
    return replace(stats, cot_grad_norm=diag, skipped=skipped)
