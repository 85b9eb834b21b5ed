"""rl/ood.py and scripts/evaluate_ood.py: the three loaders on hand-written hub-shaped fixtures (tests/fixtures/ood/)
and their errors, the batched scorer against a one-sequence reference and against closed-form NLLs, the
metrics from hand-derived numbers, and the script end to end on the tiny base."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from rl.ood import (
    BENCHMARKS,
    ChoiceProblem,
    ChoiceScores,
    OodConfig,
    encode_problem,
    load_benchmark,
    reference_nll,
    score_problems,
    summarise,
)
from rl.tokenizer import build_char_tokenizer
from tests.arch import one_thread, tiny_causal_lm  # noqa: F401 (one_thread: a fixture)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "ood"

pytestmark = pytest.mark.usefixtures("one_thread")


def fixture(name: str) -> list[ChoiceProblem]:
    return load_benchmark(name, FIXTURES / f"{name}.jsonl")


# loaders ---------------------------------------------------------------------------------------------------------


def test_fixtures_load_with_their_gold_indices() -> None:
    hellaswag, arc, mmlu = fixture("hellaswag"), fixture("arc"), fixture("mmlu")
    # labels as written in the files: HellaSwag "0".."3", ARC letters (digits on row 2), MMLU ints
    assert [p.correct for p in hellaswag] == [0, 1, 2, 3, 0, 1]
    assert [p.correct for p in arc] == [0, 2, 1, 0, 3, 3]
    assert [p.correct for p in mmlu] == [2, 1, 2, 0, 3, 0]
    assert [len(p.choices) for p in hellaswag + mmlu] == [4] * 12
    assert [len(p.choices) for p in arc] == [4, 4, 4, 3, 5, 4]  # ARC has 3 to 5 choices
    assert (
        hellaswag[0].uid == "hellaswag-14" and arc[0].uid == "arc-Mercury_7012345" and mmlu[4].uid == "mmlu-4"
    )


def test_contexts_follow_the_documented_format() -> None:
    arc, mmlu, hellaswag = fixture("arc")[2], fixture("mmlu")[1], fixture("hellaswag")
    assert arc.context == "Question: Which process changes liquid water into water vapor?\nAnswer:"
    assert arc.choices[arc.correct] == "evaporation"  # answerKey "2" among labels "1".."4"
    assert mmlu.context == "Question: Which organ of the human body produces insulin?\nAnswer:"
    assert hellaswag[0].context == (
        "Washing dishes: A woman stands at a kitchen sink filled with soapy water and stacks of plates. she"
    )
    # WikiHow markup: " [title]" -> ". ", other tags dropped, double spaces closed, stripped
    assert hellaswag[2].context == (
        "Home and Garden: How to repot a houseplant. Choose a slightly larger pot. "
        "The new pot should be one or two inches wider than the old one."
    )
    assert hellaswag[2].choices[2] == (
        "Gently remove the plant from its old pot. Turn the pot on its side and ease the root ball out."
    )


def test_limit_keeps_the_first_problems() -> None:
    assert [p.uid for p in load_benchmark("mmlu", FIXTURES / "mmlu.jsonl", limit=2)] == ["mmlu-0", "mmlu-1"]


GOOD = {
    "hellaswag": {"ctx": "A man opens a door.", "endings": ["he walks in.", "it rains."], "label": "0"},
    "arc": {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"},
    "mmlu": {"question": "Q?", "choices": ["x", "y"], "answer": 1},
}


@pytest.mark.parametrize(
    ("name", "change", "key", "says"),
    [
        ("hellaswag", {"label": None}, "label", "missing"),
        ("hellaswag", {"label": ""}, "label", "split=validation"),
        ("hellaswag", {"label": "7"}, "label", "not a choice index"),
        ("hellaswag", {"endings": "he walks in."}, "endings", "list of at least 2"),
        ("arc", {"answerKey": "E"}, "answerKey", "not one of the choice labels"),
        ("arc", {"choices": ["x", "y"]}, "choices", "expected {'text'"),
        ("mmlu", {"answer": "1"}, "answer", "expected an int"),
        ("mmlu", {"question": None}, "question", "missing"),
    ],
)
def test_a_bad_row_is_named_by_file_line_and_key(tmp_path, name, change, key, says) -> None:
    bad = {k: v for k, v in {**GOOD[name], **change}.items() if v is not None}
    path = tmp_path / f"{name}.jsonl"
    # a good row, a blank line (not a row), the bad row: physical line 3, row 1
    path.write_text(json.dumps(GOOD[name]) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as err:
        load_benchmark(name, path)
    assert f"{path}: line 3 (row 1): key {key!r}" in str(err.value) and says in str(err.value)


def test_file_errors_are_named(tmp_path) -> None:
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps(GOOD["mmlu"]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"mmlu.jsonl: line 2 \(row 1\): invalid JSON"):
        load_benchmark("mmlu", path)
    with pytest.raises(ValueError, match="does not exist"):
        load_benchmark("mmlu", tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown benchmark 'piqa'"):
        load_benchmark("piqa", path)


def test_hub_rows_come_from_datasets_with_the_benchmark_config(monkeypatch) -> None:
    calls = []

    def load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [GOOD["mmlu"], {**GOOD["mmlu"], "answer": 9}]

    monkeypatch.setitem(sys.modules, "datasets", ModuleType("datasets"))
    monkeypatch.setattr(sys.modules["datasets"], "load_dataset", load_dataset, raising=False)
    assert len(load_benchmark("mmlu", limit=1)) == 1
    with pytest.raises(ValueError, match=r"cais/mmlu \(all, split test\): row 1: key 'answer': 9 is not"):
        load_benchmark("mmlu")
    assert calls == [("cais/mmlu", "all", "test")] * 2
    assert (BENCHMARKS["hellaswag"].hub_id, BENCHMARKS["hellaswag"].split) == (
        "Rowan/hellaswag",
        "validation",
    )
    assert BENCHMARKS["arc"].hub_config == "ARC-Challenge"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"models": []}, "models=[]"),
        ({"models": ["tiny", "tiny"]}, "labels="),
        ({"models": ["a", "b"], "labels": ["x"]}, "labels=['x']"),
        ({"models": ["a"], "benchmarks": ["piqa"]}, "benchmarks=['piqa']"),
        ({"models": ["a"], "path": "all.jsonl"}, "path='all.jsonl'"),
        ({"models": ["a"], "limit": 0}, "limit=0"),
        ({"models": ["a"], "batch_size": 0}, "batch_size=0"),
        ({"models": ["a"], "dtype": "fp8"}, "dtype='fp8'"),
        ({"models": ["out"], "output_dir": "out"}, "output_dir='out'"),
    ],
)
def test_config_errors_name_the_key(kwargs, key) -> None:
    with pytest.raises(ValueError) as err:
        OodConfig(**kwargs)
    assert key in str(err.value)


# scoring ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_char_tokenizer()


def test_encoding_splits_context_and_continuation(char_tokenizer) -> None:
    problem = fixture("arc")[0]
    enc = encode_problem(char_tokenizer, problem)
    for seq, n, choice in zip(enc.sequences, enc.continuation_lengths, problem.choices, strict=True):
        assert char_tokenizer.decode(seq[:-n]) == problem.context
        assert char_tokenizer.decode(seq[-n:]) == f" {choice}"
    bos = encode_problem(char_tokenizer, problem, add_bos=True)
    assert bos.sequences[0] == [char_tokenizer.bos_token_id, *enc.sequences[0]]
    chat = encode_problem(char_tokenizer, problem, chat_template=True)
    seq, n = chat.sequences[0], chat.continuation_lengths[0]
    assert char_tokenizer.decode(seq[:-n]) == f"<s>Q: {problem.context}\nA: "  # rl/tokenizer.py's template
    assert char_tokenizer.decode(seq[-n:]) == problem.choices[0]


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("qwen2", False)])
def test_batched_scores_equal_one_forward_per_choice(char_tokenizer, arch, tied) -> None:
    model = tiny_causal_lm(arch, tied, vocab_size=len(char_tokenizer))
    problems = fixture("hellaswag")[:3] + fixture("arc")[:3] + fixture("mmlu")[:3]
    # batch_size=5: problems of different lengths and choice counts share a forward, padded to the longest
    for batch_size in (5, 64):
        scores = score_problems(model, char_tokenizer, problems, batch_size=batch_size, progress=False)
        for problem, score in zip(problems, scores, strict=True):
            enc = encode_problem(char_tokenizer, problem)
            want = [
                reference_nll(model, s, n)
                for s, n in zip(enc.sequences, enc.continuation_lengths, strict=True)
            ]
            assert score.nll == pytest.approx(want, rel=1e-4), (problem.uid, batch_size)
            assert score.tokens == [len(c) + 1 for c in problem.choices]  # characters, plus the space


class UnigramLM(torch.nn.Module):
    """Every position predicts the same distribution `logp` [V], whatever the input: a continuation's NLL is then
    the sum of -logp over its tokens, which the test can write down."""

    def __init__(self, logp: torch.Tensor, max_positions: int | None = None) -> None:
        super().__init__()
        self.logp = torch.nn.Parameter(logp)
        self.config = SimpleNamespace(max_position_embeddings=max_positions)

    def forward(self, input_ids, logits_to_keep=0, **_):
        keep = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.logp.expand(input_ids.shape[0], keep, -1))


def unigram(tokenizer, max_positions: int | None = None) -> UnigramLM:
    """p('a') = 1/2, every other token 1 / (2 (V - 1))."""
    v = len(tokenizer)
    p = torch.full((v,), 1 / (2 * (v - 1)))
    p[tokenizer.convert_tokens_to_ids("a")] = 0.5
    return UnigramLM(p.log(), max_positions).eval()


def test_accuracy_and_nll_from_closed_form_scores(char_tokenizer) -> None:
    model = unigram(char_tokenizer)
    rare, half = math.log(2 * (len(char_tokenizer) - 1)), math.log(2)  # -log p of "other" (~6.57) and of "a"
    a20 = "a" * 20
    problems = [
        ChoiceProblem("p0", "Pick one:", ["aaaa", "ab", "b"], 0),
        ChoiceProblem("p1", "Pick one:", ["b", a20], 1),
        ChoiceProblem("p2", "Pick one:", ["b", "ab"], 0),
    ]
    # continuations " aaaa", " ab", " b", " " + 20 a's: the space and "b" are rare tokens, each "a" costs log 2
    nll = {"aaaa": rare + 4 * half, "ab": 2 * rare + half, "b": 2 * rare, a20: rare + 20 * half}
    scores = score_problems(model, char_tokenizer, problems, batch_size=2, progress=False)
    for problem, score in zip(problems, scores, strict=True):
        assert score.nll == pytest.approx([nll[c] for c in problem.choices], rel=1e-5)
    # per token: p0 aaaa 1.87 < ab 4.61 < b 6.57 (right); p1 a20 0.97 < b 6.57 (right); p2 ab 4.61 < b 6.57
    # (wrong). Summed: p0 aaaa 9.34 (right); p1 b 13.14 < a20 20.4 (wrong); p2 b 13.14 < ab 13.83 (right).
    result = summarise("toy", "unigram", scores)
    assert result.accuracy == pytest.approx(2 / 3) and result.accuracy_sum == pytest.approx(2 / 3)
    correct_per_token = [nll["aaaa"] / 5, nll[a20] / 21, nll["b"] / 2]
    assert result.nll_per_token == pytest.approx(sum(correct_per_token) / 3, rel=1e-5)
    assert (result.problems, result.truncated) == (3, 0)


def test_long_context_is_cut_from_the_left(char_tokenizer) -> None:
    model = unigram(char_tokenizer, max_positions=8)
    problem = ChoiceProblem("long", "x" * 40, ["aa", "b"], 0)
    (score,) = score_problems(model, char_tokenizer, [problem], progress=False)
    assert score.truncated and score.tokens == [3, 2]
    # the continuation is kept whole: its NLL is the untruncated one (context-free under this model)
    (whole,) = score_problems(unigram(char_tokenizer), char_tokenizer, [problem], progress=False)
    assert score.nll == pytest.approx(whole.nll) and not whole.truncated
    enc = encode_problem(char_tokenizer, problem, max_length=8)
    assert [len(s) for s in enc.sequences] == [8, 8] and enc.truncated
    with pytest.raises(ValueError, match="long: choice 'aaaaaaaa' is 9 tokens"):
        score_problems(
            model, char_tokenizer, [ChoiceProblem("long", "x", ["aaaaaaaa", "b"], 0)], progress=False
        )


def test_summarise_ties_go_to_the_first_choice() -> None:
    # per token: [2/2, 3/3] tie -> choice 0 (correct); summed 2 < 3 -> choice 0 too. Correct per token 1.0.
    # second problem: per token [4/2, 3/1] -> 0 (wrong, correct is 1, per token 3.0); summed 3 < 4 -> 1 (right)
    scores = [
        ChoiceScores("t", 0, [2.0, 3.0], [2, 3], False),
        ChoiceScores("u", 1, [4.0, 3.0], [2, 1], False),
    ]
    result = summarise("toy", "m", scores)
    assert (result.accuracy, result.accuracy_sum, result.nll_per_token) == (0.5, 1.0, 2.0)


# the script --------------------------------------------------------------------------------------------------------


def test_script_puts_two_models_side_by_side(tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "ood"
    done = subprocess.run(
        [sys.executable, "scripts/evaluate_ood.py", f"models=[{tiny_base},{tiny_base}]", "labels=[base,trained]",
         f"path='{FIXTURES}/{{benchmark}}.jsonl'", "limit=4", "batch_size=8", f"output_dir={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"] == ["hellaswag", "arc", "mmlu"]
    assert summary["models"] == {"base": str(tiny_base), "trained": str(tiny_base)}
    results = {(r["benchmark"], r["model"]): r for r in summary["results"]}
    assert len(results) == 6
    for bench in summary["benchmarks"]:
        base, trained = results[bench, "base"], results[bench, "trained"]
        assert {k: v for k, v in base.items() if k != "model"} == {
            k: v for k, v in trained.items() if k != "model"
        }
        assert base["problems"] == 4
    # the summary is what the per-problem scores say
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 4
    for (bench, model), result in results.items():
        mine = [ChoiceScores(r["uid"], r["correct"], r["nll"], r["tokens"], r["truncated"]) for r in rows
                if (r["benchmark"], r["model"]) == (bench, model)]  # fmt: skip
        assert summarise(bench, model, mine).__dict__ == result
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| benchmark | n | base acc | base NLL/token | trained acc |")
    assert table in done.stdout + "\n"
    assert (out / ".hydra" / "config.yaml").is_file()
