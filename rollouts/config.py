"""How a chain of thought is generated: one dataclass shared by the `cot/` (training) and `infer/` (evaluation)
recipe groups. Every default lives here and only here."""

from __future__ import annotations

from dataclasses import dataclass

COT_MODES = ("hard", "soft", "fuzzy")
RMS_KINDS = ("entry", "row")
ENGINES = ("auto", "eager", "static", "vllm")
"""Rollout engines, chosen by `rollouts.engines.build_engine` (the key `engine` of train.py and evaluate.py)."""


def check_engine(name: str, key: str) -> None:
    """Refuse an unknown engine name, naming the config key.

    >>> check_engine("turbo", "trainer.engine")
    Traceback (most recent call last):
    ...
    ValueError: trainer.engine='turbo': expected one of ('auto', 'eager', 'static', 'vllm')
    """
    if name not in ENGINES:
        raise ValueError(f"{key}={name!r}: expected one of {ENGINES}")


@dataclass
class CotConfig:
    """One CoT generation mode (DESIGN.md section 1).

    - `mode`: hard (sampled tokens), soft (noisy probability-weighted embedding mixtures) or fuzzy (soft with
      a tiny temperature, so the mixture is almost one-hot).
    - `temperature`: τ of the CoT distribution; for hard mode 0 means greedy (argmax).
    - `noise_scale`: σ = noise_scale × rms(E); 0 gives noiseless (greedy) soft / fuzzy CoT.
    - `rms`: "entry" = sqrt(mean(E²)) over all entries (default); "row" = sqrt(mean_v ‖E_v‖²).
    - `top_k` / `top_p` / `min_p`: optional filter on the CoT distribution, renormalised (0 / 1.0 / 0.0 = off).
    - think end: top-1 token is the think-end token (or the top-1 stream ends with a multi-token delimiter),
      an entropy cold stop (`entropy_stop_threshold` > 0 nats for `entropy_stop_patience` consecutive steps),
      or `max_think_tokens`.
    - answer phase: hard tokens at `answer_temperature` (0 = greedy) and `answer_top_p` until EOS or
      `max_answer_tokens`.
    """

    name: str = "soft"
    mode: str = "soft"
    temperature: float = 0.5
    noise_scale: float = 0.33
    rms: str = "entry"
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_think_tokens: int = 128
    max_answer_tokens: int = 32
    answer_temperature: float = 1.0
    answer_top_p: float = 1.0
    entropy_stop_threshold: float = 0.0
    entropy_stop_patience: int = 4

    def __post_init__(self) -> None:
        if self.mode not in COT_MODES:
            raise ValueError(f"cot.mode={self.mode!r}: expected one of {COT_MODES}")
        if self.rms not in RMS_KINDS:
            raise ValueError(f"cot.rms={self.rms!r}: expected one of {RMS_KINDS}")
        if self.temperature < 0 or self.answer_temperature < 0:
            raise ValueError(
                f"cot.temperature={self.temperature}, cot.answer_temperature={self.answer_temperature}: must be >= 0"
            )
        if self.mode != "hard" and self.temperature == 0:
            raise ValueError("cot.temperature=0 is only meaningful for mode=hard (soft/fuzzy need τ > 0)")
        if self.noise_scale < 0:
            raise ValueError(f"cot.noise_scale={self.noise_scale}: must be >= 0")
        if not 0 < self.top_p <= 1 or not 0 < self.answer_top_p <= 1:
            raise ValueError(
                f"cot.top_p={self.top_p}, cot.answer_top_p={self.answer_top_p}: must be in (0, 1]"
            )
        if not 0 <= self.min_p < 1:
            raise ValueError(f"cot.min_p={self.min_p}: must be in [0, 1)")
        if self.top_k < 0:
            raise ValueError(f"cot.top_k={self.top_k}: must be >= 0 (0 = off)")
        if self.max_think_tokens < 0 or self.max_answer_tokens < 1:
            raise ValueError(
                f"cot.max_think_tokens={self.max_think_tokens}, cot.max_answer_tokens={self.max_answer_tokens}"
            )

    @property
    def deterministic(self) -> bool:
        """True when a rollout is a function of the prompt alone (greedy hard CoT or noiseless soft / fuzzy CoT,
        and a greedy answer): n samples of a prompt are then n copies of one.

        >>> CotConfig(mode="hard", temperature=0.0, answer_temperature=0.0).deterministic
        True
        >>> CotConfig(mode="soft", noise_scale=0.33, answer_temperature=0.0).deterministic
        False
        """
        cot_greedy = self.temperature == 0 if self.mode == "hard" else self.noise_scale == 0
        return cot_greedy and self.answer_temperature == 0

    @property
    def continuous(self) -> bool:
        """True when CoT inputs are vectors (soft, fuzzy) rather than token ids."""
        return self.mode != "hard"
