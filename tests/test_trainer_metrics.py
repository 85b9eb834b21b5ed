"""Every per-step metric the trainer logs, on hand-built rollouts whose expected values are derived below,
plus the global loss normaliser that makes micro-batched / multi-process updates equal the whole batch."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from rewards import Result
from rl.advantages import AdvantageConfig, compute_advantages
from rl.logprobs import SequenceLogProbs
from rl.loss import LossConfig, LossOutput, loss_normalizer, policy_loss
from rl.stats import StepSample, StepStats, UpdateStats, loss_stats, merge_stats, noise_ratio, step_stats
from rollouts.record import THINK_END_REASONS, Rollouts, concat_rollouts


def rollouts(d: int = 2) -> Rollouts:
    """N=4 rollouts, G=2: CoT lengths [2, 1, 3, 0], answer lengths [2, 3, 1, 2] (delimiter included)."""
    cot_len, ans_len = [2, 1, 3, 0], [2, 3, 1, 2]
    n, t, a = 4, 3, 3
    cot_mask = torch.tensor([[i < c for i in range(t)] for c in cot_len])
    ans_mask = torch.tensor([[i < c for i in range(a)] for c in ans_len])
    action = ans_mask.clone()
    action[:, 0] = False  # the first answer token is the forced delimiter
    entropy = torch.tensor(
        [[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [0.5, 0.5, 0.5], [9.0, 9.0, 9.0]]
    )  # 9 = padding
    return Rollouts(
        cot_mode="soft",
        prompt_ids=torch.ones(n, 2, dtype=torch.long),
        prompt_mask=torch.ones(n, 2, dtype=torch.bool),
        group_index=torch.tensor([0, 0, 1, 1]),
        cot_ids=torch.zeros(n, t, dtype=torch.long),
        cot_inputs=torch.zeros(n, t, d),
        cot_top1_ids=torch.zeros(n, t, dtype=torch.long),
        cot_mask=cot_mask,
        cot_entropy=entropy,
        cot_logprobs=torch.zeros(n, t),
        answer_ids=torch.zeros(n, a, dtype=torch.long),
        answer_mask=ans_mask,
        answer_action_mask=action,
        answer_logprobs=torch.zeros(n, a),
        think_end=torch.tensor([0, 0, 3, 2]),  # token, token, max_tokens, entropy
        sigma=0.5,
        temperature=0.5,
    )


LOSS_STATS = {
    "noise_ratio": 0.3, "gap_cot": 1e-6, "gap_answer": 2e-7, "clip_fraction": 0.0, "kl_cot": 0.0,
    "kl_answer": 0.0, "loss": 0.1, "cot_term": 0.07, "answer_term": 0.03, "grad_norm": 1.5,
    "cot_grad_norm": 1.2, "lr": 1e-4,
}  # fmt: skip
UPDATE = UpdateStats(**LOSS_STATS, skipped=False)


def test_step_stats_derived_by_hand() -> None:
    r = rollouts()
    rewards = [1.0, 0.0, None, 1.0]
    results = [Result(1.0, "ok"), Result(0.0, "wrong"), Result(None, "gold_unparseable"), Result(1.0, "ok")]
    sample = StepSample.of(r, rewards, results)
    s = step_stats(sample, UPDATE, AdvantageConfig(estimator="rloo"), seconds=2.0)
    # judged rewards [1, 0, 1]: mean 2/3; population std sqrt(((1/3)^2 * 2 + (2/3)^2) / 3) = sqrt(2/9)
    assert s.reward_mean == pytest.approx(2 / 3)
    assert s.reward_std == pytest.approx(math.sqrt(2 / 9))
    assert s.reward_status == {
        "ok": 2,
        "wrong": 1,
        "no_answer": 0,
        "timeout": 0,
        "gold_unparseable": 1,
        "error": 0,
    }
    # RLOO with G=2: group 0 -> [1-0, 0-1] = [1, -1]; group 1 has one judged reward -> advantage 0 (row 2 excluded)
    # judged advantages [1, -1, 0]: mean 0, population std sqrt(2/3), mean |A| 2/3
    assert s.adv_mean == pytest.approx(0.0)
    assert s.adv_std == pytest.approx(math.sqrt(2 / 3))
    assert s.adv_abs_mean == pytest.approx(2 / 3)
    # lengths: CoT (2+1+3+0)/4 = 1.5; answer (2+3+1+2)/4 = 2.0
    assert s.cot_len == pytest.approx(1.5) and s.answer_len == pytest.approx(2.0)
    # think-end reasons [token, token, max_tokens, entropy] -> fractions 2/4, 0, 1/4, 1/4
    assert s.think_end == dict(zip(THINK_END_REASONS, [0.5, 0.0, 0.25, 0.25, 0.0, 0.0], strict=True))
    # entropy over the 6 real CoT steps: (1 + 2 + 3 + 0.5 * 3) / 6 = 7.5 / 6 (padding 9s excluded)
    assert s.cot_entropy == pytest.approx(7.5 / 6)
    # throughput: (6 CoT steps + 8 answer tokens) / 2 s
    assert s.tokens_per_s == pytest.approx(7.0) and s.step_time == 2.0
    # the loss-side statistics pass through unchanged
    for key, value in LOSS_STATS.items():
        assert getattr(s.update, key) == value, key
    metrics = s.as_metrics()
    assert metrics["reward_status/gold_unparseable"] == 1.0 and metrics["think_end/max_tokens"] == 0.25
    assert metrics["skipped"] == 0.0
    # every StepStats field reaches the log (dicts and the update's logged fields flattened), none is silently
    # dropped; the update's step counts (weights of its means) are the only fields not logged
    logged_update = len(UpdateStats.__dataclass_fields__) - 5
    assert (
        len(metrics)
        == len(StepStats.__dataclass_fields__) - 3 + len(s.reward_status) + len(s.think_end) + logged_update
    )
    assert set(LOSS_STATS) | {"skipped"} <= set(metrics)


def test_merged_process_samples_give_the_whole_batch_metrics() -> None:
    """Two processes' halves, merged, give exactly the metrics of the whole batch on one process."""
    r = rollouts()
    rewards = [1.0, 0.0, None, 1.0]
    results = [Result(1.0, "ok"), Result(0.0, "wrong"), Result(None, "gold_unparseable"), Result(1.0, "ok")]
    whole = StepSample.of(r, rewards, results)
    halves = [StepSample.of(r.select(s), rewards[s], results[s]) for s in (slice(0, 2), slice(2, 4))]
    halves[1].group_index = [0, 0]  # a second process numbers its own groups from 0, as the engine does
    merged = StepSample.merge(halves)
    assert merged.group_index == [0, 0, 1, 1]  # merging offsets them back to distinct groups
    cfg = AdvantageConfig(estimator="rloo")
    a = step_stats(whole, UPDATE, cfg, 1.0).as_metrics()
    b = step_stats(merged, UPDATE, cfg, 1.0).as_metrics()
    assert a == pytest.approx(b)


