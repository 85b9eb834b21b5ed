"""Procedurally generated multi-step word problems in plain English, with exact integer answers: a task for
real pretrained models whose difficulty is set by knobs (`data=word_problems`, `data.word_problems.*`).

A problem follows one person's stock of one kind of item through `min_steps`..`max_steps` operations drawn from
`ops` ("+" gains, "-" losses, "*" multiplies the stock, "/" splits it evenly and keeps one share), each told as
a sentence with operands of up to `digits` digits (multipliers and divisors are 2..9), then asks for the final
count. Every intermediate count is a positive integer: a loss never takes more than there is, a split only
divides a count it divides exactly (otherwise another operation is drawn). The task is deterministic for its
knobs and seed; the test split does not depend on `num_train`, and no test question occurs in train.

>>> p = make_word_problems(WordProblemConfig(num_train=3, num_test=2), "test")[0]
>>> p.answer == solve(p.steps, p.start)
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from rl.synthetic import disjoint_split

NAMES = (
    "Amara", "Ben", "Carlos", "Dana", "Elif", "Farah", "George", "Hana", "Ivan", "Julia", "Kenji", "Lena",
    "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf",
)  # fmt: skip
ITEMS = (
    "apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells", "coins", "cards",
    "beads", "tickets", "bottles", "eggs", "flowers", "toy cars",
)  # fmt: skip
GAIN = ("buys {k} more {item}", "gets {k} more {item} from a friend", "finds {k} more {item}")
LOSS = ("gives away {k} {item}", "sells {k} {item}", "loses {k} {item}")
TIMES = ("ends up with {k} times as many {item} as before",)
SPLIT = ("splits the {item} into {k} equal groups and keeps only one group",)
OPS = "+-*/"


@dataclass
class WordProblemConfig:
    """Knobs of the word-problem task. `ops` is a subset of "+-*/"; `digits` bounds the starting count and the
    operands of "+" and "-"."""

    seed: int = 2026
    num_train: int = 20000
    num_test: int = 500
    # the knobs chosen for Qwen2.5-Coder-0.5B-Instruct (held-out greedy pass@1 in 0.25-0.50 within a 128-token CoT;
    # docs/real_model.md says how they were chosen)
    min_steps: int = 3
    max_steps: int = 3
    digits: int = 2
    ops: str = "+-*/"

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"data.word_problems.min_steps={self.min_steps}, data.word_problems.max_steps={self.max_steps}: "
                "need 1 <= min_steps <= max_steps"
            )
        if not 1 <= self.digits <= 6:
            raise ValueError(f"data.word_problems.digits={self.digits}: must be in 1..6")
        if not self.ops or set(self.ops) - set(OPS):
            raise ValueError(f"data.word_problems.ops={self.ops!r}: must be a non-empty subset of {OPS!r}")
        if self.num_train < 0 or self.num_test < 0:
            raise ValueError(
                f"data.word_problems.num_train={self.num_train}, data.word_problems.num_test={self.num_test}: "
                "must be >= 0"
            )


@dataclass(frozen=True)
class WordProblem:
    question: str
    start: int
    steps: tuple[tuple[str, int], ...]  # (op, operand) in order
    answer: int


def solve(steps: tuple[tuple[str, int], ...], start: int) -> int:
    """The final count: the steps applied in order (exact; a split divides exactly).

    >>> solve((("+", 5), ("*", 3), ("/", 4), ("-", 2)), 7)
    7
    """
    value = start
    for op, k in steps:
        if op == "/":
            assert value % k == 0, (value, k)
            value //= k
        else:
            value = {"+": value + k, "-": value - k, "*": value * k}[op]
    return value


def _operand(rng: random.Random, op: str, value: int, hi: int) -> int | None:
    """An operand for `op` on the count `value`, or None when `op` cannot apply (nothing to lose, no divisor)."""
    if op == "+":
        return rng.randint(1, hi)
    if op == "-":
        return rng.randint(1, min(value - 1, hi)) if value > 1 else None
    if op == "*":
        return rng.randint(2, 9)
    divisors = [k for k in range(2, 10) if value % k == 0]
    return rng.choice(divisors) if divisors else None


def _problem(rng: random.Random, cfg: WordProblemConfig) -> WordProblem:
    hi = 10**cfg.digits - 1
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = rng.randint(max(2, 10 ** (cfg.digits - 1)), hi)
    value, steps, sentences = start, [], [f"{name} has {start} {item}."]
    for i in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        while True:
            op = rng.choice(cfg.ops)
            k = _operand(rng, op, value, hi)
            if k is not None:
                break
            if not set(cfg.ops) & set("+*"):  # only "-" / "/" and neither applies: stop early
                op = ""
                break
        if not op:
            break
        template = rng.choice({"+": GAIN, "-": LOSS, "*": TIMES, "/": SPLIT}[op])
        lead = "Then " if i else ""
        sentences.append(f"{lead}{name} {template.format(k=k, item=item)}.")
        steps.append((op, k))
        value = solve(((op, k),), value)
    sentences.append(f"How many {item} does {name} have now?")
    return WordProblem(" ".join(sentences), start, tuple(steps), value)


def make_word_problems(cfg: WordProblemConfig, split: str) -> list[WordProblem]:
    """The `split` ("train" or "test") of the task, deterministic for `cfg` (rl.synthetic.disjoint_split)."""
    return disjoint_split(lambda rng: _problem(rng, cfg), cfg.seed, cfg.num_train, cfg.num_test, split,
                          f"word_problems ({cfg})")  # fmt: skip
