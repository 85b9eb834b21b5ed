"""Score a JSONL file of completions against gold answers with the sandboxed math verifier.

    python scripts/score.py --input F.jsonl --output G.jsonl [--timeout S] [--workers W] [--memory-mb M]

Each input row needs `completion` (str) and `answer` (the gold final answer: a str, or a list of acceptable
answers). Each output row is the input row plus `reward` (1.0, 0.0 or null when it cannot be judged) and
`status`, in input order. The output path and every row are checked before any scoring, and the output is
written to a temporary file and renamed, so a bad row or a crash never leaves a partial output behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bootstrap  # noqa: F401 - makes `rewards` importable from a plain checkout
from tqdm import tqdm

from rewards import RewardConfig, RewardPool, status_counts
from rl.data import utf8_lines


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each checked for `completion` and `answer`; errors name the row and the key."""
    rows: list[dict[str, Any]] = []
    for line_number, line in utf8_lines(path):  # a byte that is not UTF-8 is named with its line
        if not line.strip():
            continue  # blank lines (a trailing newline) are not rows
        where = f"{path}: row {len(rows)} (line {line_number})"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from err
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for key in ("completion", "answer"):
            if key not in row:
                raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(row["completion"], str):
            raise ValueError(
                f"{where}: key 'completion' must be a string, got {type(row['completion']).__name__}"
            )
        answer = row["answer"]
        if not (
            isinstance(answer, str) or (isinstance(answer, list) and all(isinstance(a, str) for a in answer))
        ):
            raise ValueError(
                f"{where}: key 'answer' must be a string or a list of strings, got {answer!r:.100}"
            )
        rows.append(row)
    return rows


def check_output(output: Path, source: Path) -> None:
    """Raise ValueError, before anything is read or scored, for an output path that is a directory, is the
    input file, or lies under a file. A missing parent directory is fine: it is created when writing."""
    if output.is_dir():
        raise ValueError(f"--output {output} is a directory")
    if output.exists() and source.exists() and output.samefile(source):
        raise ValueError(f"--output {output} is the input file {source}")
    ancestor = output.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--output {output}: {ancestor} is not a directory")


def write_rows_atomically(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        "w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="JSONL with `completion` and `answer`")
    parser.add_argument(
        "--output", type=Path, required=True, help="JSONL to write (input rows + reward, status)"
    )
    # Defaults are None here so that RewardConfig stays the only home of every default.
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per item (RewardConfig.timeout_s)"
    )
    parser.add_argument("--workers", type=int, default=None, help="worker processes (RewardConfig.workers)")
    parser.add_argument("--memory-mb", type=int, default=None, help="MiB per worker (RewardConfig.memory_mb)")
    args = parser.parse_args(argv)

    overrides = {"timeout_s": args.timeout, "workers": args.workers, "memory_mb": args.memory_mb}
    config = RewardConfig(**{k: v for k, v in overrides.items() if v is not None})
    try:
        check_output(args.output, args.input)
        rows = read_rows(args.input)
    except (OSError, ValueError) as err:
        print(f"score.py: {err}", file=sys.stderr)
        return 2

    with RewardPool(config) as pool:
        started = time.perf_counter()
        pool.wait_ready()  # report start-up apart from throughput
        startup = time.perf_counter() - started
        with tqdm(total=len(rows), desc="scoring", unit="row", file=sys.stderr) as bar:
            start = time.perf_counter()
            completions, golds = [r["completion"] for r in rows], [r["answer"] for r in rows]
            results = pool.score(completions, golds, progress=bar.update)
            elapsed = time.perf_counter() - start
        restarts = pool.restarts

    scored = [
        {**row, "reward": result.reward, "status": result.status}
        for row, result in zip(rows, results, strict=True)
    ]
    write_rows_atomically(args.output, scored)
    counts = " ".join(f"{status}={count}" for status, count in status_counts(results).items())
    rate = len(rows) / elapsed if elapsed > 0 else float("inf")
    print(
        f"scored {len(rows)} rows in {elapsed:.1f} s ({rate:.1f} rows/s; {config.workers} workers, started in "
        f"{startup:.1f} s, {restarts} restarts): {counts} -> {args.output}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
