"""The reward's knobs, in one dataclass: every default of the `rewards` package lives here and only here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: Every status a judged item can get, in logging order. `status_counts` always reports all six.
STATUSES: tuple[str, ...] = ("ok", "wrong", "no_answer", "timeout", "gold_unparseable", "error")

#: The training reward of each status, per scheme (`RewardConfig.scheme`). `correctness`: 1 if verified correct,
#: else 0. `paper` ("Soft Tokens, Hard Truths", Eq. 11): 100 if correct, 10 if a `\boxed{}` answer was extracted
#: but is wrong, 0 otherwise; a timeout counts as a boxed answer that could not be verified correct (the worker
#: only times out after extracting one), so 10. None (cannot judge) stays None in every scheme. Evaluation's
#: pass@k always counts correctness (`Result.reward`), whatever the scheme.
SCHEMES: dict[str, dict[str, float | None]] = {
    "correctness": {
        "ok": 1.0,
        "wrong": 0.0,
        "no_answer": 0.0,
        "timeout": 0.0,
        "gold_unparseable": None,
        "error": None,
    },
    "paper": {
        "ok": 100.0,
        "wrong": 10.0,
        "no_answer": 0.0,
        "timeout": 10.0,
        "gold_unparseable": None,
        "error": None,
    },
}


def _default_workers() -> int:
    # One worker per core: verification is CPU-bound and single-threaded.
    return max(1, os.cpu_count() or 1)


@dataclass
class RewardConfig:
    """Configuration of answer extraction, the verification pool and the format reward.

    >>> RewardConfig(workers=2, timeout_s=3.0).timeout_s
    3.0
    """

    #: Worker processes in the verification pool.
    workers: int = field(default_factory=_default_workers)
    #: Wall-clock budget per (completion, gold) item, parsing included; past it the worker is killed.
    timeout_s: float = 5.0
    #: Address-space cap per worker (RLIMIT_AS), in MiB. A worker with sympy loaded uses ~100 MiB.
    memory_mb: int = 1024
    #: The answer phase is the text after the last occurrence of this delimiter.
    think_end: str = "</think>"
    #: Optional opening delimiter; the format reward only checks that it is not misplaced.
    think_start: str = "<think>"
    #: The training reward of each verdict (a key of `SCHEMES`): correctness 1 / 0, or the paper's 100 / 10 / 0.
    scheme: str = "correctness"
    #: Weight of the format reward when `RewardPool.judge` adds it to the scheme's reward.
    format_weight: float = 0.0
    #: A boxed answer longer than this is judged wrong without parsing: no real answer is that long,
    #: and parsing megabyte LaTeX only burns the timeout.
    max_answer_chars: int = 1000
    #: Extra warm workers kept ready, so that a killed worker's replacement (a fresh interpreter that
    #: imports math-verify, about a second) never stalls the batch. At most `workers` items run at once.
    spare_workers: int = 1
    #: How long a fresh worker may take to import math-verify and warm up before the pool gives up.
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"RewardConfig.workers must be >= 1, got {self.workers}")
        if not self.timeout_s > 0:
            raise ValueError(f"RewardConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 256:
            raise ValueError(
                f"RewardConfig.memory_mb must be >= 256 (a worker needs ~100 MiB), got {self.memory_mb}"
            )
        if not self.think_end:
            raise ValueError("RewardConfig.think_end must be a non-empty string")
        if self.max_answer_chars < 1:
            raise ValueError(f"RewardConfig.max_answer_chars must be >= 1, got {self.max_answer_chars}")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"RewardConfig.startup_timeout_s must be > 0, got {self.startup_timeout_s}")
        if self.scheme not in SCHEMES:
            raise ValueError(f"RewardConfig.scheme={self.scheme!r}: expected one of {sorted(SCHEMES)}")
        if self.spare_workers < 0:
            raise ValueError(f"RewardConfig.spare_workers must be >= 0, got {self.spare_workers}")