def _out(clip: float, n_cot: int, n_ans: int, kl_cot: float, kl_ans: float, loss: float) -> LossOutput:
    t = torch.tensor(loss)
    return LossOutput(
        loss=t, cot_loss=t, cot_term=loss / 2, answer_term=loss / 2, clip_fraction=clip, clip_fraction_cot=0.0,
        clip_fraction_answer=0.0, ratio_cot=1.0, ratio_answer=1.0, kl_cot=kl_cot, kl_answer=kl_ans,
        logp_cot=0.0, logp_answer=0.0, num_cot_steps=n_cot, num_answer_steps=n_ans,
    )  # fmt: skip


def _scored(
    h: torch.Tensor, mu: torch.Tensor, behaviour: float, learner: float
) -> tuple[Rollouts, SequenceLogProbs]:
    r = rollouts(d=h.shape[-1])
    r.cot_inputs = h
    r.cot_logprobs = torch.full_like(r.cot_logprobs, behaviour)
    r.answer_logprobs = torch.full_like(r.answer_logprobs, behaviour)
    new = SequenceLogProbs(
        cot_mode="soft", cot=torch.full_like(r.cot_logprobs, learner), cot_mask=r.cot_mask,
        answer=torch.full_like(r.answer_logprobs, learner), answer_mask=r.answer_action_mask, mu=mu, sigma=0.5,
        cot_entropy=torch.zeros_like(r.cot_logprobs), answer_entropy=torch.zeros_like(r.answer_logprobs),
    )  # fmt: skip
    return r, new


