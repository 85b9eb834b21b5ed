"""Problem loading: the real offline benchmark files, hand-written fixtures for the training sets, the hub
path (with `datasets.load_dataset` replaced), malformed rows, and the synthetic task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rl.data import DATASETS, DataConfig, Problem, load_problems
from rl.synthetic import SyntheticConfig, make_examples

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----- the real files in ../shared/data -----


# Row counts from the shared data README (and `wc -l`): the official splits' sizes.
@pytest.mark.parametrize(
    ("name", "file", "split", "count"),
    [
        ("gsm8k", "gsm8k_test.jsonl", "test", 1319),
        ("gsm8k", "gsm8k_train.jsonl", "train", 7473),
        ("math500", "math500_test.jsonl", "test", 500),
        ("olympiadbench", "olympiadbench_test.jsonl", "test", 675),
    ],
)
def test_shared_files_row_counts(shared_data: Path, name: str, file: str, split: str, count: int) -> None:
    problems = load_problems(DataConfig(name=name, path=str(shared_data / file)), split)
    assert len(problems) == count
    assert len({p.uid for p in problems}) == count
    assert all(p.source == name and p.answers and all(p.answers) for p in problems)


def test_gsm8k_golds_as_written(shared_data: Path) -> None:
    problems = load_problems(DataConfig(name="gsm8k", path=str(shared_data / "gsm8k_test.jsonl")), "test")
    # Row 0 (Janet's ducks): 16 - 3 - 4 = 9 eggs sold at $2 -> 18; its solution ends "#### 18".
    assert problems[0].answers == ("18",)
    assert problems[0].question.startswith("Janet")
    assert problems[0].uid == "gsm8k-test-0"
    # Row 146 (Johnny's legos): 500 + 3*500 + 500/4 = 2125, written "#### 2,125": the comma must survive.
    assert problems[146].answers == ("2,125",)


def test_math500_gold_and_own_uid(shared_data: Path) -> None:
    problems = load_problems(DataConfig(name="math500", path=str(shared_data / "math500_test.jsonl")), "test")
    # Row 0: the point (0,3) in polar coordinates is r = 3 at angle pi/2.
    assert problems[0].answers == (r"\left( 3, \frac{\pi}{2} \right)",)
    assert problems[0].uid == "math500-test/precalculus/807.json"


def test_olympiadbench_gold_and_own_uid(shared_data: Path) -> None:
    cfg = DataConfig(name="olympiadbench", path=str(shared_data / "olympiadbench_test.jsonl"))
    problems = load_problems(cfg, "test")
    # Row 0 (id 1606, Xenia and Sergey): the file's final_answer is ["2"].
    assert problems[0].uid == "olympiadbench-1606"
    assert problems[0].answers == ("2",)


def test_split_placeholder_in_path(shared_data: Path) -> None:
    cfg = DataConfig(name="gsm8k", path=str(shared_data / "gsm8k_{split}.jsonl"))
    assert len(load_problems(cfg, "train")) == 7473
    assert len(load_problems(cfg, "test")) == 1319


def test_limit_keeps_first_rows(shared_data: Path) -> None:
    path = str(shared_data / "gsm8k_test.jsonl")
    full = load_problems(DataConfig(name="gsm8k", path=path), "test")
    assert load_problems(DataConfig(name="gsm8k", path=path, limit=5), "test") == full[:5]
    assert load_problems(DataConfig(name="gsm8k", path=path, limit=0), "test") == []


# ----- hand-written fixtures for the training sets -----


def test_math_train_fixture_last_boxed() -> None:
    problems = load_problems(DataConfig(name="math", path=str(FIXTURES / "math_train.jsonl")), "train")
    # Read off the fixture by eye: the last \boxed{...} of each solution, nested braces kept whole.
    assert [p.answers for p in problems] == [(r"\frac{5}{6}",), ("2",), (r"5\sqrt{2}",), ("(-1, 1)",)]
    assert problems[0].question == r"What is $\frac{1}{2} + \frac{1}{3}$?"
    assert [p.uid for p in problems] == [f"math-train-{i}" for i in range(4)]


def test_deepscaler_fixture() -> None:
    problems = load_problems(
        DataConfig(name="deepscaler", path=str(FIXTURES / "deepscaler_train.jsonl")), "train"
    )
    assert [p.answers for p in problems] == [("24",), ("10",), ("720",)]
    assert [p.uid for p in problems] == ["deepscaler-train-0", "deepscaler-train-1", "deepscaler-train-2"]


def test_parquet_and_json_match_jsonl(tmp_path: Path) -> None:
    source = FIXTURES / "deepscaler_train.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ds.parquet")
    (tmp_path / "ds.json").write_text(json.dumps(rows))
    expected = load_problems(DataConfig(name="deepscaler", path=str(source)), "train")
    for file in ("ds.parquet", "ds.json"):
        assert load_problems(DataConfig(name="deepscaler", path=str(tmp_path / file)), "train") == expected


# ----- the hub path, with datasets.load_dataset replaced -----

HUB_ROWS: dict[str, list[dict[str, Any]]] = {
    "gsm8k": [{"question": "Q?", "answer": "1+1=2\n#### 2"}],
    "math500": [{"problem": "P?", "answer": "3", "unique_id": "test/algebra/1.json"}],
    "olympiadbench": [{"id": 7, "question": "O?", "final_answer": ["4"], "context": None}],
    "math": [{"problem": "M?", "solution": r"so \boxed{5}", "level": "Level 1", "type": "Algebra"}],
    "deepscaler": [{"problem": "D?", "answer": "6", "solution": "..."}],
}


class FakeHub:
    """Stands in for `datasets.load_dataset`: records each call and serves `rows`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None, str]] = []
        self.rows: list[dict[str, Any]] = []

    def __call__(self, path: str, name: str | None = None, *, split: str) -> datasets.Dataset:
        self.calls.append((path, name, split))
        return datasets.Dataset.from_list(self.rows)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    hub = FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    return hub


