"""Teacher-forced log-probs (rl/logprobs.py): gradients of the Gaussian action, chunked == dense, batch
independence, the rollout-vs-learner contract against a hand-written autoregressive loop, and the refusal to
score rollouts under another filter (top-k / top-p / min-p, answer top-p) than the one they record.

Models are random-weight tiny Llama / Qwen2 configs (float32, CPU), built here or by tests/arch.py (the rollout
engine's model, for the filter tests on real rollouts): no hub access.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rl.logprobs import LogProbConfig, SequenceLogProbs, log_prob_gap, sequence_log_probs
from rollouts.config import CotConfig
from rollouts.distributions import cot_log_probs, filter_logits, gaussian_log_prob, mixture_mean, noise_sigma
from rollouts.engine import generate, input_embedding_matrix
from rollouts.modes import answer_log_probs
from rollouts.record import Rollouts, concat_rollouts
from rollouts.replay import replay
from rollouts.stopping import StopSpec
from tests.arch import tiny_causal_lm

VOCAB = 37
HIDDEN = 16
PAD = 0
DELIM = (3, 4)  # the forced think-end delimiter: two hard tokens opening every answer

COT_CONFIGS = {
    "hard": CotConfig(mode="hard", temperature=1.0),
    "soft": CotConfig(mode="soft", temperature=0.5),
    "fuzzy": CotConfig(mode="fuzzy", temperature=1e-4),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are dominated by thread hand-off on a shared CPU (25x slower with 2 busy threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(arch: str = "llama", tied: bool = True, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        initializer_range=0.3,  # larger than the default 0.02 so that p_t is far from uniform
        pad_token_id=PAD,
    )
    config = LlamaConfig(**kwargs) if arch == "llama" else Qwen2Config(**kwargs)
    model = (LlamaForCausalLM if arch == "llama" else Qwen2ForCausalLM)(config)
    return model.float().eval()


def make_rollouts(
    model: torch.nn.Module,
    cot: CotConfig,
    prompt_lens: list[int],
    cot_lens: list[int],
    answer_lens: list[int],
    seed: int = 1,
) -> Rollouts:
    """Random rollouts (ids and vectors arbitrary; behaviour log-probs zero), prompts left-padded."""
    g = torch.Generator().manual_seed(seed)
    n, p, t, a = len(prompt_lens), max(prompt_lens), max(cot_lens), max(answer_lens)
    emb = model.get_input_embeddings().weight.detach()
    sigma = noise_sigma(emb, cot)
    prompt_ids = torch.full((n, p), PAD)
    prompt_mask = torch.zeros(n, p, dtype=torch.bool)
    cot_ids = torch.full((n, t), PAD)
    cot_mask = torch.zeros(n, t, dtype=torch.bool)
    answer_ids = torch.full((n, a), PAD)
    answer_mask = torch.zeros(n, a, dtype=torch.bool)
    cot_inputs = torch.zeros(n, t, HIDDEN)
    for i in range(n):
        prompt_ids[i, p - prompt_lens[i] :] = torch.randint(5, VOCAB, (prompt_lens[i],), generator=g)
        prompt_mask[i, p - prompt_lens[i] :] = True
        cot_ids[i, : cot_lens[i]] = torch.randint(5, VOCAB, (cot_lens[i],), generator=g)
        cot_mask[i, : cot_lens[i]] = True
        # a vector near a token embedding, plus noise: the kind of h_t a soft rollout stores
        cot_inputs[i, : cot_lens[i]] = emb[cot_ids[i, : cot_lens[i]]] + max(sigma, 0.1) * torch.randn(
            cot_lens[i], HIDDEN, generator=g
        )
        answer_ids[i, : answer_lens[i]] = torch.randint(5, VOCAB, (answer_lens[i],), generator=g)
        answer_ids[i, : len(DELIM)] = torch.tensor(DELIM)
        answer_mask[i, : answer_lens[i]] = True
    action_mask = answer_mask.clone()
    action_mask[:, : len(DELIM)] = False
    return Rollouts(
        cot_mode=cot.mode,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        group_index=torch.arange(n) // 2,
        cot_ids=cot_ids,
        cot_inputs=None if cot.mode == "hard" else cot_inputs,
        cot_top1_ids=cot_ids.clone(),
        cot_mask=cot_mask,
        cot_entropy=torch.zeros(n, t),
        cot_logprobs=torch.zeros(n, t),
        answer_ids=answer_ids,
        answer_mask=answer_mask,
        answer_action_mask=action_mask,
        answer_logprobs=torch.zeros(n, a),
        think_end=torch.zeros(n, dtype=torch.long),
        sigma=sigma,
        temperature=cot.temperature,
        top_k=cot.top_k,
        top_p=cot.top_p,
        min_p=cot.min_p,
    )


def select_rows(r: Rollouts, rows: list[int]) -> Rollouts:
    """The sub-batch of `rows`, with prompt / CoT / answer padding trimmed to the sub-batch's longest."""
    idx = torch.tensor(rows)
    pm = r.prompt_mask[idx]
    p = int(pm.sum(1).max())
    t = max(int(r.cot_mask[idx].sum(1).max()), 1)
    a = int(r.answer_mask[idx].sum(1).max())
    return Rollouts(
        cot_mode=r.cot_mode,
        prompt_ids=r.prompt_ids[idx][:, -p:],
        prompt_mask=pm[:, -p:],
        group_index=r.group_index[idx],
        cot_ids=r.cot_ids[idx][:, :t],
        cot_inputs=None if r.cot_inputs is None else r.cot_inputs[idx][:, :t],
        cot_top1_ids=r.cot_top1_ids[idx][:, :t],
        cot_mask=r.cot_mask[idx][:, :t],
        cot_entropy=r.cot_entropy[idx][:, :t],
        cot_logprobs=r.cot_logprobs[idx][:, :t],
        answer_ids=r.answer_ids[idx][:, :a],
        answer_mask=r.answer_mask[idx][:, :a],
        answer_action_mask=r.answer_action_mask[idx][:, :a],
        answer_logprobs=r.answer_logprobs[idx][:, :a],
        think_end=r.think_end[idx],
        sigma=r.sigma,
        temperature=r.temperature,
        **r.sampling,
    )