def test_loss_stats_weights_micro_batches_by_their_step_counts() -> None:
    mu = torch.zeros(4, 3, 2)
    mu[..., 0] = 2.0  # ‖μ‖ = 2
    h = mu.clone()
    h[..., 1] = 1.0  # ‖h - μ‖ = 1 -> noise ratio 1/2 on every step
    pair = _scored(h, mu, behaviour=-1.0, learner=-1.25)  # |gap| = 0.25 per step of both kinds
    outs = [
        _out(0.5, 2, 2, kl_cot=0.1, kl_ans=0.2, loss=0.3),
        _out(0.0, 6, 2, kl_cot=0.4, kl_ans=0.0, loss=-0.1),
    ]
    stats = loss_stats(outs, [pair, pair], grad_norm=3.0, lr=1e-5)
    # clip fraction: (0.5 * 4 + 0 * 8) / 12 steps
    assert stats.clip_fraction == pytest.approx(2 / 12)
    # KL means weighted by the step counts of their kind: CoT (0.1*2 + 0.4*6)/8, answer (0.2*2 + 0*2)/4
    assert stats.kl_cot == pytest.approx(2.6 / 8) and stats.kl_answer == pytest.approx(0.1)
    # loss terms add up (each micro-batch was already divided by the global normaliser)
    assert stats.loss == pytest.approx(0.2) and stats.cot_term == pytest.approx(0.1)
    assert stats.gap_cot == pytest.approx(0.25) and stats.gap_answer == pytest.approx(0.25)
    assert stats.noise_ratio == pytest.approx(0.5)
    assert (stats.grad_norm, stats.lr) == (3.0, 1e-5)


def test_merged_process_stats_equal_the_stats_of_the_whole_batch() -> None:
    """Two processes with different step counts: merging their `loss_stats` (`merge_stats`, by each field's
    declared rule) gives what one process holding both micro-batches computes (per-step means weighted by
    steps, not averaged per process)."""
    mu = torch.zeros(4, 3, 2)
    mu[..., 0] = 2.0
    h_quiet, h_loud = mu.clone(), mu.clone()
    h_quiet[..., 1] = 1.0  # noise ratio 1/2
    h_loud[..., 1] = 4.0  # noise ratio 2
    first = _scored(h_quiet, mu, behaviour=-1.0, learner=-1.25)  # gaps 0.25
    second = _scored(h_loud, mu, behaviour=-1.0, learner=-2.0)  # gaps 1.0
    second[1].cot_mask[:, 2] = False  # fewer scored CoT steps on the second process: 5 against 6
    out_a = _out(0.5, 2, 2, kl_cot=0.1, kl_ans=0.2, loss=0.3)
    out_b = _out(0.0, 6, 3, kl_cot=0.4, kl_ans=0.1, loss=-0.1)
    whole = loss_stats([out_a, out_b], [first, second], grad_norm=3.0, lr=1e-5)
    merged = merge_stats(
        [
            replace(loss_stats([out_a], [first], grad_norm=3.0, lr=1e-5), cot_grad_norm=1.0),
            replace(loss_stats([out_b], [second], grad_norm=3.0, lr=1e-5), cot_grad_norm=3.0),
        ]
    )
    for key, value in asdict(whole).items():
        if key != "cot_grad_norm":  # measured by the update, not by loss_stats (NaN in `whole`)
            assert getattr(merged, key) == pytest.approx(value), key
    # by hand: noise ratio (0.5 * 6 + 2 * 5) / 11; CoT gap (0.25 * 6 + 1 * 5) / 11; KL (0.1 * 2 + 0.4 * 6) / 8
    assert merged.noise_ratio == pytest.approx(13 / 11) and merged.gap_cot == pytest.approx(6.5 / 11)
    assert merged.kl_cot == pytest.approx(2.6 / 8) and merged.kl_answer == pytest.approx(0.7 / 5)
    assert merged.clip_fraction == pytest.approx(2 / 13) and merged.loss == pytest.approx(0.2)
    assert merged.cot_grad_norm == 2.0  # each process measures its own share: averaged


