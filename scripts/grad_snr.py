"""Gradient signal-to-noise of the CoT term and the answer term, over CoT settings × batch sizes (JSON lines).

    python scripts/grad_snr.py                                   # the built-in study (README: gradient signal)
    python scripts/grad_snr.py --setting "cot=soft cot.noise_scale=1.0" --prompts 8 32 --batches 6

Each `--setting` is a space-separated list of Hydra overrides of recipes/train.yaml (a CoT mode and its noise
scale, τ_g or K); each runs at every `--prompts` value (problems per batch, × G rollouts), with the batches on the
same problems and on fresh ones (`--draws`; rl/grad_signal.py says what each measures). For each term it prints
one JSON line: the mean gradient norm, the mean pairwise cosine between the `--batches` independent batches, and
SNR = ‖E g‖² / E‖g - E g‖² (`rl.grad_signal`); a markdown table of all of them comes last. `--out` also writes
the lines to a file and `--plot` draws SNR against the batch size. The remaining arguments are overrides applied
to every setting.
"""

import argparse
import json
import shlex
from dataclasses import asdict
from pathlib import Path

import _bootstrap  # noqa: F401
from train import build_trainer

from rewards.pool import RewardPool
from rl.config import TrainConfig, compose, prepare_model, register_configs, to_object
from rl.grad_signal import DRAWS, markdown, plot_signals, term_signals

STUDY = (
    "cot=hard",
    "cot=multiplex",
    "cot=multiplex cot.multiplex_weights=prob",
    "cot=gumbel",
    "cot=gumbel cot.gumbel_temperature=0.25",
    "cot=soft",
    "cot=soft cot.noise_scale=1.0",
    "cot=fuzzy",
)
"""The README's study: every CoT mode at its recipe, the soft mode at a larger noise scale, gumbel at the τ_g that
SofT-GRPO reports collapsing, multiplex with p-weighted mixtures (multiplex at K = 1 is hard exactly:
tests/test_mixture_modes.py)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--setting", action="append", help="overrides of one setting (repeatable; default: STUDY)"
    )
    ap.add_argument(
        "--prompts", type=int, nargs="+", default=[8, 32], help="problems per batch (× G rollouts)"
    )
    ap.add_argument("--batches", type=int, default=6, help="independent batches per setting and batch size")
    ap.add_argument(
        "--draws",
        nargs="+",
        choices=DRAWS,
        default=list(DRAWS),
        help="same problems in every batch, or fresh ones",
    )
    ap.add_argument("--out", help="also write the JSON lines here")
    ap.add_argument("--plot", help="draw SNR against the batch size into this PNG")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every setting")
    args = ap.parse_intermixed_args()
    register_configs()
    rows = []
    for path in (args.out, args.plot):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    out = open(args.out, "w") if args.out else None  # noqa: SIM115 (written line by line as results come)
    for setting in args.setting or STUDY:
        for prompts in args.prompts:
            overrides = [*shlex.split(setting), *args.overrides]
            raw = compose(
                "train",
                [
                    *overrides,
                    "output_dir=/tmp/grad_snr",
                    "trainer.resume=never",
                    f"trainer.prompts_per_step={prompts}",
                    f"trainer.rollout_chunk={prompts}",
                ],
            )
            prepare_model(raw, overrides)  # the tiny base built if missing; a model directory's profile
            trainer = build_trainer(to_object(raw, TrainConfig))
            with RewardPool(trainer.cfg.reward) as pool:
                for draw in args.draws:
                    for row in term_signals(trainer, pool, setting, args.batches, draw):
                        rows.append(row)
                        line = json.dumps(asdict(row))
                        print(line, flush=True)
                        if out:
                            out.write(line + "\n")
                            out.flush()
    if out:
        out.close()
    print(markdown(rows))
    if args.plot:
        plot_signals(rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
