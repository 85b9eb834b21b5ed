"""Rewards: answer extraction, sandboxed math verification, format reward, pass@k.

Public API (see each function's docstring for its policy):

- `RewardConfig`: every knob and default of the package.
- `RewardPool(config, **overrides).score(completions, golds) -> list[Result]`: the batch API for the learner;
  `.judge(completions, golds) -> Judged` adds the format reward (`rewards` and the `results` behind them).
- `math_reward`, `format_reward`, `combine_rewards`: reward functions `(completions, answers) -> list`.
- `Result`, `STATUSES`, `status_counts`: verdicts and their counts for logging.
- `answer_phase`, `last_boxed`, `normalize_gold`, `gold_candidates`, `gsm8k_gold`: extraction.
- `pass_at_k`, `pass_at_k_per_problem`, `aggregate_pass_at_k`, `PassAtK`: the unbiased pass@k estimator;
  `paired_lift`, `PairedLift`: the per-problem paired difference of two evaluations, with its standard error.
"""

from rewards.config import STATUSES, RewardConfig
from rewards.extract import answer_phase, gold_candidates, gsm8k_gold, last_boxed, normalize_gold
from rewards.format import combine_rewards, format_reward, is_well_formatted
from rewards.passk import (
    PairedLift,
    PassAtK,
    aggregate_pass_at_k,
    paired_lift,
    pass_at_k,
    pass_at_k_per_problem,
)
from rewards.pool import Judged, RewardPool, math_reward
from rewards.verify import Result, judge, status_counts

__all__ = [
    "STATUSES",
    "Judged",
    "PairedLift",
    "PassAtK",
    "Result",
    "RewardConfig",
    "RewardPool",
    "aggregate_pass_at_k",
    "paired_lift",
    "answer_phase",
    "combine_rewards",
    "format_reward",
    "gold_candidates",
    "gsm8k_gold",
    "is_well_formatted",
    "judge",
    "last_boxed",
    "math_reward",
    "normalize_gold",
    "pass_at_k",
    "pass_at_k_per_problem",
    "status_counts",
]
