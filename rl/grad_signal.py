"""Gradient signal of each term of the learner objective (scripts/grad_snr.py).

For one training configuration: draw `batches` independent rollout batches on the SAME `prompts` training problems
(only the sampling seed differs), compute for each batch the gradient of the CoT term and of the answer term
separately (unweighted: `cot_weight = gaussian_weight = 1`, so a term a recipe switches off is measured too), and
summarise each term over the batches with `rl.diagnostics.gradient_agreement`:

- `norm`: the mean per-batch gradient norm;
- `cosine`: the mean pairwise cosine between batches (near 0: one batch's gradient is almost all noise);
- `snr`: ‖E g‖² / E‖g - E g‖², the squared norm of the expected gradient over the variance of one batch's.

An estimator with signal has an SNR that grows with the batch (about linearly: the noise variance falls as 1/B
and the expected gradient does not move); pure noise stays at SNR ≈ 0 whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewards.pool import RewardPool
from rl.advantages import compute_advantages
from rl.diagnostics import gradient_agreement
from rl.learner import learner_log_probs
from rl.loss import policy_loss

TERMS = ("cot", "answer")


@dataclass
class TermSignal:
    """One term's gradient statistics over the batches of one setting."""

    setting: str  # the setting's overrides, as given
    mode: str  # the CoT mode
    prompts: int  # training problems per batch (rollouts = prompts × G)
    term: str  # cot | answer
    norm: float
    cosine: float
    snr: float
    reward: float  # mean reward over the batches' judged rollouts


def flat_grad(term: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """∇ term as one flat float32 vector over `params` (zeros for a parameter the term does not reach)."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def term_signals(trainer, pool: RewardPool, setting: str, batches: int) -> list[TermSignal]:
    """The `TermSignal` of each term for `trainer`'s configuration (its `trainer.prompts_per_step` problems, the
    first ones of its data order, every batch; batch b is sampled as training step 1000 + b)."""
    if batches < 2:
        raise ValueError(f"batches={batches}: the agreement between batches needs at least 2")
    cfg = trainer.cfg
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads: dict[str, list[torch.Tensor]] = {term: [] for term in TERMS}
    rewards: list[float] = []
    for b in range(batches):
        rollouts, problems = trainer.rollout(step=1000 + b, start=0)
        judged = trainer.judge(pool, rollouts, problems).rewards
        adv = compute_advantages(judged, rollouts.group_index, cfg.rl.advantages)
        new = learner_log_probs(trainer.model, rollouts, cfg.cot, cfg.rl.logprobs)
        out = policy_loss(new, adv, cfg.rl.loss)
        grads["cot"].append(flat_grad(out.cot_loss, params))
        grads["answer"].append(flat_grad(out.loss - out.cot_loss, params))
        rewards += [r for r in judged if r is not None]
    reward = sum(rewards) / max(len(rewards), 1)
    out_rows = []
    for term, gs in grads.items():
        r = gradient_agreement(gs)
        out_rows.append(
            TermSignal(
                setting=setting,
                mode=cfg.cot.mode,
                prompts=cfg.trainer.prompts_per_step,
                term=term,
                norm=r.mean_norm,
                cosine=r.mean_cosine,
                snr=r.snr,
                reward=reward,
            )
        )
    return out_rows


def plot_signals(rows: list[TermSignal], path: str) -> None:
    """SNR of each term against the batch size, one line per setting and term (log scale), into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TERMS), figsize=(6 * len(TERMS), 4.5), sharey=True)
    for ax, term in zip(axes, TERMS, strict=True):
        for setting in dict.fromkeys(r.setting for r in rows):
            pts = sorted((r.prompts, r.snr) for r in rows if r.setting == setting and r.term == term)
            ax.plot([p for p, _ in pts], [max(s, 1e-4) for _, s in pts], marker="o", label=setting)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompts per batch (× G rollouts)")
        ax.set_title(f"{term} term")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("gradient SNR (floored at 1e-4)")
    axes[-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
