"""How the run is spread over processes: one strategy object per backend, chosen once from the launch
environment (`build_parallel`), which the loop and the learner call without asking which it is.

| strategy | `sharding` | parameters | gradients summed by | optimizer state |
|---|---|---|---|---|
| `Single` | none | whole | (one process) | torch AdamW |
| `DataParallel` (ddp) | none | whole on every process | one flat all-reduce after the backward | replicated |
| `FSDP2` | fsdp2 | decoder layers sharded (`fully_shard`) | layer hooks (reduce-scatter) + all-reduce of the rest | sharded |
| `Zero` stage 2 | zero2 | whole | DeepSpeed | partitioned (DeepSpeed ZeRO-2) |
| `Zero` stage 3 | zero3 | partitioned | DeepSpeed | partitioned (DeepSpeed ZeRO-3) |

Each owns: wrapping the model and building its optimizer and schedule (`prepare`), the whole policy to generate
with (`generation_view`), `backward` and `step` (returning the global pre-clip gradient norm), the collectives
the loop needs (`all_sum`, `gather`, `barrier`), whole-state gathering for checkpoints and the final model
(`save_checkpoint`, `save_model`) and `resume`. `sharding` is the name a checkpoint and summary.json record:
a checkpoint resumes only under the sharding that wrote it (rl/checkpoint.py).

Every process computes its micro-batches' losses divided by the GLOBAL normaliser, and the strategies SUM
gradients over processes (DeepSpeed averages, so `Zero` scales the loss by the world size), so N processes give
the 1-process update. The primitives (fsdp2 gathering, the DeepSpeed config, zero3's generation copy) are in
rl/sharding.py.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rl.checkpoint import (
    DEEPSPEED_TAG,
    LoadedCheckpoint,
    TrainState,
    check_model_keys,
    read_checkpoint,
    restore_run_state,
    restore_whole,
    save_checkpoint,
)
from rl.lora import adapter_state, plain_model
from rl.optim import OptimConfig, StepResult, build_optimizer, build_scheduler, clip_and_step
from rl.runtime import resolve_device
from rl.sharding import (
    SHARDINGS,
    GenerationCopy,
    deepspeed_config,
    full_state_dicts,
    gathered,
    grad_norm_sq,
    init_deepspeed,
    is_sharded,
    load_full_state_dicts,
    local_param_fraction,
    prepare_zero3,
    shard_decoder_layers,
)


def resolve_sharding(distributed_type: str, requested: str, world: int, zero_stage: str | None = None) -> str:
    """The sharding a run uses: `requested`, where auto = fsdp2 under accelerate's FSDP launch, zero2 / zero3
    under its DeepSpeed launch (`zero_stage` = ACCELERATE_DEEPSPEED_ZERO_STAGE), else none; always none for one
    process. Other ZeRO stages, and a sharding that contradicts the DeepSpeed launch, are refused rather than
    silently run as something else."""
    if distributed_type == "DEEPSPEED":
        stage = f"zero{zero_stage}"
        if stage not in ("zero2", "zero3") or requested not in ("auto", stage):
            raise NotImplementedError(
                f"accelerate DeepSpeed launch with zero_stage={zero_stage} and trainer.sharding={requested}: the "
                "trainer runs ZeRO stages 2 and 3 (recipes/accelerate/zero2.yaml, zero3.yaml) with "
                "trainer.sharding=auto or the launch's own stage"
            )
        requested = stage
    if requested == "auto":
        requested = "fsdp2" if distributed_type == "FSDP" else "none"
    return requested if world > 1 else "none"


class Single:
    """One process holding the whole model."""

    name = "none"
    sharding = "none"
    can_diagnose = True  # torch.autograd.grad reaches every parameter (the CoT-term gradient norm)
    # every process holds the whole live model: LoRA adapters (rl/lora.py) can be injected, merged and saved
    whole_model = True

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.device, self.rank, self.world = device, rank, world
        self.main = rank == 0
        self.model: torch.nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None

    # ---------------------------------------------------------------- assembly
    def prepare(
        self, model: torch.nn.Module, optim: OptimConfig, total_steps: int
    ) -> tuple[torch.optim.Optimizer, Any]:
        """Wrap `model` for this backend; build its AdamW and learning-rate schedule."""
        self.model = model
        self.opt = build_optimizer(model, optim)
        return self.opt, build_scheduler(self.opt, optim, total_steps=total_steps)

    def local_param_fraction(self) -> float:
        return local_param_fraction(self.model)

    # ---------------------------------------------------------------- collectives
    def all_sum(self, value: float) -> float:
        return value

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    # ---------------------------------------------------------------- generation
    @contextmanager
    def generation_view(self) -> Iterator[torch.nn.Module]:
        """The whole policy to generate with, for the duration (collective: every process enters it)."""
        yield self.model

    # ---------------------------------------------------------------- the update
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of one micro-batch's loss (already divided by the global normaliser)."""
        loss.backward()

    def step(self, total_loss: float, grad_clip: float) -> StepResult:
        """Sum gradients over processes, clip to `grad_clip` by the global norm and step; a non-finite loss or
        norm skips the step (rl/optim.py)."""
        self.reduce_gradients()
        return clip_and_step(self.model.parameters(), self.opt, None, total_loss, grad_clip)

    def reduce_gradients(self) -> None:
        pass

    # ---------------------------------------------------------------- whole state
    def whole_state(self, with_optimizer: bool) -> tuple[dict | None, dict | None]:
        """(model state, optimizer state) for saving, collective. A model state of None: the live model's."""
        return None, self.opt.state_dict() if with_optimizer else None

    def saveable(self) -> torch.nn.Module:
        """The module whose `save_pretrained` writes the policy (after `whole_state`)."""
        return self.model

    def write_partitions(self, root: Path, step: int) -> dict[str, Path]:
        """Folders each process writes its own part of the state into, moved into the checkpoint by name."""
        return {}

    def save_checkpoint(
        self, root: Path, tokenizer: Any, scheduler: Any, state: TrainState, keep_last: int, profile: Any
    ) -> None:
        """Write checkpoint `root/step_<state.step>` (collective; process 0 writes the whole state)."""
        self.barrier()
        model_state, optimizer_state = self.whole_state(with_optimizer=True)
        extra = self.write_partitions(root, state.step)
        if self.main:
            # LoRA (one process or ddp): model/ gets the merged plain copy, the adapters go in trainer_state.pt
            module = self.saveable()
            adapters = adapter_state(module) if model_state is None else {}
            save_checkpoint(
                root,
                plain_model(module) if adapters else module,
                tokenizer,
                optimizer_state,
                scheduler,
                state,
                keep_last,
                sharding=self.sharding,
                model_state=model_state,
                extra_dirs=extra,
                profile=profile,
                adapters=adapters or None,
            )
        self.barrier()

    def save_model(self, path: Path, tokenizer: Any, profile: Any) -> None:
        """Write the whole policy to `path` with `save_pretrained` (collective; process 0 writes)."""
        model_state = self.whole_state(with_optimizer=False)[0]
        if self.main:
            # LoRA adapters (one process or ddp only) leave the run merged into a plain model (rl/lora.py)
            module = self.saveable() if model_state is not None else plain_model(self.saveable())
            module.save_pretrained(path, state_dict=model_state)
            tokenizer.save_pretrained(path)
            profile.save(path)

    def resume(self, path: Path, scheduler: Any) -> TrainState:
        """Restore weights, optimizer, schedule and RNGs from checkpoint `path` (collective)."""
        loaded = read_checkpoint(path, self.sharding)
        self.restore(loaded)
        return restore_run_state(loaded, scheduler)

    def restore(self, loaded: LoadedCheckpoint) -> None:
        restore_whole(loaded, self.model, self.opt)


