"""Gradient signal of each term of the learner objective (scripts/grad_snr.py).

For one training configuration: draw `batches` independent rollout batches, either on the SAME `prompts` training
problems (`draw="same"`: only the sampling seed differs) or each on FRESH problems (`draw="fresh"`: batch b takes
the b-th block of `prompts` problems of the data order, as successive training steps do), compute for each batch the gradient of the CoT term and of the answer term
separately (unweighted: `cot_weight = gaussian_weight = 1`, so a term a recipe switches off is measured too), and
summarise each term over the batches with `rl.diagnostics.gradient_agreement`:

- `norm`: the mean per-batch gradient norm;
- `cosine`: the mean pairwise cosine between batches (near 0: one batch's gradient is almost all noise);
- `snr`: ‖E g‖² / E‖g - E g‖², the squared norm of the expected gradient over the variance of one batch's.

An estimator with signal has an SNR that grows with the batch (about linearly: the noise variance falls as 1/B
and the expected gradient does not move); pure noise stays at SNR ≈ 0 whatever the batch.

The two draws measure different things. On the same problems the expected gradient includes what is particular
to those problems (fitting them: the direction that raises their reward, held-out or not); on fresh problems
only what successive training batches share survives the mean, the part that can carry to held-out problems.
Training steps draw fresh problems, so the fresh SNR is the one that predicts a held-out lift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from rewards.pool import RewardPool
from rl.advantages import compute_advantages
from rl.diagnostics import gradient_agreement
from rl.learner import learner_log_probs
from rl.loss import policy_loss

TERMS = ("cot", "answer")
DRAWS = ("same", "fresh")


@dataclass
class TermSignal:
    """One term's gradient statistics over the batches of one setting."""

    setting: str  # the setting's overrides, as given
    mode: str  # the CoT mode
    prompts: int  # training problems per batch (rollouts = prompts × G)
    draw: str  # same | fresh: every batch on the same problems, or each on its own (module docstring)
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


def term_signals(
    trainer, pool: RewardPool, setting: str, batches: int, draw: str = "same"
) -> list[TermSignal]:
    """The `TermSignal` of each term for `trainer`'s configuration: `trainer.prompts_per_step` problems per batch,
    the first ones of its data order for every batch (`draw="same"`) or the b-th block of them for batch b
    (`draw="fresh"`); batch b is sampled as training step 1000 + b."""
    if batches < 2:
        raise ValueError(f"batches={batches}: the agreement between batches needs at least 2")
    if draw not in DRAWS:
        raise ValueError(f"draw={draw!r}: expected one of {DRAWS}")
    cfg = trainer.cfg
    unweighted = replace(
        cfg.rl.loss, cot_weight=1.0, gaussian_weight=1.0
    )  # a switched-off term is measured too
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grads: dict[str, list[torch.Tensor]] = {term: [] for term in TERMS}
    rewards: list[float] = []
    for b in range(batches):
        start = b * cfg.trainer.prompts_per_step if draw == "fresh" else 0
        rollouts, problems = trainer.rollout(step=1000 + b, start=start)
        judged = trainer.judge(pool, rollouts, problems).rewards
        adv = compute_advantages(judged, rollouts.group_index, cfg.rl.advantages)
        new = learner_log_probs(trainer.model, rollouts, cfg.cot, cfg.rl.logprobs)
        out = policy_loss(new, adv, unweighted)
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
                draw=draw,
                term=term,
                norm=r.mean_norm,
                cosine=r.mean_cosine,
                snr=r.snr,
                reward=reward,
            )
        )
    return out_rows


def markdown(rows: list[TermSignal]) -> str:
    """One table row per (setting, batch size): each term's mean gradient norm, and its pairwise cosine and SNR on
    the same and on fresh problems (a draw not measured shows as -)."""
    cells = {(r.setting, r.prompts, r.term, r.draw): r for r in rows}
    lines = [
        "| setting | prompts | CoT norm | CoT cos / SNR, same | CoT cos / SNR, fresh "
        "| answer norm | answer cos / SNR, same | answer cos / SNR, fresh |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for setting, prompts in dict.fromkeys((r.setting, r.prompts) for r in rows):
        out = [setting, str(prompts)]
        for term in TERMS:
            measured = [
                cells[setting, prompts, term, d] for d in DRAWS if (setting, prompts, term, d) in cells
            ]
            out.append(f"{sum(r.norm for r in measured) / len(measured):.3f}" if measured else "-")
            for draw in DRAWS:
                r = cells.get((setting, prompts, term, draw))
                out.append(f"{r.cosine:+.3f} / {r.snr:.3f}" if r else "-")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def plot_signals(rows: list[TermSignal], path: str) -> None:
    """SNR of each term against the batch size, one line per setting (log scale), one panel per draw and term,
    into `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draws = [d for d in DRAWS if any(r.draw == d for r in rows)]
    fig, axes = plt.subplots(
        len(draws), len(TERMS), figsize=(6 * len(TERMS), 4.5 * len(draws)), squeeze=False
    )
    for row_axes, draw in zip(axes, draws, strict=True):
        for ax, term in zip(row_axes, TERMS, strict=True):
            for setting in dict.fromkeys(r.setting for r in rows):
                pts = sorted(
                    (r.prompts, max(r.snr, 1e-4))
                    for r in rows
                    if (r.setting, r.term, r.draw) == (setting, term, draw) and math.isfinite(r.snr)
                )  # an infinite SNR (every batch's gradient equal, e.g. all zero) is left out
                if pts:
                    ax.plot([p for p, _ in pts], [s for _, s in pts], marker="o", label=setting)
            if ax.lines:  # an empty panel keeps linear axes (a log axis with no data cannot be drawn)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
            ax.set_xlabel("prompts per batch (× G rollouts)")
            ax.set_title(f"{term} term, {draw} problems in every batch")
            ax.grid(True, alpha=0.3)
        row_axes[0].set_ylabel("gradient SNR (floored at 1e-4)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
