"""The learner objective (rl/loss.py): every value and gradient below is derived by hand in a comment.

Log-probs are leaf tensors built here (no model), so the gradient of the loss w.r.t. each step's log-prob can be
read off directly: for a per-token mean over D steps with ratio 1, ∂loss/∂lp_step = -A_row / D.
"""

from __future__ import annotations

import math

import pytest
import torch

from rl.advantages import AdvantageConfig, Advantages, compute_advantages
from rl.logprobs import SequenceLogProbs
from rl.loss import LossConfig, gaussian_kl, k3, policy_loss
from rollouts.distributions import gaussian_log_prob


def seq_lp(
    cot: list[list[float]], answer: list[list[float]], mu: torch.Tensor | None = None, sigma: float = 0.0
) -> SequenceLogProbs:
    """SequenceLogProbs from ragged lists (right-padded with 0 / False); cot and answer are grad leaves."""

    def pad(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in rows))
        values = torch.zeros(len(rows), width)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            values[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return values.requires_grad_(True), mask

    c, cm = pad(cot)
    a, am = pad(answer)
    return SequenceLogProbs(
        cot_mode="hard" if mu is None else "soft",
        cot=c,
        cot_mask=cm,
        answer=a,
        answer_mask=am,
        mu=mu,
        sigma=sigma,
        cot_entropy=torch.zeros_like(c),
        answer_entropy=torch.zeros_like(a),
    )


def adv(values: list[float], mask: list[bool] | None = None) -> Advantages:
    m = torch.tensor(mask if mask is not None else [True] * len(values))
    return Advantages(values=torch.tensor(values), mask=m, rewards=torch.zeros(len(values)))


# row 0: 2 CoT steps + 1 answer token (3 steps); row 1: 1 CoT step + 1 answer token (2 steps); D = 5
COT = [[-1.0, -2.0], [-0.5]]
ANSWER = [[-0.3], [-0.7]]


@pytest.mark.parametrize(
    "estimator,aggregation,a0,denom",
    [
        # RLOO, rewards (1, 0): A = (1, -1). Token mean: loss = -(3·1 + 2·(-1)) / 5 = -0.2
        ("rloo", "token", 1.0, 5.0),
        # GRPO, unbiased group std sqrt(0.5): A = ±0.5 / (sqrt(0.5) + 1e-6). loss = -(3·A0 - 2·A0) / 5 = -A0 / 5
        ("grpo", "token", 0.5 / (math.sqrt(0.5) + 1e-6), 5.0),
        # Dr. GRPO, A = ±0.5, constant normaliser N·max_len_norm = 2·4 = 8: loss = -(3·0.5 - 2·0.5) / 8
        ("dr_grpo", "constant", 0.5, 8.0),
    ],
)
def test_one_iteration_two_sample_group(estimator: str, aggregation: str, a0: float, denom: float) -> None:
    # One PPO iteration: old = new.detach(), ratio = exp(lp - lp.detach()) = 1 in value, nothing clips, and
    # ∂ratio/∂lp = 1, so each step contributes -A·ratio with gradient -A: ∂loss/∂lp_step = -A_row / denom.
    lp = seq_lp(COT, ANSWER)
    advantages = compute_advantages([1.0, 0.0], torch.tensor([0, 0]), AdvantageConfig(estimator))
    torch.testing.assert_close(advantages.values, torch.tensor([a0, -a0]))
    out = policy_loss(lp, advantages, LossConfig(aggregation=aggregation, max_len_norm=4))
    expected = -(3 * a0 - 2 * a0) / denom
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    torch.testing.assert_close(lp.cot.grad, torch.tensor([[-a0, -a0], [a0, 0.0]]) / denom)
    torch.testing.assert_close(lp.answer.grad, torch.tensor([[-a0], [a0]]) / denom)
    assert out.cot_term + out.answer_term == pytest.approx(out.loss.item(), abs=1e-7)
    # CoT part: -(2·a0 - 1·a0)/denom; answer part: -(a0 - a0)/denom = 0
    assert out.cot_term == pytest.approx(-a0 / denom, rel=1e-6)
    assert out.answer_term == pytest.approx(0.0, abs=1e-7)
    assert out.clip_fraction == 0.0 and out.ratio_cot == 1.0 and out.ratio_answer == 1.0
    # means of the log-probs: CoT (-1 - 2 - 0.5)/3, answer (-0.3 - 0.7)/2
    assert out.logp_cot == pytest.approx(-3.5 / 3) and out.logp_answer == pytest.approx(-0.5)
    assert (out.num_cot_steps, out.num_answer_steps) == (3, 2)
    assert out.kl_cot == 0.0 and out.kl_answer == 0.0


@pytest.mark.parametrize(
    "aggregation,loss,cot_term",
    [
        # A = (1, -1), ratio 1, cot_weight 2. Per-step losses: row 0 CoT -1, -1 (×2 = -4), answer -1;
        # row 1 CoT +1 (×2 = 2), answer +1.
        # token: (-4 - 1 + 2 + 1) / 5 = -0.4; CoT part (-4 + 2) / 5 = -0.4
        ("token", -0.4, -0.4),
        # sequence: row 0 (-4 - 1)/3, row 1 (2 + 1)/2 -> mean (-5/3 + 3/2)/2 = -1/12; CoT (-4/3 + 2/2)/2 = -1/6
        ("sequence", -1 / 12, -1 / 6),
        # constant, max_len_norm 10: (-4 - 1 + 2 + 1) / (2·10) = -0.1; CoT (-4 + 2)/20 = -0.1
        ("constant", -0.1, -0.1),
    ],
)
def test_aggregation_modes_and_cot_weight(aggregation: str, loss: float, cot_term: float) -> None:
    lp = seq_lp(COT, ANSWER)
    out = policy_loss(
        lp, adv([1.0, -1.0]), LossConfig(aggregation=aggregation, cot_weight=2.0, max_len_norm=10)
    )
    assert out.loss.item() == pytest.approx(loss, rel=1e-6)
    assert out.cot_term == pytest.approx(cot_term, rel=1e-6)
    assert out.answer_term == pytest.approx(loss - cot_term, abs=1e-7)


@pytest.mark.parametrize(
    "gaussian,gaussian_weight,cot_term",
    [
        # hard CoT: gaussian_weight is ignored, the CoT weight is cot_weight = 2: CoT part (-4 + 2)/5 = -0.4
        (False, 0.5, -0.4),
        # soft CoT: weight 2 · 0.5 = 1. Per-step CoT losses -1, -1 (row 0, A = 1) and +1 (row 1): (-2 + 1)/5
        (True, 0.5, -0.2),
        # soft CoT with gaussian_weight 0: no CoT contribution, the steps still count in the denominator
        (True, 0.0, 0.0),
    ],
)
def test_gaussian_weight_scales_only_gaussian_cot_steps(
    gaussian: bool, gaussian_weight: float, cot_term: float
) -> None:
    mu = torch.zeros(2, 2, 3) if gaussian else None  # any μ marks the rollouts as Gaussian (soft / fuzzy)
    lp = seq_lp(COT, ANSWER, mu=mu, sigma=0.1 if gaussian else 0.0)
    out = policy_loss(lp, adv([1.0, -1.0]), LossConfig(cot_weight=2.0, gaussian_weight=gaussian_weight))
    # answer part: row 0 -1, row 1 +1 over D = 5 steps -> 0, whatever the CoT weight
    assert out.cot_term == pytest.approx(cot_term, abs=1e-7)
    assert out.answer_term == pytest.approx(0.0, abs=1e-7)
    out.loss.backward()
    weight = 2.0 * (gaussian_weight if gaussian else 1.0)
    torch.testing.assert_close(lp.cot.grad, weight * torch.tensor([[-1.0, -1.0], [1.0, 0.0]]) / 5)
    torch.testing.assert_close(lp.answer.grad, torch.tensor([[-1.0], [1.0]]) / 5)


def test_clipping_zeroes_the_clipped_branch_gradient_and_is_counted() -> None:
    # eps_low = 0.1, eps_high = 0.3: band [0.9, 1.3]. One answer step per ratio; row 0 A = +1, row 1 A = -1.
    #   A=+1, r=1.25: in band            -> loss -1.25, ∂/∂lp = -A·r = -1.25
    #   A=+1, r=1.35: > 1.3, clipped     -> loss -1.3,  gradient 0
    #   A=+1, r=0.5 : min(0.5, 0.9)=0.5  -> loss -0.5,  ∂/∂lp = -0.5 (low side never clips for A > 0)
    #   A=-1, r=0.85: < 0.9, clipped     -> min(-0.85, -0.9) = -0.9 -> loss 0.9, gradient 0
    #   A=-1, r=0.95: in band            -> loss 0.95,  ∂/∂lp = +0.95
    #   A=-1, r=1.5 : min(-1.5, -1.3)    -> loss 1.5,   ∂/∂lp = +1.5 (high side never clips for A < 0)
    # token mean over 6 steps: (-1.25 - 1.3 - 0.5 + 0.9 + 0.95 + 1.5) / 6 = 0.05; clip fraction 2/6.
    ratios = [[1.25, 1.35, 0.5], [0.85, 0.95, 1.5]]
    old_answer = [[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]]
    new_answer = [
        [o + math.log(r) for o, r in zip(os, rs, strict=True)]
        for os, rs in zip(old_answer, ratios, strict=True)
    ]
    new = seq_lp([[], []], new_answer)
    old = seq_lp([[], []], old_answer).detach()
    out = policy_loss(new, adv([1.0, -1.0]), LossConfig(clip_eps_low=0.1, clip_eps_high=0.3), old=old)
    assert out.loss.item() == pytest.approx(0.05, abs=1e-6)
    out.loss.backward()
    torch.testing.assert_close(new.answer.grad, torch.tensor([[-1.25, 0.0, -0.5], [0.0, 0.95, 1.5]]) / 6)
    assert out.clip_fraction == pytest.approx(2 / 6) and out.clip_fraction_answer == pytest.approx(2 / 6)
    assert out.clip_fraction_cot == 0.0 and out.num_cot_steps == 0
    assert out.ratio_answer == pytest.approx(sum(ratios[0] + ratios[1]) / 6, rel=1e-6)


def test_huge_log_ratio_stays_finite() -> None:
    # A Gaussian log-ratio can be hundreds of nats; exp(500) overflows float32. Clamped at 20 the unclipped
    # branch for A < 0 is -exp(20)·A: finite.
    new = seq_lp([[500.0]], [[0.0]])
    old = seq_lp([[0.0]], [[0.0]]).detach()
    out = policy_loss(new, adv([-1.0]), LossConfig(), old=old)
    assert math.isfinite(out.loss.item())
    assert out.loss.item() == pytest.approx((math.exp(20) + 1) / 2, rel=1e-5)


def test_unjudged_rows_are_excluded() -> None:
    # Row 1 masked out: the loss equals the loss of row 0 alone (3 steps, A = 1 -> -1), row 1 gets no gradient.
    lp = seq_lp(COT, ANSWER)
    out = policy_loss(lp, adv([1.0, 5.0], mask=[True, False]), LossConfig())
    assert out.loss.item() == pytest.approx(-1.0)
    out.loss.backward()
    assert lp.cot.grad[1].abs().sum() == 0 and lp.answer.grad[1].abs().sum() == 0
    assert (out.num_cot_steps, out.num_answer_steps) == (2, 1)


def test_gaussian_kl_closed_form_matches_monte_carlo() -> None:
    # KL(N(μ, σ²I) ‖ N(μ', σ²I)) = E_{x~N(μ,σ²I)}[log N(x; μ) - log N(x; μ')] = ‖μ - μ'‖² / (2σ²).
    # The MC integrand is (‖x-μ'‖² - ‖x-μ‖²)/(2σ²) = (‖δ‖² + 2 σ εᵀδ)/(2σ²) with δ = μ - μ': its std is ‖δ‖/σ,
    # so with 200k samples the MC mean is within 5 standard errors, 5‖δ‖/(σ sqrt(2e5)), of the closed form.
    g = torch.Generator().manual_seed(0)
    d, sigma, n = 8, 0.5, 200_000
    mu, mu_ref = torch.randn(d, generator=g), torch.randn(d, generator=g)
    x = mu + sigma * torch.randn(n, d, generator=g, dtype=torch.float64).float()
    mc = (
        (gaussian_log_prob(x, mu, sigma).double() - gaussian_log_prob(x, mu_ref, sigma).double())
        .mean()
        .item()
    )
    closed = gaussian_kl(mu, mu_ref, sigma).item()
    assert closed == pytest.approx((mu - mu_ref).pow(2).sum().item() / (2 * sigma**2))
    assert abs(mc - closed) < 5 * (mu - mu_ref).norm().item() / (sigma * math.sqrt(n)), (mc, closed)


def test_k3_nonnegative_zero_when_equal_and_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert bool((k3(a, b) >= 0).all())  # e^x - x - 1 >= 0 for every x
    assert bool((k3(a, a) == 0).all())
    # unbiased: for a ~ p, E[k3(log q(a), log p(a))] = Σ_a p (q/p - log(q/p) - 1) = 1 - Σ p log(q/p) - 1 = KL(p‖q)
    logp = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)
    expectation = (logp.exp() * k3(logq, logp)).sum()
    kl = (logp.exp() * (logp - logq)).sum()
    torch.testing.assert_close(expectation, kl)


