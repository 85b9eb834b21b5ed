"""Loading a policy (any Hugging Face causal LM) and its tokenizer, by hub id or local directory; and the
model's profile: its prompt format and thinking budget.

A model path is read-only to the project: loading never builds, trains or writes a model. A local path that
does not exist fails in seconds naming it. The project's own tiny base model lives in one place,
`TINY_BASE_DIR`, and is built there by `scripts/make_tiny_base.py` (or on first use by the entry scripts).

The prompt format (chat template use, think delimiters, instruction) and the CoT limits (`max_think_tokens`,
`max_answer_tokens`) belong to the model, so `ModelConfig` holds them: `recipes/model/<name>.yaml` for a named
model, and train's `cot` / evaluate's `infer` take their limits from `model` unless set explicitly. A directory
written by softgrpo (the tiny base build, a checkpoint, a run's `final/`) carries them in `PROFILE_FILE`, the
one source of truth for that model: the entry scripts apply it over the recipe (`apply_profile`), so
`evaluate.py model.path=runs/x/final` thinks exactly as long, with exactly the prompt, the run trained with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from rl.prompts import PromptConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache"  # models softgrpo builds or converts, once
TINY_BASE_DIR = CACHE_DIR / "tiny_base"
PROFILE_FILE = "softgrpo_model.json"


@dataclass
class ModelConfig:
    """`path` is a hub id or a local directory (never written to). `max_think_tokens` / `max_answer_tokens`:
    the model's CoT limits (see the module docstring)."""

    path: str = str(TINY_BASE_DIR)
    dtype: str = "float32"
    attn_implementation: str | None = None  # None = transformers' default (sdpa)
    trust_remote_code: bool = False
    # ["<distribution>:<path>", ...]: `path` is converted on first use from the GGUF file these parts make when
    # concatenated in order (one part: a whole .gguf), whose sha256 must be `gguf_sha256` when set (rl/gguf.py)
    gguf: list[str] = field(default_factory=list)
    gguf_sha256: str = ""
    max_think_tokens: int = 128
    max_answer_tokens: int = 32
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r}: expected one of {sorted(DTYPES)}")
        if self.max_think_tokens < 0 or self.max_answer_tokens < 1:
            raise ValueError(
                f"model.max_think_tokens={self.max_think_tokens}, model.max_answer_tokens="
                f"{self.max_answer_tokens}: need >= 0 and >= 1"
            )


@dataclass
class ModelProfile:
    """What a softgrpo-written model directory says about itself (`PROFILE_FILE`)."""

    prompt: PromptConfig
    max_think_tokens: int
    max_answer_tokens: int
    # rms(E) per kind ("entry", "row") of the embeddings the noise scale refers to: σ = noise_scale × rms is fixed
    # by a run's STARTING embeddings, so a trained model keeps its run's, and is evaluated with the run's σ
    embedding_rms: dict[str, float]
    written_by: str  # e.g. "tiny base build", "softgrpo train step 72 (cot=soft, from ...)"

    @staticmethod
    def of(model: ModelConfig, embedding_rms: dict[str, float], written_by: str) -> ModelProfile:
        return ModelProfile(
            model.prompt, model.max_think_tokens, model.max_answer_tokens, embedding_rms, written_by
        )

    def save(self, directory: str | Path) -> None:
        (Path(directory) / PROFILE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


PROFILE_FIELDS = [f.name for f in fields(ModelProfile)]


def read_profile(path: str | Path) -> ModelProfile | None:
    """The profile of the model directory `path`, or None when there is none (a hub id, a foreign model)."""
    file = Path(path) / PROFILE_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        return ModelProfile(
            prompt=PromptConfig(**data["prompt"]),
            max_think_tokens=int(data["max_think_tokens"]),
            max_answer_tokens=int(data["max_answer_tokens"]),
            embedding_rms={str(k): float(v) for k, v in data["embedding_rms"].items()},
            written_by=str(data["written_by"]),
        )
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
    ) as err:  # bad JSON or UTF-8, a missing or odd field
        raise ValueError(f"{file}: not a readable model profile ({type(err).__name__}: {err})") from err


def is_tiny_base(path: str) -> bool:
    """True when `path` is the project's tiny base directory (the one place it is built)."""
    return Path(path).expanduser().resolve() == TINY_BASE_DIR


def looks_local(path: str) -> bool:
    """Whether `path` names a local directory rather than a hub id ("org/name"): it exists, starts like a path,
    has more than one '/', or its first component is an existing local directory (`runs/final`).

    >>> looks_local("Qwen/Qwen2.5-3B-Instruct"), looks_local("./x"), looks_local("a/b/c")
    (False, True, True)
    """
    p = Path(path).expanduser()
    if p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        return True
    return "/" in path and Path(path.split("/", 1)[0]).is_dir()


def check_model_path(path: str) -> None:
    """Fail now, naming `model.path`, when it is a local path without a saved model (no config.json)."""
    if looks_local(path) and not (Path(path).expanduser() / "config.json").is_file():
        what = "does not exist" if not Path(path).expanduser().exists() else "has no config.json"
        hint = " (build the tiny base with scripts/make_tiny_base.py)" if is_tiny_base(path) else ""
        raise FileNotFoundError(
            f"model.path={path!r} {what}: expected a directory saved with save_pretrained{hint}"
        )


PROFILE_KEYS = ("prompt", "max_think_tokens", "max_answer_tokens")


def apply_profile(model: Any, overrides: list[str]) -> str | None:
    """Set the prompt format and CoT limits of the `model` config node (an OmegaConf DictConfig, edited in
    place) from its directory's profile, except keys the command line set (`overrides`, Hydra's list).
    Returns a note saying what was taken, or None when the directory has no profile."""
    profile = read_profile(model.path)  # a hub id has no such local file: None
    if profile is None:
        return None
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    kept = []
    for key in PROFILE_KEYS:
        value = getattr(profile, key)
        if key == "prompt":
            for sub in asdict(value):
                if f"model.prompt.{sub}" in given or "model.prompt" in given:
                    kept.append(f"model.prompt.{sub}")
                else:
                    model.prompt[sub] = getattr(value, sub)  # typed: worked examples stay `Example`s
        elif f"model.{key}" in given:
            kept.append(f"model.{key}")
        else:
            model[key] = value
    note = (
        f"model.path={model.path} ({profile.written_by}): prompt format and CoT limits "
        f"{profile.max_think_tokens} + {profile.max_answer_tokens} from its {PROFILE_FILE}"
    )
    return note + (f"; kept from the command line: {', '.join(kept)}" if kept else "")


def load_policy(cfg: ModelConfig, device: str | torch.device = "cpu"):
    """(model, tokenizer) for `cfg`; reads `cfg.path` and nothing else."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_path(cfg.path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs).to(device)
    return model, tokenizer
