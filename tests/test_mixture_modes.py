"""The mixture CoT modes (multiplex, gumbel) against an independent reference written from their definition.

A CoT step sees the raw logits z at the position before it and p = softmax(filter(z) / τ)
(`rollouts.distributions.cot_log_probs`, shared and tested elsewhere).

- multiplex: K tokens c_1..c_K drawn i.i.d. from p; the input is h = Σ_k w_k E[c_k] with w_k = 1/K ("uniform") or
  p(c_k) / Σ_j p(c_j) ("prob"); stream token c_1; behaviour log-prob Σ_k log p(c_k). Greedy (τ = 0): the top K,
  log-prob 0.
- gumbel: S = the top-k tokens of p, m = log p renormalised over S (filtered tokens: m = x = -inf, weight 0),
  x = m + β g with g ~ Gumbel(0, 1) i.i.d.; h = Σ_i softmax(x / τ_g)_i E[s_i]; stream token s_{argmax x}; behaviour
  log-density Σ_i [u_i - exp(u_i) - log β], u = (m - x) / β (independent Gumbel(m_i, β)). β = 0: x = m, log-prob 0.

References used: one plain uncached forward over [E[prompt]; stored inputs; E[answer]] per rollout (no cache, no
padding, no batch), the formulas above written out here, torch.distributions.Gumbel, float64 finite differences,
the same prompts run one at a time, and hard mode (multiplex with K = 1). Models: random tiny Llama / Qwen2, tied
and untied (tests/arch.py), float32 on CPU unless a test says otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types

import pytest
import torch

from rl.logprobs import LogProbConfig, sequence_log_probs
from rollouts.config import CotConfig
from rollouts.distributions import cot_log_probs, noise_sigma
from rollouts.engine import generate, input_embedding_matrix
from rollouts.modes import cot_action_fn, draw_noise
from rollouts.record import Rollouts
from rollouts.stopping import StopSpec
from tests.arch import ARCH_IDS, ARCHS, one_thread, tiny_causal_lm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, EOS, THINK_END = 0, 1, 2
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # different lengths: left padding is exercised
NEVER_ENDS = (95, 95, 95)  # a delimiter the 96-token models never complete

LOGPROB_ATOL = 1e-4
"""Multiplex log-probs, nats. Engine (KV cache, padded batch), learner and the uncached reference see logits that
agree to ~1e-6 relative (logits ~10, different attention kernels), so each float32 log p(c_k) agrees to ~1e-5
and a sum of K = 3 to ~3e-5 (measured <= 1.5e-5). A wrong token, position or temperature costs >= 0.1 nats."""
GUMBEL_ATOL = 5e-4
"""Gumbel log-densities, nats. δ log π = Σ_i |1 - exp(u_i)| δm_i / β: the δm ~ 2e-5 of the logits is amplified by
exp(u) = exp(-g), which for a lower-tail draw g ≈ -2.5 (probability ~1e-5 per entry) is ~12. Measured <= 2e-5."""
INPUT_ATOL = 1e-5
"""Fed vectors recomputed from the stored ids / logits: the same float32 weighted sum of <= 5 rows of E
(entries ~0.6) in another order, so a few ulps; a wrong weight is >= 1e-2."""
MU_ATOL = 5e-5
"""Fed vectors of one step, batch vs alone or vs the uncached reference (as in test_rollout_engine): logits agree to
~1e-6 relative, and w ∝ p(c_k) or softmax(m / τ_g) with τ_g = 0.1 amplifies that by up to ~1 / τ_g times ‖E‖
(measured <= 1e-6 at step 0); a real bug (wrong position, leaked mask) is O(0.1)."""


@functools.cache
def model_for(arch: str, tied: bool, vocab_size: int = 96, hidden_size: int = 48):
    return tiny_causal_lm(arch, tied, vocab_size=vocab_size, hidden_size=hidden_size, seed=0)


def emb_of(model) -> torch.Tensor:
    """E, read from the model's embedding module (these architectures apply it unscaled)."""
    return model.get_input_embeddings().weight.detach().float()


def mux(**kw) -> CotConfig:
    base = dict(
        mode="multiplex",
        temperature=0.8,
        noise_scale=0.0,
        multiplex_k=3,
        max_think_tokens=8,
        max_answer_tokens=4,
        answer_temperature=1.0,
    )
    return CotConfig(**{**base, **kw})


def gum(**kw) -> CotConfig:
    base = dict(
        mode="gumbel",
        temperature=0.8,
        noise_scale=1.0,
        gumbel_k=5,
        gumbel_temperature=0.3,
        max_think_tokens=8,
        max_answer_tokens=4,
        answer_temperature=1.0,
    )
    return CotConfig(**{**base, **kw})


def run(
    model, cfg: CotConfig, prompts=PROMPTS, *, group_size=2, seed=0, think_end_ids=(THINK_END,)
) -> Rollouts:
    return generate(
        model,
        prompts,
        cfg,
        group_size=group_size,
        sigma=noise_sigma(input_embedding_matrix(model), cfg),
        stop=StopSpec.on_ids(think_end_ids),
        eos_id=EOS,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(seed),
    )


# ------------------------------------------------------------------------------------------- the reference


