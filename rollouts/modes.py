"""The per-step actions of DESIGN.md section 1: what a hard / soft / fuzzy / multiplex / gumbel CoT step feeds and
what log-prob it stores, and how an answer token is drawn. `cot_action_fn(cfg, sigma)` is the one place where the
mode is dispatched for the rollout, `mixture_log_prob` / `mixture_weights` for the learner's mixture steps; the
decode loop only ever calls the function it returns. The multiplex and gumbel densities are derived in
`rollouts.multiplex` and `rollouts.gumbel`.

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
- multiplex greedy (τ = 0: the top K tokens) and gumbel with β = 0 (x = log p): deterministic, log-prob 0.0.

Shape legend: see `rollouts.record`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rollouts import gumbel, multiplex
from rollouts.config import CotConfig
from rollouts.distributions import filter_logits, gaussian_log_prob, mixture_mean


@dataclass
class CotAction:
    """What one CoT step produced for every row (rows outside the think phase are computed and ignored)."""

    inputs: torch.Tensor  # [N, d] float32, the vector fed at the next position (hard: E[c_t])
    # [N] int64, the stream token: hard = the sampled c_t; soft / fuzzy = top-1 of p_t; multiplex = the first
    # draw; gumbel = the Gumbel-max token
    ids: torch.Tensor
    logprobs: torch.Tensor  # [N] float32, behaviour log-prob of the action
    mix_ids: torch.Tensor | None = None  # [N, K] int64, multiplex: the K draws; gumbel: the top-k support
    mix_logits: torch.Tensor | None = None  # [N, K] float32, multiplex: log p_t of the draws; gumbel: x


CotActionFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", torch.Tensor], CotAction]
"""(log p_t [N, V], E [V, d] float32, the step's CoT noise `StepNoise.cot`, the raw logits z [N, V] float32)
-> CotAction."""


@dataclass
class StepNoise:
    """The randomness one decode step consumes, drawn before it (None where the mode draws nothing)."""

    # hard sampled CoT: q ~ Exp(1) [N, V]; soft / fuzzy with σ > 0: ε ~ N(0, I) [N, d]; multiplex sampled:
    # q ~ Exp(1) [N, K, V]; gumbel with β > 0: g ~ Gumbel(0, 1) [N, k]
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
    if cfg.gaussian and sigma > 0:
        cot = torch.randn((rows, width), generator=generator, device=device, dtype=torch.float32)  # [N, d]
    elif cfg.mode == "hard" and cfg.temperature > 0:
        cot = exponential(rows, vocab)  # [N, V]
    elif cfg.mode == "multiplex" and cfg.temperature > 0:
        cot = exponential(rows, cfg.multiplex_k, vocab)  # [N, K, V]
    elif cfg.mode == "gumbel" and sigma > 0:
        cot = gumbel.noise(rows, cfg.gumbel_k, generator)  # [N, k]
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

    def act(log_probs: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor | None, _z) -> CotAction:
        ids = sample_ids(log_probs, None if greedy else noise)  # [N]
        return CotAction(
            inputs=embedding[ids],  # [N, d]
            ids=ids,
            logprobs=log_probs.gather(-1, ids[:, None]).squeeze(-1),  # [N]
        )

    return act


def continuous_action(sigma: float) -> CotActionFn:
    """μ_t = p_t E, h_t = μ_t + σ ε_t with ε_t ~ N(0, I_d); log-prob log N(h_t; μ_t, σ² I). σ = 0: h_t = μ_t, 0.0."""

    def act(log_probs: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor | None, _z) -> CotAction:
        mu = mixture_mean(log_probs.exp(), embedding)  # [N, d] float32
        ids = log_probs.argmax(dim=-1)  # [N]
        if sigma == 0:
            return CotAction(inputs=mu, ids=ids, logprobs=torch.zeros_like(mu[:, 0]))
        h = mu + sigma * noise  # [N, d], noise = ε ~ N(0, I)
        return CotAction(inputs=h, ids=ids, logprobs=gaussian_log_prob(h, mu, sigma))

    return act


def mixture_inputs(ids: torch.Tensor, weights: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """h = Σ_k w_k E[ids_k]: ids [..., K], weights [..., K], E [V, d] -> [..., d] float32."""
    return (embedding[ids].float() * weights[..., None]).sum(dim=-2)


def mixture_weights(mix_logits: torch.Tensor, cfg: CotConfig) -> torch.Tensor:
    """The weights [..., K] a multiplex / gumbel step gives its K tokens, from the stored `mix_logits` [..., K]."""
    if cfg.mode == "multiplex":
        return multiplex.weights(mix_logits, cfg)
    return gumbel.weights(mix_logits, cfg.gumbel_temperature)


def mixture_log_prob(
    logits: torch.Tensor,
    log_probs: torch.Tensor,
    ids: torch.Tensor,
    mix_logits: torch.Tensor,
    cfg: CotConfig,
    sigma: float,
) -> torch.Tensor:
    """log π of a multiplex / gumbel step [M] from the raw logits z [M, V], log p_t [M, V] and the stored tokens and
    mix logits [M, K]: Σ_k log p_t(c_k) (multiplex), the Gumbel density of x at scale β = σ (gumbel)."""
    if cfg.mode == "multiplex":
        return multiplex.log_prob(log_probs.gather(-1, ids))
    real = torch.isfinite(mix_logits)
    return gumbel.log_density(gumbel.support_log_probs(logits, ids, real, cfg.temperature), mix_logits, sigma)


def multiplex_action(cfg: CotConfig) -> CotActionFn:
    """K draws c_k ~ p_t (the top K when greedy); input Σ w_k E[c_k]; log-prob Σ_k log p_t(c_k) (0.0 greedy)."""
    greedy = cfg.temperature == 0

    def act(log_probs: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor | None, _z) -> CotAction:
        ids = multiplex.draws(log_probs, None if greedy else noise, cfg.multiplex_k)  # [N, K]
        draw_lp = log_probs.gather(-1, ids)  # [N, K]
        logprobs = torch.zeros_like(draw_lp[:, 0]) if greedy else multiplex.log_prob(draw_lp)
        inputs = mixture_inputs(ids, multiplex.weights(draw_lp, cfg), embedding)
        return CotAction(inputs=inputs, ids=ids[:, 0], logprobs=logprobs, mix_ids=ids, mix_logits=draw_lp)

    return act


def gumbel_action(cfg: CotConfig, beta: float) -> CotActionFn:
    """x = log p_t(S_t) + β g over the top-k S_t; input Σ softmax(x / τ_g)_i E[s_i]; log-prob the Gumbel density of
    x (0.0 at β = 0); stream token the argmax of x."""

    def act(log_probs: torch.Tensor, embedding: torch.Tensor, noise: torch.Tensor | None, z) -> CotAction:
        ids = log_probs.topk(cfg.gumbel_k, dim=-1).indices  # [N, k] the support S_t
        m = gumbel.support_log_probs(z, ids, torch.isfinite(log_probs.gather(-1, ids)), cfg.temperature)
        x = m if beta == 0 else m + beta * noise  # [N, k]
        logprobs = torch.zeros_like(m[:, 0]) if beta == 0 else gumbel.log_density(m, x, beta)
        inputs = mixture_inputs(ids, gumbel.weights(x, cfg.gumbel_temperature), embedding)
        stream = ids.gather(-1, x.argmax(dim=-1, keepdim=True)).squeeze(-1)  # [N]
        return CotAction(inputs=inputs, ids=stream, logprobs=logprobs, mix_ids=ids, mix_logits=x)

    return act


def cot_action_fn(cfg: CotConfig, sigma: float) -> CotActionFn:
    """The one dispatch point on the CoT mode (fuzzy is soft at τ = 1e-4: the temperature lives in `cfg`).
    `sigma`: the Gaussian std (soft / fuzzy), the Gumbel scale β (gumbel), 0 otherwise."""
    if cfg.gaussian:
        return continuous_action(sigma)
    if cfg.mode == "gumbel":
        return gumbel_action(cfg, sigma)
    if sigma != 0:
        raise ValueError(f"{cfg.mode} CoT takes no noise scale, got sigma={sigma}")
    if cfg.mode == "multiplex":
        return multiplex_action(cfg)
    return hard_action(greedy=cfg.temperature == 0)


def answer_log_probs(logits: torch.Tensor, cfg: CotConfig) -> torch.Tensor:
    """log softmax(filter_top_p(z) / τ_answer) in float32 [N, V]; untempered for a greedy answer (τ_answer = 0).
    The learner scores answer tokens with this same function."""
    z = filter_logits(logits.float(), top_p=cfg.answer_top_p)
    tau = cfg.answer_temperature if cfg.answer_temperature > 0 else 1.0
    return torch.log_softmax(z / tau, dim=-1)
