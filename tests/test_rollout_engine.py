"""The eager rollout engine against first principles and plain references, on tiny random Llama / Qwen2 models
with tied and untied embeddings (float32, CPU).

References used: the teacher-forced replay (`rollouts.replay`: one uncached forward over the record), per-prefix
uncached forwards, and the same prompts run one at a time.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch

from rl.logprobs import LogProbConfig, sequence_log_probs
from rollouts.config import CotConfig
from rollouts.distributions import embedding_rms, entropy, gaussian_log_prob, mixture_mean, noise_sigma
from rollouts.engine import generate, input_embedding_matrix
from rollouts.modes import answer_log_probs, continuous_action
from rollouts.record import Rollouts
from rollouts.replay import replay
from rollouts.stopping import StopSpec, phrase_table
from tests.arch import ARCH_IDS, ARCHS, EXTRA_ARCHS, one_thread, tiny_causal_lm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, EOS, THINK_END = 0, 1, 2
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # different lengths: left padding is exercised


@functools.cache
def model_for(arch: str, tied: bool):
    return tiny_causal_lm(arch, tied, vocab_size=96, seed=0)


def run(
    model,
    cfg: CotConfig,
    prompts=PROMPTS,
    *,
    group_size=1,
    seed=0,
    think_end_ids=(THINK_END,),
    stop: StopSpec | None = None,
    eos_id=EOS,
    sigma: float | None = None,
) -> Rollouts:
    if sigma is None:
        sigma = noise_sigma(input_embedding_matrix(model), cfg)
    return generate(
        model,
        prompts,
        cfg,
        group_size=group_size,
        sigma=sigma,
        stop=stop or StopSpec.on_ids(think_end_ids),
        eos_id=eos_id,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(seed),
    )


def greedy(mode: str, **kw) -> CotConfig:
    tau = {"hard": 0.0, "soft": 0.5, "fuzzy": 1e-4}[mode]
    base = dict(
        mode=mode,
        temperature=tau,
        noise_scale=0.0,
        max_think_tokens=12,
        max_answer_tokens=6,
        answer_temperature=0.0,
    )
    return CotConfig(**{**base, **kw})


MU_ATOL = 5e-5
"""Tolerance on μ between the engine (KV cache, padded batch) and an uncached replay. One step's logits agree to
~1e-6 relative (float32 rounding through different attention kernels, logits ~10); softmax(z/τ) E amplifies that
by about ‖E‖/τ, giving up to ~2e-5 on these models. A real bug (wrong position, leaked mask) is O(0.1)."""
GAUSS_ATOL = 2e-3
"""log N(h; μ, σ²) moves by ≈ ‖ε‖ ‖δμ‖ / σ ≈ sqrt(48) · 1e-5 / 0.19 ≈ 4e-4 nats for the δμ above (≈1e-5
typical); 2e-3 leaves margin yet is far below the whole nats a wrong μ costs."""


def assert_replay_consistent(model, r: Rollouts, cfg: CotConfig, atol: float = 1e-4) -> None:
    """Every stored behaviour log-prob (CoT and answer) equals the one recomputed by the teacher-forced replay,
    and forced delimiter tokens are non-actions with log-prob 0. `atol` is for token log-probs (float32
    log-softmax of logits that agree to ~1e-5)."""
    for i, s in enumerate(r.samples()):
        rep = replay(model, s, cfg)
        if s.cot_ids:
            if cfg.continuous:
                h = s.cot_inputs  # [T, d]
                if r.sigma > 0:
                    expect = gaussian_log_prob(h, rep.cot_means, r.sigma)
                    torch.testing.assert_close(torch.tensor(s.cot_logprobs), expect, atol=GAUSS_ATOL, rtol=0)
                else:
                    torch.testing.assert_close(h, rep.cot_means, atol=MU_ATOL, rtol=0)  # σ = 0: h_t = μ_t
                    assert s.cot_logprobs == [0.0] * len(s.cot_ids)
            else:
                expect = rep.cot_log_probs.gather(-1, torch.tensor(s.cot_ids)[:, None]).squeeze(-1)
                torch.testing.assert_close(torch.tensor(s.cot_logprobs), expect, atol=atol, rtol=1e-5)
            torch.testing.assert_close(
                torch.tensor(s.cot_entropy), entropy(rep.cot_log_probs), atol=1e-4, rtol=0
            )
            assert s.cot_top1_ids == rep.cot_log_probs.argmax(-1).tolist()
        ans_lp = answer_log_probs(rep.answer_logits, cfg)  # [A, V]
        ids = torch.tensor(s.answer_ids)
        action = r.answer_action_mask[i, : len(s.answer_ids)]
        expect = torch.where(action, ans_lp.gather(-1, ids[:, None]).squeeze(-1), 0.0)
        torch.testing.assert_close(torch.tensor(s.answer_logprobs), expect, atol=atol, rtol=1e-5)
        if cfg.answer_temperature == 0:  # greedy answer: each sampled token is the replay's argmax
            assert ids[action].tolist() == rep.answer_logits.argmax(-1)[action].tolist(), f"row {i}"


# --------------------------------------------------------------------------------------------- mode identities


@pytest.mark.parametrize("arch,tied", ARCHS + EXTRA_ARCHS, ids=ARCH_IDS + ["gemma-tied"])
def test_hard_greedy_cot_equals_hf_generate(arch: str, tied: bool) -> None:
    # hard greedy feeds E[c_t] through inputs_embeds; HF generate feeds ids through the embedding module. The two
    # agree token for token only if E is the matrix the module really applies (Gemma scales it by sqrt(d)) and the
    # left-padded positions / masks are right. The delimiter never completes, so the CoT is 12 free greedy steps.
    model = model_for(arch, tied)
    r = run(model, greedy("hard"), think_end_ids=(95, 95, 95))
    for i, s in enumerate(r.samples()):
        ids = torch.tensor([s.prompt_ids])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=PAD,
            )
        assert s.cot_ids == out[0, ids.shape[1] :].tolist(), f"row {i}"


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
def test_fuzzy_and_top1_soft_greedy_equal_hard_greedy(arch: str, tied: bool) -> None:
    # fuzzy: p = softmax(z / 1e-4) puts mass exp(-gap / 1e-4) off the argmax, so μ = E[argmax] up to float
    # rounding and the path follows hard greedy token for token. soft with top_k=1: p is exactly one-hot,
    # so μ = E[argmax] bit for bit.
    model = model_for(arch, tied)
    hard = run(model, greedy("hard"))
    for cfg in (greedy("fuzzy"), greedy("soft", top_k=1)):
        cont = run(model, cfg)
        assert torch.equal(cont.cot_top1_ids, hard.cot_ids), cfg
        assert torch.equal(cont.cot_ids, hard.cot_ids)
        assert torch.equal(cont.answer_ids, hard.answer_ids)
        assert torch.equal(cont.think_end, hard.think_end)
        e_hard = model.get_input_embeddings().weight[hard.cot_ids] * hard.cot_mask[..., None]  # [N, T, d]
        tol = 0.0 if cfg.top_k == 1 else 1e-5
        torch.testing.assert_close(cont.cot_inputs, e_hard, atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------- cache / batching


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
def test_kv_cached_soft_equals_recomputation(arch: str, tied: bool) -> None:
    # each CoT input t is produced from the logits after [E[prompt]; h_0..h_{t-1}]; an uncached full forward over
    # that prefix (no padding, no cache) must give the same logits to float32 rounding: < 1e-5 relative to the
    # largest logit (~10 here, so a few ulps; the cached and uncached passes run different attention kernels), and
    # so the same μ_t (σ = 0 so the stored h_t is μ_t) to MU_ATOL. The engine runs the 3 prompts as one
    # left-padded batch, so this is also the per-step padding-invariance check for dense soft mixtures.
    model = model_for(arch, tied)
    cfg = greedy("soft", max_think_tokens=8)
    seen: list[
        torch.Tensor
    ] = []  # the engine's logits, one [N, 1, V] per forward (prefill keeps only the last)
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o[:, -1].clone()))
    try:
        r = run(model, cfg)
    finally:
        hook.remove()
    emb = model.get_input_embeddings().weight.detach()
    checked = 0
    for i, s in enumerate(r.samples()):
        prefix = emb[torch.tensor(s.prompt_ids)]  # [P_i, d]
        for t in range(len(s.cot_ids)):
            with torch.no_grad():
                z = model(inputs_embeds=prefix[None], use_cache=False).logits[0, -1]  # [V]
            rel = (seen[t][i] - z).abs().max() / z.abs().max()
            assert rel < 1e-5, f"logits differ by {rel:.2e} (relative) at row {i} step {t}"
            mu = mixture_mean(torch.softmax(z / cfg.temperature, dim=-1), emb)  # [d]
            torch.testing.assert_close(s.cot_inputs[t], mu, atol=MU_ATOL, rtol=0, msg=f"mu, row {i} step {t}")
            prefix = torch.cat([prefix, s.cot_inputs[t : t + 1]])
            checked += 1
    assert checked == int(r.cot_lengths.sum()) > 0


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("mode", ["hard", "fuzzy"])
def test_batch_equals_one_by_one(arch: str, tied: bool, mode: str) -> None:
    # deterministic modes (greedy hard, σ = 0 fuzzy) must not depend on padding or batch neighbours: the batch of
    # prompts of lengths 5, 2, 3 (G = 2) equals each prompt run alone with G = 1, token for token. Dense soft
    # (τ = 0.5) is not compared over whole trajectories: on these random models the soft recurrence is chaotic
    # (a 1e-7 difference grows ~10x per step, measured), so float32 rounding from a different batch shape alone
    # changes late steps; its padding invariance is checked per step in test_kv_cached_soft_equals_recomputation.
    model = model_for(arch, tied)
    cfg = greedy(mode)
    batch = run(model, cfg, group_size=2).samples()
    for b, prompt in enumerate(PROMPTS):
        (alone,) = run(model, cfg, [prompt]).samples()
        for g in range(2):
            row = batch[2 * b + g]
            assert row.prompt_ids == prompt  # the G samples of a prompt are contiguous
            assert (row.cot_ids, row.answer_ids, row.think_end) == (
                alone.cot_ids,
                alone.answer_ids,
                alone.think_end,
            )
            torch.testing.assert_close(
                torch.tensor(row.cot_entropy), torch.tensor(alone.cot_entropy), atol=1e-5, rtol=0
            )
            if mode == "fuzzy":
                torch.testing.assert_close(row.cot_inputs, alone.cot_inputs, atol=MU_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------- noise


def test_noise_per_coordinate_std() -> None:
    # h - μ = σ ε with ε ~ N(0, I): with n = 20000 draws the std estimate of each coordinate has relative standard
    # error 1/sqrt(2n) = 0.5%, so 3% is a 6-sigma band; the mean has standard error σ/sqrt(n) = 0.007σ.
    n, v, d, sigma = 20000, 16, 8, 0.37
    emb = torch.randn(v, d)
    log_p = torch.log_softmax(torch.randn(n, v), dim=-1)  # [n, V]
    eps = torch.randn((n, d), generator=torch.Generator().manual_seed(0))  # [n, d]
    act = continuous_action(sigma)(log_p, emb, eps, log_p)  # the raw logits are only read by mixture modes
    noise = act.inputs - mixture_mean(log_p.exp(), emb)  # [n, d]
    std = noise.std(dim=0)  # [d]
    assert ((std / sigma - 1).abs() < 0.03).all(), std / sigma
    assert (noise.mean(dim=0).abs() < 0.04 * sigma).all()
    # coordinates are uncorrelated (|corr| for n = 20000 has std 0.007)
    corr = torch.corrcoef(noise.T) - torch.eye(d)
    assert corr.abs().max() < 0.04, corr


def test_race_noise_is_exponential_and_draws_from_p() -> None:
    # draw_noise's q = -log U, U ~ Uniform[0, 1), is Exp(1): mean 1 and variance 1 (n = 200k draws: standard errors
    # 0.0022 and 0.0045, so 0.02 is a wide band). The race argmax(log p - log q) then picks token v with
    # probability p_v: over n = 40000 races each frequency has standard error <= sqrt(0.25 / n) = 0.0025, and
    # 0.0125 is 5 of them.
    from rollouts.modes import draw_noise, sample_ids

    cfg = CotConfig(mode="hard", temperature=1.0, answer_temperature=0.0)
    q = draw_noise(cfg, 0.0, 20000, 10, 4, torch.Generator().manual_seed(0)).cot  # [20000, 10]
    assert q.shape == (20000, 10) and (q > 0).all()
    assert abs(q.mean().item() - 1) < 0.02 and abs(q.var().item() - 1) < 0.02
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    log_p = p.log().expand(40000, -1)  # [n, 6]; the last token has p = 0 and must never win
    noise = draw_noise(cfg, 0.0, 40000, 6, 4, torch.Generator().manual_seed(1)).cot
    freq = torch.bincount(sample_ids(log_p, noise), minlength=6).float() / 40000
    assert (freq - p).abs().max() < 0.0125, freq
    assert freq[5] == 0


def test_engine_noise_std_and_independence() -> None:
    # in the engine, h_t - μ_t (μ_t from the teacher-forced replay) has per-entry std σ = noise_scale × rms(E);
    # pooled over N·T·d ≈ 24k entries the relative standard error is 0.45%, so 3% is a wide band.
    model = model_for("llama", True)
    cfg = CotConfig(mode="soft", temperature=0.5, noise_scale=0.33, max_think_tokens=32, max_answer_tokens=1)
    sigma = noise_sigma(model.get_input_embeddings().weight, cfg)
    assert sigma == pytest.approx(0.33 * embedding_rms(model.get_input_embeddings().weight))
    # a delimiter that never comes, and an EOS the random model's top-1 never is: every CoT runs to its cap
    r = run(model, cfg, PROMPTS[:2], group_size=8, think_end_ids=(95, 95, 95), eos_id=10_000)
    noise = torch.cat([s.cot_inputs - replay(model, s, cfg).cot_means for s in r.samples()])  # [ΣT, d]
    assert noise.shape[0] == 16 * 32
    assert abs(noise.std().item() / sigma - 1) < 0.03, noise.std().item() / sigma
    # the G samples of one prompt share μ_0 (same prompt) and differ only through the noise: their first inputs
    # differ, and the step-0 noise of the G rows is uncorrelated across rows
    eps0 = (r.cot_inputs[:8, 0] - replay(model, r.samples()[0], cfg).cot_means[0]) / sigma  # [G, d]
    corr = torch.corrcoef(eps0) - torch.eye(8)
    assert corr.abs().max() < 0.75  # d = 48: |corr| of independent rows has std 0.14; identical rows give 1


# ------------------------------------------------------------------------------------------ behaviour log-probs


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize(
    "cfg",
    [
        CotConfig(mode="soft", temperature=0.5, noise_scale=0.33, max_think_tokens=10, max_answer_tokens=5),
        CotConfig(mode="fuzzy", temperature=1e-4, noise_scale=0.33, max_think_tokens=10, max_answer_tokens=5),
        CotConfig(
            mode="hard",
            temperature=1.0,
            top_p=0.9,
            max_think_tokens=10,
            max_answer_tokens=5,
            answer_top_p=0.9,
        ),
        CotConfig(
            mode="hard", temperature=0.0, max_think_tokens=10, max_answer_tokens=5, answer_temperature=0.0
        ),
    ],
    ids=["soft", "fuzzy", "hard-sample", "hard-greedy"],
)
def test_behaviour_logprobs_match_replay(arch: str, tied: bool, cfg: CotConfig) -> None:
    # the stored log-probs are recomputable from the stored record alone: Gaussian log N(h; μ(replay), σ²I) for
    # vectors, log p[c] for hard tokens (untempered for greedy, see rollouts.modes), answer tokens likewise.
    model = model_for(arch, tied)
    r = run(model, cfg, group_size=2, seed=3)
    assert_replay_consistent(model, r, cfg)
    assert (r.answer_ids[:, 0] == THINK_END).all() and not r.answer_action_mask[:, 0].any()


# ------------------------------------------------------------------------------------------------- seeding


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_same_seed_same_rollouts_different_seed_different(mode: str) -> None:
    model = model_for("qwen2", True)
    tau = {"hard": 1.0, "soft": 0.5, "fuzzy": 1e-4}[mode]
    cfg = CotConfig(mode=mode, temperature=tau, max_think_tokens=8, max_answer_tokens=4)
    a, b, c = (run(model, cfg, group_size=2, seed=s) for s in (7, 7, 8))
    for name in ("cot_ids", "cot_inputs", "cot_logprobs", "answer_ids", "answer_logprobs", "think_end"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    if mode == "hard":
        assert not torch.equal(a.cot_ids, c.cot_ids)
        # G samples of one prompt differ through sampling alone
        assert not torch.equal(a.cot_ids[0], a.cot_ids[1])
    else:
        assert a.cot_inputs.shape != c.cot_inputs.shape or not torch.equal(a.cot_inputs, c.cot_inputs)
        assert not torch.equal(a.cot_inputs[0, 0], a.cot_inputs[1, 0])


# ---------------------------------------------------------------------------------------------- think end


def _free_run(model, cfg: CotConfig, prompts=PROMPTS) -> Rollouts:
    """The reference stream: thinking can only end at max tokens (the delimiter id 95 x3 never completes)."""
    return run(model, cfg, prompts, think_end_ids=(95, 95, 95))


def _first_new(seq: list, start: int) -> int:
    """First index k >= start whose element does not occur earlier in seq."""
    return next(k for k in range(start, len(seq)) if seq[k] not in seq[:k])


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_think_end_by_top1_token(arch: str, tied: bool, mode: str) -> None:
    # choose as think-end id the stream token at step k (its first occurrence): the run must be identical to the
    # free run up to k, then end at k with no CoT input for step k and the delimiter forced at answer_ids[0].
    model = model_for(arch, tied)
    cfg = greedy(mode, max_think_tokens=16)
    stream = _free_run(model, cfg, PROMPTS[:1]).samples()[0].cot_top1_ids
    k = _first_new(stream, 3)
    (s,) = run(model, cfg, PROMPTS[:1], think_end_ids=(stream[k],)).samples()
    assert s.think_end == "token"
    assert s.cot_top1_ids == stream[:k]
    assert s.answer_ids[0] == stream[k] and s.answer_logprobs[0] == 0.0


def test_hard_sampled_think_end_uses_the_sampled_token() -> None:
    # hard mode ends thinking on the *sampled* token (the action), so a sampled think-end token is never fed as a
    # CoT input. Think-end = the most frequent sampled token of a free run, so many rows meet it.
    model = model_for("llama", False)
    cfg = CotConfig(mode="hard", temperature=1.0, max_think_tokens=16, max_answer_tokens=2)
    free = run(model, cfg, group_size=8, think_end_ids=(95, 95, 95))
    ids = free.cot_ids[free.cot_mask]
    token = int(torch.bincount(ids).argmax())
    r = run(model, cfg, group_size=8, think_end_ids=(token,))
    ended = r.think_end == 0  # "token"
    assert ended.sum() >= 4, "too few rows met the think-end token for the test to mean anything"
    assert not (r.cot_ids[r.cot_mask] == token).any()
    assert (r.answer_ids[ended, 0] == token).all()
    # whereas the top-1 of p_t is the think-end token on some recorded steps (it was not the sampled token there),
    # which a top-1 based rule would have stopped on
    assert (r.cot_top1_ids[r.cot_mask] == token).any()


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_think_end_by_multi_token_delimiter(arch: str, tied: bool, mode: str) -> None:
    # delimiter = the stream pair (s[k], s[k+1]) at the first k >= 2 where that pair is new. The match is seen at
    # step k+1; the partial step k is dropped, so cot = s[:k] and answer_ids starts with the full delimiter. The
    # answer must then be what the model says after prompt ++ s[:k] ++ delimiter: the replay checks it, which
    # fails if the dropped step were still visible in the KV cache.
    model = model_for(arch, tied)
    cfg = greedy(mode, max_think_tokens=16)
    free = _free_run(model, cfg, PROMPTS).samples()
    stream = free[0].cot_top1_ids
    pairs = list(zip(stream, stream[1:], strict=False))
    k = _first_new(pairs, 2)
    delim = pairs[k]
    r = run(model, cfg, think_end_ids=delim)
    s = r.samples()[0]
    assert s.think_end == "delimiter"
    assert s.cot_top1_ids == stream[:k]
    assert tuple(s.answer_ids[:2]) == delim and s.answer_logprobs[:2] == [0.0, 0.0]
    assert not r.answer_action_mask[0, :2].any() and r.answer_action_mask[0, 2]
    assert_replay_consistent(model, r, cfg)  # every row, whether or not it met the delimiter


@pytest.mark.parametrize("arch,tied", [ARCHS[0], ARCHS[3]], ids=[ARCH_IDS[0], ARCH_IDS[3]])
def test_think_end_by_entropy_cold_stop(arch: str, tied: bool) -> None:
    model = model_for(arch, tied)
    patience = 2
    # threshold above log V: every step is cold, so thinking stops after exactly `patience` recorded steps
    r = run(model, greedy("soft", entropy_stop_threshold=math.log(96) + 1, entropy_stop_patience=patience))
    assert r.cot_lengths.tolist() == [patience] * 3 and r.think_end.tolist() == [2] * 3
    # threshold at the median entropy of the free run: the stop comes at the first i with the `patience`
    # previous recorded steps all below it (the greedy path is unchanged until then)
    (free,) = _free_run(model, greedy("soft", max_think_tokens=16), PROMPTS[:1]).samples()
    ent = free.cot_entropy
    thr = sorted(ent)[len(ent) // 2]
    i = next(i for i in range(patience, len(ent) + 1) if all(h < thr for h in ent[i - patience : i]))
    cfg = greedy("soft", max_think_tokens=16, entropy_stop_threshold=thr, entropy_stop_patience=patience)
    (s,) = _free_run(model, cfg, PROMPTS[:1]).samples()
    assert len(s.cot_ids) == i and s.cot_ids == free.cot_ids[:i]
    assert s.think_end == ("entropy" if i < 16 else "max_tokens")


@pytest.mark.parametrize("max_think", [0, 5])
def test_think_end_by_max_tokens(max_think: int) -> None:
    # no delimiter ever completes: every row thinks exactly max_think steps, then the delimiter is forced
    model = model_for("qwen2", False)
    r = _free_run(model, greedy("fuzzy", max_think_tokens=max_think))
    assert r.cot_lengths.tolist() == [max_think] * 3
    assert r.think_end.tolist() == [3] * 3
    assert r.answer_ids[:, :3].tolist() == [[95, 95, 95]] * 3 and not r.answer_action_mask[:, :3].any()


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_think_end_by_eos(mode: str) -> None:
    # EOS as the stream token of step k ends thinking there, like a think-end token: no CoT input for step k (the
    # model would otherwise be fed its own end of turn and go on), the delimiter forced, the answer after it
    model = model_for("llama", True)
    cfg = greedy(mode, max_think_tokens=16)
    stream = _free_run(model, cfg, PROMPTS[:1]).samples()[0].cot_top1_ids
    k = _first_new(stream, 3)
    r = run(model, cfg, PROMPTS[:1], think_end_ids=(95, 95, 95), eos_id=stream[k])
    (s,) = r.samples()
    assert s.think_end == "eos"
    assert s.cot_top1_ids == stream[:k]
    assert s.answer_ids[:3] == [95, 95, 95] and s.answer_logprobs[:3] == [0.0] * 3
    assert_replay_consistent(model, r, cfg)


TEXTS = [f"t{i};" for i in range(96)]  # a made-up text for every token of the random models' vocabulary
PREFILL, CAPPED = (40, 41), (50, 51, 40, 41)


def _text_stop(phrase: str, prefill: tuple[int, ...] = PREFILL) -> StopSpec:
    return StopSpec.on_text(phrase_table(phrase, TEXTS), CAPPED, prefill)


@pytest.mark.parametrize("arch,tied", [ARCHS[0], ARCHS[3]], ids=[ARCH_IDS[0], ARCH_IDS[3]])
@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_think_end_by_phrase_on_the_decoded_stream(arch: str, tied: bool, mode: str) -> None:
    # the phrase starts inside the text of stream token k-1 and ends inside that of token k (a phrase merged with
    # the characters around it, as BPE merges "is:" with what follows). The first k whose decoded prefix holds it
    # is found by plain string search; the CoT keeps token k (the phrase is part of the CoT), then the prefill is
    # forced and the answer follows, and the replay agrees with every stored log-prob.
    model = model_for(arch, tied)
    cfg = greedy(mode, max_think_tokens=16)
    stream = _free_run(model, cfg, PROMPTS[:1]).samples()[0].cot_top1_ids
    pairs = list(zip(stream, stream[1:], strict=False))
    j = _first_new(pairs, 2)
    phrase = TEXTS[stream[j]][1:] + TEXTS[stream[j + 1]][:2]
    k = next(k for k in range(len(stream)) if phrase in "".join(TEXTS[t] for t in stream[: k + 1]))
    r = run(model, cfg, PROMPTS[:1], stop=_text_stop(phrase), eos_id=95)
    (s,) = r.samples()
    assert s.think_end == "phrase"
    assert s.cot_top1_ids == stream[: k + 1]
    assert tuple(s.answer_ids[:2]) == PREFILL and s.answer_logprobs[:2] == [0.0, 0.0]
    assert not r.answer_action_mask[0, :2].any() and r.answer_action_mask[0, 2]
    assert_replay_consistent(model, r, cfg)


def test_text_rule_at_the_cap_forces_phrase_and_prefill_and_without_prefill_answers_at_once() -> None:
    model = model_for("qwen2", False)
    cfg = greedy("soft", max_think_tokens=6)
    r = run(model, cfg, stop=_text_stop("never said"), eos_id=95)  # no token text holds a space
    assert r.think_end.tolist() == [3] * 3 and r.cot_lengths.tolist() == [6] * 3  # max_tokens
    assert r.answer_ids[:, :4].tolist() == [list(CAPPED)] * 3 and not r.answer_action_mask[:, :4].any()
    assert_replay_consistent(model, r, cfg)
    stream = r.samples()[0].cot_top1_ids
    bare = run(model, cfg, PROMPTS[:1], stop=_text_stop(TEXTS[stream[2]], prefill=()), eos_id=95)
    (s,) = bare.samples()
    k = next(k for k in range(6) if TEXTS[stream[2]] in "".join(TEXTS[t] for t in stream[: k + 1]))
    assert s.think_end == "phrase" and len(s.cot_ids) == k + 1
    assert bare.answer_action_mask[0, 0]  # nothing forced: the step after the phrase samples the answer


def test_answer_stops_at_eos_and_at_max_answer_tokens() -> None:
    model = model_for("llama", False)
    cfg = greedy("hard", max_answer_tokens=6)
    free = run(model, cfg, PROMPTS[:1], eos_id=95).samples()[0]
    # no EOS: exactly max_answer_tokens sampled tokens after the 1-token delimiter
    assert len(free.answer_ids) == 1 + 6
    answer = free.answer_ids[1:]
    j = _first_new(answer, 1)
    r = run(model, cfg, PROMPTS[:1], eos_id=answer[j])
    # EOS at the j-th sampled token: kept, an action, and nothing after it
    assert r.answer_ids[0].tolist() == free.answer_ids[: 2 + j]
    assert r.answer_action_mask[0].tolist() == [False] + [True] * (j + 1)


# ------------------------------------------------------------------------------------------------- filters


def _kept(z: torch.Tensor, filt: str) -> torch.Tensor:
    """The kept-token mask, written out independently of `filter_logits`."""
    p = torch.softmax(z, dim=-1)
    if filt == "top_k":
        return z >= torch.sort(z, descending=True).values[2]  # the 3 largest
    if filt == "min_p":
        return p >= 0.2 * p.max()
    # top_p = 0.7: the smallest most-likely-first prefix whose mass reaches 0.7
    order = torch.argsort(p, descending=True)
    n_keep = int((torch.cumsum(p[order], 0) < 0.7).sum()) + 1
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


@pytest.mark.parametrize("filt", ["top_k", "top_p", "min_p"])
def test_filtered_mixture_uses_kept_tokens_only(filt: str) -> None:
    # μ_t = Σ_{v kept} p_v E_v with p = softmax over the kept logits / τ; the entropy is that of the kept mixture
    model = model_for("llama", True)
    setting = {"top_k": dict(top_k=3), "top_p": dict(top_p=0.7), "min_p": dict(min_p=0.2)}[filt]
    cfg = greedy("soft", max_think_tokens=6, **setting)
    emb = model.get_input_embeddings().weight.detach()
    r = run(model, cfg, PROMPTS[:2])
    sizes = []
    for s in r.samples():
        seq = torch.cat([emb[torch.tensor(s.prompt_ids)], s.cot_inputs])  # [P + T, d]
        with torch.no_grad():
            z = model(inputs_embeds=seq[None]).logits[0, len(s.prompt_ids) - 1 : -1]  # [T, V] raw logits
        for t in range(len(s.cot_ids)):
            keep = _kept(z[t], filt)
            p = torch.softmax(z[t][keep] / cfg.temperature, dim=-1)  # [K]
            torch.testing.assert_close(s.cot_inputs[t], p @ emb[keep], atol=MU_ATOL, rtol=0)
            assert s.cot_entropy[t] == pytest.approx(-(p * p.log()).sum().item(), abs=1e-4)
            sizes.append(int(keep.sum()))
    assert min(sizes) < 96, "the filter never removed a token: the test would not tell a mixture over all V"


# -------------------------------------------------------------------------------------------- record details


class _Tok:
    """Minimal tokenizer: id v decodes to chr(65 + v); the pad / eos / think-end ids are special (skipped)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        special = {PAD, EOS, THINK_END}
        return "".join(chr(65 + i) for i in ids if not (skip_special_tokens and i in special))


