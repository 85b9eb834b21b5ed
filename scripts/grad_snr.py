"""Gradient signal-to-noise of the CoT term and the answer term of the learner objective.

    python scripts/grad_snr.py cot=soft --batches 6
    python scripts/grad_snr.py cot=hard --batches 6 --prompts 16

Draws `--batches` independent rollout batches on the SAME `--prompts` training problems (only the sampling seed
differs), and for each computes the gradient of the CoT term and of the answer term separately. For each term it
prints the mean per-batch gradient norm, the mean pairwise cosine between batches and SNR = ‖E g‖² / E‖g - E g‖²
(`rl.diagnostics`): a cosine near 0 means one batch's gradient is almost all noise. The terms are taken
unweighted (cot_weight = gaussian_weight = 1), so the tiny recipe's switched-off Gaussian term is measured too.
The remaining arguments are Hydra overrides of recipes/train.yaml.
"""

import argparse

import _bootstrap  # noqa: F401
import torch
from train import build_trainer

from rewards.pool import RewardPool
from rl.advantages import compute_advantages
from rl.config import TrainConfig, compose, prepare_model, register_configs, to_object
from rl.diagnostics import gradient_agreement
from rl.learner import learner_log_probs
from rl.loss import policy_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # Hydra overrides may come before or after the options
    register_configs()
    raw = compose(
        "train",
        [
            *args.overrides,
            "output_dir=/tmp/grad_snr",
            "trainer.resume=never",
            "rl.loss.gaussian_weight=1",
            "rl.loss.cot_weight=1",
        ],
    )
    prepare_model(raw, args.overrides)  # the tiny base built if missing; a model directory's profile
    cfg = to_object(raw, TrainConfig)
    cfg.trainer.prompts_per_step = args.prompts
    trainer = build_trainer(cfg)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads: dict[str, list[torch.Tensor]] = {"cot": [], "answer": []}
    with RewardPool(cfg.reward) as pool:
        for b in range(args.batches):
            rollouts, problems = trainer.rollout(step=1000 + b, start=0)  # the same prompts every batch
            rewards = trainer.judge(pool, rollouts, problems).rewards
            adv = compute_advantages(rewards, rollouts.group_index, cfg.rl.advantages)
            new = learner_log_probs(trainer.model, rollouts, cfg.cot, cfg.rl.logprobs)
            out = policy_loss(new, adv, cfg.rl.loss)
            for name, term in (("cot", out.cot_loss), ("answer", out.loss - out.cot_loss)):
                g = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
                grads[name].append(
                    torch.cat(
                        [
                            (x if x is not None else torch.zeros_like(p)).reshape(-1)
                            for x, p in zip(g, params, strict=True)
                        ]
                    )
                )
            r = [x for x in rewards if x is not None]
            print(f"batch {b}: reward mean {sum(r) / max(len(r), 1):.3f}", flush=True)
    print(
        f"mode={cfg.cot.mode} sigma={trainer.state.sigma:.4g} batches={args.batches} prompts={args.prompts}"
    )
    for name, gs in grads.items():
        r = gradient_agreement(gs)
        print(f"{name:>6}: |g| {r.mean_norm:.4g}  pairwise cos {r.mean_cosine:+.4f}  SNR {r.snr:.4g}")


if __name__ == "__main__":
    main()
