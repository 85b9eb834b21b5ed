"""Math problems with gold final answers: GSM8K, MATH-500, OlympiadBench, MATH train, DeepScaleR, the
synthetic arithmetic task and the word-problem task, from a hub id (through `datasets`) or a local JSON / JSONL /
Parquet file.

`load_problems(cfg, split)` is the one entry point. Each dataset is a `_Source` in `SOURCES`: where it
lives on the hub and a small row parser that turns one raw row into (question, gold answers). Rows come
from, in order of precedence: `cfg.path` (a local file), the generator (`synthetic`, `word_problems`), or
`datasets.load_dataset(hub_id, hub_config, split=...)`.

| name | hub id (config) | split(s) | question | gold |
|---|---|---|---|---|
| gsm8k | openai/gsm8k (main) | train, test | `question` | text after `####` in `answer`, as written (`1,450,000`) |
| math500 | HuggingFaceH4/MATH-500 | test | `problem` | `answer` |
| olympiadbench | Hothan/OlympiadBench (OE_TO_maths_en_COMP) | test (hub split `train`) | `question` | every string of `final_answer` |
| math | DigitalLearningGmbH/MATH-lighteval | train, test | `problem` | last `\\boxed{...}` of `solution` (by `rewards.extract.last_boxed`) |
| deepscaler | agentica-org/DeepScaleR-Preview-Dataset | train | `problem` | `answer` |
| synthetic | (generated, `rl.synthetic`) | train, test | question | the integer answer |
| word_problems | (generated, `rl.word_problems`) | train, test | question | the integer answer |

Notes on the choices:
- OlympiadBench: the config holds the 675 open-ended, text-only, English, competition maths problems (the
  set Qwen2.5-Math and the paper evaluate on); the hub stores them under its only split, `train`, so our
  `test` is mapped to it. `final_answer` is a list of strings on the hub and in the Qwen2.5-Math file; a
  bare string is accepted and wrapped, so both shapes give a tuple of answers. A non-null `context`
  (shared setup of multi-part problems) is prepended to the question, since the question alone can be
  unanswerable without it.
- MATH train: MATH-lighteval holds all seven subjects in one default config (EleutherAI/hendrycks_math
  needs one config per subject). Its train split is the original 7,500-problem MATH train, which is
  disjoint from MATH-500 (drawn from MATH test).
- Golds are kept as written (stripped of surrounding whitespace only): normalising them is the reward's job,
  and doing it twice would hide disagreements.

Local files are read plainly (json / pyarrow) rather than through `datasets.load_dataset("json")`: errors
can then name the file and row, there is no cache written next to the user's home, and Arrow's schema
inference (which fails on rows whose fields change type, e.g. a null `context` next to a string one) never
runs. A `{split}` in `cfg.path` is replaced by the split name, so one config can name both splits
(`data/gsm8k_{split}.jsonl`); a path without it serves every split from the same file. Bytes that are not
UTF-8 are reported with the file and line (JSON, JSONL) or row and column (Parquet) where they sit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from rewards.extract import gsm8k_gold, last_boxed
from rl.synthetic import SyntheticConfig, make_examples
from rl.word_problems import WordProblemConfig, make_word_problems

DATASETS = ("synthetic", "word_problems", "gsm8k", "math500", "olympiadbench", "math", "deepscaler")


@dataclass(frozen=True)
class Problem:
    """One problem. `answers` holds every acceptable gold final answer (any one is correct)."""

    uid: str
    question: str
    answers: tuple[str, ...]
    source: str


@dataclass
class DataConfig:
    """Which problems to train and evaluate on. `path` (a local file) overrides the hub id.

    `path` may contain `{split}`, replaced by the split being loaded (see the module docstring)."""

    name: str = "synthetic"
    path: str | None = None
    hub_id: str | None = None  # None = the dataset's usual hub id
    hub_config: str | None = None  # None = the dataset's usual config (only used when hub_id is None too)
    train_split: str = "train"
    eval_split: str = "test"
    limit: int | None = None  # keep the first `limit` problems of a split (None = all)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    word_problems: WordProblemConfig = field(default_factory=WordProblemConfig)


class BadRow(ValueError):
    """A row parser's complaint; `load_problems` adds the origin (file or hub id) and the row index."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"key {key!r}: {problem}")
        self.key = key


def row_value(row: Mapping[str, Any], key: str) -> Any:
    """`row[key]`, or a `BadRow` naming the key and the keys the row has."""
    if key not in row:
        raise BadRow(key, f"missing (row has keys {sorted(row)})")
    return row[key]


def row_text(row: Mapping[str, Any], key: str) -> str:
    """The non-empty string at `row[key]`, stripped."""
    value = row_value(row, key)
    if not isinstance(value, str):
        raise BadRow(key, f"expected a string, got {type(value).__name__} {value!r:.80}")
    if not value.strip():
        raise BadRow(key, "empty")
    return value.strip()


