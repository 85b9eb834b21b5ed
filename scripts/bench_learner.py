"""Learner throughput: the forward and backward of one update's log-probs with each distinct prompt encoded once
(`rl.logprobs.share_prompts=true`, the default) against the packed rows (the reference), on the same rollouts in
the same process. Prints one JSON object.

    python scripts/bench_learner.py                        # the embedded default's step: 16 prompts x 8 samples
    python scripts/bench_learner.py cot=hard --repeats 5   # any Hydra override of recipes/train.yaml

Workload: one step of real rollouts from the run's policy (the step-1 batch of `trainer.prompts_per_step`
prompts), their GRPO advantages, and the learner's `learner_log_probs` + `policy_loss` + backward, timed as the
median of `--repeats` runs after a warm-up (bracketed by `torch.cuda.synchronize()` on CUDA). Also reports the
largest gradient difference between the two paths relative to the largest gradient entry, and the padded share
of the packed rows.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import _bootstrap  # noqa: F401
import torch
from bench_rollout import timed
from train import build_trainer

from rewards.pool import RewardPool
from rl.advantages import compute_advantages
from rl.config import TrainConfig, compose, prepare_model, register_configs, to_object
from rl.learner import learner_log_probs
from rl.loss import policy_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # Hydra overrides may come before or after the options
    register_configs()
    raw = compose("train", [*args.overrides, "output_dir=/tmp/bench_learner", "trainer.resume=never"])
    prepare_model(raw, args.overrides)  # the tiny base built if missing; a model directory's profile
    cfg = to_object(raw, TrainConfig)
    trainer = build_trainer(cfg)
    with RewardPool(cfg.reward) as pool:
        rollouts, problems = trainer.rollout(step=1)
        rewards = trainer.judge(pool, rollouts, problems).rewards
    adv = compute_advantages(rewards, rollouts.group_index, cfg.rl.advantages)
    model = trainer.model
    device = str(next(model.parameters()).device)

    configs = {share: replace(cfg.rl.logprobs, share_prompts=share) for share in (False, True)}

    def update(share: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        new = learner_log_probs(model, rollouts, cfg.cot, configs[share])  # the learner's own call
        policy_loss(new, adv, cfg.rl.loss).loss.backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    seconds = {
        "packed": timed(lambda: update(False), device, args.repeats)[2],  # the warm median
        "shared_prompts": timed(lambda: update(True), device, args.repeats)[2],
    }
    g_packed, g_shared = update(False), update(True)
    rows = rollouts.prompt_mask.sum(1) + rollouts.cot_mask.sum(1) + rollouts.answer_mask.sum(1)  # [N]
    report = {
        "cot": cfg.cot.mode,
        "device": device,
        "threads": torch.get_num_threads(),
        "rollouts": rollouts.num_rollouts,
        "distinct_prompts": len(problems),
        "mean_row_tokens": round(float(rows.float().mean()), 1),
        "mean_prompt_tokens": round(float(rollouts.prompt_mask.sum(1).float().mean()), 1),
        "packed_padding_fraction": round(1 - float(rows.sum()) / (len(rows) * int(rows.max())), 3),
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "packed_over_shared_time": round(seconds["packed"] / seconds["shared_prompts"], 3),
        "max_grad_diff_rel": float((g_packed - g_shared).abs().max() / g_packed.abs().max()),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
