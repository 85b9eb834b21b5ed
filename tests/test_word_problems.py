"""The word-problem task (rl/word_problems.py, `data=word_problems`): exact integer answers derived
independently from the question text, knobs honoured, deterministic, disjoint splits, loader wiring."""

from __future__ import annotations

import re

import pytest

from rl.data import DataConfig, load_problems
from rl.word_problems import GAIN, LOSS, SPLIT, TIMES, WordProblemConfig, make_word_problems

SMALL = WordProblemConfig(num_train=300, num_test=100)


def answer_from_text(question: str) -> int:
    """An independent reading of a question: its first sentence gives the start, each later sentence matches one
    of the four phrasings of an operation; the count is followed step by step (and must stay a whole number)."""
    sentences = [s.strip() for s in re.split(r"(?<=[.?])\s+", question) if s.strip()]
    value = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    for sentence in sentences[1:-1]:
        k = None
        for op, templates in (("+", GAIN), ("-", LOSS), ("*", TIMES), ("/", SPLIT)):
            for t in templates:
                pattern = re.escape(t).replace(r"\{k\}", r"(\d+)").replace(r"\{item\}", r"[a-z ]+")
                if m := re.search(pattern, sentence):
                    k, kind = int(m.group(1)), op
        assert k is not None, sentence
        if kind == "/":
            assert value % k == 0, (question, value, k)
            value //= k
        else:
            value = value + k if kind == "+" else value - k if kind == "-" else value * k
        assert value > 0, question
    assert sentences[-1].startswith("How many"), question
    return value


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_answer_is_the_question_worked_out(split: str) -> None:
    for p in make_word_problems(SMALL, split):
        assert p.answer == answer_from_text(p.question), p.question


def test_knobs_steps_digits_and_ops_are_honoured() -> None:
    cfg = WordProblemConfig(num_train=0, num_test=200, min_steps=3, max_steps=3, digits=3, ops="+-")
    problems = make_word_problems(cfg, "test")
    for p in problems:
        assert len(p.steps) == 3 and {op for op, _ in p.steps} <= {"+", "-"}
        assert 100 <= p.start <= 999 and all(k <= 999 for _, k in p.steps)
    # every op appears when all four are allowed
    ops = {op for p in make_word_problems(WordProblemConfig(num_test=200), "test") for op, _ in p.steps}
    assert ops == {"+", "-", "*", "/"}


def test_deterministic_disjoint_and_test_independent_of_num_train() -> None:
    a = make_word_problems(SMALL, "test")
    assert a == make_word_problems(WordProblemConfig(num_train=5, num_test=100), "test")
    train = make_word_problems(SMALL, "train")
    assert train == make_word_problems(SMALL, "train") and len(train) == 300
    assert not {p.question for p in a} & {p.question for p in train}
    assert make_word_problems(WordProblemConfig(num_test=100, seed=1), "test") != a


@pytest.mark.parametrize(
    ("key", "value"),
    [("min_steps", 0), ("max_steps", 0), ("digits", 0), ("ops", "+^"), ("ops", ""), ("num_test", -1)],
)
def test_bad_knobs_name_the_key(key: str, value) -> None:
    with pytest.raises(ValueError, match=f"data.word_problems.{key}"):
        WordProblemConfig(**{key: value})


def test_loader_serves_the_task_with_uids_and_string_golds() -> None:
    cfg = DataConfig(name="word_problems", word_problems=SMALL, limit=7)
    test = load_problems(cfg, "test")
    assert len(test) == 7 and test[3].uid == "word_problems-test-3" and test[0].source == "word_problems"
    first = make_word_problems(SMALL, "test")[0]
    assert test[0].question == first.question and test[0].answers == (str(first.answer),)
