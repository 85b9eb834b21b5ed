"""Rollout throughput: the eager and the static engine in hard, soft and fuzzy mode on one model and batch, and
Hugging Face `model.generate()` on the same hard workload as the baseline (with its dynamic cache, and with its
static cache, which transformers compiles). Prints one JSON object; `--out F` also writes it to F.

    python scripts/bench_rollout.py --model .cache/tiny_base --threads 2 --batch 128 --prompt-len 119 --new-tokens 48
    python scripts/bench_rollout.py --preset qwen2.5-0.5b --device cuda --dtype bfloat16 --batch 64 \
        --prompt-len 128 --new-tokens 256

Workload: every row decodes exactly `--new-tokens` CoT steps (the think-end delimiter is 4 ids that a random
model does not emit in that order, EOS is off), then the 4 forced delimiter tokens and 1 answer token;
`generate()` samples the same number of tokens per row (τ = 1, no top-k, EOS disabled). Every engine and mode
runs once cold, then `--repeats` times: `compile_s` is the cold run's excess over the median warm run (the
static engine's torch.compile, transformers' for its static cache; on a fresh inductor cache it is the first
compile, on a warm one much less), `tokens_per_s` the warm median. On CUDA every run is bracketed by
`torch.cuda.synchronize()`. Ratios compare engines measured in this same process. `--modes hard,soft` times a
subset (hard is always in it: it sets the tokens per row of the generate() baseline).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import _bootstrap  # noqa: F401
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

from rollouts.config import CotConfig
from rollouts.distributions import noise_sigma
from rollouts.engine import input_embedding_matrix
from rollouts.engines import EagerEngine
from rollouts.static_engine import StaticEngine
from rollouts.stopping import StopSpec

PRESETS = {
    # a small Llama that makes CPU timing meaningful in seconds
    "tiny-llama": lambda: LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    # real models' shapes with random weights, for GPU runs without a download
    "qwen2.5-0.5b": lambda: Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        use_sliding_window=False,
    ),
    "qwen2.5-1.5b": lambda: Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        use_sliding_window=False,
    ),
    "llama-3.2-3b": lambda: LlamaConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
}
DELIMITER_LEN = 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a local Hugging Face checkpoint; default: --preset with random weights")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny-llama")
    p.add_argument("--batch", type=int, default=8, help="rollouts N (prompts x G; here G = 1)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64, help="CoT steps per row")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument(
        "--modes", default="hard,soft,fuzzy", help="CoT modes to time, comma-separated (hard first)"
    )
    p.add_argument(
        "--engines",
        default="eager,static",
        help="engines to time: eager,static or eager (then generate() runs with its dynamic cache only: the "
        "compiled paths cost minutes of compile time on CPU at 0.5B)",
    )
    return p.parse_args()


def build_model(args: argparse.Namespace) -> tuple[PreTrainedModel, str]:
    dtype = getattr(torch, args.dtype)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        name = args.model
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(PRESETS[args.preset](), dtype=dtype)
        name = f"random {args.preset}"
    return model.to(args.device).eval(), name


def timed(fn, device: str, repeats: int) -> tuple[object, float, float]:
    """(the first run's result, its seconds (cold), the median seconds of `repeats` warm runs) of `fn()`."""

    def once() -> tuple[object, float]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    result, cold = once()
    return result, cold, statistics.median(once()[1] for _ in range(repeats))


MODES = {
    "hard": CotConfig(mode="hard", temperature=1.0),
    "soft": CotConfig(mode="soft", temperature=0.5, noise_scale=0.33),
    "fuzzy": CotConfig(mode="fuzzy", temperature=1e-4, noise_scale=0.33),
}


def bench_engines(model: PreTrainedModel, prompts: torch.Tensor, args: argparse.Namespace) -> dict:
    """{engine: {mode: (tokens, cold s, warm s)}} for the eager and the static engine."""
    vocab = model.get_input_embeddings().weight.shape[0]
    stop = StopSpec.on_ids(tuple(range(vocab - DELIMITER_LEN, vocab)))
    out: dict = {}
    chosen = args.engines.split(",")
    for engine in [e for e in (EagerEngine(), StaticEngine()) if e.name in chosen]:
        out[engine.name] = {}
        for mode in args.modes.split(","):
            base = MODES[mode]
            cfg = CotConfig(**{**vars(base), "max_think_tokens": args.new_tokens, "max_answer_tokens": 1})
            sigma = noise_sigma(input_embedding_matrix(model), cfg)
            gen = torch.Generator(device=args.device)

            def run(cfg=cfg, sigma=sigma, gen=gen, engine=engine):
                gen.manual_seed(0)
                return engine.generate(
                    model, prompts.tolist(), cfg, group_size=1, sigma=sigma, stop=stop, eos_id=-1, pad_id=0,
                    generator=gen,
                )  # fmt: skip

            r, cold, warm = timed(run, args.device, args.repeats)
            out[engine.name][mode] = (int((r.cot_lengths + r.answer_lengths).sum()), cold, warm)
    return out


def bench_generate(
    model: PreTrainedModel, prompts: torch.Tensor, per_row: int, args: argparse.Namespace
) -> dict:
    """{variant: (tokens, cold s, warm s)} for HF generate() with its dynamic and its (compiled) static cache."""
    ids = prompts.to(args.device)
    mask = torch.ones_like(ids)
    out = {}
    variants = (("hf_generate", None), ("hf_generate_static", "static"))
    for variant, cache in variants if "static" in args.engines.split(",") else variants[:1]:

        def run(cache=cache):
            return model.generate(
                ids, attention_mask=mask, max_new_tokens=per_row, min_new_tokens=per_row, do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0, cache_implementation=cache,
            )  # fmt: skip

        ids_out, cold, warm = timed(run, args.device, args.repeats)
        out[variant] = (int(ids_out[:, args.prompt_len :].numel()), cold, warm)
    return out


def ratios(engines: dict, baseline: dict, modes: list[str]) -> dict:
    """Static over eager per mode, soft over hard time per engine, static soft over compiled generate()."""

    def rate(entry) -> float:
        return entry[0] / entry[2]

    out: dict = {
        "eager_hard_over_generate_time": round(engines["eager"]["hard"][2] / baseline["hf_generate"][2], 3),
    }
    if "static" in engines:
        out["static_over_eager_tokens_per_s"] = {
            m: round(rate(engines["static"][m]) / rate(engines["eager"][m]), 3) for m in modes
        }
    if "soft" in modes:
        out["soft_over_hard_time"] = {
            e: round(engines[e]["soft"][2] / engines[e]["hard"][2], 3) for e in engines
        }
        if "static" in engines:
            out["static_soft_over_generate_static_tokens_per_s"] = round(
                rate(engines["static"]["soft"]) / rate(baseline["hf_generate_static"]), 3
            )
    return out


def main() -> None:
    args = parse_args()
    modes = args.modes.split(",")
    if not {"eager"} <= set(args.engines.split(",")) <= {"eager", "static"}:
        raise SystemExit(f"--engines={args.engines!r}: eager or eager,static")
    if "hard" not in modes or set(modes) - set(MODES):
        raise SystemExit(
            f"--modes={args.modes!r}: a comma-separated subset of {list(MODES)} that includes hard"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name = build_model(args)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts = torch.randint(
        3, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0)
    )
    engines = bench_engines(model, prompts, args)
    per_row = engines["eager"]["hard"][0] // args.batch
    baseline = bench_generate(model, prompts, per_row, args)

    def rate(entry) -> float:
        return entry[0] / entry[2]

    tokens_per_s = {e: {m: round(rate(v), 1) for m, v in per_mode.items()} for e, per_mode in engines.items()}
    tokens_per_s.update({k: round(rate(v), 1) for k, v in baseline.items()})
    compile_s = {
        e: {m: round(v[1] - v[2], 2) for m, v in per_mode.items()} for e, per_mode in engines.items()
    }
    compile_s.update({k: round(v[1] - v[2], 2) for k, v in baseline.items()})
    report = {
        "model": name,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens_per_row": per_row,
        "tokens_per_s": tokens_per_s,
        "warm_seconds": {
            e: {m: round(v[2], 4) for m, v in per_mode.items()} for e, per_mode in engines.items()
        },
        "compile_s": compile_s,
        "ratios": ratios(engines, baseline, modes),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
