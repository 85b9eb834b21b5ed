"""Advantage estimators (rl/advantages.py): values derived by hand, None rewards, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from rl.advantages import ESTIMATORS, AdvantageConfig, compute_advantages

PAIR = torch.tensor([0, 0])


def test_two_sample_group_by_hand() -> None:
    # rewards (1, 0), one group: mean 0.5.
    # GRPO, unbiased std: sqrt(((0.5)² + (0.5)²) / (2 - 1)) = sqrt(0.5) = 0.70711 -> A = ±0.5 / (0.70711 + eps)
    eps = 1e-6
    grpo = compute_advantages([1.0, 0.0], PAIR, AdvantageConfig(estimator="grpo", eps=eps)).values
    expected = 0.5 / (math.sqrt(0.5) + eps)
    torch.testing.assert_close(grpo, torch.tensor([expected, -expected]))
    # RLOO: A_1 = 1 - 0 = 1, A_2 = 0 - 1 = -1
    torch.testing.assert_close(
        compute_advantages([1.0, 0.0], PAIR, AdvantageConfig("rloo")).values, torch.tensor([1.0, -1.0])
    )
    # Dr. GRPO: r - mean = ±0.5
    torch.testing.assert_close(
        compute_advantages([1.0, 0.0], PAIR, AdvantageConfig("dr_grpo")).values, torch.tensor([0.5, -0.5])
    )


def test_rloo_leave_one_out_on_larger_groups() -> None:
    # group 0: (1, 0, 0, 1) -> baselines (1/3, 2/3, 2/3, 1/3) -> A = (2/3, -2/3, -2/3, 2/3)
    # group 1: (0.5, 0.5, 0.5, 0.5) -> A = 0 everywhere. Groups need not be contiguous: interleave them.
    rewards = [1.0, 0.5, 0.0, 0.5, 0.0, 0.5, 1.0, 0.5]
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    adv = compute_advantages(rewards, groups, AdvantageConfig("rloo")).values
    third = 2 / 3
    torch.testing.assert_close(adv, torch.tensor([third, 0, -third, 0, -third, 0, third, 0]))
    # identity: RLOO = n/(n-1) · (r - group mean)
    dr = compute_advantages(rewards, groups, AdvantageConfig("dr_grpo")).values
    torch.testing.assert_close(adv, dr * 4 / 3)


def test_grpo_scales() -> None:
    # group 0 = (1, 0), group 1 = (3, 1); centred: (0.5, -0.5, 1, -1).
    rewards = [1.0, 0.0, 3.0, 1.0]
    groups = torch.tensor([0, 0, 1, 1])
    centred = torch.tensor([0.5, -0.5, 1.0, -1.0])
    # group: stds sqrt(0.5) and sqrt(2) -> A = ±0.70711 in both groups
    group = compute_advantages(rewards, groups, AdvantageConfig("grpo", "group", eps=0.0)).values
    torch.testing.assert_close(group, torch.tensor([1.0, -1.0, 1.0, -1.0]) * math.sqrt(0.5))
    # batch: unbiased std of (1, 0, 3, 1): mean 1.25, Σ(r-m)² = 0.0625+1.5625+3.0625+0.0625 = 4.75, /3
    batch = compute_advantages(rewards, groups, AdvantageConfig("grpo", "batch", eps=0.0)).values
    torch.testing.assert_close(batch, centred / math.sqrt(4.75 / 3))
    # none: only centred
    none = compute_advantages(rewards, groups, AdvantageConfig("grpo", "none")).values
    torch.testing.assert_close(none, centred)


def test_equal_rewards_give_zero_advantage_even_with_zero_eps() -> None:
    # std = 0 and r - mean = 0: 0 / (0 + eps) = 0 for eps > 0; with eps = 0 a naive division gives 0/0 = nan.
    for est in ESTIMATORS:
        for scale in ("group", "batch", "none"):
            for eps in (1e-6, 0.0):
                adv = compute_advantages(
                    [1.0, 1.0, 1.0, 1.0], torch.tensor([0, 0, 1, 1]), AdvantageConfig(est, scale, eps)
                )
                assert torch.equal(adv.values, torch.zeros(4)), (est, scale, eps, adv.values)


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_none_rewards_are_excluded_not_zeroed(estimator: str) -> None:
    # group 0: (1, None, 0) -> statistics over the judged (1, 0) only; the None row gets A = 0 and mask False.
    # Were None read as 0, group 0 would be (1, 0, 0) and RLOO would give A_1 = 1 - 0 = 1 but A_3 = 0 - 0.5.
    # group 1: (None, 1) -> a single judged reward, no baseline: A = 0, still in the loss (mask True).
    rewards = [1.0, None, 0.0, None, 1.0]
    groups = torch.tensor([0, 0, 0, 1, 1])
    cfg = AdvantageConfig(estimator)
    adv = compute_advantages(rewards, groups, cfg)
    pair = compute_advantages([1.0, 0.0], PAIR, cfg).values
    torch.testing.assert_close(adv.values, torch.tensor([pair[0].item(), 0.0, pair[1].item(), 0.0, 0.0]))
    assert adv.mask.tolist() == [True, False, True, False, True]
    assert adv.num_unjudged == 2
    assert adv.rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_none_rewards_left_out_of_batch_std() -> None:
    # batch std over the judged rewards (1, 0, 1, 0) only: unbiased var = 4·0.25/3 = 1/3.
    adv = compute_advantages(
        [1.0, 0.0, None, 1.0, 0.0], torch.tensor([0, 0, 0, 1, 1]), AdvantageConfig("grpo", "batch", eps=0.0)
    )
    s = math.sqrt(1 / 3)
    torch.testing.assert_close(adv.values, torch.tensor([0.5 / s, -0.5 / s, 0.0, 0.5 / s, -0.5 / s]))


def test_tensor_rewards_and_errors() -> None:
    adv = compute_advantages(torch.tensor([1.0, 0.0]), PAIR, AdvantageConfig("rloo"))
    assert adv.mask.all() and adv.values.tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="non-finite rewards at rows \\[1\\]"):
        compute_advantages([1.0, float("nan")], PAIR, AdvantageConfig())
    with pytest.raises(ValueError, match="shape"):
        compute_advantages([1.0, 0.0, 1.0], PAIR, AdvantageConfig())
    with pytest.raises(ValueError, match="advantages.estimator='ppo'"):
        AdvantageConfig(estimator="ppo")
    with pytest.raises(ValueError, match="advantages.scale='row'"):
        AdvantageConfig(scale="row")
