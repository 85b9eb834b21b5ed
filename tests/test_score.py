"""`scripts/score.py`: order and fields preserved, statuses written, bad rows named, nothing partial."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "score.py"


def _load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # Bad-input tests call main() in-process: input is checked before any worker starts, so this is fast.
    # The script imports its sibling `_bootstrap`, as it would when run from scripts/.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("score_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_score_cli_adds_reward_and_status_in_order(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "completion": r"<think>6*7</think> \boxed{42}", "answer": "42"},
        {"id": "b", "completion": r"\boxed{1,450,000}", "answer": "1,450,000"},
        {"id": "c", "completion": r"\boxed{41}", "answer": "42"},
        {"id": "d", "completion": "forty-two", "answer": "42"},
        {"id": "e", "completion": r"\boxed{3}", "answer": ["$2$", "$3$"]},
        {"id": "f", "completion": r"\boxed{3}", "answer": ""},
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(source, rows)
    done = _run("--input", str(source), "--output", str(target), "--workers", "1", "--timeout", "5")
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in out] == ["a", "b", "c", "d", "e", "f"]  # same order, other fields kept
    assert [(r["reward"], r["status"]) for r in out] == [
        (1.0, "ok"),
        (1.0, "ok"),
        (0.0, "wrong"),
        (0.0, "no_answer"),
        (1.0, "ok"),
        (None, "gold_unparseable"),  # null in JSON, never 0
    ]
    assert all(
        {k: v for k, v in o.items() if k not in ("reward", "status")} == r
        for o, r in zip(out, rows, strict=True)
    )
    summary = done.stderr.strip().splitlines()[-1]
    assert "scored 6 rows" in summary and "rows/s" in summary
    assert "ok=3 wrong=1 no_answer=1 timeout=0 gold_unparseable=1 error=0" in summary


@pytest.mark.parametrize(
    ("bad_row", "message"),
    [
        ({"completion": "x"}, "row 1 (line 2): missing key 'answer'"),
        ({"answer": "1"}, "row 1 (line 2): missing key 'completion'"),
        ({"completion": "x", "answer": 1}, "row 1 (line 2): key 'answer' must be a string or a list"),
        ({"completion": ["x"], "answer": "1"}, "row 1 (line 2): key 'completion' must be a string"),
    ],
)
def test_score_cli_names_bad_row_and_writes_nothing(
    tmp_path: Path,
    bad_row: dict,
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_jsonl(source, [{"completion": r"\boxed{1}", "answer": "1"}, bad_row])
    target.write_text("previous results\n", encoding="utf-8")
    assert _load_script(monkeypatch).main(["--input", str(source), "--output", str(target)]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and str(source) in stderr
    # The old output is untouched and no temporary file is left behind.
    assert target.read_text(encoding="utf-8") == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_score_cli_names_invalid_json_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"completion": "x", "answer": "1"}\n\n{not json\n', encoding="utf-8")
    assert (
        _load_script(monkeypatch).main(["--input", str(source), "--output", str(tmp_path / "out.jsonl")]) == 2
    )
    # The blank line is skipped but still counted in line numbers, so the message points at line 3.
    assert "row 1 (line 3): not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_score_cli_names_bad_utf8_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    # Line 2 is `{"completion": "x` then 0xff (never a UTF-8 byte): 17 characters before it, so column 18.
    source.write_bytes(b'{"completion": "x", "answer": "1"}\n{"completion": "x\xff", "answer": "1"}\n')
    assert _load_script(monkeypatch).main(["--input", str(source), "--output", str(target)]) == 2
    stderr = capsys.readouterr().err
    assert f"{source}: line 2 is not valid UTF-8 (byte 0xff at column 18)" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("case", ["directory", "input", "parent is a file"])
def test_score_cli_rejects_bad_output_before_reading_or_scoring(
    tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "in.jsonl"
    _write_jsonl(source, [{"completion": r"\boxed{1}", "answer": "1"}])
    (tmp_path / "file").write_text("x\n", encoding="utf-8")
    output, message = {
        "directory": (tmp_path, f"--output {tmp_path} is a directory"),
        "input": (source, f"--output {source} is the input file {source}"),
        "parent is a file": (tmp_path / "file" / "out.jsonl", f"{tmp_path / 'file'} is not a directory"),
    }[case]
    script = _load_script(monkeypatch)

    def not_reached(*args: object, **kwargs: object) -> None:
        raise AssertionError("the input was read or a reward pool was started")

    monkeypatch.setattr(script, "read_rows", not_reached)
    monkeypatch.setattr(script, "RewardPool", not_reached)
    assert script.main(["--input", str(source), "--output", str(output)]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.jsonl"]
    assert (tmp_path / "file").read_text(encoding="utf-8") == "x\n"
