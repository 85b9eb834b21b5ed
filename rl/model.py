"""Loading a policy (any Hugging Face causal LM) and its tokenizer, by hub id or local directory.

The prompt format is a property of the model (its chat template, its think delimiters), so `PromptConfig`
lives inside `ModelConfig`: `model=tiny` and `model=qwen2.5-3b` each bring their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from rl.prompts import PromptConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """`path` is a hub id or a local directory. `tiny: true` marks the project's own tiny base model:
    when its directory is missing it is built there first (scripts/make_tiny_base.py, a few minutes on CPU)."""

    path: str = ".cache/tiny_base"
    tiny: bool = True
    dtype: str = "float32"
    attn_implementation: str | None = None  # None = transformers' default (sdpa)
    trust_remote_code: bool = False
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")


def load_policy(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """(model, tokenizer) for `cfg`. A local path that does not exist fails naming it, except for the tiny
    model, which is built on demand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.path)
    looks_local = cfg.path.startswith((".", "/", "~")) or path.exists()
    if cfg.tiny:
        ensure_tiny_base(path)
    elif looks_local and not (path / "config.json").exists():
        raise FileNotFoundError(
            f"model.path={cfg.path!r}: no config.json there (a directory saved with save_pretrained?)"
        )
    tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs).to(device)
    return model, tokenizer


def ensure_tiny_base(path: Path) -> dict:
    """Build the tiny base model at `path` with the recipe recipes/tiny_base.yaml unless a build of that exact
    recipe is already there (its report's fingerprint matches); a stale build is rebuilt. Returns the report."""
    import json

    from rl.config import compose, to_object
    from rl.tiny_base import REPORT_FILE, TinyBaseConfig, make_tiny_base

    cfg = to_object(compose("tiny_base", [f"output_dir={path}"]), TinyBaseConfig)
    report_path = path / REPORT_FILE
    if report_path.exists() and (path / "config.json").exists():
        report = json.loads(report_path.read_text())
        if report.get("fingerprint") == cfg.fingerprint():
            return report
        print(f"[softgrpo] tiny base model at {path} was built from another recipe; rebuilding", flush=True)
    else:
        print(
            f"[softgrpo] tiny base model not found at {path}; building it (a few minutes on CPU)", flush=True
        )
    return make_tiny_base(cfg)
