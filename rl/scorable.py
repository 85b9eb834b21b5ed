"""What the learner checks before it scores rollouts: that they were generated the way the scoring config would
score them (mode, temperature, filters, the stored vectors or mixture tokens a density needs), and that the
mixture inputs it rebuilds are the ones the rollout fed. Each failure is a ValueError naming the settings."""

from __future__ import annotations

import torch

from rollouts.config import CotConfig
from rollouts.record import SAMPLING_FIELDS, Rollouts


def check_scorable(rollouts: Rollouts, cot: CotConfig, answer_top_p: float) -> None:
    """The rollouts were generated the way `cot` (and `answer_top_p`) would score them; else ValueError."""
    if cot.mode != rollouts.cot_mode or cot.temperature != rollouts.temperature:
        raise ValueError(
            f"CotConfig (mode={cot.mode!r}, temperature={cot.temperature}) does not match the rollouts "
            f"(mode={rollouts.cot_mode!r}, temperature={rollouts.temperature})"
        )
    _check_sampling(rollouts, cot, answer_top_p)
    if cot.gaussian and (rollouts.cot_inputs is None or rollouts.sigma <= 0):
        raise ValueError(
            f"{cot.mode} CoT needs stored cot_inputs and sigma > 0 to score Gaussian actions "
            f"(cot_inputs is None: {rollouts.cot_inputs is None}, sigma={rollouts.sigma})"
        )
    if cot.mixture:
        mix = rollouts.cot_mix_ids
        if mix is None or rollouts.cot_mix_logits is None or mix.shape[-1] != cot.mix_width:
            raise ValueError(
                f"{cot.mode} CoT needs the stored mixture tokens of width {cot.mix_width} "
                f"(got {None if mix is None else tuple(mix.shape)})"
            )
        if (cot.mode == "multiplex" and cot.temperature == 0) or (
            cot.mode == "gumbel" and rollouts.sigma <= 0
        ):
            raise ValueError(f"greedy {cot.mode} rollouts are a point mass: they have no density to score")


def _check_sampling(rollouts: Rollouts, cot: CotConfig, answer_top_p: float) -> None:
    """Raise ValueError naming every filter setting (`rollouts.record.SAMPLING_FIELDS`) that differs between the
    scoring call (`cot`'s CoT filter, the `answer_top_p` argument) and what the rollouts were generated with."""
    wanted = {"top_k": cot.top_k, "top_p": cot.top_p, "min_p": cot.min_p, "answer_top_p": answer_top_p}
    assert wanted.keys() == set(SAMPLING_FIELDS)
    differ = [
        f"{'' if name == 'answer_top_p' else 'cot.'}{name}={value} but the rollouts were generated with "
        f"{name}={getattr(rollouts, name)}"
        for name, value in wanted.items()
        if value != getattr(rollouts, name)
    ]
    if differ:
        raise ValueError(
            f"cannot score rollouts under another filter than they were sampled with: {'; '.join(differ)}"
        )


def check_rebuilt_mixture(h: torch.Tensor, rollouts: Rollouts, cot: CotConfig) -> None:
    """The mixture inputs h [N, T, d] the learner rebuilt from the stored tokens and mix logits are the vectors the
    rollout fed (`rollouts.cot_inputs`, to 1e-3 of their scale); else ValueError. Another τ_g or weighting would
    silently train on other inputs than the ones that produced the rewards."""
    fed = rollouts.cot_inputs
    if fed is None:
        return
    device = h.device
    mask = rollouts.cot_mask.to(device)[..., None]  # [N, T, 1]
    err = ((h.detach() - fed.to(device).float()) * mask).abs().max() if fed.numel() else torch.tensor(0.0)
    scale = fed.abs().max().clamp(min=1e-6) if fed.numel() else 1.0
    if float(err) > 1e-3 * float(scale):
        raise ValueError(
            f"{cot.mode} CoT: the stored tokens and mix logits rebuild inputs {float(err):.3g} away from the "
            f"vectors the rollout fed (cot.gumbel_temperature={cot.gumbel_temperature}, "
            f"cot.multiplex_weights={cot.multiplex_weights!r}: are they the rollout's?)"
        )
