"""Gradient signal-to-noise: how much of one batch's policy gradient is shared with another batch's.

Given K gradients g_1..g_K of the same objective from independent rollout batches (same parameters, same prompts,
only the sampling seed differs), with mean ḡ:

- noise   = Σ_k ‖g_k - ḡ‖² / (K - 1)            unbiased estimate of E‖g - E g‖² (per batch)
- signal  = max(‖ḡ‖² - noise / K, 0)             unbiased estimate of ‖E g‖², clipped at 0
- SNR     = signal / noise; the mean pairwise cosine between batches is about SNR / (1 + SNR).

Used by `scripts/grad_snr.py` to show that the Gaussian CoT term of soft / fuzzy training is almost pure noise at
the tiny model's scale (see `rl.loss`, point 4).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch


@dataclass
class GradientAgreement:
    mean_norm: float  # mean ‖g_k‖
    mean_cosine: float  # mean pairwise cosine between the K gradients
    snr: float  # signal / noise as in the module docstring (inf when every g_k is the same)


def gradient_agreement(grads: list[torch.Tensor]) -> GradientAgreement:
    """Statistics of K >= 2 flattened gradients of equal shape ([P] each).

    >>> r = gradient_agreement([torch.tensor([2.0, 1.0]), torch.tensor([2.0, -1.0])])
    >>> round(r.mean_cosine, 6), r.snr
    (0.6, 1.5)
    """
    if len(grads) < 2:
        raise ValueError(f"gradient_agreement needs at least 2 gradients, got {len(grads)}")
    g = torch.stack([x.double() for x in grads])  # [K, P]
    k = g.shape[0]
    mean = g.mean(dim=0)
    noise = float((g - mean).pow(2).sum()) / (k - 1)
    signal = max(float(mean.pow(2).sum()) - noise / k, 0.0)
    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(g, 2)]
    return GradientAgreement(
        mean_norm=float(g.norm(dim=1).mean()),
        mean_cosine=sum(cos) / len(cos),
        snr=signal / noise if noise > 0 else math.inf,
    )