def test_answer_texts_group_layout_and_samples() -> None:
    model = model_for("llama", True)
    cfg = CotConfig(mode="hard", temperature=1.0, max_think_tokens=6, max_answer_tokens=5)
    r = generate(
        model,
        PROMPTS,
        cfg,
        group_size=3,
        sigma=0.0,
        stop=StopSpec.on_ids((THINK_END,)),
        eos_id=EOS,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(0),
        tokenizer=_Tok(),
    )
    assert r.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert r.cot_inputs is None and r.sigma == 0.0 and r.temperature == 1.0
    for i, s in enumerate(r.samples()):
        # the text is the decoded sampled answer tokens only (the forced delimiter is not part of it)
        sampled = [t for t, act in zip(s.answer_ids, r.answer_action_mask[i].tolist(), strict=False) if act]
        assert r.answer_texts[i] == s.answer_text == _Tok().decode(sampled, skip_special_tokens=True)
        assert s.prompt_ids == PROMPTS[i // 3]
        # padding past each length is blank
        assert (r.cot_ids[i, len(s.cot_ids) :] == PAD).all() and (
            r.answer_ids[i, len(s.answer_ids) :] == PAD
        ).all()
        assert (r.cot_logprobs[i, len(s.cot_ids) :] == 0).all() and (
            r.answer_logprobs[i, len(s.answer_ids) :] == 0
        ).all()


def test_bf16_model_keeps_float32_records() -> None:
    # DESIGN.md numerics: p, μ, log-probs and the stored h_t are float32 even when the model runs in bf16
    model = tiny_causal_lm("qwen2", False, seed=0).to(torch.bfloat16)
    cfg = CotConfig(mode="soft", temperature=0.5, noise_scale=0.33, max_think_tokens=6, max_answer_tokens=3)
    r = run(model, cfg)
    assert r.cot_inputs.dtype == torch.float32
    assert r.cot_logprobs.dtype == r.cot_entropy.dtype == r.answer_logprobs.dtype == torch.float32
    assert torch.isfinite(r.cot_inputs).all() and torch.isfinite(r.cot_logprobs).all()
    # h_t keeps float32 detail: a bf16 round trip would change it
    assert not torch.equal(r.cot_inputs, r.cot_inputs.bfloat16().float())


# ------------------------------------------------------------------------------------------- library warnings


@pytest.mark.parametrize("arch,tied", ARCHS, ids=ARCH_IDS)
def test_no_transformers_deprecation_warning(arch: str, tied: bool) -> None:
    # The engine and the learner pass the KV cache as `cache=`: transformers 5.24 warns (FutureWarning) that
    # `past_key_values=` is "deprecated and will be removed in version 5.40.0". Neither the engine's prefill and
    # decode steps nor the learner's shared-prompt (cached), packed (uncached) and chunked-backward paths may
    # emit any deprecation warning.
    model = model_for(arch, tied)
    cfg = CotConfig(mode="soft", temperature=0.5, noise_scale=0.33, max_think_tokens=6, max_answer_tokens=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run(model, cfg, group_size=2)
        hard_cfg = CotConfig(mode="hard", temperature=1.0, max_think_tokens=6, max_answer_tokens=4)
        hard = run(model, hard_cfg, group_size=2)
        for share in (True, False):
            with torch.no_grad():
                sequence_log_probs(model, hard, hard_cfg, LogProbConfig(share_prompts=share))
            lp = sequence_log_probs(model, r, cfg, LogProbConfig(chunk_size=4, share_prompts=share))
            (lp.cot.sum() + lp.answer.sum()).backward()
        model.zero_grad(set_to_none=True)
    deprecated = [f"{w.category.__name__}: {w.message}" for w in caught if "deprecated" in str(w.message)]
    assert not deprecated, deprecated
