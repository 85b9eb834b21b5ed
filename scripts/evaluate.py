"""Evaluate a model in one inference mode with n samples per problem.

    python scripts/evaluate.py model.path=DIR data=gsm8k data.path=../shared/data/gsm8k_test.jsonl \
        data.limit=100 infer=soft_sample n=8 output_dir=OUT

Writes OUT/samples.jsonl (one row per problem, each sample with its per-step CoT entropy), OUT/summary.json
(pass@1, pass@k for every power of two k <= n, lengths, think-end reasons, timings, and the CoT entropy
profile: `cot_entropy_by_position`, the mean H(p_t) in nats at each CoT index over the samples that reached it,
with `samples_at_position`), OUT/config.yaml, OUT/passk.png and OUT/entropy.png (the profile), and
OUT/trace.html: the first `trace_problems` problems (default 4; 0 = off) step by step, each CoT step with its
top-k tokens, their probabilities and H(p_t), then the answer, the reward and why thinking ended
(rollouts/trace.py).
"""

import json
from pathlib import Path

import _bootstrap  # noqa: F401
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from rewards import RewardPool
from rl.config import RECIPES_DIR, EvaluateConfig, prepare_model, register_configs, to_object
from rl.data import Problem, load_problems, require_problems
from rl.evaluation import evaluate_mode, write_outputs
from rl.model import load_policy, read_profile
from rl.runtime import resolve_device, seed_everything
from rollouts.distributions import embedding_rms_by_kind, sigma_from_rms
from rollouts.engine import input_embedding_matrix
from rollouts.engines import build_engine
from rollouts.record import Rollout
from rollouts.trace import TracedSample, trace_page, trace_sample

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
    engine, note = build_engine(cfg.engine, model, key="engine", modes=[cfg.infer], vllm_model=cfg.model.path)
    print(f"[softgrpo] {note}", flush=True)
    with RewardPool(cfg.reward) as pool:
        rows, summary, kept = evaluate_mode(
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
            keep=cfg.trace_problems,
            engine=engine,
        )
    traced = trace_first(model, problems, kept, rows, cfg)
    out = write_outputs(cfg.output_dir, rows, summary, OmegaConf.to_yaml(raw, resolve=True))
    if traced:
        write_trace(out / "trace.html", traced, tokenizer, cfg, sigma)
    print(
        json.dumps(
            {
                "output_dir": str(out),
                "mode": summary.mode,
                **{f"pass@{k}": v for k, v in summary.pass_at.items()},
            }
        )
    )


def trace_first(
    model, problems: list[Problem], kept: list[Rollout], rows: list[dict], cfg: EvaluateConfig
) -> list[TracedSample]:
    """The evaluated first sample of each of the first problems (`kept`, from evaluate_mode), with its verdict
    from `rows` and its per-step top-k replayed (rollouts/trace.py), for trace.html."""
    return [
        trace_sample(
            model,
            sample,
            cfg.infer,
            title=problem.uid,
            reward=row["samples"][0]["reward"],
            status=row["samples"][0]["status"],
            gold=problem.answers,
        )
        for problem, sample, row in zip(problems, kept, rows, strict=False)
    ]


def write_trace(path: Path, traced: list[TracedSample], tokenizer, cfg: EvaluateConfig, sigma: float) -> None:
    note = (
        f"model {cfg.model.path}, mode {cfg.infer.name} (sigma={sigma:.4g}, seed {cfg.seed}): one sample of each of "
        f"the first {len(traced)} problems: the first evaluated sample (samples.jsonl's first of each row). Top-1 "
        "outlined; cells shaded by probability; H in nats."
    )
    path.write_text(
        trace_page(traced, tokenizer, title=f"soft trace: {cfg.infer.name}", note=note), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
