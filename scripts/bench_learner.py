"""Learner throughput: the forward and backward of one update's log-probs with each distinct prompt encoded once
(`rl.logprobs.share_prompts=true`, the default) against the packed rows (the reference), and against a plain
causal-LM step over the same tokens (what a Hugging Face user would time: `model(input_ids).logits`, cross-entropy
on the CoT and answer tokens, backward), on the same rollouts in the same process. Prints one JSON object.

    python scripts/bench_learner.py                        # the embedded default's step: 16 prompts x 8 samples
    python scripts/bench_learner.py cot=hard --repeats 5   # any Hydra override of recipes/train.yaml

Workload: one step of real rollouts from the run's policy (the step-1 batch of `trainer.prompts_per_step`
prompts), their GRPO advantages, and the learner's `learner_log_probs` + `policy_loss` + backward, timed as the
median of `--repeats` runs after a warm-up (bracketed by `torch.cuda.synchronize()` on CUDA). The plain step's
rows are each rollout's prompt, CoT stream ids (the sampled tokens; for continuous CoT the top-1 ids, where the
learner feeds vectors) and answer, right-padded. Also reports the largest gradient difference between the two
learner paths relative to the largest gradient entry, the padded share of the packed rows, and the process's peak
resident memory (`ru_maxrss`; CUDA: the peak allocated).

    python scripts/bench_learner.py model=qwen2.5-coder-0.5b data=word_problems rl.lora.rank=16 \
        trainer.prompts_per_step=2 rl.group_size=8 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
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

PAD_ID, PAD_LABEL = 0, -100


def plain_rows(rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([N, L] ids, [N, L] labels, [N, L] attention mask): each rollout's prompt ++ CoT stream ids ++ answer,
    right-padded; labels are the ids on the CoT and answer tokens (the ones the learner scores), PAD_LABEL
    elsewhere."""
    rows, targets = [], []
    for i in range(rollouts.num_rollouts):
        prompt = rollouts.prompt_ids[i][rollouts.prompt_mask[i]]
        scored = torch.cat(
            [rollouts.cot_ids[i][rollouts.cot_mask[i]], rollouts.answer_ids[i][rollouts.answer_mask[i]]]
        )
        rows.append(torch.cat([prompt, scored]))
        targets.append(torch.cat([torch.full_like(prompt, PAD_LABEL), scored]))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), PAD_LABEL, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, : len(r)], labels[i, : len(t)], mask[i, : len(r)] = r, t, 1
    device = rollouts.prompt_ids.device
    return ids.to(device), labels.to(device), mask.to(device)


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # Hydra overrides may come before or after the options
    register_configs()
    scratch = tempfile.mkdtemp(prefix="bench_learner_")  # a fresh run directory each time (resume=never)
    raw = compose("train", [*args.overrides, f"output_dir={scratch}", "trainer.resume=never"])
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

    ids, labels, mask = plain_rows(rollouts)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits  # [N, L, V]
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=PAD_LABEL
        ).backward()

    seconds = {
        "packed": timed(lambda: update(False), device, args.repeats)[2],  # the warm median
        "shared_prompts": timed(lambda: update(True), device, args.repeats)[2],
        "plain_causal_lm": timed(plain, device, args.repeats)[2],
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
        "learner_over_plain_time": round(seconds["shared_prompts"] / seconds["plain_causal_lm"], 3),
        "max_grad_diff_rel": float((g_packed - g_shared).abs().max() / g_packed.abs().max()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_memory_gb": round(peak_memory_gb(device), 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
