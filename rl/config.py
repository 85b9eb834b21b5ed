"""The run configurations, composed from each component's own dataclass and registered in Hydra's
ConfigStore; `TrainerConfig` (run length, batch, evaluation and checkpoint cadence, the sharding to use) is the
run's own and lives here, so no configuration imports the training loop. Recipes under `recipes/` are validated against these schemas: an unknown key or a wrong type
fails at start with the key named. Every default lives in the component dataclass, never here.

`compose(name, overrides)` builds a config without `@hydra.main` (tests, the tiny-model builder, the
entry scripts' per-mode evaluation recipes), from the same recipe tree the scripts use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from rewards.config import RewardConfig
from rl.data import DataConfig
from rl.gguf import ensure_converted
from rl.learner import RLConfig
from rl.logger import LoggerConfig
from rl.model import CACHE_DIR, ModelConfig, apply_profile, check_model_path, is_tiny_base
from rl.rundir import RESUME_MODES
from rl.sharding import SHARDINGS
from rl.tiny_base import TinyBaseConfig, ensure_tiny_base
from rollouts.config import CotConfig, check_engine

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

T = TypeVar("T")

PAPER_INFER_MODES = (
    "hard_greedy",
    "hard_sample",
    "soft_greedy",
    "soft_sample",
    "fuzzy_greedy",
    "fuzzy_sample",
)
"""The paper's six inference settings: the default `trainer.eval_modes`."""
INFER_MODES = (*PAPER_INFER_MODES, "multiplex_greedy", "multiplex_sample", "gumbel_greedy", "gumbel_sample")
"""Every inference recipe in recipes/infer/."""