class DataParallel(Single):
    """Several processes, each holding the whole model; gradients summed with one flat all-reduce."""

    name = "ddp"

    def all_sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def reduce_gradients(self) -> None:
        # fsdp2-sharded layers were already reduce-scattered (as sums) by their backward hooks
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and not is_sharded(p.grad)]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class FSDP2(DataParallel):
    """Every decoder layer sharded with `fully_shard` (rl/sharding.py); the rest replicated as under ddp."""

    name = "fsdp2"
    sharding = "fsdp2"
    whole_model = False
    can_diagnose = (
        False  # autograd.grad cannot reach sharded parameters (their gradients arrive through hooks)
    )

    def prepare(
        self, model: torch.nn.Module, optim: OptimConfig, total_steps: int
    ) -> tuple[torch.optim.Optimizer, Any]:
        self.model = model
        self.layers = shard_decoder_layers(model)
        # per-parameter AdamW loops: foreach kernels refuse a group that mixes sharded and replicated tensors
        self.opt = build_optimizer(model, optim, foreach=False)
        return self.opt, build_scheduler(self.opt, optim, total_steps=total_steps)

    @contextmanager
    def generation_view(self) -> Iterator[torch.nn.Module]:
        with gathered(self.layers):
            yield self.model

    def step(self, total_loss: float, grad_clip: float) -> StepResult:
        self.reduce_gradients()
        return clip_and_step(
            self.model.parameters(), self.opt, None, total_loss, grad_clip, global_norm_sq=grad_norm_sq
        )

    def whole_state(self, with_optimizer: bool) -> tuple[dict | None, dict | None]:
        return full_state_dicts(self.model, self.opt if with_optimizer else None)

    def restore(self, loaded: LoadedCheckpoint) -> None:
        expected = set(self.model.state_dict())
        weights = loaded.weights
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        load_full_state_dicts(
            self.model, self.opt, {k: v for k, v in weights.items() if k in expected}, loaded.optimizer
        )
        check_model_keys(loaded.path, self.model, missing, unexpected)


