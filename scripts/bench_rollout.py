"""Rollout throughput: the eager engine in hard, soft and fuzzy mode on one model and batch, and Hugging Face
`model.generate()` on the same hard workload as the baseline. Prints one JSON object.

    python scripts/bench_rollout.py                                   # random tiny Llama, CPU
    python scripts/bench_rollout.py --preset qwen2.5-0.5b --device cuda --dtype bfloat16 --batch 64
    python scripts/bench_rollout.py --model path/to/checkpoint --new-tokens 256

Workload: every row decodes exactly `--new-tokens` CoT steps (the think-end delimiter is 4 ids that a random
model does not emit in that order), then the 4 forced delimiter tokens and 1 answer token; `generate()` samples the
same number of tokens per row (τ = 1, no top-k, EOS disabled). Times are the median of `--repeats` runs after a
warm-up run; on CUDA every run is bracketed by `torch.cuda.synchronize()`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import _bootstrap  # noqa: F401
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel, Qwen2Config

from rollouts.config import CotConfig
from rollouts.distributions import noise_sigma
from rollouts.engine import generate, input_embedding_matrix
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
    # Qwen2.5-0.5B's shapes with random weights, for GPU runs without a download
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


def timed(fn, device: str, repeats: int) -> float:
    """Median wall seconds of `fn()` over `repeats` runs, after one warm-up run."""

    def once() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, name = build_model(args)
    vocab = model.get_input_embeddings().weight.shape[0]
    prompts = torch.randint(
        3, vocab, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0)
    )
    delimiter = tuple(range(vocab - DELIMITER_LEN, vocab))
    modes = {
        "hard": CotConfig(mode="hard", temperature=1.0),
        "soft": CotConfig(mode="soft", temperature=0.5, noise_scale=0.33),
        "fuzzy": CotConfig(mode="fuzzy", temperature=1e-4, noise_scale=0.33),
    }
    seconds, tokens = {}, {}
    for mode, base in modes.items():
        cfg = CotConfig(**{**vars(base), "max_think_tokens": args.new_tokens, "max_answer_tokens": 1})
        sigma = noise_sigma(input_embedding_matrix(model), cfg)
        gen = torch.Generator(device=args.device)

        def run(cfg=cfg, sigma=sigma, gen=gen):
            gen.manual_seed(0)
            return generate(
                model,
                prompts.tolist(),
                cfg,
                group_size=1,
                sigma=sigma,
                stop=StopSpec.on_ids(delimiter),
                eos_id=-1,
                pad_id=0,
                generator=gen,
            )

        r = run()
        tokens[mode] = int((r.cot_lengths + r.answer_lengths).sum())
        seconds[mode] = timed(run, args.device, args.repeats)

    per_row = tokens["hard"] // args.batch
    ids = prompts.to(args.device)
    mask = torch.ones_like(ids)

    def hf_generate():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=per_row,
            min_new_tokens=per_row,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            eos_token_id=None,
            pad_token_id=0,
        )

    tokens["hf_generate"] = int(hf_generate()[:, args.prompt_len :].numel())
    seconds["hf_generate"] = timed(hf_generate, args.device, args.repeats)

    report = {
        "model": name,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens_per_row": per_row,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "tokens_per_s": {k: round(tokens[k] / seconds[k], 1) for k in seconds},
        "ratios": {
            "soft_over_hard_time": round(seconds["soft"] / seconds["hard"], 3),
            "fuzzy_over_hard_time": round(seconds["fuzzy"] / seconds["hard"], 3),
            "engine_hard_over_generate_time": round(seconds["hard"] / seconds["hf_generate"], 3),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