def row_logits(model, r: Rollouts, i: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """One uncached forward over [E[prompt]; h_0..h_{T-1}; E[answer]] of row i (no padding, no cache).
    Returns the logits that produced each CoT step [T, V] and each answer token [A, V]."""
    emb = model.get_input_embeddings().weight
    prompt = r.prompt_ids[i][r.prompt_mask[i]]
    t_len, a_len = int(r.cot_mask[i].sum()), int(r.answer_mask[i].sum())
    h = r.cot_inputs[i, :t_len].to(dtype)
    seq = torch.cat([emb[prompt], h, emb[r.answer_ids[i, :a_len]]])  # [P + T + A, d]
    logits = model(inputs_embeds=seq[None], use_cache=False).logits[0].to(dtype)  # [L, V]
    p_len = len(prompt)
    return logits[p_len - 1 : p_len - 1 + t_len], logits[p_len + t_len - 1 : p_len + t_len + a_len - 1]


def multiplex_log_prob(log_p: torch.Tensor, mix_ids: torch.Tensor) -> torch.Tensor:
    """Σ_k log p(c_k): [..., V], [..., K] -> [...]."""
    return log_p.gather(-1, mix_ids).sum(-1)


def gumbel_locations(log_p: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """m = log p renormalised over the support S (filtered tokens stay -inf): [..., V], [..., K] -> [..., K]."""
    ls = log_p.gather(-1, support)
    return ls - ls.logsumexp(-1, keepdim=True)


def gumbel_log_density(m: torch.Tensor, x: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ over finite entries of log Gumbel(x_i; m_i, β) = u_i - exp(u_i) - log β, u = (m - x) / β: [..., K] -> [...]"""
    finite = x.isfinite() & m.isfinite()
    u = torch.where(finite, (m - x) / beta, torch.zeros_like(x))
    return torch.where(finite, u - u.exp() - math.log(beta), torch.zeros_like(x)).sum(-1)


def mixture_weights(cfg: CotConfig, mix_logits: torch.Tensor) -> torch.Tensor:
    """The weights of the K stored tokens, from the stored logits alone: [..., K] -> [..., K]."""
    if cfg.mode == "gumbel":  # exp(-inf) = 0 for filtered entries
        return torch.softmax(mix_logits / cfg.gumbel_temperature, dim=-1)
    if cfg.multiplex_weights == "uniform":
        return torch.full_like(mix_logits, 1.0 / mix_logits.shape[-1])
    return torch.softmax(mix_logits, dim=-1)  # p(c_k) / Σ_j p(c_j), duplicates counted each time


def reference_cot_log_probs(
    cfg: CotConfig, sigma: float, z: torch.Tensor, r: Rollouts, i: int
) -> torch.Tensor:
    """The log-prob of each stored CoT action of row i under the logits z [T, V]: [T]."""
    t_len = z.shape[0]
    log_p = cot_log_probs(z, cfg)
    ids = r.cot_mix_ids[i, :t_len]
    if cfg.mode == "multiplex":
        return multiplex_log_prob(log_p, ids)
    return gumbel_log_density(gumbel_locations(log_p, ids), r.cot_mix_logits[i, :t_len], sigma)


# --------------------------------------------------------------------------------------- real rollout cases

CASES = {
    **{f"multiplex-{a}": (arch, tied, mux()) for (arch, tied), a in zip(ARCHS, ARCH_IDS, strict=True)},
    **{f"gumbel-{a}": (arch, tied, gum()) for (arch, tied), a in zip(ARCHS, ARCH_IDS, strict=True)},
    "multiplex-prob-top_p": ("qwen2", False, mux(multiplex_weights="prob", top_p=0.9, temperature=1.0)),
    "multiplex-prob-min_p": ("llama", True, mux(multiplex_weights="prob", min_p=0.1, multiplex_k=4)),
    # top_k = 3 < gumbel_k = 5: two entries of every support are filtered out (m = x = -inf, weight 0)
    "gumbel-top_k": ("llama", False, gum(top_k=3, noise_scale=0.7, gumbel_temperature=0.1)),
    "gumbel-top_p": ("qwen2", True, gum(top_p=0.8, gumbel_k=4, temperature=1.0)),
}


@functools.cache
def case(name: str):
    """(model, cfg, rollouts, per-row reference CoT logits [T_i, V] and answer logits [A_i, V])."""
    arch, tied, cfg = CASES[name]
    model = model_for(arch, tied)
    r = run(model, cfg, seed=3)
    with torch.no_grad():
        ref = [row_logits(model, r, i) for i in range(r.num_rollouts)]
    return model, cfg, r, ref


def test_gumbel_log_density_equals_torch_distributions() -> None:
    # the formula above against torch's own Gumbel(m, β).log_prob, summed over the finite entries, for β below,
    # at and above 1, including rows with filtered (-inf) entries
    g = torch.Generator().manual_seed(0)
    for beta in (0.3, 1.0, 2.5):
        m = torch.log_softmax(torch.randn(200, 5, generator=g, dtype=torch.float64), dim=-1)
        gumbel = -torch.log(-torch.log(torch.rand(200, 5, generator=g, dtype=torch.float64)))
        x = m + beta * gumbel
        x = x + 0.5 * torch.randn(200, 5, generator=g, dtype=torch.float64)  # also off the mode of the law
        m[::3, 3:] = float("-inf")  # a filter removed the last two tokens of every third row
        x[::3, 3:] = float("-inf")
        finite = x.isfinite()
        expect = torch.distributions.Gumbel(m[finite], torch.tensor(beta, dtype=torch.float64)).log_prob(
            x[finite]
        )
        expect = torch.zeros_like(x).masked_scatter(finite, expect).sum(-1)
        torch.testing.assert_close(gumbel_log_density(m, x, beta), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_behaviour_log_probs_match_teacher_forced_reference(name: str) -> None:
    # the engine's stored record (ids, logits, log-probs) recomputed from an uncached forward over its own inputs
    model, cfg, r, ref = case(name)
    # σ is the Gumbel scale β for gumbel; multiplex draws tokens and has no noise
    beta = cfg.noise_scale if cfg.mode == "gumbel" else 0.0
    assert noise_sigma(emb_of(model), cfg) == r.sigma == beta
    k = cfg.mix_width
    assert r.cot_mix_ids.shape == r.cot_mix_logits.shape == (*r.cot_mask.shape, k)
    assert r.cot_mix_ids.dtype == torch.int64 and r.cot_mix_logits.dtype == torch.float32
    assert r.cot_mask.sum() >= 20, "too few CoT steps for the test to mean anything"
    for i, (z, _) in enumerate(ref):
        t_len = z.shape[0]
        log_p = cot_log_probs(z, cfg)  # [T, V]
        ids, logits = r.cot_mix_ids[i, :t_len], r.cot_mix_logits[i, :t_len]
        if cfg.mode == "multiplex":
            # every draw is a token p allows, stored with its log p; the stream token is the first draw
            assert logits.isfinite().all() and log_p.gather(-1, ids).isfinite().all()
            torch.testing.assert_close(logits, log_p.gather(-1, ids), atol=LOGPROB_ATOL, rtol=0)
            assert torch.equal(r.cot_ids[i, :t_len], ids[:, 0])
        else:
            # S is the top-k of p: as many finite entries as the filter keeps (at most k), and these are the most
            # probable tokens; the stream token is the argmax of x
            finite = logits.isfinite()
            n_kept = log_p.isfinite().sum(-1).clamp(max=k)
            assert torch.equal(finite.sum(-1), n_kept), f"row {i}"
            top = torch.topk(log_p, k, dim=-1).indices
            for t in range(t_len):
                n = int(n_kept[t])
                assert sorted(ids[t][finite[t]].tolist()) == sorted(top[t, :n].tolist()), f"row {i} step {t}"
            assert torch.equal(r.cot_ids[i, :t_len], ids.gather(-1, logits.argmax(-1, keepdim=True))[:, 0])
        expect = reference_cot_log_probs(cfg, r.sigma, z, r, i)
        atol = LOGPROB_ATOL if cfg.mode == "multiplex" else GUMBEL_ATOL
        torch.testing.assert_close(r.cot_logprobs[i, :t_len], expect, atol=atol, rtol=0, msg=f"row {i}")
    assert (r.cot_logprobs[~r.cot_mask] == 0).all()


@pytest.mark.parametrize("name", list(CASES))
def test_learner_matches_rollout_and_uncached_reference(name: str) -> None:
    # rollout vs learner vs reference: the learner's teacher-forced log-probs of every CoT action (and answer token)
    # equal both the engine's behaviour log-probs and the reference from the plain uncached forward
    model, cfg, r, ref = case(name)
    with torch.no_grad():
        lp = sequence_log_probs(model, r, cfg, LogProbConfig(chunk_size=5), answer_temperature=1.0)
    atol = LOGPROB_ATOL if cfg.mode == "multiplex" else GUMBEL_ATOL
    torch.testing.assert_close(lp.cot[r.cot_mask], r.cot_logprobs[r.cot_mask], atol=atol, rtol=0)
    assert (lp.cot[~r.cot_mask] == 0).all()
    for i, (z, za) in enumerate(ref):
        t_len, a_len = z.shape[0], za.shape[0]
        expect = reference_cot_log_probs(cfg, r.sigma, z, r, i)
        torch.testing.assert_close(lp.cot[i, :t_len], expect, atol=atol, rtol=0, msg=f"row {i}")
        action = r.answer_action_mask[i, :a_len]
        ans = torch.log_softmax(za, dim=-1).gather(-1, r.answer_ids[i, :a_len, None])[:, 0]
        torch.testing.assert_close(lp.answer[i, :a_len][action], ans[action], atol=LOGPROB_ATOL, rtol=0)
        torch.testing.assert_close(
            r.answer_logprobs[i, :a_len][action], ans[action], atol=LOGPROB_ATOL, rtol=0
        )


@pytest.mark.parametrize("name", list(CASES))
def test_fed_inputs_are_the_weighted_mixture_of_the_stored_tokens(name: str) -> None:
    model, cfg, r, _ = case(name)
    emb = emb_of(model)
    w = mixture_weights(cfg, r.cot_mix_logits)  # [N, T, K]
    expect = (w[..., None] * emb[r.cot_mix_ids]).sum(-2) * r.cot_mask[..., None]  # [N, T, d]
    torch.testing.assert_close(r.cot_inputs, expect, atol=INPUT_ATOL, rtol=0)
    # the weights matter: the plain mean of the K embeddings is not what was fed, except for uniform multiplex
    plain = emb[r.cot_mix_ids].mean(-2) * r.cot_mask[..., None]
    same = (r.cot_inputs - plain).abs().amax(-1)[r.cot_mask] < INPUT_ATOL  # [M]
    if cfg.mode == "multiplex" and cfg.multiplex_weights == "uniform":
        assert same.all()
    else:
        assert not same.all()


# ------------------------------------------------------------------------------------------- sampling law

P6 = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03], dtype=torch.float64)
N_DRAWS = 20000


def _band(p: torch.Tensor, n: int = N_DRAWS, sigmas: float = 5.0) -> torch.Tensor:
    """5 binomial standard errors of a frequency estimate of p from n draws (two-sided tail ~6e-7 each)."""
    return sigmas * (p * (1 - p) / n).sqrt()


def _unit_inputs(cfg: CotConfig, tau: float, seed: int = 1):
    """log p = log P6 for every row, its raw logits z = τ log p (so softmax(z / τ) = P6), a random E [6, 8]."""
    log_p = P6.float().log().expand(N_DRAWS, -1).contiguous()
    z = tau * log_p
    assert torch.allclose(cot_log_probs(z, cfg), log_p, atol=1e-6)
    emb = torch.randn(6, 8, generator=torch.Generator().manual_seed(seed))
    return log_p, z, emb


@pytest.mark.parametrize("weights", ["uniform", "prob"])
def test_multiplex_draws_are_iid_from_p(weights: str) -> None:
    tau, k = 0.5, 3
    cfg = mux(temperature=tau, multiplex_k=k, multiplex_weights=weights)
    log_p, z, emb = _unit_inputs(cfg, tau)
    noise = draw_noise(cfg, 0.0, N_DRAWS, 6, 8, torch.Generator().manual_seed(0))
    assert noise.cot.shape == (N_DRAWS, k, 6) and (noise.cot > 0).all()  # q ~ Exp(1) per draw and token
    act = cot_action_fn(cfg, 0.0)(log_p, emb, noise.cot, z)
    c = act.mix_ids  # [n, K]
    assert c.shape == (N_DRAWS, k) and torch.equal(act.ids, c[:, 0])
    # each draw has law p, and the draws are independent: each pair's joint frequency is p_a p_b
    for j in range(k):
        freq = torch.bincount(c[:, j], minlength=6).double() / N_DRAWS
        assert ((freq - P6).abs() < _band(P6)).all(), (j, freq)
    for j1, j2 in ((0, 1), (0, 2), (1, 2)):
        joint = torch.bincount(6 * c[:, j1] + c[:, j2], minlength=36).double().view(6, 6) / N_DRAWS
        pp = P6[:, None] * P6[None, :]
        assert ((joint - pp).abs() < _band(pp)).all(), (j1, j2, (joint - pp).abs().max())
    # the K draws are not all the same token (which a single race copied K times would give)
    assert (c[:, 0] != c[:, 1]).double().mean() > 0.5
    # stored logits, behaviour log-prob and fed input, from the draws alone
    stored = P6.float().log()[c]  # [n, K]
    torch.testing.assert_close(act.mix_logits, stored, atol=1e-6, rtol=0)
    torch.testing.assert_close(act.logprobs, stored.sum(-1), atol=1e-5, rtol=0)
    w = mixture_weights(cfg, stored)
    torch.testing.assert_close(act.inputs, (w[..., None] * emb[c]).sum(-2), atol=INPUT_ATOL, rtol=0)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_gumbel_step_law(beta: float) -> None:
    # S = top-4 of P6, m = log q with q = P6 renormalised over S, x = m + β g. The stream token argmax(m + β g) has
    # law softmax(m / β) (Gumbel-max on m / β): q itself for β = 1 (the Gumbel-softmax), q² / Σq² for β = 1/2.
    tau, k, tau_g = 1.0, 4, 0.2
    cfg = gum(temperature=tau, noise_scale=beta, gumbel_k=k, gumbel_temperature=tau_g)
    log_p, z, emb = _unit_inputs(cfg, tau)
    noise = draw_noise(cfg, beta, N_DRAWS, 6, 8, torch.Generator().manual_seed(0))
    assert noise.cot.shape == (N_DRAWS, k)
    act = cot_action_fn(cfg, beta)(log_p, emb, noise.cot, z)
    assert act.mix_ids.shape == act.mix_logits.shape == (N_DRAWS, k)
    assert (act.mix_ids.sort(-1).values == torch.arange(4)).all()  # the support is the top 4, in any order
    q = P6[:4] / P6[:4].sum()
    law = torch.softmax(q.log() / beta, dim=0)
    freq = torch.bincount(act.ids, minlength=6).double() / N_DRAWS
    assert freq[4:].sum() == 0
    assert ((freq[:4] - law).abs() < _band(law)).all(), (freq, law)
    # the noise g = (x - m) / β is Gumbel(0, 1), independent across the support: exp(-g) ~ Exp(1) has mean 1
    # (n = 80000 entries: standard error 0.0035, so 0.02 is ~6 of them), and exp(-exp(-g)) is uniform (KS distance
    # below 1.95 / sqrt(n) = 0.0069 at the 0.1% level)
    m = gumbel_locations(log_p, act.mix_ids)  # [n, K]
    g = ((act.mix_logits - m) / beta).double()
    assert abs(torch.exp(-g).mean().item() - 1) < 0.02
    u = torch.exp(-torch.exp(-g)).flatten().sort().values
    ecdf = torch.arange(1, u.numel() + 1, dtype=torch.float64) / u.numel()
    assert (ecdf - u).abs().max() < 1.95 / math.sqrt(u.numel())
    corr = torch.corrcoef(g.T) - torch.eye(k, dtype=torch.float64)
    assert corr.abs().max() < 0.04, corr  # |corr| of independent columns has std 1/sqrt(n) = 0.007
    # stream token, behaviour log-density and fed input, from (S, x) alone
    assert torch.equal(act.ids, act.mix_ids.gather(-1, act.mix_logits.argmax(-1, keepdim=True))[:, 0])
    expect = gumbel_log_density(m.double(), act.mix_logits.double(), beta)
    torch.testing.assert_close(act.logprobs.double(), expect, atol=1e-4, rtol=1e-5)
    y = mixture_weights(cfg, act.mix_logits)
    torch.testing.assert_close(act.inputs, (y[..., None] * emb[act.mix_ids]).sum(-2), atol=INPUT_ATOL, rtol=0)


def test_greedy_actions() -> None:
    # multiplex τ = 0: the top K of p, the stream token c_1 its argmax, log-prob 0; gumbel β = 0: x = m, log-prob 0
    log_p = torch.log_softmax(torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), dim=-1)
    emb = torch.randn(10, 8, generator=torch.Generator().manual_seed(1))
    cfg = mux(temperature=0.0, multiplex_k=3, multiplex_weights="prob")
    noise = draw_noise(cfg, 0.0, 64, 10, 8, torch.Generator().manual_seed(2))
    act = cot_action_fn(cfg, 0.0)(log_p, emb, noise.cot, log_p)
    assert torch.equal(act.mix_ids.sort(-1).values, torch.topk(log_p, 3, dim=-1).indices.sort(-1).values)
    assert torch.equal(act.ids, log_p.argmax(-1)) and (act.logprobs == 0).all()
    cfg = gum(noise_scale=0.0, temperature=1.0, gumbel_k=4)
    noise = draw_noise(cfg, 0.0, 64, 10, 8, torch.Generator().manual_seed(2))
    act = cot_action_fn(cfg, 0.0)(log_p, emb, noise.cot, log_p)
    torch.testing.assert_close(act.mix_logits, gumbel_locations(log_p, act.mix_ids), atol=1e-6, rtol=0)
    assert torch.equal(act.ids, log_p.argmax(-1)) and (act.logprobs == 0).all()


# ------------------------------------------------------------------------------------------------ gradients


def float64_copy(model):
    """A float64 copy of the model that really computes in float64: Hugging Face's RMSNorm upcasts to float32 and
    back, which would leave ~1e-7 relative rounding in every evaluation (finite differences / ε of ~1e-2)."""
    model64 = copy.deepcopy(model).double()

    def rms_norm(self, x: torch.Tensor) -> torch.Tensor:  # the same formula, in the input's dtype
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model64.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm, module)
    return model64


def reference_total64(model64, cfg: CotConfig, r: Rollouts) -> torch.Tensor:
    """Σ over rows and steps of the reference CoT log-prob, in float64 (no filter in these cases), as a function
    of the parameters. The action of a step is its tokens (multiplex) or (S, x) (gumbel); what it feeds is a function
    of the action and of E: h = Σ w E[c] with E the model's current embedding and w from the stored logits (as a
    hard token feeds E[c]). One uncached forward per row over [E[prompt]; h_0..h_{T-1}]."""
    emb = model64.get_input_embeddings().weight
    total = torch.zeros((), dtype=torch.float64)
    for i in range(r.num_rollouts):
        prompt = r.prompt_ids[i][r.prompt_mask[i]]
        t_len = int(r.cot_mask[i].sum())
        ids, stored = r.cot_mix_ids[i, :t_len], r.cot_mix_logits[i, :t_len].double()
        h = (mixture_weights(cfg, stored)[..., None] * emb[ids]).sum(-2)  # [T, d]
        seq = torch.cat([emb[prompt], h])
        z = model64(inputs_embeds=seq[None], use_cache=False).logits[0, len(prompt) - 1 : -1]  # [T, V]
        log_p = torch.log_softmax(z / cfg.temperature, dim=-1)
        if cfg.mode == "multiplex":
            total = total + multiplex_log_prob(log_p, ids).sum()
        else:
            total = total + gumbel_log_density(gumbel_locations(log_p, ids), stored, r.sigma).sum()
    return total


FD_CASES = {
    "multiplex-llama-untied": ("llama", False, mux()),
    "multiplex-prob-qwen2-tied": ("qwen2", True, mux(multiplex_weights="prob")),
    "gumbel-llama-untied": ("llama", False, gum()),
    "gumbel-qwen2-tied": ("qwen2", True, gum(noise_scale=0.6, gumbel_k=3)),
}


@pytest.mark.parametrize("name", list(FD_CASES))
def test_learner_gradient_matches_float64_finite_differences(name: str) -> None:
    # d/dε of the float64 reference Σ log π along a random direction of each parameter tensor, by central
    # differences (ε = 1e-5: truncation ~ε² f''' and rounding ~1e-16 |f| / ε, both < 1e-9), against the learner's
    # autograd gradient on the same float64 model. The learner's log-probs are float32 inside, so its gradient
    # carries ~1e-6 relative rounding; 1e-4 relative to the directional derivative's scale covers it.
    arch, tied, cfg = FD_CASES[name]
    model = tiny_causal_lm(arch, tied, vocab_size=32, hidden_size=16, seed=1)
    cfg = dataclasses.replace(cfg, max_think_tokens=5, max_answer_tokens=2)
    r = run(model, cfg, PROMPTS[:2], group_size=1, seed=5, think_end_ids=(31, 31, 31))
    model64 = float64_copy(model)
    lp = sequence_log_probs(model64, r, cfg, LogProbConfig(chunk_size=3))
    model64.zero_grad(set_to_none=True)
    lp.cot.sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(
            lp.cot.sum().double(), reference_total64(model64, cfg, r), atol=1e-4, rtol=0
        )
    g = torch.Generator().manual_seed(0)
    eps, checked = 1e-5, 0
    for pname, param in model64.named_parameters():
        direction = torch.randn(param.shape, generator=g, dtype=torch.float64)
        direction /= direction.norm()
        with torch.no_grad():
            param += eps * direction
            up = reference_total64(model64, cfg, r).item()
            param -= 2 * eps * direction
            down = reference_total64(model64, cfg, r).item()
            param += eps * direction
        fd = (up - down) / (2 * eps)
        ad = 0.0 if param.grad is None else (param.grad * direction).sum().item()
        scale = max(abs(fd), 0.0 if param.grad is None else param.grad.norm().item(), 1e-2)
        assert abs(ad - fd) < 1e-4 * scale, f"{pname}: autograd {ad:.8g} vs finite differences {fd:.8g}"
        checked += fd != 0
    assert checked >= 10


LOGIT_CASES = {
    "multiplex": ("llama", False, mux(temperature=0.7)),
    "multiplex-top_p": ("qwen2", True, mux(temperature=1.0, top_p=0.8, multiplex_weights="prob")),
    "gumbel": ("llama", False, gum(noise_scale=0.8)),
    "gumbel-top_k": ("qwen2", True, gum(top_k=3, gumbel_k=5)),
}


@pytest.mark.parametrize("name", list(LOGIT_CASES))
def test_logit_gradient_matches_closed_form(name: str) -> None:
    # ∂ log π / ∂z for one step, from first principles (q = p renormalised over the finite support):
    #   multiplex: Σ_k (onehot(c_k) - p) / τ
    #   gumbel:    Σ_i (1 - exp(u_i)) / β · (onehot(s_i) - q 1[S]) / τ,  u = (m - x) / β
    # The learner's gradient is read at the decoder output h (z = W h per position, so ∂/∂h = Wᵀ ∂/∂z); with
    # V = 32 < d = 48, Wᵀ is injective and ∂/∂z is recovered by least squares. Positions are matched to CoT steps
    # by their logits (W h vs the reference z). Every position that produces no CoT step gets exactly 0.
    arch, tied, cfg = LOGIT_CASES[name]
    model = tiny_causal_lm(arch, tied, vocab_size=32, hidden_size=48, seed=2)
    r = run(model, cfg, PROMPTS, group_size=1, seed=4, think_end_ids=(31, 31, 31))
    seen: list[torch.Tensor] = []

    def keep(module, args, kwargs, out):
        out.last_hidden_state.retain_grad()
        seen.append(out.last_hidden_state)

    hook = model.get_decoder().register_forward_hook(keep, with_kwargs=True)
    try:
        lp = sequence_log_probs(model, r, cfg, LogProbConfig(chunk_size=0, share_prompts=False))
    finally:
        hook.remove()
    lp.cot.sum().backward()
    assert len(seen) == 1
    hidden, g_hidden = seen[0].detach(), seen[0].grad  # [B, L, d]
    w = model.get_output_embeddings().weight.detach()  # [V, d]
    logits = hidden @ w.T  # [B, L, V]
    used = torch.zeros(hidden.shape[:2], dtype=torch.bool)
    worst, checked = 0.0, 0
    for i in range(r.num_rollouts):
        with torch.no_grad():
            z, _ = row_logits(model, r, i)
        t_len = z.shape[0]
        for t in range(t_len):
            dist = (logits - z[t]).abs().amax(-1)  # [B, L]
            b, j = divmod(int(dist.argmin()), dist.shape[1])
            assert dist[b, j] < 1e-4 * z[t].abs().max(), f"no position has the logits of row {i} step {t}"
            used[b, j] = True
            g_z = torch.linalg.lstsq(w.T.double(), g_hidden[b, j].double()[:, None]).solution[:, 0]
            log_p = cot_log_probs(z[t], cfg)
            p = log_p.exp()
            ids = r.cot_mix_ids[i, t]
            if cfg.mode == "multiplex":
                expect = torch.nn.functional.one_hot(ids, 32).double().sum(0) - len(ids) * p.double()
                expect = expect / cfg.temperature
            else:
                x = r.cot_mix_logits[i, t].double()
                m = gumbel_locations(log_p, ids).double()
                fin = x.isfinite()
                q = torch.zeros(32, dtype=torch.float64).scatter(0, ids[fin], m[fin].exp())
                coef = (1 - torch.exp((m[fin] - x[fin]) / r.sigma)) / r.sigma  # [K_fin]
                onehots = torch.nn.functional.one_hot(ids[fin], 32).double()  # [K_fin, V]
                expect = (coef[:, None] * (onehots - q[None, :])).sum(0) / cfg.temperature
            err = (g_z - expect).abs().max().item()
            worst = max(worst, err / max(expect.abs().max().item(), 1.0))
            checked += 1
    # float32 gradients (~1e-6 relative) through a least-squares solve with cond(Wᵀ) ~ 10: 1e-4 relative
    assert worst < 1e-4, f"∂ log π / ∂z differs from the closed form by {worst:.3g} (relative)"
    assert checked == int(r.cot_mask.sum()) >= 10
    assert g_hidden[~used].abs().max() == 0


# --------------------------------------------------------------------------------------- batching and seeds


def _tensor_fields(r: Rollouts) -> dict[str, torch.Tensor]:
    return {
        f.name: getattr(r, f.name)
        for f in dataclasses.fields(r)
        if isinstance(getattr(r, f.name), torch.Tensor)
    }


GREEDY = {
    # uniform multiplex: the fed vector is a function of the discrete top K alone
    "multiplex-uniform": dict(
        mode="multiplex", temperature=0.0, noise_scale=0.0, multiplex_weights="uniform"
    ),
    # prob multiplex / gumbel: the fed vector depends continuously on the logits (w ∝ p(c_k), y = softmax(m / τ_g))
    "multiplex-prob": dict(mode="multiplex", temperature=0.0, noise_scale=0.0, multiplex_weights="prob"),
    "gumbel": dict(mode="gumbel", temperature=0.8, noise_scale=0.0, gumbel_temperature=0.1),
}


def greedy_cfg(name: str) -> CotConfig:
    base = dict(max_think_tokens=12, max_answer_tokens=6, answer_temperature=0.0)
    return CotConfig(**{**base, **GREEDY[name]})


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("name", list(GREEDY))
def test_greedy_batch_equals_one_by_one(name: str, arch: str, tied: bool) -> None:
    # greedy multiplex (τ = 0: the top K) and greedy gumbel (β = 0: x = m) are functions of the prompt. The batch of
    # prompts of lengths 5, 2, 3 with G = 2 is compared with each prompt run alone, and every stored step of the
    # batch with the greedy step recomputed from an uncached forward of that row alone over its own prefix.
    #
    # Whole trajectories are compared exactly where the fed vectors are a function of discrete choices (uniform
    # multiplex, and step 0 of every mode, which sees the prompt only). Where they depend continuously on the
    # logits (prob weights, gumbel's softmax(m / τ_g)) the recurrence is chaotic on these random models, as for
    # dense soft CoT (test_rollout_engine.test_batch_equals_one_by_one): measured, the batch-vs-alone gap of h_t
    # starts at ~1e-7 at step 0 (float32 rounding of another batch shape) and grows ~2-10x per step, to 1e-2..1 by
    # step 11 on some rows (e.g. qwen2-tied prob, prompt 3: log p of the draws differs by 1e-4 at step 2, 5e-2 at
    # step 9, and the top K changes at step 10). There the per-step check below is the padding-invariance check.
    model = model_for(arch, tied)
    cfg = greedy_cfg(name)
    assert cfg.deterministic
    emb = emb_of(model)
    batch = run(model, cfg, group_size=2)
    assert (batch.cot_logprobs == 0).all() and batch.sigma == 0.0
    chaotic = name != "multiplex-uniform"
    for b, prompt in enumerate(PROMPTS):
        alone = run(model, cfg, [prompt], group_size=1, seed=99)
        t, a = int(alone.cot_mask.sum()), int(alone.answer_mask.sum())
        assert t >= 2
        for row in (2 * b, 2 * b + 1):
            steps = 1 if chaotic else t
            assert torch.equal(batch.cot_ids[row, :steps], alone.cot_ids[0, :steps]), (b, row)
            assert torch.equal(batch.cot_mix_ids[row, :steps], alone.cot_mix_ids[0, :steps]), (b, row)
            torch.testing.assert_close(
                batch.cot_inputs[row, :steps], alone.cot_inputs[0, :steps], atol=MU_ATOL, rtol=0
            )
            torch.testing.assert_close(
                batch.cot_mix_logits[row, :steps], alone.cot_mix_logits[0, :steps], atol=LOGPROB_ATOL, rtol=0
            )
            if not chaotic:
                assert int(batch.cot_mask[row].sum()) == t and int(batch.answer_mask[row].sum()) == a
                assert torch.equal(batch.answer_ids[row, :a], alone.answer_ids[0, :a]), (b, row)
                assert batch.think_end[row] == alone.think_end[0]
            # the G copies of one prompt are identical, bit for bit
            fa, fb = (
                _tensor_fields(batch.select(slice(2 * b, 2 * b + 1))),
                _tensor_fields(batch.select(slice(2 * b + 1, 2 * b + 2))),
            )
            for key in fa:
                if key != "group_index":
                    assert torch.equal(fa[key], fb[key]), key
        # every step of the batch row: the greedy action of its own uncached prefix (top K / x = m, and h from it)
        with torch.no_grad():
            z, _ = row_logits(model, batch, 2 * b)
        log_p = cot_log_probs(z, cfg)  # [T, V]; greedy multiplex scores under the untempered p
        steps = z.shape[0]
        ids, stored = batch.cot_mix_ids[2 * b, :steps], batch.cot_mix_logits[2 * b, :steps]
        k = cfg.mix_width
        assert torch.equal(ids.sort(-1).values, torch.topk(log_p, k, dim=-1).indices.sort(-1).values)
        if cfg.mode == "multiplex":
            expect_logits = log_p.gather(-1, ids)
        else:
            expect_logits = gumbel_locations(log_p, ids)
        torch.testing.assert_close(stored, expect_logits, atol=LOGPROB_ATOL, rtol=0)
        w = mixture_weights(cfg, expect_logits)
        torch.testing.assert_close(
            batch.cot_inputs[2 * b, :steps], (w[..., None] * emb[ids]).sum(-2), atol=MU_ATOL, rtol=0
        )


@pytest.mark.parametrize("mode", ["multiplex", "gumbel"])
def test_same_seed_same_rollouts_different_seed_different(mode: str) -> None:
    model = model_for("qwen2", True)
    cfg = mux() if mode == "multiplex" else gum()
    a, b, c = (run(model, cfg, group_size=2, seed=s, think_end_ids=NEVER_ENDS) for s in (7, 7, 8))
    fa, fb = _tensor_fields(a), _tensor_fields(b)
    assert {"cot_mix_ids", "cot_mix_logits", "cot_inputs"} <= fa.keys()
    for name in fa:
        assert torch.equal(fa[name], fb[name]), name
    assert a.answer_texts == b.answer_texts
    # another seed, and the G samples of one prompt, differ through the noise alone
    assert not torch.equal(a.cot_inputs, c.cot_inputs)
    assert not torch.equal(a.cot_mix_logits, c.cot_mix_logits)
    assert not torch.equal(a.cot_inputs[0], a.cot_inputs[1])
    if mode == "multiplex":
        assert not torch.equal(a.cot_mix_ids, c.cot_mix_ids)
    else:  # same prompt, same first support: the perturbed logits of the two samples differ at step 0
        assert torch.equal(a.cot_mix_ids[0, 0], a.cot_mix_ids[1, 0])
        assert not torch.equal(a.cot_mix_logits[0, 0], a.cot_mix_logits[1, 0])


# ------------------------------------------------------------------------------------------- mode identities


@pytest.mark.parametrize("arch,tied", [ARCHS[0], ARCHS[3]], ids=[ARCH_IDS[0], ARCH_IDS[3]])
@pytest.mark.parametrize("weights", ["uniform", "prob"])
@pytest.mark.parametrize("tau", [0.8, 0.0])
def test_multiplex_k1_equals_hard(tau: float, weights: str, arch: str, tied: bool) -> None:
    # one draw from p is a hard token: with the same seed the same tokens, log-probs and answers, and the fed
    # vector is E[c] exactly (weight 1)
    model = model_for(arch, tied)
    kw = dict(temperature=tau, max_think_tokens=10, max_answer_tokens=5, top_p=0.95)
    hard = run(model, CotConfig(mode="hard", **kw), seed=11)
    one = run(model, mux(multiplex_k=1, multiplex_weights=weights, **kw), seed=11)
    assert hard.cot_mask.sum() >= 10
    for name in ("cot_ids", "cot_top1_ids", "cot_mask", "answer_ids", "answer_logprobs", "think_end"):
        assert torch.equal(getattr(one, name), getattr(hard, name)), name
    if tau > 0:
        assert torch.equal(one.cot_logprobs, hard.cot_logprobs)
    else:
        # the spec's two rules disagree here: a greedy multiplex step has log-prob 0, while greedy hard mode stores
        # the untempered log p of its argmax (test_rollout_engine); the greedy rule wins, hard keeps its own
        assert (one.cot_logprobs == 0).all()
        assert (hard.cot_logprobs[hard.cot_mask] < 0).any()
    assert torch.equal(one.cot_mix_ids[..., 0][one.cot_mask], hard.cot_ids[hard.cot_mask])
    assert torch.equal(one.cot_inputs, emb_of(model)[hard.cot_ids] * hard.cot_mask[..., None])


@pytest.mark.parametrize("arch,tied", [ARCHS[1], ARCHS[2]], ids=[ARCH_IDS[1], ARCH_IDS[2]])
def test_gumbel_tiny_mixture_temperature_feeds_the_stream_token(arch: str, tied: bool) -> None:
    # τ_g = 1e-6: the weight off the argmax of x is exp(-gap / τ_g), below float32 resolution unless two perturbed
    # logits are within ~2e-5 (probability ~1e-5 per step for continuous x)
    model = model_for(arch, tied)
    cfg = gum(gumbel_temperature=1e-6, max_think_tokens=10)
    r = run(model, cfg, seed=2)
    assert r.cot_mask.sum() >= 10
    top = r.cot_mix_ids.gather(-1, r.cot_mix_logits.argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(r.cot_ids[r.cot_mask], top[r.cot_mask])
    expect = emb_of(model)[r.cot_ids] * r.cot_mask[..., None]
    torch.testing.assert_close(r.cot_inputs, expect, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ refusals


def test_learner_refuses_greedy_mixture_rollouts() -> None:
    # a greedy step has no density (the top K / x = m is a point mass): nothing to score
    model = model_for("llama", True)
    for cfg in (mux(temperature=0.0), gum(noise_scale=0.0)):
        r = run(model, cfg, PROMPTS[:1], group_size=1)
        with pytest.raises(ValueError, match="greedy"):
            sequence_log_probs(model, r, cfg)


@pytest.mark.parametrize(
    "cfg,key,other",
    [
        (mux(multiplex_weights="uniform"), "multiplex_weights", "prob"),
        (mux(multiplex_weights="prob"), "multiplex_weights", "uniform"),
        (gum(gumbel_temperature=0.3), "gumbel_temperature", 0.1),
    ],
    ids=["weights-uniform", "weights-prob", "gumbel_temperature"],
)
def test_learner_refuses_other_mixture_settings(cfg: CotConfig, key: str, other) -> None:
    model = model_for("llama", True)
    r = run(model, cfg, PROMPTS[:2], group_size=2)
    with torch.no_grad():
        sequence_log_probs(model, r, cfg)  # the generating settings are accepted
        with pytest.raises(ValueError, match=key):
            sequence_log_probs(model, r, dataclasses.replace(cfg, **{key: other}))


# ------------------------------------------------------------------------------------------ the static engine


@pytest.mark.parametrize("name", ["multiplex-prob-top_p", "gumbel-qwen2-untied"])
def test_static_engine_draws_the_eager_records(name: str) -> None:
    # the static engine runs the eager Stepper on a preallocated cache and draws the same noise in the same order.
    # Its attention kernel rounds differently (~1e-7), and a fed mixture carries that into the next step's logits,
    # where these random models amplify it (~30x per step, as in test_static_engine): so step 0 (the same prefix)
    # gives the same K tokens (or support and perturbed logits) and the same fed mixture, and at every step the
    # learner scores the static record as the static engine stored it (the rollout-vs-learner gap)
    from rollouts.static_engine import StaticEngine

    arch, tied, cfg = CASES[name]
    model = model_for(arch, tied)
    eager = run(model, cfg, seed=5)
    static = StaticEngine(compile=False).generate(
        model,
        PROMPTS,
        cfg,
        group_size=2,
        sigma=noise_sigma(input_embedding_matrix(model), cfg),
        stop=StopSpec.on_ids((THINK_END,)),
        eos_id=EOS,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(eager.cot_mix_ids[:, 0], static.cot_mix_ids[:, 0])
    assert torch.equal(eager.cot_ids[:, 0], static.cot_ids[:, 0])
    torch.testing.assert_close(static.cot_inputs[:, 0], eager.cot_inputs[:, 0], atol=INPUT_ATOL, rtol=0)
    torch.testing.assert_close(
        static.cot_mix_logits[:, 0], eager.cot_mix_logits[:, 0], atol=INPUT_ATOL, rtol=0, equal_nan=True
    )
    assert static.cot_lengths.min() >= 2, "the check needs steps past the first"
    atol = LOGPROB_ATOL if cfg.mode == "multiplex" else GUMBEL_ATOL
    with torch.no_grad():
        lp = sequence_log_probs(model, static, cfg, LogProbConfig(chunk_size=5), answer_temperature=1.0)
    torch.testing.assert_close(
        lp.cot[static.cot_mask], static.cot_logprobs[static.cot_mask], atol=atol, rtol=0
    )
