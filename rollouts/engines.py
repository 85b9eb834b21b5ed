"""The rollout engines and the one place that chooses between them (`build_engine`, key `engine` of train.py
and evaluate.py):

- `eager`: the reference loop on a growing cache (rollouts/engine.py). Every model, every setting.
- `static`: the same decode step on a preallocated cache, compiled (rollouts/static_engine.py). Models whose
  cache layers are all full attention, where torch.compile can build kernels.
- `vllm`: hard-token evaluation through vLLM (rollouts/vllm_engine.py); evaluate.py only, hard modes only.
- `auto`: the fastest one that supports the run, saying which and why: vLLM for a hard-mode evaluation on CUDA
  when vLLM is installed, else static on CUDA when the model supports it, else eager. On CPU auto is eager:
  there a decode step of a small model is mostly matrix products, the static engine decodes 1.0-1.45x faster
  (scripts/bench_rollout.py) and compiles each shape and CoT structure on a fresh cache for 5-20 s, which the
  default run only earns back (7m21s against 7m24s, README "Rollout engines"); `engine=static` forces it.

Every engine has `generate` with the eager engine's arguments and returns the same `Rollouts` record, so the
trainer and the evaluator call it without asking which it is.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from rollouts.config import CotConfig, check_engine
from rollouts.engine import CHECK_EVERY, generate
from rollouts.record import Rollouts
from rollouts.stopping import StopSpec
from rollouts.vllm_engine import VllmEngine, vllm_reason


class RolloutEngine(Protocol):
    name: str

    def generate(
        self,
        model: Any,
        prompt_ids: list[list[int]],
        cfg: CotConfig,
        *,
        group_size: int,
        sigma: float,
        stop: StopSpec,
        eos_id: int,
        pad_id: int,
        generator: torch.Generator,
        tokenizer: Any = None,
        check_every: int = CHECK_EVERY,
    ) -> Rollouts: ...


class EagerEngine:
    """The reference engine (rollouts.engine.generate)."""

    name = "eager"

    def generate(self, model: Any, prompt_ids: list[list[int]], cfg: CotConfig, **kwargs: Any) -> Rollouts:
        return generate(model, prompt_ids, cfg, **kwargs)


def static_reason(model: Any) -> str | None:
    """Why the static engine cannot run `model` here (None: it can)."""
    from rollouts.static_engine import compile_reason, unsupported_reason

    return unsupported_reason(model) or compile_reason(model.device)


def build_engine(
    name: str,
    model: Any,
    *,
    key: str,
    modes: list[CotConfig],
    vllm_model: str | None = None,
    sharding: str = "none",
) -> tuple[RolloutEngine, str]:
    """The engine `name` for `model` and the CoT modes it will run, with a line saying which and why.
    `vllm_model`: the checkpoint directory vLLM would load (evaluate.py; None where vLLM cannot serve, as in
    training, whose policy changes every step). `sharding`: the training policy's (rl/parallel.py); the static
    engine runs on a whole, unwrapped model only, so a sharded run (fsdp2 gathers layers inside the forward,
    zero3 generates on a refreshed copy) uses the eager engine."""
    check_engine(name, key)
    if name in ("auto", "vllm"):
        reason = vllm_reason(vllm_model, modes, model.device)  # hard modes, installed, CUDA, a checkpoint
        if reason is None:
            return VllmEngine.load(
                vllm_model
            ), f"{key}={name}: vllm on {vllm_model} (hard-token modes on CUDA)"
        if name == "vllm":
            raise ValueError(f"{key}=vllm: {reason}")
    if name in ("auto", "static"):
        reason = (
            static_reason(model) if sharding in ("none", "zero2") else f"the policy is sharded ({sharding})"
        )
        if name == "auto" and reason is None and model.device.type != "cuda":
            reason = (
                "on CPU the static engine's compile time about equals what it saves in the default run; "
                "engine=static forces it"
            )
        if reason is None:
            from rollouts.static_engine import StaticEngine

            return StaticEngine(), f"{key}={name}: static (compiled decode step on a preallocated cache)"
        if name == "static":
            raise ValueError(f"{key}=static: {reason}; use {key}=eager")
        return EagerEngine(), f"{key}=auto: eager ({reason})"
    return EagerEngine(), f"{key}=eager: the reference engine"