def weighted_sum(lp: SequenceLogProbs, seed: int = 7) -> torch.Tensor:
    """A scalar touching every output with distinct random weights, so gradients test each of them."""
    g = torch.Generator().manual_seed(seed)
    total = (lp.cot * torch.randn(lp.cot.shape, generator=g)).sum()
    total = total + (lp.answer * torch.randn(lp.answer.shape, generator=g)).sum()
    if lp.mu is not None:
        total = total + (lp.mu * torch.randn(lp.mu.shape, generator=g)).sum()
    return total


def grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- the Gaussian action's gradient


def test_gaussian_log_prob_gradient_matches_closed_form_and_finite_differences() -> None:
    # f(z, E) = log N(h; μ, σ²I), μ = softmax(z/τ) E, p = softmax(z/τ). From first principles:
    #   ∂f/∂μ = (h - μ) / σ²
    #   ∂f/∂E_k = p_k ∂f/∂μ                       (μ = Σ_k p_k E_k)
    #   ∂f/∂z_k = (1/τ) p_k (E_k - μ) · ∂f/∂μ     (softmax Jacobian ∂p_j/∂z_k = p_j(δ_jk - p_k)/τ)
    torch.manual_seed(0)
    v, d, tau, sigma = 9, 5, 0.5, 0.3
    cot = CotConfig(mode="soft", temperature=tau)
    z = torch.randn(v, requires_grad=True)
    emb = torch.randn(v, d, requires_grad=True)
    p = cot_log_probs(z, cot).exp()
    mu = mixture_mean(p, emb)
    mu.retain_grad()
    h = (mu + sigma * torch.randn(d)).detach()
    gaussian_log_prob(h, mu, sigma).backward()

    p_, mu_ = p.detach(), mu.detach()
    g_mu = (h - mu_) / sigma**2
    torch.testing.assert_close(mu.grad, g_mu)
    torch.testing.assert_close(emb.grad, p_[:, None] * g_mu[None, :])
    torch.testing.assert_close(z.grad, p_ * ((emb.detach() - mu_) @ g_mu) / tau, rtol=1e-5, atol=1e-5)

    # central finite differences of a float64 first-principles reference of the same function
    z64, e64, h64 = z.detach().double(), emb.detach().double(), h.double()

    def f64(zz: torch.Tensor, ee: torch.Tensor) -> float:
        m = torch.softmax(zz / tau, dim=-1) @ ee
        return float(-(h64 - m).pow(2).sum() / (2 * sigma**2) - 0.5 * d * math.log(2 * math.pi * sigma**2))

    step = 1e-6
    fd_z = torch.zeros(v, dtype=torch.float64)
    for k in range(v):
        dz = torch.zeros(v, dtype=torch.float64)
        dz[k] = step
        fd_z[k] = (f64(z64 + dz, e64) - f64(z64 - dz, e64)) / (2 * step)
    fd_e = torch.zeros(v, d, dtype=torch.float64)
    for k in range(v):
        for j in range(d):
            de = torch.zeros(v, d, dtype=torch.float64)
            de[k, j] = step
            fd_e[k, j] = (f64(z64, e64 + de) - f64(z64, e64 - de)) / (2 * step)
    torch.testing.assert_close(z.grad.double(), fd_z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(emb.grad.double(), fd_e, rtol=1e-4, atol=1e-4)
    # and the value itself
    assert abs(gaussian_log_prob(h, mu_, sigma).item() - f64(z64, e64)) < 1e-4


# ---------------------------------------------------------------- chunked == dense


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_chunked_equals_dense_values_and_gradients(arch: str, tied: bool, mode: str) -> None:
    # The chunked path only regroups the same per-position computations (and recomputes them in the backward
    # under checkpointing), so values and gradients must agree with the dense path up to float32 rounding.
    model = tiny_model(arch, tied)
    cot = COT_CONFIGS[mode]
    r = make_rollouts(model, cot, prompt_lens=[3, 6, 1], cot_lens=[5, 2, 4], answer_lens=[4, 6, 3])
    dense = sequence_log_probs(model, r, cot, LogProbConfig(chunk_size=0))
    g_dense = grads(model, weighted_sum(dense))
    chunked = sequence_log_probs(model, r, cot, LogProbConfig(chunk_size=3))  # 11 CoT / 7 answer positions
    g_chunked = grads(model, weighted_sum(chunked))

    torch.testing.assert_close(chunked.cot, dense.cot, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked.answer, dense.answer, rtol=1e-5, atol=1e-5)
    # fuzzy: τ = 1e-4 magnifies float32 rounding of z by 1e4, so entropies agree to ~1e-5 only
    torch.testing.assert_close(chunked.cot_entropy, dense.cot_entropy, rtol=1e-4, atol=1e-4)
    assert (dense.mu is None) == (mode == "hard")
    if dense.mu is not None:
        torch.testing.assert_close(chunked.mu, dense.mu)
    assert g_dense.keys() == g_chunked.keys()
    assert "model.embed_tokens.weight" in g_dense
    # fuzzy: a step whose top-2 logits are within ~1e-3 has p(1-p)/τ ~ 10 and the 1e4 magnification of z's
    # rounding moves its gradient by ~1e-3 relative; compare fuzzy gradients relative to their scale.
    tol = 1e-2 if mode == "fuzzy" else 1e-4
    for name in g_dense:
        scale = g_dense[name].abs().max().item()
        torch.testing.assert_close(
            g_chunked[name], g_dense[name], rtol=tol, atol=tol * max(scale, 1.0), msg=name
        )
    # masks and padding: exactly the real CoT steps and the sampled (non-delimiter) answer tokens are scored
    assert torch.equal(dense.cot_mask, r.cot_mask)
    assert torch.equal(dense.answer_mask, r.answer_action_mask)
    assert bool((dense.cot[~r.cot_mask] == 0).all()) and bool(
        (dense.answer[~r.answer_action_mask] == 0).all()
    )
    assert bool((dense.cot[r.cot_mask] != 0).all()) and bool((dense.answer[r.answer_action_mask] < 0).all())


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)])
def test_shared_prompts_equal_the_packed_rows(arch: str, tied: bool, mode: str) -> None:
    # Rows 0-2 share one prompt, rows 3-4 another, row 5 has its own (a GRPO batch cut at a group boundary), with
    # CoT lengths 0..5 (a 0-length CoT scores its first answer token after the delimiter) and ragged answers.
    # Encoding each prompt once and running the suffixes on its KV cache is the packed computation regrouped:
    # values and gradients agree up to float32 rounding.
    model = tiny_model(arch, tied)
    cot = COT_CONFIGS[mode]
    r = make_rollouts(
        model,
        cot,
        prompt_lens=[5, 5, 5, 2, 2, 7],
        cot_lens=[4, 0, 5, 2, 3, 1],
        answer_lens=[4, 6, 3, 5, 3, 4],
    )
    for row, source in ((1, 0), (2, 0), (4, 3)):
        r.prompt_ids[row] = r.prompt_ids[source]
    calls: list[int] = []
    hook = model.get_decoder().register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True
    )
    packed = sequence_log_probs(model, r, cot, LogProbConfig(chunk_size=4, share_prompts=False))
    g_packed = grads(model, weighted_sum(packed))
    shared = sequence_log_probs(model, r, cot, LogProbConfig(chunk_size=4))
    g_shared = grads(model, weighted_sum(shared))
    hook.remove()
    # the packed rows; then the 3 distinct prompts once, and the 6 suffixes on their cache
    assert calls == [6, 3, 6]

    torch.testing.assert_close(shared.cot, packed.cot, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(shared.answer, packed.answer, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared.cot_entropy, packed.cot_entropy, rtol=1e-4, atol=1e-4)
    if packed.mu is not None:
        torch.testing.assert_close(shared.mu, packed.mu, rtol=1e-5, atol=1e-6)
    assert g_shared.keys() == g_packed.keys()
    tol = 1e-2 if mode == "fuzzy" else 1e-4  # see test_chunked_equals_dense_values_and_gradients
    for name in g_packed:
        scale = g_packed[name].abs().max().item()
        torch.testing.assert_close(
            g_shared[name], g_packed[name], rtol=tol, atol=tol * max(scale, 1.0), msg=name
        )


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_row_alone_equals_row_in_batch(arch: str, mode: str) -> None:
    # Padding (prompt lengths 2..7, CoT 1..5, answers 3..6) must not change any row's numbers.
    model = tiny_model(arch, tied=arch == "llama")
    cot = COT_CONFIGS[mode]
    r = make_rollouts(model, cot, prompt_lens=[2, 7, 4], cot_lens=[5, 1, 3], answer_lens=[6, 3, 4])
    with torch.no_grad():
        batch = sequence_log_probs(model, r, cot, LogProbConfig(chunk_size=4))
        for i in range(3):
            alone = sequence_log_probs(model, select_rows(r, [i]), cot, LogProbConfig(chunk_size=4))
            t, a = alone.cot.shape[1], alone.answer.shape[1]
            torch.testing.assert_close(alone.cot[0], batch.cot[i, :t], rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(alone.answer[0], batch.answer[i, :a], rtol=1e-5, atol=1e-5)
            if alone.mu is not None:
                torch.testing.assert_close(alone.mu[0], batch.mu[i, :t], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- rollout-vs-learner contract


def run_loop(
    model: torch.nn.Module,
    cot: CotConfig,
    prompts: list[list[int]],
    cot_lens: list[int],
    answer_lens: list[int],
    answer_top_p: float = 1.0,
) -> Rollouts:
    """A plain autoregressive rollout, one row at a time, full forward each step (no cache, no padding).

    CoT step: z = logits at the last position; p = softmax(filter(z)/τ); hard: c ~ p, input E[c], log p[c];
    soft/fuzzy: μ = pE, h = μ + σε, input h, log N(h; μ, σ²I). Then the delimiter is forced; then answer tokens
    are sampled at τ = 1 (nucleus `answer_top_p`) with their log-probs.
    """
    g = torch.Generator().manual_seed(123)
    emb = model.get_input_embeddings().weight.detach()
    sigma = noise_sigma(emb, cot)
    n, p, t, a = len(prompts), max(map(len, prompts)), max(cot_lens), max(answer_lens)
    r = make_rollouts(model, cot, [len(x) for x in prompts], cot_lens, answer_lens)
    r.cot_logprobs = torch.zeros(n, t)
    r.answer_logprobs = torch.zeros(n, a)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            r.prompt_ids[i] = PAD
            r.prompt_ids[i, p - len(prompt) :] = torch.tensor(prompt)
            seq = emb[torch.tensor(prompt)]  # [L, d]
            for step in range(cot_lens[i]):
                z = model(inputs_embeds=seq[None]).logits[0, -1]  # [V]
                logp = cot_log_probs(z, cot)
                if cot.mode == "hard":
                    c = int(torch.multinomial(logp.exp(), 1, generator=g))
                    r.cot_ids[i, step] = c
                    r.cot_logprobs[i, step] = logp[c]
                    x = emb[c]
                else:
                    mu = mixture_mean(logp.exp(), emb)
                    x = mu + sigma * torch.randn(HIDDEN, generator=g)
                    r.cot_inputs[i, step] = x
                    r.cot_ids[i, step] = int(logp.argmax())
                    r.cot_logprobs[i, step] = gaussian_log_prob(x, mu, sigma)
                seq = torch.cat([seq, x[None]])
            seq = torch.cat([seq, emb[torch.tensor(DELIM)]])
            for k in range(len(DELIM), answer_lens[i]):
                z = filter_logits(model(inputs_embeds=seq[None]).logits[0, -1].float(), top_p=answer_top_p)
                logp = torch.log_softmax(z, dim=-1)
                tok = int(torch.multinomial(logp.exp(), 1, generator=g))
                r.answer_ids[i, k] = tok
                r.answer_logprobs[i, k] = logp[tok]
                seq = torch.cat([seq, emb[tok][None]])
    r.sigma = sigma
    r.answer_top_p = answer_top_p
    return r


LOOP_CASES = [
    ("llama", COT_CONFIGS["hard"]),
    ("llama", COT_CONFIGS["soft"]),
    ("llama", COT_CONFIGS["fuzzy"]),
    ("qwen2", COT_CONFIGS["soft"]),
    ("qwen2", CotConfig(mode="soft", temperature=0.5, top_k=5)),
    ("llama", CotConfig(mode="hard", temperature=1.0, top_p=0.8)),
]


@pytest.mark.parametrize(
    "arch,cot", LOOP_CASES, ids=[f"{a}-{c.mode}-k{c.top_k}-p{c.top_p}" for a, c in LOOP_CASES]
)
def test_learner_matches_autoregressive_loop(arch: str, cot: CotConfig) -> None:
    # The learner replays the loop's sequence in one teacher-forced pass; every CoT step's log-prob (Gaussian
    # density for soft/fuzzy, whose value is ~±60 nats here) and every answer token's must agree to < 1e-4.
    model = tiny_model(arch, tied=arch == "llama")
    prompts = [[5, 9, 11], [7, 8, 20, 21, 6, 30], [12]]
    r = run_loop(model, cot, prompts, cot_lens=[6, 3, 5], answer_lens=[5, 7, 3])
    with torch.no_grad():
        lp = sequence_log_probs(model, r, cot, LogProbConfig(chunk_size=4))
    cot_gap = (lp.cot - r.cot_logprobs)[r.cot_mask].abs().max().item()
    ans_gap = (lp.answer - r.answer_logprobs)[r.answer_action_mask].abs().max().item()
    assert cot_gap < 1e-4, f"CoT rollout-vs-learner gap {cot_gap:.3g} nats"
    assert ans_gap < 1e-4, f"answer rollout-vs-learner gap {ans_gap:.3g} nats"
    gap = log_prob_gap(r, lp)
    assert gap.cot <= cot_gap and gap.answer <= ans_gap
    assert gap.cot == pytest.approx((lp.cot - r.cot_logprobs)[r.cot_mask].abs().mean().item())


def test_answer_nucleus_is_scored_like_the_rollout() -> None:
    # Answers sampled from a top-p 0.6 nucleus: the learner must renormalise over the same nucleus; scoring the
    # full distribution instead would give log p_full(a) < log p_nucleus(a) on every token.
    model = tiny_model("llama")
    cot = COT_CONFIGS["soft"]
    r = run_loop(model, cot, [[5, 9], [7, 8, 20]], cot_lens=[2, 3], answer_lens=[6, 5], answer_top_p=0.6)
    with torch.no_grad():
        lp = sequence_log_probs(model, r, cot, answer_top_p=0.6)
        # the full distribution is what the learner would score without the record's answer_top_p check
        full = sequence_log_probs(model, replace(r, answer_top_p=1.0), cot)
    mask = r.answer_action_mask
    assert (lp.answer - r.answer_logprobs)[mask].abs().max().item() < 1e-4
    assert bool((full.answer[mask] < lp.answer[mask] + 1e-6).all())
    assert (lp.answer - full.answer)[mask].max().item() > 1e-2


def test_learner_gradient_matches_per_row_reference() -> None:
    # Reference: for each row, the model's own top-level forward over [E[prompt]; h (detached); E[answer]],
    # full logits, log-probs written out by hand, summed. Its gradient w.r.t. every parameter (through μ via the
    # logits and via E, and through E[prompt], E[answer] and the untied head) must equal the learner's.
    model = tiny_model("qwen2", tied=False)
    cot = COT_CONFIGS["soft"]
    r = make_rollouts(model, cot, prompt_lens=[4, 2], cot_lens=[3, 5], answer_lens=[5, 4])
    lp = sequence_log_probs(model, r, cot, LogProbConfig(chunk_size=2))
    g_learner = grads(model, lp.cot.sum() + lp.answer.sum())

    emb = model.get_input_embeddings()
    total = torch.zeros(())
    for i in range(2):
        prompt = r.prompt_ids[i][r.prompt_mask[i]]
        h = r.cot_inputs[i][r.cot_mask[i]]  # [T_i, d]
        ans = r.answer_ids[i][r.answer_mask[i]]
        seq = torch.cat([emb(prompt), h, emb(ans)])  # [L_i, d]
        logits = model(inputs_embeds=seq[None]).logits[0].float()  # [L_i, V]
        p_len, t_len = len(prompt), len(h)
        for t in range(t_len):
            mu = torch.softmax(logits[p_len + t - 1] / cot.temperature, dim=-1) @ emb.weight
            total = (
                total
                - (h[t] - mu).pow(2).sum() / (2 * r.sigma**2)
                - 0.5 * HIDDEN * math.log(2 * math.pi * r.sigma**2)
            )
        for k in range(len(DELIM), len(ans)):
            total = total + torch.log_softmax(logits[p_len + t_len + k - 1], dim=-1)[ans[k]]
    torch.testing.assert_close(lp.cot.sum() + lp.answer.sum(), total.detach(), rtol=1e-5, atol=1e-3)
    g_ref = grads(model, total)
    assert g_ref.keys() == g_learner.keys()
    for name in g_ref:
        torch.testing.assert_close(g_learner[name], g_ref[name], rtol=1e-4, atol=1e-3, msg=name)


# ---------------------------------------------------------------- contracts


def test_stored_vectors_receive_no_gradient() -> None:
    # h_t are constants: a gradient on them would mean backprop through the recurrence.
    model = tiny_model()
    cot = COT_CONFIGS["soft"]
    r = make_rollouts(model, cot, prompt_lens=[3, 2], cot_lens=[2, 3], answer_lens=[3, 4])
    r.cot_inputs = r.cot_inputs.clone().requires_grad_(True)
    lp = sequence_log_probs(model, r, cot)
    (lp.cot.sum() + lp.answer.sum()).backward()
    assert r.cot_inputs.grad is None
    assert model.get_input_embeddings().weight.grad is not None


def test_detach_and_entropy() -> None:
    # Entropy of p_t is in [0, log V] on real steps and 0 elsewhere; detach() keeps values and drops the graph.
    model = tiny_model()
    cot = COT_CONFIGS["soft"]
    r = make_rollouts(model, cot, prompt_lens=[3, 2], cot_lens=[2, 3], answer_lens=[3, 4])
    lp = sequence_log_probs(model, r, cot)
    ent = lp.cot_entropy[r.cot_mask]
    assert bool(((ent > 0) & (ent <= math.log(VOCAB) + 1e-5)).all()), ent
    assert bool((lp.cot_entropy[~r.cot_mask] == 0).all())
    old = lp.detach()
    assert lp.cot.requires_grad and lp.mu.requires_grad
    assert not old.cot.requires_grad and not old.mu.requires_grad and not old.answer.requires_grad
    assert torch.equal(old.cot, lp.cot.detach()) and old.sigma == lp.sigma


def test_rejects_mismatched_config_and_bad_masks() -> None:
    model = tiny_model()
    r = make_rollouts(model, COT_CONFIGS["soft"], prompt_lens=[3], cot_lens=[2], answer_lens=[3])
    with pytest.raises(ValueError, match="does not match"):
        sequence_log_probs(model, r, COT_CONFIGS["fuzzy"])
    r.cot_mask = torch.tensor([[False, True]])
    with pytest.raises(ValueError, match="cot_mask must be right-padded"):
        sequence_log_probs(model, r, COT_CONFIGS["soft"])


def test_detaching_the_mean_from_the_embedding_changes_only_that_gradient_path() -> None:
    # Same values either way; with the flag off, E's gradient loses exactly the μ = p E path, which for a sum of
    # Gaussian log-probs is Σ_t p_t ⊗ (h_t - μ_t) / σ² (∂ log N / ∂μ = (h - μ) / σ², ∂μ / ∂E = p_t ⊗ I).
    torch.manual_seed(0)
    model = tiny_model(tied=False)
    cot = COT_CONFIGS["soft"]
    r = make_rollouts(model, cot, prompt_lens=[3, 2], cot_lens=[2, 3], answer_lens=[3, 4])
    emb = model.get_input_embeddings().weight
    grads, values = [], []
    for through in (True, False):
        model.zero_grad()
        lp = sequence_log_probs(model, r, cot, LogProbConfig(mean_grad_through_embedding=through))
        lp.cot[r.cot_mask].sum().backward()
        grads.append(emb.grad.clone())
        values.append(lp)
    torch.testing.assert_close(values[0].cot, values[1].cot)
    mu = values[0].mu.detach()[r.cot_mask]  # [M, d]
    h = r.cot_inputs[r.cot_mask]  # [M, d]
    # p_t recomputed by the uncached teacher-forced replay of each sample (rows in mask order)
    from rollouts.replay import replay

    with torch.no_grad():
        p = torch.cat([replay(model, s, cot).cot_log_probs.exp() for s in r.samples()])  # [M, V]
    expected = p.T @ ((h - mu) / r.sigma**2)  # [V, d]
    torch.testing.assert_close(grads[0] - grads[1], expected, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- the filter the rollouts were sampled with

ENGINE_PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
NEVER_ENDS = (95, 95, 95)
"""A think-end delimiter the engine model never completes: every row thinks max_think_tokens steps."""
EOS = 1
FILTER_SETTINGS = {"top_k": 3, "top_p": 0.7, "min_p": 0.2, "answer_top_p": 0.7}
"""One strong setting per recorded field (off: 0 / 1.0 / 0.0 / 1.0), on the 96-token engine model."""
NO_FILTER = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "answer_top_p": 1.0}


@functools.cache
def engine_model() -> torch.nn.Module:
    """The rollout engine tests' tiny Llama (96 tokens, logits spread ~4 nats; see tests/arch.py)."""
    return tiny_causal_lm("llama", tied=True, vocab_size=96, seed=0)


def engine_rollouts(
    model: torch.nn.Module, cot: CotConfig, prompts=ENGINE_PROMPTS, seed: int = 0
) -> Rollouts:
    """Real rollouts from `rollouts.engine.generate`, G = 4 samples per prompt."""
    return generate(
        model,
        prompts,
        cot,
        group_size=4,
        sigma=noise_sigma(input_embedding_matrix(model), cot),
        stop=StopSpec.on_ids(NEVER_ENDS),
        eos_id=EOS,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(seed),
    )


def _score(model, r: Rollouts, cot: CotConfig, answer_top_p: float | None = None) -> SequenceLogProbs:
    with torch.no_grad():
        return sequence_log_probs(
            model, r, cot, answer_top_p=cot.answer_top_p if answer_top_p is None else answer_top_p
        )


@pytest.mark.parametrize("mode", ["hard", "soft"])
@pytest.mark.parametrize("key", list(FILTER_SETTINGS))
def test_scoring_under_another_filter_is_refused(key: str, mode: str) -> None:
    # The engine records the filter; the learner accepts exactly that filter and refuses any other, naming the
    # setting and both values (CoT filters through `cot`, the answer nucleus through `answer_top_p`).
    model = engine_model()
    tau = {"hard": 1.0, "soft": 0.5}[mode]
    noise = 0.33 if mode == "soft" else 0.0
    base = CotConfig(mode=mode, temperature=tau, noise_scale=noise, max_think_tokens=6, max_answer_tokens=4)
    on, off = FILTER_SETTINGS[key], NO_FILTER[key]
    name = key if key == "answer_top_p" else f"cot.{key}"
    for generated, scored in ((on, off), (off, on)):
        cot = replace(base, **{key: generated})
        r = engine_rollouts(model, cot, ENGINE_PROMPTS[:2])
        assert r.sampling == {**NO_FILTER, key: generated}
        _score(model, r, cot)  # the generating settings are accepted
        wrong = replace(cot, **{key: scored})
        expect = f"{name}={scored} but the rollouts were generated with {key}={generated}"
        with pytest.raises(ValueError, match=re.escape(expect)):
            _score(model, r, wrong)
    # the mode / temperature check keeps its message
    with pytest.raises(ValueError, match="does not match"):
        _score(model, r, replace(cot, temperature=tau / 2))


def test_every_differing_setting_is_named() -> None:
    model = engine_model()
    cot = CotConfig(mode="hard", temperature=1.0, top_k=3, min_p=0.2, max_think_tokens=4, max_answer_tokens=3)
    r = engine_rollouts(model, cot, ENGINE_PROMPTS[:1])
    with pytest.raises(ValueError) as err:
        _score(model, r, replace(cot, top_k=0, top_p=0.9), answer_top_p=0.5)
    message = str(err.value)
    for part in (
        "cot.top_k=0 but the rollouts were generated with top_k=3",
        "cot.top_p=0.9 but the rollouts were generated with top_p=1.0",
        "answer_top_p=0.5 but the rollouts were generated with answer_top_p=1.0",
    ):
        assert part in message, message
    assert "min_p" not in message  # equal settings are not listed


def test_recorded_filter_survives_select_and_concat() -> None:
    # The trainer concatenates rollout chunks and splits them into micro-batches: the record must survive both,
    # and the result must still score to the behaviour log-probs (gap < 1e-3, as for the engine's own output).
    model = engine_model()
    cot = CotConfig(
        mode="soft",
        temperature=0.5,
        noise_scale=0.33,
        top_k=5,
        top_p=0.9,
        min_p=0.05,
        answer_top_p=0.8,
        max_think_tokens=6,
        max_answer_tokens=4,
    )
    recorded = {"top_k": 5, "top_p": 0.9, "min_p": 0.05, "answer_top_p": 0.8}
    a = engine_rollouts(model, cot, ENGINE_PROMPTS[:2], seed=0)
    b = engine_rollouts(model, cot, ENGINE_PROMPTS[2:], seed=1)
    assert a.sampling == b.sampling == recorded
    both = concat_rollouts([a.select(slice(2, 8)), b])
    assert both.num_rollouts == 10 and both.sampling == recorded
    part = both.select(slice(3, 9))
    assert part.sampling == recorded
    for r in (both, part):
        gap = log_prob_gap(r, _score(model, r, cot))
        assert gap.cot < 1e-3 and gap.answer < 1e-3, gap
    with pytest.raises(ValueError, match="top_k"):
        _score(model, part, replace(cot, top_k=4))
    # parts sampled under different filters are not concatenated; the message names both values
    c = engine_rollouts(model, replace(cot, top_k=3, answer_top_p=1.0), ENGINE_PROMPTS[2:])
    with pytest.raises(ValueError) as err:
        concat_rollouts([a, c])
    assert "top_k=5 in part 0 but top_k=3 in part 1" in str(err.value)
    assert "answer_top_p=0.8 in part 0 but answer_top_p=1.0 in part 1" in str(err.value)


GAP_THRESHOLD = 0.1
"""Nats. 100x the 1e-3 bound within which the learner reproduces the engine's log-probs under the right filter
(measured ~1e-6 for hard, ~2e-5 for soft Gaussian densities): a mean gap above it cannot be float rounding."""


@pytest.mark.parametrize(
    "mode,key",
    [("hard", "top_k"), ("hard", "top_p"), ("hard", "min_p"), ("hard", "answer_top_p"), ("soft", "top_k")],
)
def test_the_refusal_prevents_a_silent_gap(mode: str, key: str) -> None:
    # What the check guards against. Rollouts are generated under a filter, then scored with the filter removed
    # by forging the record (dataclasses.replace) so that the check passes. For a hard action a sampled from the
    # filtered distribution, log p_filtered(a) - log p_full(a) = -log(mass the filter kept) > 0 at every action,
    # so the mean gap is exactly the mean removed mass in log space; the replay recomputes it independently.
    # Measured mean |gap| over 192 CoT steps / ~180 answer tokens (G = 4 x 3 prompts, T = 16, A <= 16):
    #   hard top_k=3: 0.204 nats   hard top_p=0.7: 0.227   hard min_p=0.2: 0.210   answer_top_p=0.7: 0.234
    #   soft (τ = 0.5, σ = 0.33 rms(E)) top_k=5: 0.180 (Gaussian density of h_t under the wrong μ_t)
    # versus < 2e-5 under the right filter. Milder filters give less (hard top_k=5: 0.108, top_p=0.9: 0.086,
    # answer_top_p=0.9: 0.084; soft top_p=0.9: 0.043), and on the trained tiny base (.cache/tiny_base, whose
    # distributions are peaked) 0.01-0.08 nats: each is a bias in every ratio π_θ / π_old with no error raised.
    model = engine_model()
    tau = {"hard": 1.0, "soft": 0.5}[mode]
    cot = CotConfig(
        mode=mode,
        temperature=tau,
        noise_scale=0.33 if mode == "soft" else 0.0,
        max_think_tokens=16,
        max_answer_tokens=16,
        **{key: 5 if (mode, key) == ("soft", "top_k") else FILTER_SETTINGS[key]},
    )
    r = engine_rollouts(model, cot)
    right = log_prob_gap(r, _score(model, r, cot))
    assert right.cot < 1e-3 and right.answer < 1e-3, right
    unfiltered = replace(cot, **NO_FILTER)
    with pytest.raises(ValueError, match=key):
        _score(model, r, unfiltered)
    forged = replace(r, **NO_FILTER)
    wrong = log_prob_gap(r, _score(model, forged, unfiltered))
    phase = "answer" if key == "answer_top_p" else "cot"
    other = "cot" if phase == "answer" else "answer"
    assert getattr(wrong, phase) > GAP_THRESHOLD, wrong
    assert getattr(wrong, other) < 1e-3, wrong  # the other phase is scored under its right (absent) filter
    if mode != "hard":
        return
    removed = []  # -log(kept mass) at every action of the phase, from the uncached replay
    for i, s in enumerate(r.samples()):
        rep, rep_filtered = replay(model, s, unfiltered), replay(model, s, cot)
        if phase == "cot":
            full, kept = rep.cot_log_probs, rep_filtered.cot_log_probs.isfinite()  # [T, V] (τ = 1)
        else:
            full = torch.log_softmax(rep.answer_logits, dim=-1)  # [A, V]
            kept = answer_log_probs(rep.answer_logits, cot).isfinite()
            actions = r.answer_action_mask[i, : len(s.answer_ids)]
            full, kept = full[actions], kept[actions]
        removed.append(-full.masked_fill(~kept, float("-inf")).logsumexp(dim=-1))
    expected = torch.cat(removed).mean().item()
    assert getattr(wrong, phase) == pytest.approx(expected, abs=1e-4)
