"""Optimizer groups, the warmup/cosine schedule and the guarded step (rl/optim.py), checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rl.optim import OptimConfig, build_optimizer, build_scheduler, clip_and_step


def tiny_llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_no_weight_decay_on_norms_and_biases(tied: bool) -> None:
    model = tiny_llama(tied)
    opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.5))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    # every trainable parameter exactly once (a tied embedding / head is one parameter)
    unique = {id(p) for p in model.parameters()}
    assert len(decay["params"]) + len(no_decay["params"]) == len(unique)
    # AdamW with zero gradients moves only by decoupled decay: p <- p (1 - lr·wd) = 0.95 p for matrices,
    # norm gains (ones) untouched.
    emb = model.get_input_embeddings().weight
    before_emb = emb.detach().clone()
    norm = model.model.norm.weight
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(emb.detach(), before_emb * 0.95)
    torch.testing.assert_close(norm.detach(), torch.ones_like(norm))


def test_frozen_parameters_are_left_out() -> None:
    model = tiny_llama(tied=False)
    model.lm_head.weight.requires_grad_(False)
    opt = build_optimizer(model, OptimConfig())
    assert all(p is not model.lm_head.weight for g in opt.param_groups for p in g["params"])


def test_schedule_values_by_hand() -> None:
    # lr = 1, warmup 2, total 6, min ratio 0.1.
    # warmup: (s+1)/2 -> 0.5, 1.0. cosine: 0.1 + 0.9·(1 + cos(π (s-2)/4))/2 for s = 2..6
    #   s=2: 1.0; s=3: 0.1 + 0.45(1 + 0.70711) = 0.86820; s=4: 0.55; s=5: 0.1 + 0.45(1 - 0.70711) = 0.23180;
    #   s=6: 0.1; after the end stays 0.1.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=2, min_lr_ratio=0.1), total_steps=6)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    c = math.cos(math.pi / 4)
    expected = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + c), 0.55, 0.1 + 0.45 * (1 - c), 0.1, 0.1]
    assert seen == pytest.approx(expected, abs=1e-9)


def test_schedule_total_steps_from_config_and_errors() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, OptimConfig(lr=2.0, total_steps=4, min_lr_ratio=0.0))
    # no warmup: s=0 -> full lr 2.0
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="total_steps"):
        build_scheduler(opt, OptimConfig())
    with pytest.raises(ValueError, match="warmup_steps=5 exceeds total_steps=3"):
        build_scheduler(opt, OptimConfig(warmup_steps=5), total_steps=3)


def sgd_setup(grad: list[float]) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    p = torch.nn.Parameter(torch.zeros(len(grad)))
    p.grad = torch.tensor(grad)
    return p, torch.optim.SGD([p], lr=1.0)


def test_clip_and_step_clips_and_reports_pre_clip_norm() -> None:
    # grad (3, 4): norm 5; clipped to norm 1 -> (0.6, 0.8); SGD lr 1 moves p from 0 to -(0.6, 0.8).
    p, opt = sgd_setup([3.0, 4.0])
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=2), total_steps=10)
    res = clip_and_step([p], opt, sched, torch.tensor(0.7), grad_clip=1.0)
    assert res.grad_norm == pytest.approx(5.0) and not res.skipped and res.lr == pytest.approx(0.5)
    # warmup step 0 has lr 0.5 -> p = -0.5·(0.6, 0.8)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.3, -0.4]))
    assert p.grad is None
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)  # scheduler advanced to warmup step 1
    # grad_clip <= 0: no clipping, the full gradient is applied
    p, opt = sgd_setup([3.0, 4.0])
    res = clip_and_step([p], opt, None, 0.7, grad_clip=0.0)
    assert res.grad_norm == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([-3.0, -4.0]))


@pytest.mark.parametrize(
    "loss,grad",
    [
        (float("nan"), [1.0, 1.0]),
        (1.0, [float("inf"), 1.0]),
        (1.0, [float("nan"), 0.0]),
        (float("inf"), [1.0, 0.0]),
    ],
)
def test_clip_and_step_skips_non_finite(loss: float, grad: list[float]) -> None:
    p, opt = sgd_setup(grad)
    sched = build_scheduler(opt, OptimConfig(lr=1.0), total_steps=10)
    lr_before = opt.param_groups[0]["lr"]
    res = clip_and_step([p], opt, sched, torch.tensor(loss), grad_clip=1.0)
    assert res.skipped
    assert torch.equal(p.detach(), torch.zeros(2))  # no update
    assert p.grad is None  # grads zeroed for the next accumulation
    assert sched.last_epoch == 1 and opt.param_groups[0]["lr"] < lr_before  # schedule follows trainer steps


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="optim.grad_accum=0"):
        OptimConfig(grad_accum=0)
    with pytest.raises(ValueError, match="optim.betas"):
        OptimConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="optim.min_lr_ratio"):
        OptimConfig(min_lr_ratio=1.5)


def test_grad_accum_other_than_one_is_refused_not_ignored() -> None:
    """The key never did anything (the learner accumulates over rl.micro_batch): a value other than 1 fails
    naming the alternative instead of running an unaccumulated update."""
    with pytest.raises(ValueError, match=r"optim.grad_accum=4: not supported.*rl.micro_batch"):
        OptimConfig(grad_accum=4)
    assert OptimConfig(grad_accum=1).grad_accum == 1
