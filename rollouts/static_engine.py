"""The `static` rollout engine: the eager engine's decode step (`rollouts.engine.Stepper`, the same code) on a
preallocated KV cache, with the step and the model's one-token forward compiled (`torch.compile`; on CUDA the
forward is captured in a CUDA graph, `mode="reduce-overhead"`), so that a decode step is a couple of compiled
calls with no recompilation from step to step.

How it differs from the eager engine, and why the rollouts are the same ones:
1. The KV cache is a Hugging Face `StaticCache` of [R, kv heads, C, head dim] per layer, R rows and C columns
   fixed per shape bucket (`bucket_rows`, `bucket_columns`): a run compiles once per bucket (the training batch,
   the evaluation batch, its last partial chunk), not once per call. Rows past the batch are inert copies of the
   last row, marked done from the start, and trimmed after; columns past P + steps are never fed (mask 0).
2. Prefill is the eager engine's (`rollouts.engine.prefill`: each distinct prompt once), copied into the
   static cache. Decode step t feeds column P + t, as the eager engine does; the attention mask is the same
   [R, C] tensor, passed to the model as an already-built 4-D boolean mask, so the model never rebuilds it.
3. Attention of one query against the static cache runs as `decode_attention` (grouped-query attention without
   materialising repeated K/V heads, which is what makes the compiled CPU graph faster than eager instead of
   slower), registered as a Hugging Face attention implementation and switched on only for the duration of a
   call. Only models whose cache layers are all full attention are supported (`supports`); a sliding-window
   model uses the eager engine (`engine=auto` says so).
4. Randomness is drawn eagerly from the run's generator with the eager engine's `Stepper.draw`, in the same
   order and shape, so the same seed gives the same noise. The greedy modes are token-identical to the eager
   engine and μ agrees to float32 rounding (tests/test_static_engine.py); the compiled kernels round
   differently, so a sampled row can part from the eager one at a near-tie of the race, with the same law.
5. Like the eager engine it reads "all rows done?" every `check_every` steps and stops early; otherwise it runs
   the fixed P + T + F + A columns with finished rows masked, and trims after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from rollouts.config import CotConfig
from rollouts.engine import (
    CHECK_EVERY,
    DONE,
    DecodeState,
    Stepper,
    check_request,
    decode_steps,
    finish,
    input_embedding_matrix,
    prefill,
)
from rollouts.modes import StepNoise
from rollouts.record import Rollouts
from rollouts.stopping import StopSpec, ThinkEndDetector

DECODE_ATTENTION = "softgrpo_decode"
"""The attention implementation name `decode_attention` is registered under (transformers' AttentionInterface)."""


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """softmax(q K^T · scaling + mask) V for ONE query per row, grouped-query heads sharing their K/V head by a
    reshape (no repeated K/V); query [N, H, 1, hd], key / value [N, Hkv, C, hd], mask [N, 1, 1, C] bool (True =
    attend). Scores and softmax in float32. Anything else (a prompt's prefill) goes to transformers' SDPA."""
    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    n, heads, _, hd = query.shape
    kv_heads = key.shape[1]
    scale = hd**-0.5 if scaling is None else scaling
    q = query.reshape(n, kv_heads, heads // kv_heads, hd)  # [N, Hkv, g, hd]
    scores = (q @ key.transpose(-1, -2)).float() * scale  # [N, Hkv, g, C]
    scores = scores.masked_fill(~attention_mask, float("-inf"))  # mask [N, 1, 1, C] broadcasts over heads
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = probs @ value  # [N, Hkv, g, hd]
    return out.reshape(n, heads, 1, hd).transpose(1, 2), None  # [N, 1, H, hd], transformers' layout


AttentionInterface.register(DECODE_ATTENTION, decode_attention)


@contextlib.contextmanager
def attention_implementation(model: PreTrainedModel, name: str) -> Iterator[None]:
    """Use attention implementation `name` inside the block, and the model's own again after it."""
    saved = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def bucket_rows(n: int) -> int:
    """Rows of the static buffers for a batch of n: the next power of two, at least 8.

    >>> [bucket_rows(n) for n in (1, 8, 9, 128, 130)]
    [8, 8, 16, 128, 256]
    """
    return max(8, 1 << (n - 1).bit_length())


def bucket_columns(c: int, multiple: int = 64) -> int:
    """KV-cache columns for c = P + decode steps: the next multiple of `multiple`.

    >>> bucket_columns(90), bucket_columns(128), bucket_columns(129)
    (128, 128, 192)
    """
    return -(-c // multiple) * multiple


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the static engine cannot run `model` (None: it can)."""
    cache = StaticCache(config=model.config, max_cache_len=8)
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds != {StaticLayer.__name__}:
        return f"{type(model).__name__}'s cache layers are {sorted(kinds)}; the static engine needs full attention only"
    if not model._can_set_attn_implementation():
        return f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface"
    return None


def compile_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot build kernels on `device` here (None: it can)."""
    if device.type == "cpu" and shutil.which("c++") is None and shutil.which("g++") is None:
        return "torch.compile on CPU needs a C++ compiler (c++ / g++) on PATH"
    return None


def _step(stepper: Stepper, st: DecodeState, logits: torch.Tensor, noise: StepNoise) -> torch.Tensor:
    return stepper(st, logits, noise)


def _forward(
    model: PreTrainedModel,
    cache: StaticCache,
    feed: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """One decode step of the model for every row: `feed` [R, d] written at the cache's next column, attending
    to the columns where `mask` [R, C] is 1, at `positions` [R]; the next logits [R, V] float32. It mutates the
    cache only (whose tensors keep their addresses: a CUDA graph replays on them)."""
    out = model(
        inputs_embeds=feed[:, None].to(model.dtype),  # [R, 1, d]
        attention_mask=mask[:, None, None, :].bool(),  # [R, 1, 1, C], built: used as is
        position_ids=positions[:, None],  # [R, 1]
        cache=cache,
        use_cache=True,
    )
    return out.logits[:, -1].float()


@dataclass
class _Slot:
    """The static cache of one (rows, columns) bucket for one model."""

    cache: StaticCache
    rows: int
    columns: int

    def load(self, prefilled, width: int, n: int) -> None:
        """Copy the eager prefill's [n, kv heads, width, hd] keys / values into the first `width` columns (rows
        past n: copies of row n - 1), and point the write position at column `width`."""
        for static, dynamic in zip(self.cache.layers, prefilled.layers, strict=True):
            for dst, src in ((static.keys, dynamic.keys), (static.values, dynamic.values)):
                dst[:n, :, :width].copy_(src)
                dst[n:, :, :width].copy_(src[-1:].expand(self.rows - n, -1, -1, -1))
            static.cumulative_length.fill_(width)


class StaticEngine:
    """`generate` with the eager engine's signature (rollouts.engine.generate) on static, compiled decode steps.
    One engine serves a run: it keeps its caches and compiled functions across calls."""

    name = "static"

    def __init__(self, column_multiple: int = 64, compile: bool = True):
        self.column_multiple = column_multiple
        self._slots: dict[tuple, _Slot] = {}
        self._model_id: int | None = None
        dynamo = torch._dynamo.config
        # one compiled variant per (CoT structure, bucket); torch's default limit of 8 would silently fall back to
        # eager after the 8th (a six-mode evaluation plus training reaches it)
        dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
        self._step = torch.compile(_step, fullgraph=True, dynamic=None) if compile else _step
        self._forward_default = torch.compile(_forward, fullgraph=True, dynamic=None) if compile else _forward
        self._forward_cuda = (
            torch.compile(_forward, fullgraph=True, dynamic=None, mode="reduce-overhead")
            if compile
            else _forward
        )

    def _slot(self, model: PreTrainedModel, rows: int, columns: int) -> _Slot:
        if self._model_id != id(model):  # another model (or a fresh generation copy): its own caches
            self._slots.clear()
            self._model_id = id(model)
        key = (rows, columns, model.dtype, model.device)
        if key not in self._slots:
            text = model.config.get_text_config(decoder=True)
            cache = StaticCache(config=model.config, max_cache_len=columns)
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            cache.early_initialization(rows, text.num_key_value_heads, head_dim, model.dtype, model.device)
            self._slots[key] = _Slot(cache, rows, columns)
        return self._slots[key]

    @torch.no_grad()
    def generate(
        self,
        model: PreTrainedModel,
        prompt_ids: list[list[int]],
        cfg: CotConfig,
        *,
        group_size: int,
        sigma: float,
        stop: StopSpec,
        eos_id: int,
        pad_id: int,
        generator: torch.Generator,
        tokenizer=None,
        check_every: int = CHECK_EVERY,
    ) -> Rollouts:
        """As `rollouts.engine.generate` (same arguments, same record)."""
        check_request(group_size, sigma, cfg)
        embedding = input_embedding_matrix(model)  # [V, d] model dtype
        emb32 = embedding.float()  # [V, d]
        prefilled, logits, prompts, prompt_mask = prefill(model, embedding, prompt_ids, group_size, pad_id)
        n, width = prompts.shape
        steps = decode_steps(cfg, stop)
        rows, columns = bucket_rows(n), bucket_columns(width + steps, self.column_multiple)
        slot = self._slot(model, rows, columns)
        slot.load(prefilled, width, n)
        del prefilled
        st = DecodeState.empty(_pad_rows(prompt_mask, rows), columns - width, cfg, stop, emb32.shape[1])
        st.phase[n:] = DONE
        detector = ThinkEndDetector(cfg, stop, eos_id, rows, emb32.shape[0], model.device)
        stepper = Stepper(cfg, sigma, emb32, stop, detector, eos_id, pad_id)
        logits = _pad_rows(logits, rows)
        forward = self._forward_cuda if model.device.type == "cuda" else self._forward_default
        with attention_implementation(model, DECODE_ATTENTION):
            for step in range(steps):
                noise = stepper.draw(n, generator)
                feed = self._step(stepper, st, logits, _pad_noise(noise, rows))  # [R, d]
                if step == steps - 1 or ((step + 1) % check_every == 0 and bool((st.phase == DONE).all())):
                    break
                logits = forward(model, slot.cache, feed, st.attention_mask, st.next_pos)
                if model.device.type == "cuda":
                    logits = logits.clone()  # the CUDA graph's output: overwritten by the next replay
                stepper.advance(st)
        return finish(_first_rows(st, n), cfg, prompts, prompt_mask, group_size, sigma, pad_id, tokenizer)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, ...] with rows n .. rows-1 copies of its last row -> [rows, ...]."""
    extra = rows - x.shape[0]
    return x if extra == 0 else torch.cat([x, x[-1:].expand(extra, *x.shape[1:])], dim=0)


def _pad_noise(noise: StepNoise, rows: int) -> StepNoise:
    pad = functools.partial(_pad_rows, rows=rows)
    return StepNoise(
        None if noise.cot is None else pad(noise.cot), None if noise.answer is None else pad(noise.answer)
    )


def _first_rows(st: DecodeState, n: int) -> DecodeState:
    """The state of the first n rows (the batch without the bucket's padding rows)."""
    values = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}
    # [R, ...] -> [n, ...]
    rows = {k: v[:n] for k, v in values.items() if isinstance(v, torch.Tensor) and v.ndim > 0}
    return dataclasses.replace(st, **rows)
