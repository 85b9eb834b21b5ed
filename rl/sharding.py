"""The primitives of the parallel strategies (rl/parallel.py): `none` (every process holds the whole model; the
`DataParallel` strategy all-reduces gradients itself), `fsdp2` (PyTorch's `fully_shard` on every decoder layer), `zero2` (DeepSpeed
ZeRO-2: gradients and AdamW state partitioned, parameters replicated; see `deepspeed_config`) or `zero3`
(DeepSpeed ZeRO-3: parameters partitioned too).

Under `fsdp2` each decoder layer's parameters, gradients and AdamW state are split across the processes; the
modules the learner calls outside a layer's forward (the input embedding E, read directly for μ = p E; the final
norm; the output head, applied in chunks) stay replicated and their gradients are all-reduced by the strategy like
under `none`. Gradients of the sharded layers are reduce-SCATTERED as sums (not means), so both kinds follow the
learner's global normaliser and N processes give the 1-process update.

Every function here that communicates is collective: every process must call it, in the same order.

- `gathered(layers)`: the full layer parameters for a stretch of generation (rollouts, evaluation). Decoding
  calls each layer once per token and processes stop at different steps, so per-layer all-gathers inside the
  decode loop could deadlock; instead every layer is unsharded once on entry and resharded on exit.
- `grad_norm_sq`: the global squared gradient norm, sharded pieces summed across processes exactly once.
- `full_state_dicts` / `load_full_state_dicts`: whole (unsharded) model and optimizer state for checkpoints and
  `save_pretrained`, gathered to / broadcast from process 0.

Under `zero3` DeepSpeed's module hooks gather a module's parameters for its forward (and its backward) and
release them after, so a parameter read outside its module's forward is an empty tensor. Two pieces make the
`Zero` strategy work with that:

- `prepare_zero3(model)` registers the learner's `ActionScorer` on the policy, with E and the output head as its
  external parameters, before `deepspeed.initialize`: the learner's only reads of E and of the head outside a
  module of their own (μ = p E; the head applied in chunks) then happen inside a module call that DeepSpeed
  gathers for, once per learner pass on every process.
- `GenerationCopy`: generation and evaluation run on a whole, hook-free copy of the policy, refreshed from the
  partitions (one `GatheredParameters` per module, collective) when the parameters have changed. Decoding then
  runs no collective at all, so processes may stop at different steps, and evaluation may run on process 0
  alone. The cost is one whole copy of the weights per process, as a colocated inference engine would hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

SHARDINGS = ("none", "fsdp2", "zero2", "zero3")


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


def local_param_fraction(model: torch.nn.Module) -> float:
    """Parameter elements this process holds / all parameter elements: 1 when replicated; under fsdp2 the
    local shards; under zero3 the local partitions (DeepSpeed pads them to equal sizes), whole for parameters
    DeepSpeed keeps persistent (below `stage3_param_persistence_threshold` elements)."""
    local = total = 0
    for p in model.parameters():
        full = int(getattr(p, "ds_numel", p.numel()))
        total += full
        if hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False):
            local += p.ds_tensor.numel()
        elif is_sharded(p):
            local += p.to_local().numel()
        else:
            local += full
    return local / total if total else 1.0


def deepspeed_config(
    stage: int, grad_clip: float, dtype: torch.dtype, persistence_threshold: int = 100_000
) -> dict[str, Any]:
    """The DeepSpeed config of `zero2` / `zero3` sharding (`stage` 2 or 3), from the run's optimizer settings and
    model dtype.

    The learner keeps its own batching: one backward and one engine step per optimizer step (so micro-batch 1 and
    no DeepSpeed accumulation), DeepSpeed clips at `grad_clip` (0 = no clipping) and keeps float32 master weights
    under bf16. Its AdamW is the run's own optimizer, wrapped; the learning-rate schedule stays the run's.
    Under stage 3, parameters with fewer than `persistence_threshold` elements stay whole on every process
    (DeepSpeed's default 1e5: gathering small norms costs more than it saves); whole weights for saving come from
    the strategy's `GenerationCopy`, not from DeepSpeed.

    >>> deepspeed_config(2, 1.0, torch.bfloat16)["zero_optimization"], deepspeed_config(2, 0.0, torch.float32).get("bf16")
    ({'stage': 2}, None)
    >>> deepspeed_config(3, 1.0, torch.float32, persistence_threshold=0)["zero_optimization"]["stage3_param_persistence_threshold"]
    0
    """
    if stage not in (2, 3):
        raise ValueError(f"DeepSpeed ZeRO stage {stage}: softgrpo runs stages 2 and 3")
    if dtype == torch.float16:
        raise ValueError(
            f"zero{stage} sharding with a float16 model needs loss scaling; use model.dtype=bfloat16 or float32"
        )
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
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
    deepspeed = _import_deepspeed(config["zero_optimization"]["stage"])
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def prepare_zero3(model: torch.nn.Module) -> None:
    """Register the learner's `ActionScorer` on `model`, with E and the output head's parameters as its external
    parameters (see the module docstring). Call before `deepspeed.initialize`, which installs the hooks."""
    from rl.action_scorer import SCORER_ATTR, ActionScorer

    deepspeed = _import_deepspeed(3)
    scorer = ActionScorer(model)
    model.add_module(SCORER_ATTR, scorer)
    head = model.get_output_embeddings()
    for param in (model.get_input_embeddings().weight, head.weight, head.bias):
        if param is not None:
            deepspeed.zero.register_external_parameter(scorer, param)


class GenerationCopy:
    """zero3: a whole, hook-free copy of the policy for generation and evaluation (see the module docstring).
    Make it before `deepspeed.initialize` (it copies the whole model as loaded); `mark_stale()` after every
    change to the parameters; `refreshed(model)` (collective) returns the copy, gathering the partitions first
    when they changed."""

    def __init__(self, model: torch.nn.Module) -> None:
        import copy

        # requires_grad stays as in the policy: used under no_grad only, and torch's matmul picks its kernel
        # (fold a [N, L, d] input into one matrix or not) by the weight's requires_grad, so changing it would
        # change the rollouts' rounding against every other sharding
        self.module = copy.deepcopy(model).eval()
        self.stale = False

    def mark_stale(self) -> None:
        self.stale = True

    def refreshed(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.stale:
            deepspeed = _import_deepspeed(3)
            mine = dict(self.module.named_parameters())
            names = {id(p): name for name, p in model.named_parameters()}  # a tied weight: its first name
            done: set[int] = set()
            with torch.no_grad():
                for module in model.modules():  # one gather per module, in module order on every process
                    own = [p for p in module.parameters(recurse=False) if id(p) not in done]
                    if not own:
                        continue
                    with deepspeed.zero.GatheredParameters(own):
                        for param in own:
                            mine[names[id(param)]].copy_(param)
                    done.update(id(p) for p in own)
            self.stale = False
        return self.module


def _import_deepspeed(stage: int) -> Any:
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(f"zero{stage} sharding needs DeepSpeed: pip install -e '.[deepspeed]'") from err
    return deepspeed
