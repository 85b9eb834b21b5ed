"""The tiny base model: a character-level Llama trained from scratch by SFT on synthetic CoT traces.

It is the embedded default's policy and the test bed of every code path a 3B model takes. Trained with a
plain loop rather than TRL's SFTTrainer: the job is ~100 lines (completion-only loss, fixed shapes, one
seed), and a plain loop keeps it deterministic, dependency-light and fast on 2 CPU cores.

An SFT example is `render_prompt(question) + cot + "</think>" + "\\boxed{answer}" + eos`; the loss covers the
completion only (everything after the rendered prompt).

The same weights on every machine (`build_pinned`): the build runs in a child process with one thread
(`OMP_NUM_THREADS=MKL_NUM_THREADS=1`: torch's parallel reductions split their sums by thread count, so 1, 2 and
3 threads round differently), with torch's CPU kernels pinned to AVX2 (`ATEN_CPU_CAPABILITY=avx2`, instead of
AVX-512 where the processor has it) and MKL in its AVX2 reproducibility mode (`MKL_CBWR=AVX2`). These must be
set before torch loads, hence the child process. A new user's tiny base, and so the README's "before" numbers,
match the ones measured here on any x86-64 processor with AVX2.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rewards.extract import answer_phase, last_boxed
from rl.model import PROFILE_FIELDS, TINY_BASE_DIR, ModelConfig, ModelProfile, is_tiny_base
from rl.prompts import PromptConfig, render_prompt
from rl.synthetic import SyntheticConfig, SyntheticExample, make_examples
from rl.tokenizer import build_char_tokenizer
from rollouts.distributions import embedding_rms_by_kind

REPORT_FILE = "tiny_base_report.json"
PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
}


@dataclass
class TinyModelConfig:
    """Shape of the tiny Llama (about 1.2M parameters with the defaults)."""

    hidden_size: int = 160
    num_layers: int = 4
    num_heads: int = 5
    num_kv_heads: int = 1
    intermediate_size: int = 448
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True


@dataclass
class TinySFTConfig:
    """The SFT loop."""

    steps: int = 250
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0


@dataclass
class TinyBaseConfig:
    """`python scripts/make_tiny_base.py output_dir=DIR` builds this. `eval_problems` test problems are
    decoded greedily (`model.max_think_tokens + model.max_answer_tokens` new tokens) for the held-out accuracy.
    The prompt format and CoT limits are `model`'s (recipes/model/tiny.yaml), written into the built
    directory's profile, so the trainer and evaluator render and think exactly as the model was trained."""

    output_dir: str = str(TINY_BASE_DIR)
    seed: int = 0
    eval_problems: int = 200
    arch: TinyModelConfig = field(default_factory=TinyModelConfig)
    sft: TinySFTConfig = field(default_factory=TinySFTConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    model: ModelConfig = field(default_factory=ModelConfig)

    def fingerprint(self) -> str:
        """A hash of everything that shapes the built model (not where it is written): a cached build whose
        fingerprint differs is stale."""
        spec = asdict(self)
        spec.pop("output_dir")
        spec["model"].pop("path")
        spec["pinned"] = PINNED_ENV  # how it is built (module docstring) shapes the weights too
        spec["profile"] = PROFILE_FIELDS  # a build whose profile lacks a field is stale too
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_model(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(config)


def completion_text(example: SyntheticExample, prompt_cfg: PromptConfig, eos: str) -> str:
    """What the model should write after the rendered prompt (which already ends with the think start)."""
    return f"{example.cot}{prompt_cfg.think_end}{example.final}{eos}"


def _encode_sft(
    examples: list[SyntheticExample], tokenizer: PreTrainedTokenizerFast, prompt_cfg: PromptConfig
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per example."""
    out = []
    for ex in examples:
        prompt = tokenizer(
            render_prompt(tokenizer, ex.question, prompt_cfg), add_special_tokens=False
        ).input_ids
        completion = tokenizer(
            completion_text(ex, prompt_cfg, tokenizer.eos_token), add_special_tokens=False
        ).input_ids
        out.append((prompt + completion, len(prompt)))
    return out


def _collate(
    rows: list[tuple[list[int], int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, L], attention mask [B, L] and labels [B, L] (-100 on prompt and padding)."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (row, n_prompt) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
    return ids, mask, labels


def train_sft(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, cfg: TinyBaseConfig, progress: bool = True
) -> list[float]:
    """Completion-only SFT with AdamW, linear warmup and cosine decay. Returns the loss per step."""
    data = _encode_sft(make_examples(cfg.synthetic, "train"), tokenizer, cfg.model.prompt)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.sft.lr, weight_decay=cfg.sft.weight_decay, betas=(0.9, 0.95)
    )

    def lr_factor(step: int) -> float:
        if step < cfg.sft.warmup_steps:
            return (step + 1) / cfg.sft.warmup_steps
        progress_frac = (step - cfg.sft.warmup_steps) / max(1, cfg.sft.steps - cfg.sft.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    losses = []
    order: list[int] = []
    bar = tqdm(range(cfg.sft.steps), desc="tiny SFT", disable=not progress)
    for _ in bar:
        if len(order) < cfg.sft.batch_size:
            order = list(range(len(data)))
            rng.shuffle(order)
        batch = [data[order.pop()] for _ in range(cfg.sft.batch_size)]
        ids, mask, labels = _collate(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.sft.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@torch.no_grad()
def greedy_accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[SyntheticExample],
    prompt_cfg: PromptConfig,
    max_new_tokens: int,
    batch_size: int = 100,
) -> float:
    """Fraction of `examples` whose greedy completion boxes the right integer after the think end."""
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [render_prompt(tokenizer, ex.question, prompt_cfg) for ex in chunk]
        enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=False)
        for ex, text in zip(chunk, texts, strict=True):
            correct += last_boxed(answer_phase(text, prompt_cfg.think_end)) == str(ex.answer)
    return correct / len(examples)


def make_tiny_base(cfg: TinyBaseConfig, progress: bool = True) -> dict[str, float | int | str]:
    """Build, train, evaluate and save the tiny base model to `cfg.output_dir`; returns the report."""
    start = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = build_char_tokenizer()
    model = build_model(cfg.arch, tokenizer, cfg.seed)
    losses = train_sft(model, tokenizer, cfg, progress=progress)
    test = make_examples(cfg.synthetic, "test")[: cfg.eval_problems]
    new_tokens = cfg.model.max_think_tokens + cfg.model.max_answer_tokens
    accuracy = greedy_accuracy(model, tokenizer, test, cfg.model.prompt, new_tokens)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rms = embedding_rms_by_kind(model.get_input_embeddings().weight)
    ModelProfile.of(cfg.model, rms, "tiny base build").save(out)
    report = {
        "heldout_accuracy": accuracy,
        "params": sum(p.numel() for p in model.parameters()),
        "final_sft_loss": round(sum(losses[-20:]) / min(20, len(losses)), 4),
        "build_seconds": round(time.time() - start, 1),
        "output_dir": str(out),
        "fingerprint": cfg.fingerprint(),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def build_pinned(cfg: TinyBaseConfig) -> dict:
    """`make_tiny_base(cfg)` in a child process with `PINNED_ENV` (see the module docstring); its progress bar
    shows here. Returns the report."""
    from omegaconf import OmegaConf

    spec = json.dumps(OmegaConf.to_container(OmegaConf.structured(cfg)))
    root = str(TINY_BASE_DIR.parents[1])  # the child imports rl/ from this checkout, installed or not
    env = {
        **os.environ,
        **PINNED_ENV,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    subprocess.run([sys.executable, "-m", "rl.tiny_base", spec], env=env, check=True)
    return json.loads((Path(cfg.output_dir) / REPORT_FILE).read_text())


def ensure_tiny_base(cfg: TinyBaseConfig) -> dict:
    """The report of the tiny base at `cfg.output_dir`, built there first (pinned) unless a build of this exact
    recipe is there already (its report's fingerprint matches). Only the project's own tiny base directory
    (`rl.model.TINY_BASE_DIR`) is ever built into this way. Processes started together (`accelerate launch`)
    take a file lock: one builds, the others wait and reuse its build."""
    out = Path(cfg.output_dir)
    if not is_tiny_base(cfg.output_dir):
        raise ValueError(f"ensure_tiny_base: {out} is not the tiny base directory {TINY_BASE_DIR}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report_path = out / REPORT_FILE
        if report_path.exists() and (out / "config.json").exists():
            report = json.loads(report_path.read_text())
            if report.get("fingerprint") == cfg.fingerprint():
                return report
            print(
                f"[softgrpo] tiny base model at {out} was built from another recipe; rebuilding", flush=True
            )
        else:
            print(
                f"[softgrpo] tiny base model not found at {out}; building it (a few minutes on CPU)",
                flush=True,
            )
        return build_pinned(cfg)


if __name__ == "__main__":  # the child process of build_pinned
    from omegaconf import OmegaConf

    spec = OmegaConf.merge(OmegaConf.structured(TinyBaseConfig), json.loads(sys.argv[1]))
    make_tiny_base(OmegaConf.to_object(spec))