@pytest.mark.parametrize(
    ("name", "split", "call", "uid", "answers"),
    [
        ("gsm8k", "test", ("openai/gsm8k", "main", "test"), "gsm8k-test-0", ("2",)),
        ("math500", "test", ("HuggingFaceH4/MATH-500", None, "test"), "math500-test/algebra/1.json", ("3",)),
        # OlympiadBench's hub config has only a `train` split, which is the evaluation set.
        (
            "olympiadbench",
            "test",
            ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train"),
            "olympiadbench-7",
            ("4",),
        ),
        ("math", "train", ("DigitalLearningGmbH/MATH-lighteval", None, "train"), "math-train-0", ("5",)),
        (
            "deepscaler",
            "train",
            ("agentica-org/DeepScaleR-Preview-Dataset", None, "train"),
            "deepscaler-train-0",
            ("6",),
        ),
    ],
)
def test_hub_ids(fake_hub: FakeHub, name: str, split: str, call: tuple, uid: str, answers: tuple) -> None:
    fake_hub.rows = HUB_ROWS[name]
    problems = load_problems(DataConfig(name=name), split)
    assert fake_hub.calls == [call]
    row = HUB_ROWS[name][0]
    question = row["question"] if "question" in row else row["problem"]
    assert problems == [Problem(uid=uid, question=question, answers=answers, source=name)]


def test_hub_override_uses_given_id_config_and_split(fake_hub: FakeHub) -> None:
    fake_hub.rows = HUB_ROWS["olympiadbench"]
    cfg = DataConfig(name="olympiadbench", hub_id="me/olympiad-copy", hub_config="en")
    load_problems(cfg, "test")
    # The default's config and split mapping belong to the default id, so neither carries over.
    assert fake_hub.calls == [("me/olympiad-copy", "en", "test")]


