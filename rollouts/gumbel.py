"""Gumbel CoT (SofT-GRPO, arXiv 2511.06411): Gumbel noise on the log-probabilities of the top-k tokens; the step
feeds the Gumbel-softmax mixture of their embeddings, and the learner scores the perturbed logits under the
policy's Gumbel density.

The step. With p_t = softmax(filter(z_{t-1}) / τ) (the CoT filter every mode uses), let S_t = (s_1, ..., s_k) be
its top-k tokens (k = `gumbel_k`, SofT-GRPO's 5) and m_i = log p_t(s_i) renormalised over S_t
(`support_log_probs`; tokens the filter removed stay out). A step draws g_i ~ Gumbel(0, 1) i.i.d.,
forms the perturbed logits

    x_i = m_i + β g_i                      (β = `noise_scale`, 1 in SofT-GRPO)

and feeds h_t = Σ_i y_i E[s_i] with y = softmax(x / τ_g) (τ_g = `gumbel_temperature`, SofT-GRPO's 0.1).

The density. The action is the vector x (h_t is a deterministic function of x); its coordinates are independent
Gumbels with locations m_i(θ) and scale β, so with u_i = (m_i - x_i) / β

    log π(x | history) = Σ_i [ u_i - exp(u_i) - log β ]                                        (exact)

and ∇ log π = Σ_i ∇m_i (1 - exp(u_i)) / β, where exp(u_i) = exp(-g_i) ~ Exp(1) at the behaviour policy: the score
has mean 0 and a bounded-variance weight per token, on k tokens only (not d embedding directions as the Gaussian).
Tokens that the other filters (top-p, min-p) cut out of S_t have m_i = -inf; they get x_i = -inf, weight 0, and
no term in the sum.

Stream token: s_argmax(x), the Gumbel-max draw, an exact sample of p_t restricted to S_t (for β = 1), and the
token with the largest mixture weight. β → 0 with τ_g → 0 is hard sampling's greedy limit; β = 0 is the greedy
variant (x = m, a point mass, log-prob 0.0, rollouts the learner refuses to score).

What the record keeps: S_t and x (`cot_mix_ids`, `cot_mix_logits`, [N, T, k]); the learner recomputes m_i(θ) from
its own logits at the stored S_t and rebuilds h_t = Σ y_i E(θ)[s_i] with y from the stored x.

Departures from SofT-GRPO: the Gumbel location is log p_t of the config's τ and filters (SofT-GRPO perturbs the
top-k of the sampling distribution, top-p 0.95 in its scripts); the score is the exact Gumbel density of x,
with the location renormalised over the stored S_t, so a learner whose top-k differs from the rollout's (after a
PPO iteration) still gets a finite density; β is configurable (their `noise_factor`).
"""

from __future__ import annotations

import torch


def noise(rows: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """g ~ Gumbel(0, 1) [rows, k] float32: -log(-log U), U ~ Uniform(0, 1) (clamped off 0, so g is finite)."""
    u = torch.rand((rows, k), dtype=torch.float32, device=generator.device, generator=generator)
    return u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()


def support_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, real: torch.Tensor, tau: float
) -> torch.Tensor:
    """m = log softmax(z_S / τ) over the tokens `ids` [M, k] where `real` [M, k] (elsewhere -inf), from the raw
    logits z [M, V]: p_t renormalised over its support S_t, finite on every real token whatever the filter."""
    z = logits.float().gather(-1, ids) / tau  # [M, k]
    return torch.log_softmax(z.masked_fill(~real, float("-inf")), dim=-1)


def log_density(locations: torch.Tensor, x: torch.Tensor, beta: float) -> torch.Tensor:
    """log π(x) = Σ_i [u_i - exp(u_i) - log β], u_i = (m_i - x_i) / β, over the real tokens (x finite):
    locations m [..., k], perturbed logits x [..., k] -> [...]."""
    if beta <= 0:
        raise ValueError(f"the Gumbel density needs a noise scale beta > 0, got {beta}")
    real = torch.isfinite(x)
    u = (locations.masked_fill(~real, 0.0) - x.masked_fill(~real, 0.0)) / beta  # [..., k]
    term = u - u.exp() - torch.log(torch.tensor(beta, dtype=u.dtype, device=u.device))
    return torch.where(real, term, 0.0).sum(dim=-1)


def weights(x: torch.Tensor, tau_g: float) -> torch.Tensor:
    """y = softmax(x / τ_g) [..., k] (a -inf logit gets weight 0)."""
    return torch.softmax(x / tau_g, dim=-1)
