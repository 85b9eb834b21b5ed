"""The paper recipe's learner objective has exactly the gradient of the paper's Eq. 14 (../shared/PAPER.md).

Eq. 14 ("Soft Tokens, Hard Truths", RLOO REINFORCE): for B prompts × G samples,

    A_{b,g} = r_{b,g} - mean of the other G-1 rewards of prompt b            (stop-gradient)
    ℓ_{b,g} = Σ over ALL action steps of the sequence of log π(step)        (a SUM: every CoT step, every
              sampled answer token; forced delimiter / prefill tokens are not actions)
    L       = -1/(B·G) Σ_b Σ_g A_{b,g} ℓ_{b,g}

with, per CoT step t, log π(h̃_t) = -‖h̃_t - h_t‖² / (2σ²) + const for soft / fuzzy CoT (h_t = softmax(z_{t-1}/τ)·E,
the mixture of the input embedding matrix E under the logits at the previous position; the stored h̃_t is a
constant input, no backpropagation through time) and the categorical log softmax(z_{t-1}/τ)[c_t] for hard CoT;
answer tokens score log softmax(z / answer_temperature) at the sampled token.

The reference below computes that from scratch: one plain teacher-forced forward per rollout over
prompt ++ CoT inputs ++ answer tokens (no padding, explicit positions), straight from the `Rollouts` fields, with
its own RLOO. It shares no code with rl/logprobs.py, rl/loss.py, rl/learner.py or rollouts/replay.py. The project
side is `rl.learner.update` itself under `experiment=paper` (one micro-batch holding every rollout, its global
normaliser), with a `Parallel` whose `step` records the accumulated gradients instead of stepping.

Loss VALUES differ and must: the project's per-step PPO surrogate is -min(ρ_t A, clip(ρ_t) A) with
ρ_t = exp(ℓ_t(θ) - ℓ_t(θ_old)), and with one iteration θ_old = θ, so ρ_t = 1 in value and the loss VALUE is
-1/N Σ_i A_i n_i (n_i = number of action steps of row i), not -1/N Σ_i A_i ℓ_i. The two differ by
-1/N Σ_i A_i (ℓ_i(θ_old) - n_i), which is constant in θ, and their gradients coincide ONLY at θ = θ_old, i.e. only
when the ratio is exactly 1 (`num_iterations == 1`, or the first PPO iteration): there d exp(x)/dx = 1 and the clip
(1 ± eps, eps > 0) is inactive, so ∇ = -1/N Σ_i A_i Σ_t ∇ℓ_t. On a later iteration ρ_t ≠ 1 reweights every step's
gradient and clipping zeroes some: no longer Eq. 14. (The Gaussian normaliser -(d/2) log 2πσ² is also constant in θ,
so whether a log-prob includes it changes values, never gradients.) `test_paper_gradient_equals_eq14` checks the
value formula -1/N Σ A_i n_i too.

Unjudged rewards (None; the verifier could not parse the gold answer) — behaviour found in rl/advantages.py and
rl/loss.py and encoded here: such a row gets advantage 0 and takes no part anywhere. The RLOO baseline of a judged
row is the mean of the OTHER JUDGED rewards of its group (n_b - 1 of them, n_b = judged rows of group b), and the
normaliser B·G becomes the number of judged rollouts N_judged (the `constant` aggregation counts judged rows only).
So the update is Eq. 14 applied to the judged rollouts alone, as if the unjudged ones had never been sampled. A
group with fewer than 2 judged rewards has no baseline: advantage 0 (it still counts in N_judged).

Mutations of the reference tried by hand (each made tests here fail, then was reverted; the relative gradient
difference it caused in brackets): ℓ = MEAN over steps instead of SUM (0.9); RLOO baseline = mean of all G rewards
instead of the other G-1 (1/3, also caught by the advantage comparison); dropping the answer term (≥ 0.04) or the
CoT term; scoring the forced delimiter / prefill tokens as actions; μ = softmax(z)·E without τ; for the None cases,
normalising by B·G instead of N_judged (1/7, 1.0), leaving a lone judged row out of N_judged, and a baseline that
counts the None row as reward 0; and, in the value check, n_i without the answer tokens.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import replace

import pytest
import torch

from rl.advantages import compute_advantages
from rl.config import TrainConfig, compose, to_object
from rl.learner import update
from rl.optim import StepResult
from rl.parallel import Single
from rollouts.distributions import noise_sigma
from rollouts.engine import generate, input_embedding_matrix
from rollouts.record import Rollouts
from rollouts.stopping import StopSpec
from tests.arch import one_thread, tiny_causal_lm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 0
EOS = 67  # a token this model samples often enough that CoT and answer lengths vary (both stop on EOS)
DELIMITER, PREFILL = (95, 95, 95), (94,)  # forced after the CoT: never actions
PROMPTS = [[5, 6, 7, 8, 9], [10, 11]]  # B = 2, different lengths (left padding in the record)
G = 4
MODES = {"hard": (1.0, 0.0), "soft": (0.5, 0.33), "fuzzy": (1e-4, 0.33)}  # τ, noise_scale (paper §4)

COS_MIN = 0.99999
NORM_RTOL = 1e-4
DIFF_RTOL = 1e-4
"""‖g_project - g_reference‖ / ‖g_reference‖ bound (also per parameter tensor). The gradients are taken on a
float64 copy of the model: in float32 the two paths (batched vs one row at a time, shared prompt prefix, chunking)
already differ by up to 3e-5 for soft CoT (the Gaussian score (h̃ - μ)ᵀ∇μ / σ² amplifies rounding in μ; float32
vs float64 of the reference alone differs by 2e-5), too close to a 1e-4 bound. In float64 the residual is ≤ 3e-6
(some of the project's steps are float32 whatever the model dtype). The mutations listed in the module docstring
move it by 4e-2 or more."""


@functools.cache
def paper_config() -> TrainConfig:
    return to_object(compose("train", ["experiment=paper"]), TrainConfig)


@functools.cache
def model():
    """The float32 model that generates the rollouts."""
    return tiny_causal_lm("llama", True, vocab_size=96, seed=0)


@functools.cache
def model64():
    """The same weights in float64, for the gradient comparisons (see `DIFF_RTOL`)."""
    return copy.deepcopy(model()).double()


def scored_in_float64(r: Rollouts) -> Rollouts:
    """`r` with its stored CoT vectors in float64 (the same values), to score with `model64()`."""
    return r if r.cot_inputs is None else replace(r, cot_inputs=r.cot_inputs.double())


def cot_config(mode: str):
    tau, noise = MODES[mode]
    return replace(
        paper_config().cot,
        name=mode,
        mode=mode,
        temperature=tau,
        noise_scale=noise,
        max_think_tokens=8,
        max_answer_tokens=4,
    )


@functools.cache
def rollouts_for(mode: str) -> Rollouts:
    m, cot = model(), cot_config(mode)
    return generate(
        m,
        PROMPTS,
        cot,
        group_size=G,
        sigma=noise_sigma(input_embedding_matrix(m), cot),
        stop=StopSpec.on_ids(DELIMITER, PREFILL),
        eos_id=EOS,
        pad_id=PAD,
        generator=torch.Generator().manual_seed(0),
    )


# ------------------------------------------------------------------------------------------------ reference


def reference_rloo(rewards: list[float | None]) -> tuple[list[float], list[bool]]:
    """A_i = r_i - mean of the other judged rewards of i's group (G contiguous rows per prompt); 0 when unjudged
    or when no other judged reward exists. Returns (advantages, judged)."""
    adv, judged = [], [r is not None for r in rewards]
    for i, r in enumerate(rewards):
        lo = (i // G) * G
        others = [rewards[j] for j in range(lo, lo + G) if j != i and rewards[j] is not None]
        adv.append(0.0 if r is None or not others else r - sum(others) / len(others))
    return adv, judged


def reference_sequence_log_probs(m, r: Rollouts, answer_temperature: float):
    """ℓ_i for every row (with grad) and the per-step log-probs (detached) of CoT steps and sampled answer tokens,
    from one plain forward per row over its unpadded prompt ++ CoT inputs ++ answer tokens."""
    E = m.get_input_embeddings().weight  # [V, d]
    ells, cot_steps, answer_steps = [], [], []
    for i in range(r.num_rollouts):
        prompt = r.prompt_ids[i][r.prompt_mask[i]]  # [P_i]
        t_len, a_len = int(r.cot_mask[i].sum()), int(r.answer_mask[i].sum())
        assert bool(r.cot_mask[i, :t_len].all()) and bool(r.answer_mask[i, :a_len].all())  # right-padded
        answer = r.answer_ids[i, :a_len]  # [A_i]
        action = r.answer_action_mask[i, :a_len]  # [A_i]
        if r.cot_mode == "hard":
            cot_in = E[r.cot_ids[i, :t_len]]  # [T_i, d]
        else:
            cot_in = r.cot_inputs[i, :t_len].detach()  # [T_i, d] stored h̃_t: constants
        x = torch.cat([E[prompt], cot_in, E[answer]])[None]  # [1, L, d]
        n = x.shape[1]
        logits = m(
            inputs_embeds=x,
            attention_mask=torch.ones(1, n, dtype=torch.long),
            position_ids=torch.arange(n)[None],
        ).logits[0]  # [L, V]
        p_len = prompt.numel()
        z_cot = logits[p_len - 1 : p_len - 1 + t_len]  # [T_i, V]: the logits before each CoT input
        z_ans = logits[p_len + t_len - 1 : p_len + t_len - 1 + a_len]  # [A_i, V]
        if r.cot_mode == "hard":
            lp_cot = torch.log_softmax(z_cot / r.temperature, -1).gather(-1, r.cot_ids[i, :t_len, None])[:, 0]
        else:
            h = torch.softmax(z_cot / r.temperature, -1) @ E  # [T_i, d] the mean h_t (grad via z and E)
            lp_cot = -(cot_in - h).pow(2).sum(-1) / (2 * r.sigma**2)  # [T_i]
        lp_ans = torch.log_softmax(z_ans / answer_temperature, -1).gather(-1, answer[:, None])[:, 0]  # [A_i]
        lp_ans = lp_ans[action]  # forced delimiter / prefill tokens are not actions
        ells.append(lp_cot.sum() + lp_ans.sum())
        cot_steps.append(lp_cot.detach())
        answer_steps.append(lp_ans.detach())
    return torch.stack(ells), cot_steps, answer_steps


def reference_eq14_grads(m, r: Rollouts, rewards: list[float | None], answer_temperature: float):
    """∇θ of L = -1/N_judged Σ_judged A_i ℓ_i (Eq. 14; N_judged = B·G when every reward is judged)."""
    adv, judged = reference_rloo(rewards)
    ell, _, _ = reference_sequence_log_probs(m, r, answer_temperature)
    keep = torch.tensor(judged)
    loss = -(torch.tensor(adv)[keep] * ell[keep]).sum() / int(keep.sum())
    m.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: _grad(p) for name, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return grads


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


# -------------------------------------------------------------------------------------------- project side


class _RecordingParallel(Single):
    """The single-process strategy, except that `step` records the accumulated gradients and the loss and
    leaves the weights alone."""

    def __init__(self, m) -> None:
        super().__init__(torch.device("cpu"))
        self.model = m
        self.grads: dict[str, torch.Tensor] = {}
        self.total_loss = math.nan

    def step(self, total_loss: float, grad_clip: float) -> StepResult:
        self.total_loss = total_loss
        self.grads = {name: _grad(p) for name, p in self.model.named_parameters()}
        self.model.zero_grad(set_to_none=True)
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in self.grads.values()))
        return StepResult(grad_norm=norm, skipped=False, lr=0.0)


class _NoSchedule:
    def step(self) -> None:
        pass


def project_update(m, r: Rollouts, rewards: list[float | None], mode: str, micro_batch: int = 0):
    cfg = replace(paper_config().rl, group_size=G, micro_batch=micro_batch)
    parallel = _RecordingParallel(m)
    m.zero_grad(set_to_none=True)
    update(m, r, rewards, cfg, cot_config(mode), parallel, _NoSchedule())
    return parallel


def compare(g_proj: dict[str, torch.Tensor], g_ref: dict[str, torch.Tensor]) -> dict[str, float]:
    assert g_proj.keys() == g_ref.keys()
    a = torch.cat([g_proj[k].flatten() for k in g_ref]).double()
    b = torch.cat([g_ref[k].flatten() for k in g_ref]).double()
    return {
        "cos": float(a @ b / (a.norm() * b.norm())),
        "norm_ratio": float(a.norm() / b.norm()),
        "rel_diff": float((a - b).norm() / b.norm()),
        "ref_norm": float(b.norm()),
    }


def assert_same_gradient(g_proj, g_ref) -> dict[str, float]:
    s = compare(g_proj, g_ref)
    assert s["ref_norm"] > 0, "the reference gradient is zero: nothing is being compared"
    assert s["cos"] > COS_MIN, s
    assert abs(s["norm_ratio"] - 1) < NORM_RTOL, s
    assert s["rel_diff"] < DIFF_RTOL, s
    # per parameter too, so that a small tensor (a norm weight) cannot hide inside the global numbers
    for name, ref in g_ref.items():
        err = float((g_proj[name] - ref).norm())
        assert err <= DIFF_RTOL * float(ref.norm()) + 1e-6 * s["ref_norm"], (name, err, float(ref.norm()))
    return s


def assert_surrogate_value(value: float, r: Rollouts, adv: list[float], judged: list[bool]) -> None:
    """The loss value at ratio 1 is -A per action step: -1/N_judged Σ_judged A_i n_i (module docstring)."""
    keep = torch.tensor(judged)
    a = torch.tensor(adv)[keep]
    steps = (r.cot_mask.sum(1) + r.answer_action_mask.sum(1))[keep]  # n_i
    expect = -float((a * steps).sum()) / int(keep.sum())
    scale = float((a.abs() * steps).sum()) / int(keep.sum())  # float32 cancellation in the sum
    assert value == pytest.approx(expect, rel=1e-5, abs=1e-6 * scale)


# ------------------------------------------------------------------------------------------------------ tests


def test_paper_recipe_is_eq14() -> None:
    # the settings under which the project's objective reduces to Eq. 14 (see the module docstring)
    rl = paper_config().rl
    assert rl.loss.aggregation == "constant" and rl.loss.max_len_norm == 1  # Σ_t ℓ_t per row, / N
    assert rl.num_iterations == 1  # ratio exactly 1: nothing clips
    assert rl.advantages.estimator == "rloo"
    assert rl.loss.kl_coef == 0.0
    assert rl.loss.cot_weight == 1.0 and rl.loss.gaussian_weight == 1.0
    cot = paper_config().cot
    assert (cot.top_k, cot.top_p, cot.min_p, cot.answer_top_p) == (0, 1.0, 0.0, 1.0)  # no filters


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_scores_the_behaviour_log_probs(mode: str) -> None:
    # anchors the reference to the sampler: its per-step log-probs (at the parameters that generated the
    # rollouts) are the engine's stored behaviour log-probs, up to the Gaussian normaliser -(d/2) log 2πσ²
    # (constant in θ) that the engine includes. A position off by one would miss by nats.
    m, r = model(), rollouts_for(mode)
    assert r.cot_lengths.min() >= 1 and r.cot_lengths.unique().numel() > 1  # varied lengths are exercised
    assert (~r.answer_action_mask & r.answer_mask).any()  # forced tokens are present
    with torch.no_grad():
        _, cot_steps, answer_steps = reference_sequence_log_probs(m, r, cot_config(mode).answer_temperature)
    d = r.cot_inputs.shape[-1] if r.cot_inputs is not None else 0
    const = 0.0 if mode == "hard" else -0.5 * d * math.log(2 * math.pi * r.sigma**2)
    atol = 1e-4 if mode == "hard" else 2e-3  # Gaussian: μ from a KV-cached batch vs one uncached row, ×‖ε‖/σ
    for i in range(r.num_rollouts):
        t_len, a_len = int(r.cot_mask[i].sum()), int(r.answer_mask[i].sum())
        torch.testing.assert_close(cot_steps[i] + const, r.cot_logprobs[i, :t_len], atol=atol, rtol=1e-5)
        stored = r.answer_logprobs[i, :a_len][r.answer_action_mask[i, :a_len]]
        torch.testing.assert_close(answer_steps[i], stored, atol=1e-4, rtol=1e-5)


REWARDS = {
    "varied": [100.0, 10.0, 0.0, 100.0, 0.0, 10.0, 0.0, 100.0],
    "tied_group": [100.0, 0.0, 10.0, 0.0, 10.0, 10.0, 10.0, 10.0],  # group 1: all equal, A = 0, no gradient
}


@pytest.mark.parametrize("rewards", list(REWARDS), ids=list(REWARDS))
@pytest.mark.parametrize("mode", list(MODES))
def test_paper_gradient_equals_eq14(mode: str, rewards: str) -> None:
    m, r, rw = model64(), scored_in_float64(rollouts_for(mode)), REWARDS[rewards]
    adv, _ = reference_rloo(rw)
    project_adv = compute_advantages(rw, r.group_index, paper_config().rl.advantages)
    torch.testing.assert_close(project_adv.values, torch.tensor(adv), atol=1e-5, rtol=1e-6)
    if rewards == "tied_group":
        assert project_adv.values[G:].abs().max() == 0

    proj = project_update(m, r, rw, mode)
    ref = reference_eq14_grads(m, r, rw, cot_config(mode).answer_temperature)
    assert_same_gradient(proj.grads, ref)

    # the loss VALUE: the surrogate at ratio 1 is -A per action step (module docstring), / (B·G)
    assert_surrogate_value(proj.total_loss, r, adv, [True] * len(rw))
    assert len(rw) == len(PROMPTS) * G  # so the normaliser there is B·G


def test_micro_batches_leave_the_gradient_unchanged() -> None:
    # the paper recipe splits an update into micro-batches (rl.micro_batch), each divided by the GLOBAL
    # normaliser: 3 + 3 + 2 rows (a group split across micro-batches) must give the one-batch gradient
    m, r, rw = model64(), scored_in_float64(rollouts_for("soft")), REWARDS["varied"]
    ref = reference_eq14_grads(m, r, rw, cot_config("soft").answer_temperature)
    assert_same_gradient(project_update(m, r, rw, "soft", micro_batch=3).grads, ref)


UNJUDGED = {
    "one_none": [100.0, None, 0.0, 10.0, 0.0, 10.0, 100.0, 0.0],
    "none_group": [None, None, None, None, 100.0, 0.0, 10.0, 0.0],  # the gold answer of prompt 0 unparsable
    "lone_judged": [None, None, 100.0, None, 100.0, 0.0, 10.0, 0.0],  # no baseline: A = 0, counts in N_judged
}


@pytest.mark.parametrize("rewards", list(UNJUDGED), ids=list(UNJUDGED))
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_unjudged_rewards_drop_out_of_eq14(mode: str, rewards: str) -> None:
    # behaviour found (module docstring): unjudged rows leave the RLOO baseline (mean of the other JUDGED
    # rewards) and the normaliser (N_judged instead of B·G); this is Eq. 14 on the judged rollouts alone
    m, r, rw = model64(), scored_in_float64(rollouts_for(mode)), UNJUDGED[rewards]
    adv, judged = reference_rloo(rw)
    project_adv = compute_advantages(rw, r.group_index, paper_config().rl.advantages)
    assert project_adv.mask.tolist() == judged
    torch.testing.assert_close(project_adv.values, torch.tensor(adv), atol=1e-5, rtol=1e-6)
    if rewards == "one_none":
        assert adv[:4] == [100.0 - 5.0, 0.0, 0.0 - 55.0, 10.0 - 50.0]  # baseline over the 2 other judged

    proj = project_update(m, r, rw, mode)
    ref = reference_eq14_grads(m, r, rw, cot_config(mode).answer_temperature)
    assert_same_gradient(proj.grads, ref)

    assert_surrogate_value(proj.total_loss, r, adv, judged)
