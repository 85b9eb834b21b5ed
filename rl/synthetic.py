"""Procedurally generated multi-step arithmetic word problems with step-by-step solutions.

The embedded default's data and the fast test bed: a character-level model can learn the format and some
of the arithmetic, so RL has both signal and room. Train and test splits are disjoint by question text.

>>> ex = make_examples(SyntheticConfig(num_train=4, num_test=2), "test")[0]
>>> ex.answer == eval(ex.steps[-1].split("=")[0].replace("x", "*"))
True
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

NAMES = (
    "Ann",
    "Ben",
    "Cal",
    "Dee",
    "Eli",
    "Fay",
    "Gus",
    "Ivy",
    "Jon",
    "Kim",
    "Lea",
    "Max",
    "Ned",
    "Ola",
    "Pam",
    "Rex",
)
ITEMS = ("apples", "coins", "cards", "books", "shells", "pens", "stamps", "marbles", "eggs", "beads")
ADD_VERBS = ("gets", "buys", "finds", "wins")
SUB_VERBS = ("gives away", "loses", "sells", "uses")


@dataclass
class SyntheticConfig:
    """Knobs of the synthetic task. `ops` is a subset of "+-x"."""

    seed: int = 1234
    num_train: int = 20000
    num_test: int = 500
    min_steps: int = 1
    max_steps: int = 3
    max_digits: int = 1
    ops: str = "+-"

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"synthetic.min_steps={self.min_steps}, max_steps={self.max_steps}: need 1 <= min <= max"
            )
        if self.max_digits < 1:
            raise ValueError(f"synthetic.max_digits={self.max_digits}: must be >= 1")
        if not self.ops or set(self.ops) - set("+-x"):
            raise ValueError(f"synthetic.ops={self.ops!r}: must be a non-empty subset of '+-x'")


@dataclass(frozen=True)
class SyntheticExample:
    question: str
    steps: tuple[str, ...]  # e.g. ("23+14=37", "37-9=28")
    answer: int

    @property
    def cot(self) -> str:
        """The chain of thought: one equation per line."""
        return "\n".join(self.steps)

    @property
    def final(self) -> str:
        """The answer phase text."""
        return f"\\boxed{{{self.answer}}}"


def _example(rng: random.Random, cfg: SyntheticConfig) -> SyntheticExample:
    hi = 10**cfg.max_digits - 1
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, hi)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for i in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        op = rng.choice(cfg.ops)
        if op == "-" and value == 0:
            op = "+"
        lead = "Then " if i else ""
        if op == "+":
            k = rng.randint(1, hi)
            verb = rng.choice(ADD_VERBS)
            sentences.append(f"{lead}{name} {verb} {k} more.")
            new = value + k
        elif op == "-":
            k = rng.randint(1, min(value, hi))
            verb = rng.choice(SUB_VERBS)
            sentences.append(f"{lead}{name} {verb} {k}.")
            new = value - k
        else:
            k = rng.randint(2, 9)
            sentences.append(f"{lead}the {item} are multiplied by {k}.")
            new = value * k
        steps.append(f"{value}{op}{k}={new}")
        value = new
    sentences.append(f"How many {item} does {name} have?")
    question = " ".join(s[0].upper() + s[1:] for s in sentences)
    return SyntheticExample(question=question, steps=tuple(steps), answer=value)


def make_examples(cfg: SyntheticConfig, split: str) -> list[SyntheticExample]:
    """The `split` ("train" or "test") of the task, deterministic for `cfg`. Test questions never occur in
    train; the test split does not depend on `num_train`."""
    return disjoint_split(lambda rng: _example(rng, cfg), cfg.seed, cfg.num_train, cfg.num_test, split,
                          f"synthetic task ({cfg})")  # fmt: skip


T = TypeVar("T")


def disjoint_split(
    draw: Callable[[random.Random], T], seed: object, num_train: int, num_test: int, split: str, what: str
) -> list[T]:
    """The `split` of a generated task whose items (with a `.question`) come from `draw`: `num_test` distinct
    test items from the seed `f"{seed}-test"`, then `num_train` distinct train items from `f"{seed}-train"`
    with no test question among them (so the test split does not depend on `num_train`)."""
    if split not in ("train", "test"):
        raise ValueError(f"{what}: split {split!r}: expected 'train' or 'test'")
    test = _unique(random.Random(f"{seed}-test"), draw, num_test, set(), what)
    if split == "test":
        return test
    return _unique(random.Random(f"{seed}-train"), draw, num_train, {e.question for e in test}, what)


def _unique(
    rng: random.Random, draw: Callable[[random.Random], T], n: int, exclude: set[str], what: str
) -> list[T]:
    seen, out = set(exclude), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"{what}: cannot draw {n} distinct problems; widen the knobs")
        ex = draw(rng)
        if ex.question not in seen:
            seen.add(ex.question)
            out.append(ex)
    return out
