"""Evaluate a model in one inference mode with n samples per problem.

    python scripts/evaluate.py model.path=DIR data=gsm8k data.path=../shared/data/gsm8k_test.jsonl \
        data.limit=100 infer=soft_sample n=8 output_dir=OUT

Writes OUT/samples.jsonl (one row per problem, each sample with its per-step CoT entropy), OUT/summary.json
(pass@1, pass@k for every power of two k <= n, lengths, think-end reasons, timings, and the CoT entropy
profile: `cot_entropy_by_position`, the mean H(p_t) in nats at each CoT index over the samples that reached it,
with `samples_at_position`), OUT/config.yaml, OUT/passk.png and OUT/entropy.png (the profile).
"""

import json

import _bootstrap  # noqa: F401
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from rewards import RewardPool
from rl.config import RECIPES_DIR, EvaluateConfig, prepare_model, register_configs, to_object
from rl.data import load_problems, require_problems
from rl.evaluation import evaluate_mode, write_outputs
from rl.model import load_policy, read_profile
from rl.runtime import resolve_device, seed_everything
from rollouts.distributions import embedding_rms_by_kind, sigma_from_rms
from rollouts.engine import input_embedding_matrix

register_configs()


@hydra.main(config_path=str(RECIPES_DIR), config_name="evaluate", version_base="1.3")
def main(raw) -> None:
    to_object(raw, EvaluateConfig)  # every setting checked before a model is built or loaded
    note = prepare_model(raw, list(HydraConfig.get().overrides.task))
    if note:
        print(f"[softgrpo] {note}", flush=True)
    cfg = to_object(raw, EvaluateConfig)
    seed_everything(cfg.seed)
    problems = require_problems(load_problems(cfg.data, cfg.data.eval_split), cfg.data, cfg.data.eval_split)
    model, tokenizer = load_policy(cfg.model, resolve_device(cfg.device))
    # σ from the rms(E) the model's run started from (its profile), as the run's own evaluations use; a model
    # without a profile: from its embeddings
    profile = read_profile(cfg.model.path)
    rms = profile.embedding_rms if profile else embedding_rms_by_kind(input_embedding_matrix(model))
    sigma = sigma_from_rms(cfg.infer, rms)
    with RewardPool(cfg.reward) as pool:
        rows, summary = evaluate_mode(
            model,
            tokenizer,
            problems,
            cfg.infer,
            n=cfg.n,
            pool=pool,
            prompt=cfg.model.prompt,
            sigma=sigma,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
        )
    out = write_outputs(cfg.output_dir, rows, summary, OmegaConf.to_yaml(raw, resolve=True))
    print(
        json.dumps(
            {
                "output_dir": str(out),
                "mode": summary.mode,
                **{f"pass@{k}": v for k, v in summary.pass_at.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
