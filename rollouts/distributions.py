"""The CoT distributions of DESIGN.md section 1, shared by the rollout engine and the learner so that both
compute exactly the same numbers. Everything here runs in float32.

Shape legend: see `rollouts.record`.
"""

from __future__ import annotations

import math

import torch

from rollouts.config import RMS_KINDS, CotConfig


def filter_logits(
    logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """`filter(z)`: set to -inf every logit outside the top-k / top-p nucleus / min-p floor of softmax(z).

    The mask is computed on the untempered distribution softmax(z), as DESIGN.md writes p = softmax(filter(z)/τ);
    the top-1 token always survives. With every filter off the logits come back unchanged (same object).

    >>> z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    >>> filter_logits(z, top_k=2)
    tensor([[2., 1., -inf, -inf]])
    >>> filter_logits(z, min_p=0.3)  # keeps tokens with p >= 0.3 * p_max
    tensor([[2., 1., -inf, -inf]])
    """
    if top_k <= 0 and top_p >= 1.0 and min_p <= 0.0:
        return logits
    z = logits.float()  # [..., V]
    remove = torch.zeros_like(z, dtype=torch.bool)
    if top_k > 0 and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        remove |= z < kth
    if top_p < 1.0 or min_p > 0.0:
        probs = torch.softmax(z, dim=-1)
        if min_p > 0.0:
            remove |= probs < min_p * probs.max(dim=-1, keepdim=True).values
        if top_p < 1.0:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            # drop a token when the mass strictly before it already reaches top_p (the top-1 always stays)
            drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
            remove |= torch.zeros_like(remove).scatter(-1, order, drop_sorted)
    return z.masked_fill(remove, float("-inf"))


def cot_log_probs(logits: torch.Tensor, cfg: CotConfig) -> torch.Tensor:
    """log p_t = log_softmax(filter(z) / τ) in float32, [..., V]. For hard greedy (τ = 0) this is the
    untempered filtered distribution (used for entropy only; the action is the argmax)."""
    z = filter_logits(logits.float(), cfg.top_k, cfg.top_p, cfg.min_p)
    tau = cfg.temperature if cfg.temperature > 0 else 1.0
    return torch.log_softmax(z / tau, dim=-1)


def mixture_mean(probs: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """μ_t = p_t E in float32: [..., V] × [V, d] -> [..., d]."""
    return probs.float() @ embedding.float()


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """H(p) in nats from log-probs [..., V] -> [...]; -inf entries (filtered tokens) contribute 0."""
    p = log_probs.exp()
    return -(p * log_probs.masked_fill(p == 0, 0.0)).sum(dim=-1)


def gaussian_log_prob(h: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(h; μ, σ² I_d) = -‖h - μ‖² / (2σ²) - (d/2) log(2πσ²), summed over the last dim: [..., d] -> [...].

    >>> h = torch.zeros(1, 2); mu = torch.ones(1, 2)
    >>> round(gaussian_log_prob(h, mu, 1.0).item(), 6) == round(-1.0 - math.log(2 * math.pi), 6)
    True
    """
    if sigma <= 0:
        raise ValueError(f"gaussian_log_prob needs sigma > 0, got {sigma}")
    d = h.shape[-1]
    sq = (h.float() - mu.float()).pow(2).sum(dim=-1)
    return -sq / (2 * sigma**2) - 0.5 * d * math.log(2 * math.pi * sigma**2)


def embedding_rms(embedding: torch.Tensor, kind: str = "entry") -> float:
    """rms(E): "entry" = sqrt(mean(E²)) over all entries; "row" = sqrt(mean_v ‖E_v‖²).

    >>> embedding_rms(torch.full((3, 4), 2.0)), embedding_rms(torch.full((3, 4), 2.0), "row")
    (2.0, 4.0)
    """
    e = embedding.detach().float()
    if kind == "entry":
        return e.pow(2).mean().sqrt().item()
    if kind == "row":
        return e.pow(2).sum(dim=-1).mean().sqrt().item()
    raise ValueError(f"rms kind {kind!r}: expected 'entry' or 'row'")


def embedding_rms_by_kind(embedding: torch.Tensor) -> dict[str, float]:
    """rms(E) of every kind in RMS_KINDS: what a run keeps of its starting embeddings to fix σ."""
    return {kind: embedding_rms(embedding, kind) for kind in RMS_KINDS}


def noise_sigma(embedding: torch.Tensor, cfg: CotConfig) -> float:
    """σ of `sigma_from_rms` (noise_scale × rms(E) for soft / fuzzy). Computed once from the starting E."""
    return sigma_from_rms(cfg, {cfg.rms: embedding_rms(embedding, cfg.rms)})


def sigma_from_rms(cfg: CotConfig, rms: dict[str, float]) -> float:
    """The scale σ of a CoT step's continuous noise, from rms(E) measured earlier (per kind): a run's starting
    embeddings, kept with the run and with the models it writes. Soft / fuzzy: the Gaussian std
    noise_scale × rms[cfg.rms]; gumbel: the Gumbel scale β = noise_scale (on log-probabilities, not on E);
    hard and multiplex: 0.

    >>> sigma_from_rms(CotConfig(noise_scale=0.5, rms="row"), {"entry": 1.0, "row": 3.0})
    1.5
    >>> sigma_from_rms(CotConfig(mode="gumbel", noise_scale=1.0), {"entry": 1.0, "row": 3.0})
    1.0
    """
    if cfg.mode == "gumbel":
        return cfg.noise_scale
    if not cfg.gaussian or cfg.noise_scale == 0:
        return 0.0
    return cfg.noise_scale * rms[cfg.rms]
