"""How a chain of thought is generated: one dataclass shared by the `cot/` (training) and `infer/` (evaluation)
recipe groups. Every default lives here and only here."""

from __future__ import annotations

from dataclasses import dataclass

COT_MODES = ("hard", "soft", "fuzzy", "multiplex", "gumbel")
GAUSSIAN_MODES = ("soft", "fuzzy")  # the CoT input is a Gaussian vector around μ_t = p_t E
MIXTURE_MODES = ("multiplex", "gumbel")  # the CoT input is a weighted mixture of K token embeddings
MULTIPLEX_WEIGHTS = ("uniform", "prob")
MAX_MIX_WIDTH = 64  # the most tokens a mixture step may store per row (multiplex_k, gumbel_k)
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

    - `mode`: hard (sampled tokens), soft (noisy probability-weighted embedding mixtures), fuzzy (soft with
      a tiny temperature, so the mixture is almost one-hot), multiplex (the mixture of K tokens drawn from p_t,
      arXiv 2601.08808) or gumbel (Gumbel-softmax weights over the top-k tokens, SofT-GRPO arXiv 2511.06411);
      the densities are derived in `rollouts.modes`.
    - `temperature`: τ of the CoT distribution; for hard and multiplex 0 means greedy (argmax / the top K).
    - `noise_scale`: soft / fuzzy: σ = noise_scale × rms(E), 0 gives noiseless (greedy) CoT; gumbel: the scale β
      of the Gumbel noise on log p_t (1 = the Gumbel-softmax, 0 = greedy); multiplex: must be 0; hard: unused.
    - `multiplex_k` / `multiplex_weights`: the K draws of a multiplex step and how their embeddings are mixed
      ("uniform" = their mean, "prob" = weighted by p_t of each draw, renormalised).
    - `gumbel_k` / `gumbel_temperature`: the support of a gumbel step (the top gumbel_k tokens of p_t,
      SofT-GRPO's 5) and τ_g of its mixture weights softmax((log p_t + β g) / τ_g) (SofT-GRPO's 0.1).
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
    multiplex_k: int = 3
    multiplex_weights: str = "uniform"
    gumbel_k: int = 5
    gumbel_temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in COT_MODES:
            raise ValueError(f"cot.mode={self.mode!r}: expected one of {COT_MODES}")
        self._check_mixture()
        if self.rms not in RMS_KINDS:
            raise ValueError(f"cot.rms={self.rms!r}: expected one of {RMS_KINDS}")
        if self.temperature < 0 or self.answer_temperature < 0:
            raise ValueError(
                f"cot.temperature={self.temperature}, cot.answer_temperature={self.answer_temperature}: must be >= 0"
            )
        if self.mode not in ("hard", "multiplex") and self.temperature == 0:
            raise ValueError(
                f"cot.temperature=0 with cot.mode={self.mode}: greedy by temperature is for hard and multiplex only "
                "(soft / fuzzy / gumbel need τ > 0; their greedy variant is cot.noise_scale=0)"
            )
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

    def _check_mixture(self) -> None:
        """The keys of the mixture modes (and noise_scale, which only soft / fuzzy / gumbel use)."""
        if self.mode == "multiplex" and self.noise_scale != 0:
            raise ValueError(
                f"cot.noise_scale={self.noise_scale} with cot.mode={self.mode}: this mode draws tokens and takes "
                "no noise scale; set cot.noise_scale=0"
            )
        for key in ("multiplex_k", "gumbel_k"):
            if not 1 <= getattr(self, key) <= MAX_MIX_WIDTH:
                raise ValueError(f"cot.{key}={getattr(self, key)}: must be in [1, {MAX_MIX_WIDTH}]")
        if self.multiplex_weights not in MULTIPLEX_WEIGHTS:
            raise ValueError(
                f"cot.multiplex_weights={self.multiplex_weights!r}: expected one of {MULTIPLEX_WEIGHTS}"
            )
        if self.gumbel_temperature <= 0:
            raise ValueError(f"cot.gumbel_temperature={self.gumbel_temperature}: must be > 0")

    @property
    def mix_width(self) -> int:
        """K, the tokens a mixture step stores per row: multiplex_k (multiplex), gumbel_k (gumbel), 0 otherwise.

        >>> CotConfig(mode="gumbel", temperature=1.0, noise_scale=1.0, gumbel_k=4).mix_width
        4
        """
        return {"multiplex": self.multiplex_k, "gumbel": self.gumbel_k}.get(self.mode, 0)

    @property
    def deterministic(self) -> bool:
        """True when a rollout is a function of the prompt alone (greedy hard CoT or noiseless soft / fuzzy CoT,
        and a greedy answer): n samples of a prompt are then n copies of one.

        >>> CotConfig(mode="hard", temperature=0.0, answer_temperature=0.0).deterministic
        True
        >>> CotConfig(mode="soft", noise_scale=0.33, answer_temperature=0.0).deterministic
        False
        """
        cot_greedy = self.temperature == 0 if self.mode in ("hard", "multiplex") else self.noise_scale == 0
        return cot_greedy and self.answer_temperature == 0

    @property
    def continuous(self) -> bool:
        """True when CoT inputs are vectors (soft, fuzzy, multiplex, gumbel) rather than token ids."""
        return self.mode != "hard"

    @property
    def gaussian(self) -> bool:
        """True when a CoT step is a Gaussian vector around μ_t = p_t E (soft, fuzzy): σ applies."""
        return self.mode in GAUSSIAN_MODES

    @property
    def mixture(self) -> bool:
        """True when a CoT step mixes the embeddings of K stored tokens (multiplex, gumbel)."""
        return self.mode in MIXTURE_MODES
