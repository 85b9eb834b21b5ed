"""Train a policy with GRPO through hard, soft or fuzzy chains of thought.

    python scripts/train.py                                   # the embedded default (tiny model, CPU)
    python scripts/train.py cot=fuzzy trainer.max_steps=200 output_dir=runs/fuzzy
    python scripts/train.py cot=soft model=qwen2.5-3b data=gsm8k
    python scripts/train.py -m cot.noise_scale=0.1,0.33,1.0   # a sweep (Hydra multirun)
    accelerate launch --config_file recipes/accelerate/ddp.yaml scripts/train.py ...

Writes output_dir/metrics.jsonl (every step), checkpoints, summary.json (eval_before / eval_after for every
inference mode in trainer.eval_modes), passk.png, curves.png (training curves) and the final policy in output_dir/final.
With trainer.select_best=true the policy evaluated after training and saved in final/ is the one with the best
periodic eval_primary pass@1 (kept in output_dir/best/ as the run goes; summary.json's `selected` names its step).

The composition root: config → parts (`build_trainer`) → the loop (`Trainer.run`, which saves as it goes).
"""

import dataclasses
import json

import _bootstrap  # noqa: F401
import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from rl.config import RECIPES_DIR, TrainConfig, load_infer_recipe, prepare_model, register_configs, to_object
from rl.data import load_problems, require_problems
from rl.lora import apply_lora
from rl.model import load_policy
from rl.parallel import build_parallel
from rl.rundir import config_yaml, plan_run
from rl.runtime import seed_everything
from rl.trainer import RunParts, Trainer
from rollouts.engines import build_engine

register_configs()


def build_trainer(cfg: TrainConfig) -> Trainer:
    """The run's parts, each checked as early as it can fail: the run directory (before anything is loaded or
    written), the parallel strategy of this launch, the data, the evaluation modes, then the model."""
    tcfg = cfg.trainer
    plan = plan_run(cfg.output_dir, config_yaml(cfg), tcfg.resume)
    parallel = build_parallel(
        tcfg.sharding, tcfg.device, cfg.rl.micro_batch, tcfg.zero3_persistence_threshold
    )
    tcfg.check_processes(parallel.world)
    if cfg.rl.lora.enabled and not parallel.whole_model:
        raise ValueError(
            f"rl.lora.rank={cfg.rl.lora.rank} with trainer.sharding={parallel.sharding}: LoRA runs on one process "
            "or data parallel (sharding none); drop the sharding or set rl.lora.rank=0"
        )
    if plan.overwrite:
        if parallel.main:
            print(f"[softgrpo] trainer.resume=overwrite: deleting the run in {cfg.output_dir}", flush=True)
            plan.clear()
        parallel.barrier()
    data = cfg.data
    train_problems = require_problems(load_problems(data, data.train_split), data, data.train_split)
    eval_problems = load_problems(data, data.eval_split)[: tcfg.eval_problems]
    modes = {}
    if tcfg.eval_modes:
        require_problems(eval_problems, data, data.eval_split)
        # the primary first; each recipe in recipes/infer/ takes the training CoT's limits and filter, except that
        # evaluation may think longer than training does (trainer.eval_max_think_tokens; 0 = the training cap)
        think = tcfg.eval_max_think_tokens or cfg.cot.max_think_tokens
        eval_cot = dataclasses.replace(cfg.cot, max_think_tokens=think)
        modes = {
            name: load_infer_recipe(name, eval_cot)
            for name in dict.fromkeys([tcfg.eval_primary, *tcfg.eval_modes])
        }
    seed_everything(tcfg.seed)
    model, tokenizer = load_policy(cfg.model, parallel.device)
    apply_lora(model, cfg.rl.lora)  # rank 0: full fine-tuning, nothing injected
    ref = None
    if cfg.rl.loss.kl_coef > 0:
        ref = load_policy(cfg.model, parallel.device)[0].eval().requires_grad_(False)
    engine, note = build_engine(
        tcfg.engine, model, key="trainer.engine", modes=[cfg.cot, *modes.values()], sharding=parallel.sharding
    )
    if parallel.main:
        print(f"[softgrpo] {note}", flush=True)
    parts = RunParts(plan, parallel, model, tokenizer, ref, train_problems, eval_problems, modes, engine)
    return Trainer(cfg, parts)


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
    trainer = build_trainer(cfg)
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
                    # trainer.select_best: the step whose policy was evaluated after training
                    "selected": summary.get("selected"),
                    "before": before["pass@k"],
                    "after": after["pass@k"],
                }
            )
        )


if __name__ == "__main__":
    main()
