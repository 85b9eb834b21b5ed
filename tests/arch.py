"""Random-weight tiny causal LMs for tests that must hold on any Hugging Face causal LM (Llama, Qwen2; tied and
untied embeddings). Built from configs, never downloaded; float32, eval mode, deterministic for a seed.

Why the embeddings are re-initialised: with the default `initializer_range=0.02` the logits of a random model
have a spread of about 0.1 nats, so every distribution is near-uniform, greedy paths hinge on 1e-3 gaps and a
fuzzy (τ = 1e-4) mixture is not close to one-hot. We draw E (and the untied lm_head) with std
`logit_scale / sqrt(hidden)` so that logits = W · RMSNorm(x) have a spread of about `logit_scale` nats, and use a
larger `initializer_range` for the layers so that the residual stream is not just the last input embedding
(which, tied, would make every model "repeat the last token" forever).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, PreTrainedModel, Qwen2Config

ARCHS = [("llama", True), ("llama", False), ("qwen2", True), ("qwen2", False)]
"""(architecture, tied embeddings) pairs for `pytest.mark.parametrize`."""

EXTRA_ARCHS = [("gemma", True)]
"""Architectures with a quirk the engine must handle (Gemma's embedding scale), for targeted tests."""

ARCH_IDS = [f"{arch}-{'tied' if tied else 'untied'}" for arch, tied in ARCHS]


def tiny_config(arch: str, tied: bool, vocab_size: int = 96, hidden_size: int = 48):
    """A 2-layer, 4-head (2 kv heads) config of the given architecture."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "gemma":  # scales its input embeddings by sqrt(d) inside the embedding module
        return GemmaConfig(**common, head_dim=hidden_size // 4)
    raise ValueError(f"arch={arch!r}: expected 'llama', 'qwen2' or 'gemma'")


def tiny_causal_lm(
    arch: str = "llama",
    tied: bool = True,
    vocab_size: int = 96,
    hidden_size: int = 48,
    seed: int = 0,
    logit_scale: float = 4.0,
) -> PreTrainedModel:
    """A random tiny causal LM (see the module docstring for the init), float32, eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, tied, vocab_size, hidden_size), dtype=torch.float32
    )
    std = logit_scale / math.sqrt(hidden_size)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, std)
        if not tied:
            model.get_output_embeddings().weight.normal_(0.0, std)
    return model.eval()


@pytest.fixture(autouse=False, scope="module")
def one_thread():
    """Tiny models are dominated by thread start-up cost: with the 2 shared cores oversubscribed, one intra-op
    thread runs these tests ~40x faster. Import into a test module and mark it `usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
