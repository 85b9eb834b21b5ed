"""Train a policy with GRPO through hard, soft or fuzzy chains of thought.

    python scripts/train.py                                   # the embedded default (tiny model, CPU)
    python scripts/train.py cot=fuzzy trainer.max_steps=200 output_dir=runs/fuzzy
    python scripts/train.py cot=soft model=qwen2.5-3b data=gsm8k
    python scripts/train.py -m cot.noise_scale=0.1,0.33,1.0   # a sweep (Hydra multirun)
    accelerate launch --config_file recipes/accelerate/ddp.yaml scripts/train.py ...

Writes output_dir/metrics.jsonl (every step), checkpoints, summary.json (eval_before / eval_after for every
inference mode in trainer.eval_modes), passk.png, curves.png (training curves) and the final policy in output_dir/final.
"""

import json

import _bootstrap  # noqa: F401
import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from rl.config import RECIPES_DIR, TrainConfig, prepare_model, register_configs, to_object
from rl.trainer import Trainer

register_configs()


@hydra.main(config_path=str(RECIPES_DIR), config_name="train", version_base="1.3")
def main(raw) -> None:
    run = HydraConfig.get()
    if run.mode == RunMode.MULTIRUN:
        # each sweep job trains in its own multirun/<date>/<job number>/ directory, beside Hydra's .hydra/
        raw.output_dir = run.runtime.output_dir
    to_object(raw, TrainConfig)  # every setting checked before a model is built or loaded
    note = prepare_model(raw, list(run.overrides.task))
    if note:
        print(f"[softgrpo] {note}", flush=True)
    cfg = to_object(raw, TrainConfig)
    trainer = Trainer(cfg)
    summary = trainer.run()
    if trainer.main:
        before, after = summary["eval_before"], summary["eval_after"]
        primary = before["primary"]
        print(
            json.dumps(
                {
                    "output_dir": cfg.output_dir,
                    "primary_mode": primary,
                    "heldout_pass@1_before": before["pass@1"],
                    "heldout_pass@1_after": after["pass@1"],
                    "lift_pass@1": after.get(primary, {}).get("lift_pass@1") if primary else None,
                    "before": before["pass@k"],
                    "after": after["pass@k"],
                }
            )
        )


if __name__ == "__main__":
    main()
