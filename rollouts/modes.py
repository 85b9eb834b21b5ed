"""The per-step actions of DESIGN.md section 1: what a hard / soft / fuzzy CoT step feeds and what log-prob it
stores, and how an answer token is drawn. `cot_action_fn(cfg, sigma)` is the one place where the mode is
dispatched; the decode loop only ever calls the function it returns.

Every function here takes and returns fixed-shape tensors and never reads a value back to the host, so a decode
step built from them can be compiled and captured in a CUDA graph. Randomness comes in as tensors (`StepNoise`,
drawn by `draw_noise` from the run's generator before the step), so the step itself is a pure function: the
eager and the static engine draw the same noise and run the same step. Sampling uses the exponential race
(Gumbel-max): argmax(log p - log q), q ~ Exp(1), which draws exactly from p, needs no `torch.multinomial` and
consumes the same amount of randomness every step whatever the batch holds.

Conventions for the noiseless / greedy cases (documented here once, relied on by the learner and tests):
- hard greedy (τ = 0): the action is argmax z; its stored log-prob is log softmax(filter(z))[c], the untempered
  (τ = 1) distribution that `cot_log_probs` returns for τ = 0. Same for a greedy answer token.
- soft / fuzzy with σ = 0: h_t = μ_t exactly and the stored log-prob is 0.0 (a point mass has no density).

Shape legend: see `rollouts.record`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rollouts.config import CotConfig
from rollouts.distributions import filter_logits, gaussian_log_prob, mixture_mean


@dataclass
class CotAction:
    """What one CoT step produced for every row (rows outside the think phase are computed and ignored)."""

    inputs: torch.Tensor  # [N, d] float32, the vector fed at the next position (hard: E[c_t])
    ids: torch.Tensor  # [N] int64, the stream token: hard = the sampled c_t; soft / fuzzy = top-1 of p_t
    logprobs: torch.Tensor  # [N] float32, behaviour log-prob of the action


CotActionFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], CotAction]
"""(log p_t [N, V], E [V, d] float32, the step's CoT noise `StepNoise.cot`) -> CotAction."""


@dataclass
class StepNoise:
    """The randomness one decode step consumes, drawn before it (None where the mode draws nothing)."""

    # hard sampled CoT: q ~ Exp(1) [N, V]; soft / fuzzy with σ > 0: ε ~ N(0, I) [N, d]
    cot: torch.Tensor | None
    answer: torch.Tensor | None  # sampled answer tokens: q ~ Exp(1) [N, V]


def draw_noise(
    cfg: CotConfig, sigma: float, rows: int, vocab: int, width: int, generator: torch.Generator
) -> StepNoise:
    """One step's noise for `rows` rows, always in the same order from `generator` (CoT, then answer), so an
    engine that draws it the same way reproduces the same rollouts. float32 on the generator's device."""
    device = generator.device

    def exponential(*shape: int) -> torch.Tensor:
        # -log U, U ~ Uniform[0, 1): Exp(1) at a fifth of `exponential_`'s CPU cost (1.0 ms vs 0.2 ms for
        # [128, 358]); U = 0 gives q = inf, a token that cannot win the race, and U < 1 keeps q > 0
        return torch.rand(shape, dtype=torch.float32, device=device, generator=generator).log_().neg_()

    cot = None
    if cfg.continuous and sigma > 0:
        cot = torch.randn((rows, width), generator=generator, device=device, dtype=torch.float32)  # [N, d]
    elif not cfg.continuous and cfg.temperature > 0:
        cot = exponential(rows, vocab)  # [N, V]
    answer = exponential(rows, vocab) if cfg.answer_temperature > 0 else None  # [N, V]
    return StepNoise(cot, answer)


def sample_ids(log_probs: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """One id per row drawn from exp(log_probs) [N, V] -> [N] by the race argmax(log p - log q) with
    q ~ Exp(1) [N, V]; greedy (argmax) when `q` is None. Filtered tokens (-inf) are never drawn."""
    if q is None:
        return log_probs.argmax(dim=-1)
    return (log_probs - q.log()).argmax(dim=-1)


def hard_action(greedy: bool) -> CotActionFn:
    """c_t ~ p_t (argmax when greedy); input E[c_t]; log-prob log p_t[c_t]."""

    def act(log_probs: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor | None) -> CotAction:
        ids = sample_ids(log_probs, None if greedy else noise)  # [N]
        return CotAction(
            inputs=embedding[ids],  # [N, d]
            ids=ids,
            logprobs=log_probs.gather(-1, ids[:, None]).squeeze(-1),  # [N]
        )

    return act


def continuous_action(sigma: float) -> CotActionFn:
    """μ_t = p_t E, h_t = μ_t + σ ε_t with ε_t ~ N(0, I_d); log-prob log N(h_t; μ_t, σ² I). σ = 0: h_t = μ_t, 0.0."""

    def act(log_probs: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor | None) -> CotAction:
        mu = mixture_mean(log_probs.exp(), embedding)  # [N, d] float32
        ids = log_probs.argmax(dim=-1)  # [N]
        if sigma == 0:
            return CotAction(inputs=mu, ids=ids, logprobs=torch.zeros_like(mu[:, 0]))
        h = mu + sigma * noise  # [N, d], noise = ε ~ N(0, I)
        return CotAction(inputs=h, ids=ids, logprobs=gaussian_log_prob(h, mu, sigma))

    return act


def cot_action_fn(cfg: CotConfig, sigma: float) -> CotActionFn:
    """The one dispatch point on the CoT mode (fuzzy is soft at τ = 1e-4: the temperature lives in `cfg`)."""
    if cfg.continuous:
        return continuous_action(sigma)
    if sigma != 0:
        raise ValueError(f"hard CoT takes no embedding noise, got sigma={sigma}")
    return hard_action(greedy=cfg.temperature == 0)


def answer_log_probs(logits: torch.Tensor, cfg: CotConfig) -> torch.Tensor:
    """log softmax(filter_top_p(z) / τ_answer) in float32 [N, V]; untempered for a greedy answer (τ_answer = 0).
    The learner scores answer tokens with this same function."""
    z = filter_logits(logits.float(), top_p=cfg.answer_top_p)
    tau = cfg.answer_temperature if cfg.answer_temperature > 0 else 1.0
    return torch.log_softmax(z / tau, dim=-1)
