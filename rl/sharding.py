"""Parameter sharding for multi-process training: `none` (every process holds the whole model; the trainer
all-reduces gradients itself), `fsdp2` (PyTorch's `fully_shard` on every decoder layer) or `zero2` (DeepSpeed
ZeRO-2: gradients and AdamW state partitioned, parameters replicated; see `deepspeed_config`).

Under `fsdp2` each decoder layer's parameters, gradients and AdamW state are split across the processes; the
modules the learner calls outside a layer's forward (the input embedding E, read directly for μ = p E; the final
norm; the output head, applied in chunks) stay replicated and their gradients are all-reduced by the trainer like
under `none`. Gradients of the sharded layers are reduce-SCATTERED as sums (not means), so both kinds follow the
trainer's global normaliser and N processes give the 1-process update.

Every function here that communicates is collective: every process must call it, in the same order.

- `gathered(layers)`: the full layer parameters for a stretch of generation (rollouts, evaluation). Decoding
  calls each layer once per token and processes stop at different steps, so per-layer all-gathers inside the
  decode loop could deadlock; instead every layer is unsharded once on entry and resharded on exit.
- `grad_norm_sq`: the global squared gradient norm, sharded pieces summed across processes exactly once.
- `full_state_dicts` / `load_full_state_dicts`: whole (unsharded) model and optimizer state for checkpoints and
  `save_pretrained`, gathered to / broadcast from process 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

SHARDINGS = ("none", "fsdp2", "zero2")


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (`model.get_decoder().layers`)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or len(layers) == 0:
        raise TypeError(f"{type(model).__name__}: no decoder `layers` to shard with fsdp2")
    return list(layers)


def shard_decoder_layers(model: torch.nn.Module) -> list[Any]:
    """Apply `fully_shard` to every decoder layer (sum-reduced gradients). Returns the FSDP modules."""
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
        layer.set_gradient_divide_factor(1.0)
        layer.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return layers


@contextmanager
def gathered(layers: list[Any]) -> Iterator[None]:
    """Full parameters in every layer for the duration (collective on entry; see the module docstring)."""
    for layer in layers:
        layer.unshard()
        layer.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.reshard()
            layer.set_reshard_after_forward(True)


def grad_norm_sq(params: Iterable[torch.Tensor]) -> float:
    """Σ ‖grad‖² over `params`: replicated gradients counted once, sharded ones summed over processes. The sums
    stay on the gradients' device; one all-reduce and one host read in all."""
    sharded: list[torch.Tensor] = []
    replicated: list[torch.Tensor] = []
    for p in params:
        if p.grad is not None:
            if is_sharded(p.grad):
                sharded.append(p.grad.to_local().double().pow(2).sum())
            else:
                replicated.append(p.grad.double().pow(2).sum())
    if not sharded and not replicated:
        return 0.0
    device = (sharded or replicated)[0].device
    zero = torch.zeros((), dtype=torch.float64, device=device)
    shard_sum = torch.stack(sharded).sum() if sharded else zero  # [] this process's shards
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(shard_sum)
    total = shard_sum + (torch.stack(replicated).sum().to(device) if replicated else zero)
    return float(total)


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Whole model state (and optimizer state, unless `optimizer` is None) on process 0 as CPU tensors; empty
    dicts elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if optimizer is None:
        return model_state, None
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict | None
) -> None:
    """Load whole state dicts (as `full_state_dicts` wrote them) into a sharded model and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # strict=False: a tied output head is saved once; the caller checks the keys against the architecture
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def deepspeed_config(grad_clip: float, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config of `zero2` sharding, from the run's optimizer settings and model dtype.

    The trainer keeps its own batching: one backward and one engine step per optimizer step (so micro-batch 1 and
    no DeepSpeed accumulation), DeepSpeed clips at `grad_clip` (0 = no clipping) and keeps float32 master weights
    under bf16. Its AdamW is the trainer's own optimizer, wrapped; the learning-rate schedule stays the trainer's.

    >>> deepspeed_config(1.0, torch.bfloat16)["zero_optimization"], deepspeed_config(0.0, torch.float32).get("bf16")
    ({'stage': 2}, None)
    """
    if dtype == torch.float16:
        raise ValueError(
            "zero2 sharding with a float16 model needs loss scaling; use model.dtype=bfloat16 or float32"
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if grad_clip > 0:
        config["gradient_clipping"] = grad_clip
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    return config


def init_deepspeed(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """`deepspeed.initialize` over the already-initialised process group; returns the engine."""
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError("zero2 sharding needs DeepSpeed: pip install -e '.[deepspeed]'") from err
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine
