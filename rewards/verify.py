"""Judging one (completion, gold) pair with math-verify, in-process, and counting the outcomes.

`judge` is what a pool worker runs. It has no timeout of its own and must not be called on untrusted text in
a process that cannot be killed: `RewardPool` runs it in worker processes and kills a worker that passes the
per-item budget. math-verify's own SIGALRM timeouts are switched off (`parsing_timeout=None`,
`timeout_seconds=None`) because (a) they cannot interrupt C-level work such as big-integer powers, so the
pool's kill is needed anyway, and (b) on timeout math-verify returns False, which would turn a timeout into a
silent `wrong`; with one mechanism every timeout is reported as `timeout`.

Only LaTeX extraction is used, for gold and prediction alike: math-verify's plain-expression extraction goes
through sympy's `parse_expr`, which calls `eval` on the text, and model output must never be executed.

Statuses and rewards:

| status | reward | meaning |
|---|---|---|
| ok | 1.0 | the boxed answer matches one acceptable gold answer |
| wrong | 0.0 | it does not, or it cannot be parsed, or it is longer than `max_answer_chars` |
| no_answer | 0.0 | no box (or an empty / unclosed one) in the answer phase |
| timeout | 0.0 | judging passed `timeout_s`; the worker was killed and replaced |
| gold_unparseable | None | no acceptable gold answer parses: the item cannot be judged |
| error | None | the worker died or the verifier raised (e.g. MemoryError under the memory cap) |
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from rewards.config import SCHEMES, STATUSES, RewardConfig
from rewards.extract import GoldAnswer, answer_phase, gold_candidates, last_boxed

_REWARD_OF_STATUS = SCHEMES["correctness"]  # `Result.reward`: correctness, whatever the training scheme


@dataclass(frozen=True)
class Result:
    """The verdict on one completion. `detail` says why, for the unusual cases (empty otherwise).

    >>> Result.of("ok")
    Result(reward=1.0, status='ok', detail='')
    """

    reward: float | None
    status: str
    detail: str = ""

    @classmethod
    def of(cls, status: str, detail: str = "") -> Result:
        if status not in _REWARD_OF_STATUS:
            raise ValueError(f"unknown status {status!r}; expected one of {STATUSES}")
        return cls(_REWARD_OF_STATUS[status], status, detail)


def status_counts(results: Iterable[Result]) -> dict[str, int]:
    """Count results per status; all six statuses are present, so logged series never have gaps.

    >>> status_counts([Result.of("ok"), Result.of("ok"), Result.of("timeout")])
    {'ok': 2, 'wrong': 0, 'no_answer': 0, 'timeout': 1, 'gold_unparseable': 0, 'error': 0}
    """
    counts = dict.fromkeys(STATUSES, 0)
    for result in results:
        counts[result.status] += 1
    return counts


def _latex_config() -> list:
    from math_verify import LatexExtractionConfig

    # The text handed to math-verify is always `\boxed{...}` we built ourselves, so the box comes first.
    return [LatexExtractionConfig(boxed_match_priority=0)]


def _parse(latex: str) -> list:
    from math_verify import parse

    return parse("\\boxed{" + latex + "}", extraction_config=_latex_config(), parsing_timeout=None)


@lru_cache(maxsize=4096)
def _parsed_golds(candidates: tuple[str, ...]) -> tuple[list, ...]:
    # The G samples of one prompt share a gold: parse it once per worker.
    return tuple(parsed for parsed in (_parse(c) for c in candidates if c) if parsed)


def silence_math_verify() -> None:
    """math-verify warns once that its timeout is off (the pool provides it) and logs every parse failure."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def judge(completion: str, gold: GoldAnswer, config: RewardConfig) -> Result:
    """Judge one completion against its gold answer(s), in this process, with no timeout.

    >>> cfg = RewardConfig(workers=1)
    >>> judge("<think>1+1</think> The answer is \\\\boxed{\\\\frac{4}{2}}.", "2", cfg)
    Result(reward=1.0, status='ok', detail='')
    >>> judge("\\\\boxed{3}", ["$2$", "$3$"], cfg).status
    'ok'
    >>> judge("I think it is 2", "2", cfg).status
    'no_answer'
    >>> judge("\\\\boxed{2}", "", cfg).reward is None
    True
    """
    from math_verify import verify

    golds = _parsed_golds(gold_candidates(gold))
    if not golds:
        return Result.of("gold_unparseable", f"gold {gold!r:.200}")
    answer = last_boxed(answer_phase(completion, config.think_end))
    if answer is None or not answer.strip():
        return Result.of("no_answer")
    if len(answer) > config.max_answer_chars:
        return Result.of("wrong", f"answer_too_long ({len(answer)} > {config.max_answer_chars} chars)")
    predicted = _parse(answer)
    if not predicted:
        return Result.of("wrong", "answer_unparseable")
    for parsed_gold in golds:
        if verify(parsed_gold, predicted, timeout_seconds=None):
            return Result.of("ok")
    return Result.of("wrong")