def test_hub_olympiadbench_shapes_normalised(fake_hub: FakeHub) -> None:
    # One Arrow column has one type, so each shape of `final_answer` is its own (mirror of the) dataset.
    fake_hub.rows = [{"id": 1, "question": "How many?", "final_answer": "3", "context": "Setup."}]
    (bare,) = load_problems(DataConfig(name="olympiadbench"), "test")
    assert bare.answers == ("3",)  # a bare string is wrapped
    assert bare.question == "Setup.\nHow many?"  # the shared context comes first
    fake_hub.rows = [{"id": 2, "question": "Which?", "final_answer": ["$x=1$", "$x=2$"], "context": None}]
    (listed,) = load_problems(DataConfig(name="olympiadbench"), "test")
    assert listed.answers == ("$x=1$", "$x=2$")
    assert listed.question == "Which?"


def test_hub_malformed_row_names_hub_id(fake_hub: FakeHub) -> None:
    fake_hub.rows = [{"question": "Q?", "answer": "#### 1"}, {"question": "Q?", "answer": "no marker"}]
    with pytest.raises(ValueError, match=r"openai/gsm8k .*row 1: key 'answer'.*####"):
        load_problems(DataConfig(name="gsm8k"), "train")


# ----- malformed files -----


@pytest.mark.parametrize(
    ("name", "bad_row", "key"),
    [
        ("gsm8k", {"question": "Q?"}, "answer"),
        ("gsm8k", {"question": "Q?", "answer": "2"}, "answer"),  # no ####
        ("gsm8k", {"question": "Q?", "answer": "#### "}, "answer"),  # nothing after ####
        ("gsm8k", {"question": "  ", "answer": "#### 2"}, "question"),
        ("math500", {"problem": "P?", "answer": 3}, "answer"),  # wrong type
        ("olympiadbench", {"question": "O?", "final_answer": []}, "final_answer"),
        ("olympiadbench", {"question": "O?", "final_answer": [5]}, "final_answer"),
        ("math", {"problem": "M?", "solution": r"\boxed{5"}, "solution"),  # unclosed box
        ("deepscaler", {"problem": "", "answer": "1"}, "problem"),
        ("synthetic", {"question": "S?", "answer": "7"}, "answer"),  # must be an int
    ],
)
def test_malformed_row_names_file_row_and_key(tmp_path: Path, name: str, bad_row: dict, key: str) -> None:
    good = {
        "gsm8k": {"question": "Q?", "answer": "#### 1"},
        "math500": {"problem": "P?", "answer": "1"},
        "olympiadbench": {"question": "O?", "final_answer": ["1"]},
        "math": {"problem": "M?", "solution": r"\boxed{1}"},
        "deepscaler": {"problem": "D?", "answer": "1"},
        "synthetic": {"question": "S?", "answer": 1},
    }[name]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad_row])
    with pytest.raises(ValueError) as info:
        load_problems(DataConfig(name=name, path=str(path)), "train")
    message = str(info.value)
    assert str(path) in message and "row 2" in message and repr(key) in message


def test_malformed_row_beyond_limit_is_not_read(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "P?", "answer": "1"}, {"problem": "P?"}])
    assert len(load_problems(DataConfig(name="deepscaler", path=str(path), limit=1), "train")) == 1


