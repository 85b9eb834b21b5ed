"""The learner objective: a PPO-clipped policy gradient over CoT steps and answer tokens (DESIGN.md §1, Learner).

How this objective relates to GRPO (DeepSeekMath) and to "Soft Tokens, Hard Truths" (arXiv 2509.19170):

1. Advantages (`rl.advantages`). The paper uses RLOO: A_i = r_i - mean of the other G-1 rewards of the prompt,
   with no std division; that is the default. GRPO's (r - group mean) / (group std + eps) and Dr. GRPO's
   r - group mean are the alternatives. One scalar advantage per rollout is broadcast to all of its action steps.
2. Ratio and clip. Every action step gets its own importance ratio and its own clip: per CoT step t on the
   density ratio π_θ(a_t) / π_old(a_t) (for soft/fuzzy CoT the Gaussian density of the stored vector h_t; the
   normalising constant -(d/2) log 2πσ² cancels, leaving exp((‖h-μ_old‖² - ‖h-μ_θ‖²) / 2σ²)), and per sampled
   answer token on the token-probability ratio. Step loss = -min(ratio·A, clip(ratio, 1-eps_low, 1+eps_high)·A).
   The paper trains with plain RLOO policy gradients; with `num_iterations=1` (one update per batch) the ratio
   is exactly 1, nothing clips, and the gradient is exactly the RLOO gradient A·∇log π. Clipping only matters
   for extra PPO iterations on the same batch.
3. Old log-probs come from the learner, not the rollout: rl/learner.py runs `sequence_log_probs` once at the
   start of the update and passes its detached copy as `old` (`old=None` does that from `new` itself). The
   rollout's own log-probs (bf16 or a different kernel) are only compared for the health metric
   `rl.logprobs.log_prob_gap`; an error δ in μ moves a Gaussian log-prob by about ‖δ‖·sqrt(d)/σ nats.
4. Scale of the Gaussian term. ∇_θ log N(h; μ_θ, σ²I) = (h - μ_θ)ᵀ ∇_θ μ_θ / σ² = εᵀ ∇_θ μ_θ / σ with ε ~ N(0, I_d):
   the 1/σ² factor (σ = 0.33·rms(E) is small) makes each CoT step's gradient far larger than an answer token's,
   and there are many more CoT steps than answer tokens. `cot_weight` multiplies every CoT step's loss (its
   surrogate and its KL); `gaussian_weight` multiplies it again for Gaussian (soft / fuzzy) steps only. The
   paper uses neither, so the defaults 1.0 are the paper's objective. Why the second knob exists: the Gaussian
   score εᵀ∇μ/σ has d·T independent noise directions per rollout, of which the reward depends on few, so at a
   small batch its gradient is almost pure noise (measured on the tiny model with `scripts/grad_snr.py`: pairwise
   cosine between the CoT-term gradients of independent 128-rollout batches -0.007 soft / -0.002 fuzzy, against
   +0.26 for the hard-token CoT term, at 38× / 150× the norm of the answer term); under Adam a pure-noise term
   takes the whole step whatever its weight, so the tiny recipe sets `gaussian_weight: 0` (recipes/experiment/tiny.yaml).
5. Aggregation is JOINT over all action steps of both kinds, with `cot_weight` applied per step:
   `token`: (cot_weight·Σ_cot ℓ + Σ_answer ℓ) / (#CoT steps + #answer tokens) over the batch;
   `sequence`: the same ratio within each row, then the mean over rows (GRPO's 1/|o_i| Σ_t);
   `constant`: (cot_weight·Σ_cot ℓ + Σ_answer ℓ) / (N_judged · max_len_norm) (Dr. GRPO's constant normaliser).
   Joint, because a CoT step and an answer token are both actions of the same trajectory whose probability
   the policy gradient differentiates: log π(trajectory) = Σ_t log π(h_t) + Σ_a log π(a); normalising the two
   kinds by separate counts would silently reweight one kind against the other by the ratio of their lengths.
   `cot_term` and `answer_term` (loss = cot_term + answer_term) are returned separately for logging.
6. The think-end delimiter appended after the CoT is forced context, not an action: it carries
   `answer_action_mask=False`, is never scored, and gets no gradient, ratio or KL.
7. The stored h_t are constants: no gradient flows through the recurrence that produced them (h_t feeds later
   positions as input only); a CoT step's gradient flows through its mean μ_t(θ) = softmax(filter(z)/τ) E(θ),
   via the logits z and via E.
8. Optional KL to a frozen reference (`kl_coef` > 0): Gaussian CoT steps in closed form
   KL(N(μ_θ, σ²I) ‖ N(μ_ref, σ²I)) = ‖μ_θ - μ_ref‖² / (2σ²); hard CoT steps and answer tokens with the k3
   estimator exp(ref - new) - (ref - new) - 1 (Schulman), evaluated at the sampled token. The paper uses no KL;
   the default `kl_coef=0` needs no reference model.
9. Rollouts whose reward is None (unjudged) are excluded: their steps enter no sum and no count.

Shape legend: N rollouts, T CoT steps, A answer tokens, d embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.advantages import Advantages
from rl.logprobs import SequenceLogProbs
from rollouts.record import Rollouts

AGGREGATIONS = ("token", "sequence", "constant")


@dataclass
class LossConfig:
    """Every default of the objective (see the module docstring for the meaning of each)."""

    clip_eps_low: float = 0.2  # ratio floor 1 - clip_eps_low (for A < 0)
    clip_eps_high: float = 0.2  # ratio ceiling 1 + clip_eps_high (for A > 0); DAPO's clip-higher uses 0.28
    kl_coef: float = 0.0  # 0 = no KL term and no reference model
    aggregation: str = "token"  # token | sequence | constant
    max_len_norm: int = 1024  # constant aggregation: per-rollout normaliser (Dr. GRPO uses the max length)
    cot_weight: float = 1.0  # multiplies every CoT step's loss (surrogate + KL)
    gaussian_weight: float = 1.0  # multiplies cot_weight again for Gaussian (soft / fuzzy) CoT steps only
    max_log_ratio: float = (
        20.0  # log-ratios (and k3 arguments) are clamped to ±this before exp: overflow guard
    )

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"loss.aggregation={self.aggregation!r}: expected one of {AGGREGATIONS}")
        if not (0 <= self.clip_eps_low < 1 and self.clip_eps_high >= 0):
            raise ValueError(
                f"loss.clip_eps_low={self.clip_eps_low}, loss.clip_eps_high={self.clip_eps_high}"
            )
        if min(self.kl_coef, self.cot_weight, self.gaussian_weight) < 0:
            raise ValueError(
                f"loss.kl_coef={self.kl_coef}, loss.cot_weight={self.cot_weight}, "
                f"loss.gaussian_weight={self.gaussian_weight}: must be >= 0"
            )
        if self.max_len_norm <= 0 or self.max_log_ratio <= 0:
            raise ValueError(
                f"loss.max_len_norm={self.max_len_norm}, loss.max_log_ratio={self.max_log_ratio}"
            )


@dataclass
class LossOutput:
    """The scalar to backpropagate plus detached statistics (means over valid steps of each kind; 0 if none)."""

    loss: torch.Tensor  # [] = cot_term + answer_term
    cot_loss: torch.Tensor  # [] the CoT term with its graph (for diagnosing the CoT gradient alone)
    cot_term: float  # CoT contribution to the loss (cot_weight and gaussian_weight included)
    answer_term: float  # answer contribution to the loss
    clip_fraction: float  # fraction of all action steps where the clipped branch is active
    clip_fraction_cot: float
    clip_fraction_answer: float
    ratio_cot: float  # mean importance ratio over CoT steps
    ratio_answer: float
    kl_cot: float  # mean per-step KL to the reference (0 without one)
    kl_answer: float
    logp_cot: float  # mean log π_θ per CoT step (Gaussian log-density for soft/fuzzy)
    logp_answer: float
    num_cot_steps: int
    num_answer_steps: int


@dataclass
class _Steps:
    """Per-step quantities of one kind of action (CoT or answer)."""

    loss: torch.Tensor  # [N, S] surrogate (+ kl_coef · KL), 0 where masked
    mask: torch.Tensor  # [N, S] bool, valid steps of judged rows
    ratio: torch.Tensor  # [N, S] detached
    clipped: torch.Tensor  # [N, S] bool, clipped branch active
    kl: torch.Tensor  # [N, S] detached per-step KL (0 without reference)
    logp: torch.Tensor  # [N, S] detached


def k3(log_ref: torch.Tensor, log_new: torch.Tensor, max_log_ratio: float = 20.0) -> torch.Tensor:
    """k3 KL estimator exp(x) - x - 1 with x = log_ref - log_new: >= 0, zero iff equal, unbiased for KL(new‖ref).

    >>> k3(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))
    tensor([0.0000, 0.7183])
    """
    x = (log_ref - log_new).clamp(-max_log_ratio, max_log_ratio)
    return torch.exp(x) - x - 1


def gaussian_kl(mu: torch.Tensor, mu_ref: torch.Tensor, sigma: float) -> torch.Tensor:
    """KL(N(μ, σ²I) ‖ N(μ_ref, σ²I)) = ‖μ - μ_ref‖² / (2σ²): [..., d] -> [...].

    >>> gaussian_kl(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), 1.0)
    tensor([1.])
    """
    return (mu.float() - mu_ref.float()).pow(2).sum(dim=-1) / (2 * sigma**2)


def _steps(
    log_new: torch.Tensor,
    log_old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None,
    cfg: LossConfig,
) -> _Steps:
    """PPO-clipped surrogate per step. log_* [N, S], adv [N, 1], mask [N, S], kl [N, S] or None."""
    log_ratio = (log_new - log_old.detach()).clamp(-cfg.max_log_ratio, cfg.max_log_ratio)
    ratio = torch.exp(log_ratio)  # [N, S]
    clipped_ratio = ratio.clamp(1 - cfg.clip_eps_low, 1 + cfg.clip_eps_high)
    surrogate = -torch.minimum(ratio * adv, clipped_ratio * adv)  # [N, S]
    clipped = ((adv > 0) & (ratio > 1 + cfg.clip_eps_high)) | ((adv < 0) & (ratio < 1 - cfg.clip_eps_low))
    step_loss = surrogate if kl is None else surrogate + cfg.kl_coef * kl
    zero = torch.zeros((), device=log_new.device)
    return _Steps(
        loss=torch.where(mask, step_loss, zero),
        mask=mask,
        ratio=ratio.detach(),
        clipped=clipped & mask,
        kl=torch.zeros_like(log_new) if kl is None else torch.where(mask, kl.detach(), zero),
        logp=log_new.detach(),
    )


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    count = int(mask.sum())
    return float(x[mask].float().sum() / count) if count else 0.0


def _denominator(steps: torch.Tensor, judged: torch.Tensor, cfg: LossConfig) -> float:
    """The aggregation's denominator (module docstring, point 5) from each row's action steps `steps` [N]
    (0 on unjudged rows) and `judged` [N]: token = all action steps; sequence = rows with at least one action
    step; constant = judged rows × max_len_norm."""
    if cfg.aggregation == "token":
        return float(steps.sum())
    if cfg.aggregation == "sequence":
        return float((steps > 0).sum())
    return float(judged.sum()) * cfg.max_len_norm


def loss_normalizer(rollouts: Rollouts, advantages: Advantages, cfg: LossConfig) -> float:
    """The denominator `policy_loss` would use for this batch alone. Summed over micro-batches and processes,
    it is the GLOBAL normaliser that makes a split batch give the same gradient as the whole."""
    judged = advantages.mask.to(rollouts.cot_mask.device)  # [N]
    steps = rollouts.cot_mask.sum(dim=1) + rollouts.answer_action_mask.sum(dim=1)  # [N]
    return _denominator(torch.where(judged, steps, 0), judged, cfg)


def policy_loss(
    new: SequenceLogProbs,
    advantages: Advantages,
    cfg: LossConfig,
    *,
    old: SequenceLogProbs | None = None,
    ref: SequenceLogProbs | None = None,
    normalizer: float | None = None,
) -> LossOutput:
    """The objective of the module docstring for one (micro-)batch.

    `normalizer`: the global denominator of `loss_normalizer` summed over every micro-batch and process of
    the update (None = this batch's own, the plain single-batch objective).

    `new`: log-probs under the current model (with grad). `old`: the learner's detached log-probs from the start
    of the update (None: `new.detach()`, i.e. the first PPO iteration, ratio exactly 1). `ref`: a frozen
    reference model's log-probs (needed iff `cfg.kl_coef > 0`; used for the KL statistics whenever given).
    """
    if cfg.kl_coef > 0 and ref is None:
        raise ValueError(f"loss.kl_coef={cfg.kl_coef} needs reference log-probs (ref=None)")
    old = old if old is not None else new.detach()
    continuous = new.mu is not None
    row_mask = advantages.mask.to(new.cot.device)  # [N]
    adv = torch.where(row_mask, advantages.values.to(new.cot.device).float(), 0.0)[:, None]  # [N, 1]

    kl_cot: torch.Tensor | None = None
    kl_answer: torch.Tensor | None = None
    if ref is not None:
        if continuous:
            assert new.mu is not None and ref.mu is not None, "soft/fuzzy reference log-probs need mu"
            kl_cot = gaussian_kl(new.mu, ref.mu.detach(), new.sigma)  # [N, T]
        else:
            kl_cot = k3(ref.cot.detach(), new.cot, cfg.max_log_ratio)  # [N, T]
        kl_answer = k3(ref.answer.detach(), new.answer, cfg.max_log_ratio)  # [N, A]
    cot = _steps(new.cot, old.cot, adv, new.cot_mask & row_mask[:, None], kl_cot, cfg)
    ans = _steps(new.answer, old.answer, adv, new.answer_mask & row_mask[:, None], kl_answer, cfg)

    cot_weight = cfg.cot_weight * (cfg.gaussian_weight if continuous else 1.0)
    cot_sum = cot_weight * cot.loss.sum(dim=1)  # [N]
    ans_sum = ans.loss.sum(dim=1)  # [N]
    n_cot = cot.mask.sum(dim=1)  # [N] (0 on unjudged rows)
    n_ans = ans.mask.sum(dim=1)  # [N]
    denom = max(_denominator(n_cot + n_ans, row_mask, cfg) if normalizer is None else normalizer, 1.0)
    if cfg.aggregation == "sequence":  # each row's mean over its own steps, summed, over the row count
        per_row = (n_cot + n_ans).clamp(min=1)  # [N]
        cot_sum, ans_sum = cot_sum / per_row, ans_sum / per_row
    cot_term, answer_term = cot_sum.sum() / denom, ans_sum.sum() / denom

    all_clipped = int(cot.clipped.sum() + ans.clipped.sum())
    all_steps = int(cot.mask.sum() + ans.mask.sum())
    return LossOutput(
        loss=cot_term + answer_term,
        cot_loss=cot_term,
        cot_term=float(cot_term.detach()),
        answer_term=float(answer_term.detach()),
        clip_fraction=all_clipped / all_steps if all_steps else 0.0,
        clip_fraction_cot=_masked_mean(cot.clipped, cot.mask),
        clip_fraction_answer=_masked_mean(ans.clipped, ans.mask),
        ratio_cot=_masked_mean(cot.ratio, cot.mask),
        ratio_answer=_masked_mean(ans.ratio, ans.mask),
        kl_cot=_masked_mean(cot.kl, cot.mask),
        kl_answer=_masked_mean(ans.kl, ans.mask),
        logp_cot=_masked_mean(cot.logp, cot.mask),
        logp_answer=_masked_mean(ans.logp, ans.mask),
        num_cot_steps=int(cot.mask.sum()),
        num_answer_steps=int(ans.mask.sum()),
    )
