"""Out-of-domain multiple choice (HellaSwag, ARC, MMLU; rl/ood.py): models side by side.

    python scripts/evaluate_ood.py "models=[tiny,runs/soft/final]" labels=[base,soft] limit=500 output_dir=OUT
    python scripts/evaluate_ood.py "models=[tiny,smollm2-135m]" "path='tests/fixtures/ood/{benchmark}.jsonl'"

A model is a recipe name (recipes/model/<name>.yaml: built or converted on first use, like the other scripts'
`model=`), a local directory or a hub id. Prints a markdown table (benchmark × model: accuracy, per-token NLL of
the correct answer) and writes OUT/summary.json, OUT/table.md, OUT/scores.jsonl (every choice's NLL and token
count, per model and problem) and OUT/.hydra (the resolved config).

Hydra, as the other entry scripts: `OodConfig` is checked strictly (a typo fails naming the key) and the resolved
config is saved with the outputs. Its schema is registered here, the only place that runs it; there is no recipe
file because every default lives in `OodConfig` (the recipe tree stays on the search path: `prepare_model` composes
`tiny_base` from it).
"""

import json
from dataclasses import asdict
from pathlib import Path

import _bootstrap  # noqa: F401
import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rl.config import RECIPES_DIR, compose, prepare_model, register_configs, to_object
from rl.model import ModelConfig, load_policy
from rl.ood import OodConfig, benchmark_path, load_benchmark, score_problems, side_by_side, summarise
from rl.runtime import resolve_device

register_configs()  # the `${cache:...}` resolver the model recipes use
ConfigStore.instance().store(name="evaluate_ood_schema", node=OodConfig)
ConfigStore.instance().store(
    name="evaluate_ood",
    node={
        "defaults": ["evaluate_ood_schema", "_self_"],
        "hydra": {"run": {"dir": "${output_dir}"}, "output_subdir": ".hydra"},
    },
)


def model_config(entry: str, dtype: str | None) -> ModelConfig:
    """The model `entry` names (a recipe under recipes/model/, else a path or hub id), ready to load: the tiny
    base built, a GGUF converted, a local path checked (`prepare_model`)."""
    recipe = RECIPES_DIR / "model" / f"{entry}.yaml"
    # a recipe is composed, so that its own defaults list (its prompt) applies
    if "/" not in entry and recipe.is_file():
        node = compose("evaluate", [f"model={entry}"]).model
    else:
        node = OmegaConf.structured(ModelConfig)
        node.path = entry
    if dtype is not None:
        node.dtype = dtype
    raw = OmegaConf.create({"model": node})
    prepare_model(raw, [])
    return OmegaConf.to_object(raw.model)


@hydra.main(config_path=str(RECIPES_DIR), config_name="evaluate_ood", version_base="1.3")
def main(raw) -> None:
    cfg = to_object(raw, OodConfig)
    labels = cfg.model_labels
    models = {label: model_config(entry, cfg.dtype) for label, entry in zip(labels, cfg.models, strict=True)}
    problems = {b: load_benchmark(b, benchmark_path(cfg, b), cfg.split, cfg.limit) for b in cfg.benchmarks}
    for bench, items in problems.items():
        if not items:
            raise ValueError(f"benchmark {bench} (path={benchmark_path(cfg, bench)}) has no problems")
    device = resolve_device(cfg.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with (out / "scores.jsonl").open("w", encoding="utf-8") as rows:
        for label, model_cfg in models.items():
            model, tokenizer = load_policy(model_cfg, device)
            for bench, items in problems.items():
                scores = score_problems(
                    model,
                    tokenizer,
                    items,
                    batch_size=cfg.batch_size,
                    chat_template=cfg.chat_template,
                    add_bos=cfg.add_bos,
                    desc=f"{label} {bench}",
                )
                for s in scores:
                    rows.write(json.dumps({"model": label, "benchmark": bench, **asdict(s)}) + "\n")
                results.append(summarise(bench, label, scores))
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = side_by_side(results, labels, cfg.benchmarks)
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    summary = {
        "models": dict(zip(labels, cfg.models, strict=True)),
        "benchmarks": cfg.benchmarks,
        "results": [asdict(r) for r in results],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(table)
    print(json.dumps({"output_dir": str(out), "summary": str(out / "summary.json")}))


if __name__ == "__main__":
    main()