# Row parsers: raw row -> (question, gold answers). One per dataset; they raise BadRow.
RowParser = Callable[[Mapping[str, Any]], tuple[str, tuple[str, ...]]]


def _parse_gsm8k(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    try:
        gold = gsm8k_gold(row_text(row, "answer"))
    except ValueError as err:  # no '####' marker
        raise BadRow("answer", str(err)) from None
    if not gold:
        raise BadRow("answer", "nothing after '####'")
    return row_text(row, "question"), (gold,)


def _parse_problem_answer(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    return row_text(row, "problem"), (row_text(row, "answer"),)


def _parse_olympiadbench(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    question = row_text(row, "question")
    context = row.get("context")  # optional in the schema: absent and null both mean "no shared setup"
    if isinstance(context, str) and context.strip():
        question = f"{context.strip()}\n{question}"
    if "final_answer" not in row:
        raise BadRow("final_answer", f"missing (row has keys {sorted(row)})")
    raw = row["final_answer"]
    answers = [raw] if isinstance(raw, str) else raw
    if not isinstance(answers, list | tuple) or not answers:
        raise BadRow("final_answer", f"expected a non-empty list of strings, got {raw!r:.80}")
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise BadRow("final_answer", f"expected non-empty strings, got {raw!r:.80}")
    return question, tuple(a.strip() for a in answers)


def _parse_math_solution(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    solution = row_text(row, "solution")
    gold = last_boxed(solution)
    if gold is None or not gold.strip():
        raise BadRow("solution", f"its last \\boxed{{...}} is missing, unclosed or empty: {solution[-80:]!r}")
    return row_text(row, "problem"), (gold.strip(),)


def _parse_synthetic(row: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise BadRow("answer", f"expected an int, got {answer!r:.80}")
    return row_text(row, "question"), (str(answer),)


@dataclass(frozen=True)
class _Source:
    """Where a dataset lives and how to read one row."""

    parse: RowParser
    hub_id: str | None = None
    hub_config: str | None = None
    # Our split name -> the hub's, where they differ.
    hub_splits: Mapping[str, str] = field(default_factory=dict)
    id_key: str | None = None  # the dataset's own stable row id, used in the uid when present
    # a generated dataset: (config, split) -> raw rows (no hub home)
    generate: Callable[[DataConfig, str], Iterable[Mapping[str, Any]]] | None = None


def _synthetic_rows(cfg: DataConfig, split: str) -> Iterable[Mapping[str, Any]]:
    return ({"question": e.question, "answer": e.answer} for e in make_examples(cfg.synthetic, split))


def _word_problem_rows(cfg: DataConfig, split: str) -> Iterable[Mapping[str, Any]]:
    return (
        {"question": p.question, "answer": p.answer} for p in make_word_problems(cfg.word_problems, split)
    )


SOURCES: dict[str, _Source] = {
    "gsm8k": _Source(_parse_gsm8k, "openai/gsm8k", "main"),
    "math500": _Source(_parse_problem_answer, "HuggingFaceH4/MATH-500", id_key="unique_id"),
    "olympiadbench": _Source(
        _parse_olympiadbench, "Hothan/OlympiadBench", "OE_TO_maths_en_COMP", {"test": "train"}, id_key="id"
    ),
    "math": _Source(_parse_math_solution, "DigitalLearningGmbH/MATH-lighteval"),
    "deepscaler": _Source(_parse_problem_answer, "agentica-org/DeepScaleR-Preview-Dataset"),
    "synthetic": _Source(_parse_synthetic, generate=_synthetic_rows),
    "word_problems": _Source(_parse_synthetic, generate=_word_problem_rows),
}
assert set(SOURCES) == set(DATASETS), (sorted(SOURCES), DATASETS)


def load_problems(cfg: DataConfig, split: str) -> list[Problem]:
    """The problems of `split` for `cfg.name`, in the dataset's order, the first `cfg.limit` of them.

    Raises ValueError for an unknown name, a missing file, bytes that are not UTF-8 (naming the file and
    line) or a malformed row (naming file or hub id, row index and key).
    """
    if cfg.name not in SOURCES:
        raise ValueError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}")
    if cfg.limit is not None and cfg.limit < 0:
        raise ValueError(f"data.limit={cfg.limit}: must be >= 0 or None")
    source = SOURCES[cfg.name]
    origin, rows = _rows(cfg, source, split)
    problems = []
    for index, row in enumerate(islice(rows, cfg.limit)):
        if not isinstance(row, Mapping):
            raise ValueError(f"{origin}: row {index}: expected an object, got {type(row).__name__}")
        try:
            question, answers = source.parse(row)
        except BadRow as err:
            raise ValueError(f"{origin}: row {index}: {err}") from None
        own_id = row.get(source.id_key) if source.id_key else None
        uid = f"{cfg.name}-{own_id}" if own_id is not None else f"{cfg.name}-{split}-{index}"
        problems.append(Problem(uid=uid, question=question, answers=answers, source=cfg.name))
    seen: set[str] = set()
    for index, p in enumerate(problems):
        if p.uid in seen:
            raise ValueError(f"{origin}: row {index}: duplicate uid {p.uid!r} (key {source.id_key!r})")
        seen.add(p.uid)
    return problems


def require_problems(problems: list[Problem], cfg: DataConfig, split: str) -> list[Problem]:
    """`problems`, or an error naming the dataset and split when there are none (data.limit=0, an empty file)."""
    if not problems:
        raise ValueError(
            f"data={cfg.name} (path={cfg.path}, limit={cfg.limit}): split {split!r} has no problems"
        )
    return problems


def _rows(cfg: DataConfig, source: _Source, split: str) -> tuple[str, Iterable[Any]]:
    """(origin for error messages, raw rows) from the local file, the generator or the hub."""
    if cfg.path is not None:
        path = Path(cfg.path.replace("{split}", split))
        return str(path), _read_file(path)
    if source.generate is not None:  # a generated dataset has no hub home
        return f"{cfg.name}[{split}]", source.generate(cfg, split)
    hub_id = cfg.hub_id or source.hub_id
    # An overridden hub id takes its config from cfg alone: the default config belongs to the default id.
    hub_config = cfg.hub_config if cfg.hub_id or cfg.hub_config else source.hub_config
    hub_split = source.hub_splits.get(split, split) if cfg.hub_id is None else split
    import datasets  # lazy: importing datasets costs seconds and the synthetic path never needs it

    dataset = datasets.load_dataset(hub_id, hub_config, split=hub_split)
    return f"{hub_id} ({hub_config or 'default'}, split {hub_split})", dataset


def _read_file(path: Path) -> list[Any]:
    """Rows of a .jsonl, .json (a list of objects) or .parquet file."""
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [row for _, row in jsonl_rows(path)]
    if suffix == ".json":
        text = decode_utf8(path.read_bytes(), str(path))
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: invalid JSON: {err}") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of row objects, got {type(rows).__name__}")
        return rows
    if suffix == ".parquet":
        return _read_parquet(path)
    raise ValueError(f"data file {path}: unsupported suffix {suffix!r}; expected .jsonl, .json or .parquet")


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for each non-blank line of a JSONL file; `where` names the file, line and row, and invalid
    JSON is an error naming them."""
    index = 0
    for line_no, line in utf8_lines(path):
        if not line.strip():
            continue  # a trailing blank line is common and is not a row
        where = f"{path}: line {line_no} (row {index})"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON: {err}") from None
        yield where, row
        index += 1


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    """Rows of a Parquet file. pyarrow reads string columns without checking that they are UTF-8, so a bad
    string shows only when the table is converted; the first such cell is then found, row by row."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    try:
        return table.to_pylist()
    except UnicodeDecodeError as err:
        failure = err
    for index in range(table.num_rows):
        for name in table.column_names:
            try:
                table.column(name)[index].as_py()
            except UnicodeDecodeError as err:
                character = len(err.object[: err.start].decode("utf-8")) + 1  # the bytes before it decode
                raise ValueError(
                    f"{path}: row {index}, column {name!r} is not valid UTF-8 "
                    f"(byte 0x{err.object[err.start]:02x} at character {character})"
                ) from None
    # Not reached while every cell that fails inside the whole-table conversion also fails alone.
    raise ValueError(f"{path}: not valid UTF-8 ({failure})")


def decode_utf8(data: bytes, origin: str, first_line: int = 1) -> str:
    """`data` decoded as UTF-8, or a ValueError naming `origin` and the line (`data` starting on line
    `first_line`), column and value of the first byte that is not UTF-8.

    >>> decode_utf8(b'["\\xc3\\xa9"]', "x.json")
    '["é"]'
    >>> decode_utf8(b'[\\n "\\xc3\\xa9\\xff"]', "x.json")
    Traceback (most recent call last):
    ...
    ValueError: x.json: line 2 is not valid UTF-8 (byte 0xff at column 4)
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.start  # offset of the first bad byte in `data`
        line = first_line + data.count(b"\n", 0, bad)
        line_start = data.rfind(b"\n", 0, bad) + 1
        column = len(data[line_start:bad].decode("utf-8")) + 1  # characters, as an editor counts them
        where = f"{origin}: line {line}"
        raise ValueError(f"{where} is not valid UTF-8 (byte 0x{data[bad]:02x} at column {column})") from None


def utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text with its newline) for each line of a UTF-8 text file, read as bytes and
    decoded one line at a time so that a bad byte is reported with its line (see `decode_utf8`)."""
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            yield line_no, decode_utf8(raw, str(path), line_no)
