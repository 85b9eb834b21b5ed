"""Optimizer, learning-rate schedule and a guarded optimizer step.

- AdamW with two parameter groups: weight decay on matrices (ndim >= 2: linear layers and the embedding /
  output head), none on vectors (ndim < 2: norm gains and biases), because decaying a norm gain or a bias
  toward 0 changes the function's scale rather than regularising it. Tied embeddings appear once.
- Schedule (`LambdaLR`, multiplier of `lr` after `step` optimizer steps): linear warmup (step+1)/warmup_steps
  for step < warmup_steps, then a half cosine from 1 at step = warmup_steps down to `min_lr_ratio` at
  step = total_steps, flat after.
- `clip_and_step`: pre-clip global grad norm, clip to `grad_clip`, step; a non-finite loss or grad norm skips the
  update (grads zeroed, flag returned so the loop counts skips). The scheduler advances on skipped steps
  too: the schedule is a function of the loop's step count, so `total_steps` and resuming stay exact.
- Gradient accumulation is the learner's `rl.micro_batch` (rl/learner.py): every micro-batch's loss is divided
  by the global normaliser and `clip_and_step` runs once per update. `grad_accum` is kept only so that saved
  configurations still load; any value but 1 is refused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch.optim.lr_scheduler import LambdaLR


@dataclass
class OptimConfig:
    """AdamW + warmup/cosine schedule + clipping. `total_steps=None`: the trainer supplies it."""

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    total_steps: int | None = None
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still reported)
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"optim.lr={self.lr}, optim.weight_decay={self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas}: expected two values in [0, 1)")
        if self.warmup_steps < 0 or (self.total_steps is not None and self.total_steps <= 0):
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}, optim.total_steps={self.total_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
        if self.grad_accum < 1:
            raise ValueError(f"optim.grad_accum={self.grad_accum}: must be >= 1")
        if self.grad_accum != 1:  # it never did anything: refuse rather than silently ignore it
            raise ValueError(
                f"optim.grad_accum={self.grad_accum}: not supported; accumulate over micro-batches with "
                "rl.micro_batch (every micro-batch is divided by the global normaliser, one step per update)"
            )


@dataclass
class StepResult:
    """What one guarded optimizer step did."""

    grad_norm: float  # global L2 norm of the gradients before clipping (inf / nan when non-finite)
    skipped: bool  # True when the loss or the grad norm was non-finite: no update, grads zeroed
    lr: float  # learning rate used (of the first parameter group), before the scheduler advanced


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, foreach: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on ndim < 2 parameters (norms, biases).
    `foreach`: torch's choice when None; False for a model that mixes fsdp2-sharded and replicated parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # shared (tied) parameters are yielded once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=foreach
    )


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The schedule of the module docstring.

    >>> [round(lr_multiplier(s, 2, 6, 0.1), 4) for s in range(8)]
    [0.5, 1.0, 1.0, 0.8682, 0.55, 0.2318, 0.1, 0.1]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def fit_warmup(cfg: OptimConfig, total_steps: int) -> tuple[OptimConfig, str | None]:
    """`cfg` with a warmup that fits a run of `total_steps`: one longer than the run is cut to a tenth of it
    (the note says so); otherwise `cfg` unchanged and no note.

    >>> fit_warmup(OptimConfig(warmup_steps=10), 8)[0].warmup_steps
    0
    >>> fit_warmup(OptimConfig(warmup_steps=10), 30) == (OptimConfig(warmup_steps=10), None)
    True
    """
    if cfg.warmup_steps <= total_steps:
        return cfg, None
    short = total_steps // 10
    note = (
        f"rl.optim.warmup_steps={cfg.warmup_steps} is longer than the run (trainer.max_steps={total_steps}); "
        f"warming up over {short} steps (a tenth of the run)"
    )
    return replace(cfg, warmup_steps=short), note


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int | None = None) -> LambdaLR:
    """Linear warmup then cosine to `min_lr_ratio · lr`; `total_steps` overrides `cfg.total_steps`."""
    total = total_steps if total_steps is not None else cfg.total_steps
    if total is None or total <= 0:
        raise ValueError(
            f"build_scheduler needs total_steps > 0 (argument {total_steps}, optim.total_steps "
            f"{cfg.total_steps})"
        )
    if cfg.warmup_steps > total:
        raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} exceeds total_steps={total}")
    return LambdaLR(opt, lambda step: lr_multiplier(step, cfg.warmup_steps, total, cfg.min_lr_ratio))


def clip_and_step(
    params: Iterable[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    scheduler: LambdaLR | None,
    loss: torch.Tensor | float,
    grad_clip: float,
    global_norm_sq: Callable[[list[torch.nn.Parameter]], float] | None = None,
) -> StepResult:
    """Clip the accumulated gradients and step, unless the loss or the grad norm is non-finite (then skip).

    Always leaves the gradients zeroed and advances the scheduler (see the module docstring).
    `global_norm_sq(params)`: the squared global gradient norm when some gradients are shards of a parameter
    (rl/parallel.py passes fsdp2's, collective); the clip is then applied as torch's `clip_grad_norm_` does
    (coefficient max_norm / (norm + 1e-6), capped at 1). None: torch's `clip_grad_norm_` on whole gradients.
    """
    params = [p for p in params if p.grad is not None]
    loss_value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
    max_norm = grad_clip if grad_clip > 0 else math.inf
    if global_norm_sq is not None:
        grad_norm = math.sqrt(global_norm_sq(params))
        coef = min(1.0, max_norm / (grad_norm + 1e-6))
        if coef < 1.0 and math.isfinite(grad_norm):
            for p in params:
                p.grad.mul_(coef)
    elif params:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    else:
        grad_norm = 0.0
    lr = float(opt.param_groups[0]["lr"])
    skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
    if not skipped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if scheduler is not None:
        with warnings.catch_warnings():
            # a skipped first step trips torch's "scheduler.step() before optimizer.step()" check; intended here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
            scheduler.step()
    return StepResult(grad_norm=grad_norm, skipped=skipped, lr=lr)