def test_noise_ratio_is_zero_for_hard_cot() -> None:
    r, new = _scored(torch.zeros(4, 3, 2), torch.ones(4, 3, 2), 0.0, 0.0)
    new.mu = None
    assert noise_ratio([(r, new)]) == 0.0


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_global_normaliser_makes_micro_batches_equal_the_whole_batch(aggregation: str) -> None:
    """Split a batch in two micro-batches, divide each by the summed normaliser, add the gradients: the result
    must equal the gradient of the whole batch's loss (what a 1-process, 1-micro-batch run computes)."""
    torch.manual_seed(0)
    r = rollouts()
    cfg = LossConfig(aggregation=aggregation, max_len_norm=7)
    adv = compute_advantages([1.0, 0.0, 0.0, 1.0], r.group_index, AdvantageConfig(estimator="rloo"))
    cot = torch.randn(4, 3, requires_grad=True)
    ans = torch.randn(4, 3, requires_grad=True)

    def lp(rows: slice) -> SequenceLogProbs:
        part = r.select(rows)
        return SequenceLogProbs(
            cot_mode="hard", cot=cot[rows], cot_mask=part.cot_mask, answer=ans[rows],
            answer_mask=part.answer_action_mask, mu=None, sigma=0.0,
            cot_entropy=torch.zeros(part.num_rollouts, 3), answer_entropy=torch.zeros(part.num_rollouts, 3),
        )  # fmt: skip

    whole = policy_loss(lp(slice(0, 4)), adv, cfg).loss
    g_whole = torch.autograd.grad(whole, [cot, ans])
    halves = [slice(0, 2), slice(2, 4)]
    norm = sum(loss_normalizer(r.select(s), adv.select(s), cfg) for s in halves)
    split = sum(policy_loss(lp(s), adv.select(s), cfg, normalizer=norm).loss for s in halves)
    g_split = torch.autograd.grad(split, [cot, ans])
    assert float(split.detach()) == pytest.approx(float(whole.detach()), abs=1e-7)
    for a, b in zip(g_whole, g_split, strict=True):
        torch.testing.assert_close(a, b)
    # the normaliser itself, by hand: action steps per row = CoT + answer actions = [2+1, 1+2, 3+0, 0+1]
    expected = {"token": 3 + 3 + 3 + 1, "sequence": 4, "constant": 4 * 7}[aggregation]
    assert loss_normalizer(r, adv, cfg) == expected


def test_concat_rollouts_pads_and_offsets_groups() -> None:
    a, b = rollouts(), rollouts().select(slice(0, 2))
    b.prompt_ids = torch.ones(2, 4, dtype=torch.long)  # longer prompts: `a` must be left-padded to 4
    b.prompt_mask = torch.ones(2, 4, dtype=torch.bool)
    both = concat_rollouts([a, b], pad_id=7)
    assert both.num_rollouts == 6
    assert both.group_index.tolist() == [0, 0, 1, 1, 2, 2]  # b's group 0 becomes group 2
    assert both.prompt_ids[0].tolist() == [7, 7, 1, 1] and both.prompt_mask[0].tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert both.cot_lengths.tolist() == [2, 1, 3, 0, 2, 1]
    torch.testing.assert_close(both.select(slice(4, 6)).cot_entropy, b.cot_entropy)


def test_cot_grad_norm_is_the_unweighted_cot_term_gradient(tiny_base, tmp_path) -> None:
    """`cot_grad_norm` = ‖∇_θ (-Σ_{CoT steps} A_i · log π_θ(step)) / D‖ with ratio 1 (one PPO iteration): the
    CoT surrogate -A·ratio has gradient -A·∇log π at ratio 1. It ignores cot_weight / gaussian_weight (here 0),
    so it shows what the switched-off Gaussian term would do."""
    from rl.learner import cot_grad_norm
    from rl.logprobs import sequence_log_probs
    from tests.test_trainer import make_trainer, small_run

    trainer = make_trainer(small_run(tiny_base, tmp_path, "cot=soft", "rl.loss.gaussian_weight=0"))
    rollouts, _ = trainer.rollout(0)
    adv = compute_advantages(
        [1.0, 0.0, 0.0, 1.0] * 4, rollouts.group_index, AdvantageConfig(estimator="rloo")
    )
    new = sequence_log_probs(trainer.model, rollouts, trainer.cfg.cot, trainer.cfg.rl.logprobs)
    norm = loss_normalizer(rollouts, adv, trainer.cfg.rl.loss)
    got = cot_grad_norm(trainer.model, new, adv, trainer.cfg.rl.loss, normalizer=norm)
    mask = new.cot_mask & adv.mask[:, None]
    manual = -(adv.values[:, None] * torch.where(mask, new.cot, 0.0)).sum() / norm
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(manual, params, allow_unused=True)
    expected = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
    assert expected > 0
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "kind,requested,world,stage,expected",
    [
        ("FSDP", "auto", 2, None, "fsdp2"),  # the fsdp2.yaml launch selects it
        ("DEEPSPEED", "auto", 2, "2", "zero2"),  # zero2.yaml (ACCELERATE_DEEPSPEED_ZERO_STAGE=2)
        ("DEEPSPEED", "auto", 2, "3", "zero3"),  # zero3.yaml
        ("DEEPSPEED", "zero3", 2, "3", "zero3"),
        ("MULTI_CPU", "zero2", 2, None, "zero2"),  # cpu2.yaml + trainer.sharding=zero2
        ("MULTI_CPU", "zero3", 2, None, "zero3"),  # cpu2.yaml + trainer.sharding=zero3
        ("MULTI_GPU", "auto", 2, None, "none"),
        ("MULTI_CPU", "fsdp2", 2, None, "fsdp2"),  # cpu2.yaml + trainer.sharding=fsdp2
        ("FSDP", "auto", 1, None, "none"),  # one process: nothing to shard with
        ("DEEPSPEED", "auto", 1, "3", "none"),
        ("NO", "none", 1, None, "none"),
    ],
)
def test_resolve_sharding(kind: str, requested: str, world: int, stage: str | None, expected: str) -> None:
    from rl.parallel import resolve_sharding

    assert resolve_sharding(kind, requested, world, zero_stage=stage) == expected