class Zero(DataParallel):
    """DeepSpeed ZeRO stage 2 (gradients and AdamW state partitioned) or 3 (parameters too). DeepSpeed reduces,
    clips and steps; one backward per optimizer step. Under stage 3 generation and evaluation run on a whole copy
    of the policy, refreshed after every update (rl/sharding.py `GenerationCopy`)."""

    can_diagnose = False
    whole_model = False

    def __init__(self, device: torch.device, rank: int, world: int, stage: int, persistence_threshold: int):
        super().__init__(device, rank, world)
        self.stage, self.persistence_threshold = stage, persistence_threshold
        self.name = self.sharding = f"zero{stage}"
        self.copy: GenerationCopy | None = None
        self.pending: torch.Tensor | None = None

    def prepare(
        self, model: torch.nn.Module, optim: OptimConfig, total_steps: int
    ) -> tuple[torch.optim.Optimizer, Any]:
        self.model = model
        if self.stage == 3:
            self.copy = GenerationCopy(model)  # before DeepSpeed partitions the parameters
            prepare_zero3(model)
        self.opt = build_optimizer(model, optim)
        scheduler = build_scheduler(self.opt, optim, total_steps=total_steps)
        dtype = next(model.parameters()).dtype
        config = deepspeed_config(self.stage, optim.grad_clip, dtype, self.persistence_threshold)
        self.engine = init_deepspeed(model, self.opt, config)
        return self.opt, scheduler

    @contextmanager
    def generation_view(self) -> Iterator[torch.nn.Module]:
        yield self.copy.refreshed(self.model) if self.copy is not None else self.model

    def backward(self, loss: torch.Tensor) -> None:
        self.pending = loss  # DeepSpeed's backward runs in `step`, after the all-process finiteness check

    def step(self, total_loss: float, grad_clip: float) -> StepResult:
        """DeepSpeed AVERAGES gradients over processes, so the loss (already divided by the global normaliser) is
        multiplied by the world size to keep the summed update. A non-finite loss on any process skips
        everywhere. DeepSpeed clips at the `grad_clip` its config was built with."""
        loss, self.pending = self.pending, None
        lr = float(self.opt.param_groups[0]["lr"])
        if self.all_sum(0.0 if math.isfinite(total_loss) else 1.0) > 0:
            return StepResult(grad_norm=float("nan"), skipped=True, lr=lr)
        self.engine.backward(loss * self.world)
        self.engine.step()
        if self.copy is not None:
            self.copy.mark_stale()
        norm = self.engine.get_global_grad_norm()
        return StepResult(grad_norm=float("nan") if norm is None else float(norm), skipped=False, lr=lr)

    def whole_state(self, with_optimizer: bool) -> tuple[dict | None, dict | None]:
        """Zero3: the whole weights of the refreshed generation copy; the AdamW state is in DeepSpeed's own
        checkpoint (`write_partitions`) under both stages."""
        if self.copy is not None:
            return self.copy.refreshed(self.model).state_dict(), None
        return None, None

    def saveable(self) -> torch.nn.Module:
        return self.copy.module if self.copy is not None else self.model

    def write_partitions(self, root: Path, step: int) -> dict[str, Path]:
        staging = root / f".deepspeed_step_{step:06d}"
        self.engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG)
        dist.barrier()
        return {"deepspeed": staging}

    def restore(self, loaded: LoadedCheckpoint) -> None:
        self.engine.load_checkpoint(
            str(loaded.path / "deepspeed"),
            tag=DEEPSPEED_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if self.copy is not None:
            self.copy.mark_stale()


Parallel = Single
"""The interface every strategy implements (`Single`'s methods)."""


def build_parallel(sharding: str, device: str, micro_batch: int, persistence_threshold: int) -> Single:
    """The strategy of this launch: accelerate's process group and launch config, and `trainer.sharding`
    (`sharding`; auto = what the launch config asks for, see `resolve_sharding`). The one place a backend is
    chosen by name."""
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    rank, world = state.process_index, state.num_processes
    kind = str(state.distributed_type).rsplit(".", 1)[-1]
    chosen = resolve_sharding(kind, sharding, world, os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))
    assert chosen in SHARDINGS, chosen
    if chosen.startswith("zero") and micro_batch:
        raise ValueError(
            f"rl.micro_batch={micro_batch}: {chosen} sharding runs one backward per optimizer step; use "
            "rl.micro_batch=0"
        )
    if world == 1:
        return Single(resolve_device(device))
    if chosen.startswith("zero"):
        return Zero(state.device, rank, world, int(chosen[-1]), persistence_threshold)
    return {"none": DataParallel, "fsdp2": FSDP2}[chosen](state.device, rank, world)
