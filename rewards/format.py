"""The format reward (a pure function of the text) and the weighted combination of reward functions."""

from __future__ import annotations

from collections.abc import Sequence

from rewards.config import RewardConfig
from rewards.extract import GoldAnswer, answer_phase, last_boxed


def is_well_formatted(completion: str, think_start: str, think_end: str) -> bool:
    """True when the think delimiters are well formed and the answer phase boxes an answer.

    Well formed: exactly one `think_end`; at most one `think_start`, and if present it comes before
    `think_end` (it is optional because chat templates often put it in the prompt).

    >>> is_well_formatted("<think>2+2</think>\\\\boxed{4}", "<think>", "</think>")
    True
    >>> is_well_formatted("2+2</think>\\\\boxed{4}", "<think>", "</think>")
    True
    >>> is_well_formatted("\\\\boxed{4}", "<think>", "</think>")
    False
    >>> is_well_formatted("</think><think>\\\\boxed{4}</think>", "<think>", "</think>")
    False
    """
    if completion.count(think_end) != 1:
        return False
    starts = completion.count(think_start)
    if starts > 1 or (starts == 1 and completion.find(think_start) > completion.find(think_end)):
        return False
    answer = last_boxed(answer_phase(completion, think_end))
    return answer is not None and bool(answer.strip())


def format_reward(
    completions: Sequence[str],
    answers: Sequence[GoldAnswer] | None = None,
    config: RewardConfig | None = None,
) -> list[float | None]:
    """1.0 for a well-formatted completion (see `is_well_formatted`), else 0.0. `answers` is unused: the
    signature matches every reward function.

    >>> format_reward(["<think>x</think> \\\\boxed{1}", "\\\\boxed{1}"], ["1", "1"], RewardConfig(workers=1))
    [1.0, 0.0]
    """
    config = config or RewardConfig()
    return [1.0 if is_well_formatted(c, config.think_start, config.think_end) else 0.0 for c in completions]


def combine_rewards(
    rewards: Sequence[Sequence[float | None]], weights: Sequence[float]
) -> list[float | None]:
    """Weighted sum of reward lists, item by item. An item is None (cannot judge) when any reward with a
    non-zero weight is None for it: a partial sum would look like a judged, lower reward.

    >>> combine_rewards([[1.0, 0.0, None], [1.0, 1.0, 1.0]], [1.0, 0.1])
    [1.1, 0.1, None]
    >>> combine_rewards([[1.0, None]], [0.0])
    [0.0, 0.0]
    """
    if len(rewards) != len(weights):
        raise ValueError(f"{len(rewards)} reward lists but {len(weights)} weights")
    if not rewards:
        raise ValueError("combine_rewards needs at least one reward list")
    lengths = {len(r) for r in rewards}
    if len(lengths) != 1:
        raise ValueError(f"reward lists differ in length: {[len(r) for r in rewards]}")
    combined: list[float | None] = []
    for column in zip(*rewards, strict=True):
        total: float | None = 0.0
        for value, weight in zip(column, weights, strict=True):
            if weight == 0.0:
                continue
            if value is None:
                total = None
                break
            total += weight * value
        combined.append(total)
    return combined