@dataclass
class TrainerConfig:
    """Run length, batch, evaluation and checkpoint cadence. `eval_modes` names recipes in recipes/infer/;
    the final evaluation runs all of them, `eval_primary` is the one evaluated periodically. The evaluation
    modes think for at most `eval_max_think_tokens` CoT steps (0 = the training cap `cot.max_think_tokens`; the
    paper trains GSM8K with 128 and evaluates with 512).

    `select_best` is the paper's model selection: the policy tested is the one with the best `eval_primary`
    pass@1 among the evaluations made during the run. The candidates are the pre-training evaluation (step 0:
    the base weights), every `eval_every`-th step and the last step; a candidate strictly better than every
    earlier one is saved whole into `output_dir/best/` (with `selected.json`: its step and pass@1), so best/
    always holds the selected weights, the base ones until training beats them. After training, best/'s weights
    are loaded into the policy: `eval_after`, summary.json's `selected` block and `final/` are those of the
    selected step, while the last weights stay in the newest checkpoint (which a longer run resumes from).
    It needs `eval_every` > 0 and `eval_modes`."""

    max_steps: int = 100
    prompts_per_step: int = 16  # global, over all processes
    rollout_chunk: int = 16  # prompts per engine call (keys the rollout randomness; see module docstring)
    seed: int = 0
    device: str = "auto"
    eval_every: int = 0  # 0 = evaluate only before and after training
    eval_problems: int = 200
    eval_n: int = 8
    eval_batch_size: int = 64
    eval_primary: str = "soft_sample"
    eval_modes: list[str] = field(default_factory=lambda: list(PAPER_INFER_MODES))
    eval_max_think_tokens: int = 0  # CoT cap of the evaluation modes; 0 = cot.max_think_tokens
    select_best: bool = False  # test the best eval_primary pass@1 of the run, kept in output_dir/best/
    save_every: int = 50
    keep_last: int = 2  # 0 = keep every checkpoint
    diag_every: int = 10  # steps between CoT-term gradient norms (an extra backward pass); 0 = never
    # auto = continue the run in output_dir when its config agrees (rl/rundir.py); never = start fresh, refuse a
    # used output_dir; overwrite = delete the run in output_dir and start fresh
    resume: str = "auto"
    # none | fsdp2 | zero2 | zero3 (rl/sharding.py) | auto = what the accelerate launch config asks for
    sharding: str = "auto"
    # zero3: parameters with fewer elements stay whole on every process (DeepSpeed's default 1e5)
    zero3_persistence_threshold: int = 100_000
    # rollout engine (rollouts/engines.py): auto = static (compiled) on CUDA where the model supports it and the
    # policy is not sharded, else eager (the reference; on CPU compiling does not pay in short runs)
    engine: str = "auto"

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.prompts_per_step < 1 or self.rollout_chunk < 1:
            raise ValueError(
                f"trainer.max_steps={self.max_steps}, prompts_per_step={self.prompts_per_step}, "
                f"rollout_chunk={self.rollout_chunk}: must be >= 1"
            )
        if self.resume not in RESUME_MODES:
            raise ValueError(f"trainer.resume={self.resume!r}: expected one of {RESUME_MODES}")
        if self.save_every < 1:
            raise ValueError(
                f"trainer.save_every={self.save_every}: must be >= 1 (steps between checkpoints)"
            )
        for key in ("eval_every", "keep_last", "diag_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key}={getattr(self, key)}: must be >= 0 (0 = off)")
        if self.eval_max_think_tokens < 0:
            raise ValueError(
                f"trainer.eval_max_think_tokens={self.eval_max_think_tokens}: must be >= 0 "
                "(0 = cot.max_think_tokens)"
            )
        for key in ("eval_problems", "eval_n", "eval_batch_size"):
            if self.eval_modes and getattr(self, key) < 1:
                raise ValueError(
                    f"trainer.{key}={getattr(self, key)}: must be >= 1 (or trainer.eval_modes=[])"
                )
        check_engine(self.engine, "trainer.engine")
        if self.engine == "vllm":
            raise ValueError(
                "trainer.engine=vllm: vLLM serves evaluate.py's hard modes; training uses auto|static|eager"
            )
        if self.sharding not in ("auto", *SHARDINGS):
            raise ValueError(f"trainer.sharding={self.sharding!r}: expected 'auto' or one of {SHARDINGS}")
        if self.zero3_persistence_threshold < 0:
            raise ValueError(
                f"trainer.zero3_persistence_threshold={self.zero3_persistence_threshold}: must be >= 0"
            )
        unknown = sorted(set(self.eval_modes) - set(INFER_MODES))
        if unknown or (self.eval_modes and self.eval_primary not in INFER_MODES):
            raise ValueError(
                f"trainer.eval_modes={self.eval_modes}, eval_primary={self.eval_primary!r}: modes must be in {INFER_MODES}"
            )
        if self.select_best and not (self.eval_every and self.eval_modes):
            raise ValueError(
                f"trainer.select_best=true needs periodic evaluations to select from: trainer.eval_every="
                f"{self.eval_every} (must be >= 1) and trainer.eval_modes={self.eval_modes} (must not be empty)"
            )

    def check_processes(self, world: int) -> None:
        """The global batch splits evenly over `world` processes (checked once the launch is known)."""
        if self.prompts_per_step % world:
            raise ValueError(
                f"trainer.prompts_per_step={self.prompts_per_step} must divide evenly over {world} processes"
            )