def test_kl_term_in_the_loss_soft_and_hard() -> None:
    # A = 0 and ratio 1: the surrogate is 0, so loss = kl_coef · (cot_weight·Σ KL_cot + Σ KL_answer) / D.
    # Soft CoT: row 0 has 2 steps with δ = μ - μ_ref = (1, 0), (0, 2); σ = 0.5 -> KL = 1/0.5 = 2 and 4/0.5 = 8.
    # Answer: one token with ref - new = log 2 -> k3 = 2 - log 2 - 1. D = 3.
    # ∂loss/∂μ_step = kl_coef · cot_weight · δ / σ² / D.
    mu = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], requires_grad=True)
    new = seq_lp([[-1.0, -1.0]], [[-1.0]], mu=mu, sigma=0.5)
    ref = seq_lp([[-1.0, -1.0]], [[-1.0 + math.log(2)]], mu=torch.zeros(1, 2, 2), sigma=0.5).detach()
    cfg = LossConfig(kl_coef=0.1, cot_weight=3.0)
    out = policy_loss(new, adv([0.0]), cfg, ref=ref)
    k = 2 - math.log(2) - 1
    assert out.loss.item() == pytest.approx(0.1 * (3.0 * (2 + 8) + k) / 3, rel=1e-6)
    assert out.kl_cot == pytest.approx(5.0) and out.kl_answer == pytest.approx(k, rel=1e-6)
    out.loss.backward()
    torch.testing.assert_close(mu.grad, 0.1 * 3.0 * torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]) / 0.25 / 3)
    # ∂k3/∂new = -(e^x - 1) with x = ref - new = log 2 -> -1; times kl_coef / D
    torch.testing.assert_close(new.answer.grad, torch.tensor([[-0.1 / 3]]))

    # Hard CoT: KL via k3 on the CoT token log-probs: ref - new = (0, log 3) -> (0, 3 - log 3 - 1)
    new_h = seq_lp([[-1.0, -2.0]], [[-1.0]])
    ref_h = seq_lp([[-1.0, -2.0 + math.log(3)]], [[-1.0]]).detach()
    out_h = policy_loss(new_h, adv([0.0]), LossConfig(kl_coef=1.0), ref=ref_h)
    assert out_h.loss.item() == pytest.approx((3 - math.log(3) - 1) / 3, rel=1e-6)
    assert out_h.kl_cot == pytest.approx((3 - math.log(3) - 1) / 2, rel=1e-6)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="needs reference"):
        policy_loss(seq_lp(COT, ANSWER), adv([1.0, -1.0]), LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="loss.aggregation='mean'"):
        LossConfig(aggregation="mean")
    with pytest.raises(ValueError, match="clip_eps_low"):
        LossConfig(clip_eps_low=1.0)
