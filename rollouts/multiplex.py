"""Multiplex CoT (Multiplex Thinking, arXiv 2601.08808): each CoT step draws K tokens from p_t and feeds the
mixture of their embeddings; the step's log-probability is the sum of the K token log-probabilities.

The step and its density. With p_t = softmax(filter(z_{t-1}) / τ) (`rollouts.distributions.cot_log_probs`, the
distribution every mode uses), a step draws the ordered K-tuple c = (c_1, ..., c_K) i.i.d. from p_t (with
replacement) and feeds

    h_t = Σ_k w_k E[c_k],   w_k = 1/K ("uniform")   or   w_k = p_t(c_k) / Σ_j p_t(c_j) ("prob").

h_t is a deterministic function of the action c (and of p_t for "prob"), so the action whose probability the
policy gradient differentiates is c itself, and since the draws are independent

    log π(c | history) = Σ_k log p_t(c_k)                                                     (exact)

and ∇ log π = Σ_k ∇ log p_t(c_k): a sum of K ordinary token scores, each as well conditioned as a hard step's.
K = 1 is hard mode exactly (the same draw, input, stream token and log-prob); `tests/test_mixture_modes.py` checks it.

What the record keeps: the K ids [N, T, K] and their behaviour log-probs log p_t(c_k) [N, T, K] (`cot_mix_ids`,
`cot_mix_logits`), from which the weights are a function (`mixture_weights`), so the learner rebuilds h_t as
Σ_k w_k E(θ)[c_k]: the gradient reaches E through the inputs as in hard mode. The "prob" weights are the
behaviour's, stored constants: making them a function of the learner's p_t would tie each input to the previous
position's logits and need a sequential pass (departure from a fully differentiable recurrence, as in soft mode,
whose h_t are constants too).

Stream token (what the think-end rule reads, and what the record shows as `cot_ids`): c_1, an exact sample of
p_t, so the think-end token ends thinking with the probability hard mode gives it.

Greedy (τ = 0): the K most probable tokens (distinct), weighted as configured; a point mass, log-prob 0.0, and
rollouts the learner refuses to score (like soft at σ = 0).

Departures from the paper: the paper samples with the model's own decoding settings in a long-CoT model and
reports K = 3 with the mean; here τ, the CoT filter and the weights are the config's, and the stop rule is the
project's (the stream token c_1).
"""

from __future__ import annotations

import torch

from rollouts.config import CotConfig


def draws(log_probs: torch.Tensor, q: torch.Tensor | None, k: int) -> torch.Tensor:
    """[N, V] log p_t -> [N, K] token ids: K independent exponential races argmax(log p - log q_k) with
    q ~ Exp(1) [N, K, V] (each an exact draw from p_t); greedy (q None): the K most probable tokens."""
    if q is None:
        return log_probs.topk(k, dim=-1).indices
    return (log_probs[:, None, :] - q.log()).argmax(dim=-1)


def log_prob(draw_log_probs: torch.Tensor) -> torch.Tensor:
    """log π(c) = Σ_k log p_t(c_k): [..., K] -> [...]."""
    return draw_log_probs.sum(dim=-1)


def weights(draw_log_probs: torch.Tensor, cfg: CotConfig) -> torch.Tensor:
    """The mixture weights [..., K] of the draws, from their log p_t [..., K]: uniform over the draws with
    p_t > 0 ("uniform"), or p_t renormalised over the draws ("prob")."""
    if cfg.multiplex_weights == "prob":
        return torch.softmax(draw_log_probs, dim=-1)
    real = torch.isfinite(draw_log_probs).float()  # a greedy top-K may reach filtered (-inf) tokens
    return real / real.sum(dim=-1, keepdim=True)