@dataclass
class EvaluateConfig:
    """`scripts/evaluate.py`: one inference mode, `n` samples per problem, on the eval split of `data`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    infer: CotConfig = field(default_factory=CotConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    n: int = 8
    batch_size: int = 64  # prompts per engine call (each expands to `n` rollouts)
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    # rollout engine (rollouts/engines.py): auto = vllm for a hard mode on CUDA when vLLM is installed, else
    # static (compiled) on CUDA where supported, else eager (the reference)
    engine: str = "auto"
    output_dir: str = "outputs/eval"
    trace_problems: int = 4  # the first problems shown step by step in trace.html (0 = no trace.html)

    def __post_init__(self) -> None:
        check_engine(self.engine, "engine")
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"n={self.n}, batch_size={self.batch_size}: both must be >= 1")
        if self.trace_problems < 0:
            raise ValueError(f"trace_problems={self.trace_problems}: must be >= 0 (0 = no trace.html)")
        if Path(self.output_dir).resolve() == Path(self.model.path).expanduser().resolve():
            raise ValueError(f"output_dir={self.output_dir!r} is model.path: a model directory is read-only")


@dataclass
class TrainConfig:
    """`scripts/train.py`: GRPO through the `cot` mode, evaluated in `trainer.eval_modes`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cot: CotConfig = field(default_factory=CotConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    output_dir: str = "outputs/train"


def prepare_model(raw: Any, overrides: list[str]) -> str | None:
    """Make the composed config `raw`'s model ready to load, before anything else runs: the project's tiny base
    is built if it is missing (only in its one place, `TINY_BASE_DIR`), a model shipped as GGUF (`model.gguf`) is
    converted into `model.path` if it is not there yet (rl/gguf.py), a local path without a saved model
    fails naming it, and a softgrpo model directory's profile sets the prompt format and CoT limits unless the
    command line `overrides` set them (rl/model.py). Returns the profile's note, if any."""
    if is_tiny_base(raw.model.path):
        ensure_tiny_base(to_object(compose("tiny_base"), TinyBaseConfig))
    if raw.model.gguf:
        ensure_converted(raw.model.path, list(raw.model.gguf), raw.model.gguf_sha256)
    check_model_path(raw.model.path)
    return apply_profile(raw.model, overrides)


def register_configs() -> None:
    """Put every schema in the ConfigStore (idempotent). Recipes name them in their defaults lists."""
    # `${cache:name}` in a recipe: <repo>/.cache/name, where softgrpo keeps the models it builds or converts
    OmegaConf.register_new_resolver("cache", lambda name: str(CACHE_DIR / name), replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="tiny_base_schema", node=TinyBaseConfig)


def compose(config_name: str, overrides: list[str] | None = None) -> Any:
    """The DictConfig of `recipes/<config_name>.yaml` with Hydra `overrides`, validated by its schema."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=overrides or [])
    with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def load_infer_recipe(name: str, cot: CotConfig) -> CotConfig:
    """The inference mode `recipes/infer/<name>.yaml`, with the CoT length limits and filter of the training
    `cot` (so evaluation thinks as long as training does), validated by CotConfig."""
    path = RECIPES_DIR / "infer" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"inference mode {name!r}: no {path} (known: {known})")
    base = OmegaConf.structured(CotConfig)
    inherited = {
        k: getattr(cot, k)
        for k in (
            "max_think_tokens",
            "max_answer_tokens",
            "top_k",
            "top_p",
            "min_p",
            "entropy_stop_threshold",
            "entropy_stop_patience",
            "rms",
        )
    }
    merged = OmegaConf.merge(base, inherited, OmegaConf.load(path))
    return OmegaConf.to_object(merged)


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys of a composed config that its schema does not have (Hydra's `+key=value` adds them silently)."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    names = {f.name for f in dataclasses.fields(schema)}
    out = []
    for key in node.keys():
        if key not in names:
            out.append(f"{prefix}{key}")
        elif isinstance(child := node._get_node(key), DictConfig) and not child._is_missing():
            out += unknown_keys(child, f"{prefix}{key}.")
    return out


def to_object(cfg: Any, schema: type[T]) -> T:
    """The typed dataclass behind a composed config (runs every `__post_init__` check); a key the schema does
    not have is an error naming it."""
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(
            f"unknown config keys {unknown}: not in {schema.__name__} (a typo, or a `+` override?)"
        )
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, schema):
        raise TypeError(f"config resolved to {type(obj).__name__}, expected {schema.__name__}")
    return obj