def test_non_object_row_and_bad_json(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "P?", "answer": "1"}, ["P?", "1"]])
    with pytest.raises(ValueError, match=r"row 1: expected an object"):
        load_problems(DataConfig(name="deepscaler", path=str(path)), "train")
    path.write_text('{"problem": "P?", "answer": "1"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"line 2 \(row 1\): invalid JSON"):
        load_problems(DataConfig(name="deepscaler", path=str(path)), "train")
    (tmp_path / "d.json").write_text('{"problem": "P?"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_problems(DataConfig(name="deepscaler", path=str(tmp_path / "d.json")), "train")


# Line 3 of each file holds "é?" then 0xff, a byte that never occurs in UTF-8. The column counts characters:
# `{"problem": "é?` is 15 of them (16 bytes), so the bad byte is at column 16; the .json file's line 3 opens
# with one more space (column 17).
_BAD_UTF8 = "é?".encode() + b"\xff"


@pytest.mark.parametrize(
    ("file", "content", "where"),
    [
        (
            "d.jsonl",
            b'{"problem": "P?", "answer": "1"}\n\n{"problem": "' + _BAD_UTF8 + b'", "answer": "2"}\n',
            "line 3 is not valid UTF-8 (byte 0xff at column 16)",
        ),
        (
            "d.json",
            b'[\n {"problem": "P?", "answer": "1"},\n {"problem": "' + _BAD_UTF8 + b'", "answer": "2"}\n]',
            "line 3 is not valid UTF-8 (byte 0xff at column 17)",
        ),
    ],
    ids=["jsonl", "json"],
)
def test_bad_utf8_names_file_and_line(tmp_path: Path, file: str, content: bytes, where: str) -> None:
    path = tmp_path / file
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_problems(DataConfig(name="deepscaler", path=str(path)), "train")
    assert info.type is ValueError  # not a bare UnicodeDecodeError (a ValueError subclass)
    assert str(info.value) == f"{path}: {where}"


def test_bad_utf8_in_parquet_names_row_and_column(tmp_path: Path) -> None:
    # pyarrow writes a string column without checking it, so the raw bytes can be placed in one by hand.
    problems = pa.Array.from_buffers(pa.string(), 2, pa.array([b"P?", _BAD_UTF8]).buffers())
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": problems, "answer": ["1", "2"]}), path)
    with pytest.raises(ValueError) as info:
        load_problems(DataConfig(name="deepscaler", path=str(path)), "train")
    assert info.type is ValueError
    # "é?" is 2 characters, so 0xff is the 3rd.
    assert str(info.value) == f"{path}: row 1, column 'problem' is not valid UTF-8 (byte 0xff at character 3)"


def test_missing_file_and_bad_suffix_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        load_problems(DataConfig(name="gsm8k", path=str(missing)), "test")
    csv = tmp_path / "rows.csv"
    csv.write_text("question,answer\n")
    with pytest.raises(ValueError, match=rf"{csv}.*unsupported suffix '.csv'"):
        load_problems(DataConfig(name="gsm8k", path=str(csv)), "test")


def test_duplicate_own_ids_are_rejected(tmp_path: Path) -> None:
    row = {"id": 3, "question": "O?", "final_answer": ["1"]}
    path = write_jsonl(tmp_path / "o.jsonl", [row, row])
    with pytest.raises(ValueError, match=r"row 1: duplicate uid 'olympiadbench-3'"):
        load_problems(DataConfig(name="olympiadbench", path=str(path)), "test")


def test_unknown_dataset_lists_known() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'") as info:
        load_problems(DataConfig(name="gsm9k"), "test")
    assert all(name in str(info.value) for name in DATASETS)


# ----- synthetic -----


def test_synthetic_counts_uids_and_disjoint_splits() -> None:
    syn = SyntheticConfig(num_train=40, num_test=12)
    cfg = DataConfig(name="synthetic", synthetic=syn)
    train, test = load_problems(cfg, "train"), load_problems(cfg, "test")
    assert (len(train), len(test)) == (40, 12)
    assert not {p.question for p in train} & {p.question for p in test}
    # The answers are the generator's own integers, written as decimal strings, in the generator's order.
    assert [p.answers for p in test] == [(str(e.answer),) for e in make_examples(syn, "test")]
    assert test[5].uid == "synthetic-test-5" and train[17].uid == "synthetic-train-17"
    assert len(load_problems(DataConfig(name="synthetic", synthetic=syn, limit=3), "test")) == 3
