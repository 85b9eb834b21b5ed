"""LoRA fine-tuning through `peft` (`rl.lora.rank > 0`): low-rank adapters on the decoder's linear layers, the
base weights frozen. On CPU it makes a real model's update cheaper (no weight gradients and no AdamW state for
the base: 630M parameters of Qwen2.5-0.5B train as 8.8M at rank 16) and lets two runs share the machine's memory.

- The adapters are injected into the policy itself (`peft.inject_adapter_in_model`), not wrapped in a
  `PeftModel`: the policy stays the transformers model every engine and the learner already drive (inputs_embeds,
  the KV cache, `get_input_embeddings`, `get_output_embeddings`), the adapters' `B` start at zero so the first
  rollouts are the base model's, and the optimizer sees only the adapters (it takes what requires grad).
- The input embedding E and the output head are never adapted: σ, μ = p E and the soft inputs keep the base
  model's embeddings.
- Everything that leaves a run as a model (a checkpoint's `model/`, `final/`, `best/`) is the adapters merged into
  a plain copy (`plain_model`: `W + (α/r) B A`), loadable with ordinary tools. A checkpoint also keeps the adapter
  tensors themselves (`adapter_state`, in `trainer_state.pt`): the base is frozen at the run's starting weights
  (`model.path`, read-only), so a resume loads those and the adapters (`load_adapters`), exactly. `load_plain`
  loads merged weights back into an adapted policy (base := merged, B := 0): the same function.
- One process or data parallel only: the sharded backends (fsdp2, zero2, zero3) are refused at start.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """`rank` 0 = full fine-tuning (no adapters). The adapter output is scaled by `alpha / rank`."""

    rank: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"rl.lora.rank={self.rank} (>= 0), rl.lora.alpha={self.alpha} (> 0), "
                f"rl.lora.dropout={self.dropout} (in [0, 1)): out of range"
            )
        if self.rank and not self.target_modules:
            raise ValueError("rl.lora.target_modules is empty: name the linear layers to adapt")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Inject `cfg`'s adapters into `model` in place (base frozen, adapters trainable) and return it; a no-op
    for rank 0. A target module name that matches nothing is an error naming it."""
    if not cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(cfg.target_modules) - names)
    if missing:
        raise ValueError(
            f"rl.lora.target_modules: {missing} match no linear layer of {type(model).__name__} "
            f"(it has {sorted(names)})"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.target_modules)
    )
    inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def has_lora(model: torch.nn.Module) -> bool:
    try:
        return bool(lora_layers(model))
    except ImportError:  # peft not installed: nothing can hold adapters
        return False


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself when it holds no adapters; else a plain copy with the adapters merged into the weights and
    the LoRA layers replaced by their base layers (the state-dict keys of the un-adapted model)."""
    if not has_lora(model):
        return model
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            base = module.get_base_layer()
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, base)
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def plain_keys(model: torch.nn.Module) -> dict[str, str]:
    """{plain-model key: the adapted policy's key of the same tensor} for every base tensor."""
    out = {}
    for key in model.state_dict():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = key
    return out


@torch.no_grad()
def load_plain(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load plain weights (as `plain_model` saves them) into an adapted `model`: its base tensors take them and
    every adapter's B is zeroed, so the policy computes exactly the plain model. Returns (missing, unexpected)
    plain keys."""
    keys = plain_keys(model)
    missing, unexpected = sorted(set(keys) - set(weights)), sorted(set(weights) - set(keys))
    state = model.state_dict()
    for plain, live in keys.items():
        if plain in weights:
            state[live].copy_(weights[plain])
    for layer in lora_layers(model):
        for b in layer.lora_B.values():
            b.weight.zero_()
    return missing, unexpected


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of `model` (what a LoRA run trains), by state-dict key; empty without adapters."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@torch.no_grad()
def load_adapters(model: torch.nn.Module, adapters: dict[str, torch.Tensor], where: str) -> None:
    """Set `model`'s adapters to `adapters` (saved by `adapter_state`); the keys must be exactly the model's."""
    state = model.state_dict()
    mine = {k for k in state if "lora_" in k}
    if mine != set(adapters):
        missing, unexpected = sorted(mine - set(adapters)), sorted(set(adapters) - mine)
        raise ValueError(f"{where}: its LoRA adapters do not match the model's: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (another rl.lora setting?)")  # fmt: skip
    for key, value in adapters.items():
        state[key].copy_(value)