@pytest.mark.parametrize(
    "stage,requested", [("1", "auto"), (None, "auto"), ("2", "fsdp2"), ("3", "zero2"), ("2", "zero3")]
)
def test_other_deepspeed_launches_are_refused_with_the_alternatives_named(stage, requested) -> None:
    """ZeRO-1 (or a launch without a stage) and a sharding that contradicts the launch's stage fail at start."""
    from rl.parallel import resolve_sharding

    with pytest.raises(NotImplementedError, match=r"ZeRO stages 2 and 3(.|\n)*zero2.yaml, zero3.yaml"):
        resolve_sharding("DEEPSPEED", requested, 8, zero_stage=stage)


def test_deepspeed_config_maps_the_optimizer_settings() -> None:
    from rl.sharding import deepspeed_config

    cfg = deepspeed_config(2, 0.5, torch.bfloat16)
    # one backward and one engine step per trainer step; DeepSpeed clips; bf16 keeps float32 master weights
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_optimization"] == {"stage": 2} and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True}
    plain = deepspeed_config(2, 0.0, torch.float32)
    assert "gradient_clipping" not in plain and "bf16" not in plain
    # stage 3: the persistence threshold is passed through; DeepSpeed does not gather weights to save them (the
    # trainer saves its whole generation copy)
    zero3 = deepspeed_config(3, 1.0, torch.float32, persistence_threshold=0)["zero_optimization"]
    assert zero3 == {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    for stage, dtype in ((2, torch.float16), (3, torch.float16)):
        with pytest.raises(ValueError, match=f"zero{stage} sharding with a float16"):
            deepspeed_config(stage, 1.0, dtype)
    with pytest.raises(ValueError, match="stage 1"):
        deepspeed_config(1, 1.0, torch.float32)


@pytest.mark.parametrize(
    "config,expected",
    [("ddp.yaml", "none"), ("fsdp2.yaml", "fsdp2"), ("zero2.yaml", "zero2"), ("zero3.yaml", "zero3")],
)
def test_accelerate_launch_configs_select_their_sharding(config: str, expected: str) -> None:
    """What `accelerate launch --config_file recipes/accelerate/<config>` hands the trainer: its distributed type
    and (DeepSpeed) ZeRO stage, which `trainer.sharding=auto` turns into the sharding the file's comment names."""
    from omegaconf import OmegaConf

    from rl.parallel import resolve_sharding

    launch = OmegaConf.load(Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / config)
    stage = launch.get("deepspeed_config", {}).get("zero_stage")
    world = launch["num_processes"]
    assert world > 1
    assert (
        resolve_sharding(launch["distributed_type"], "auto", world, None if stage is None else str(stage))
        == expected
    )


def test_every_update_statistic_declares_how_it_merges() -> None:
    """One declaration per field (rl/stats.py): a rule, and for a weighted mean a step-count field that exists;
    a record whose field has no rule cannot be merged."""
    from dataclasses import dataclass, fields

    from rl.stats import MERGE_RULES

    names = {f.name for f in fields(UpdateStats)}
    for f in fields(UpdateStats):
        assert f.metadata.get("merge") in MERGE_RULES, f.name
        if f.metadata["merge"] == "weighted":
            assert f.metadata["weight"] in names, f.name

    @dataclass
    class Unruled:
        x: float = 0.0

    with pytest.raises(TypeError, match="Unruled.x: no merge rule"):
        merge_stats([Unruled(), Unruled()])
