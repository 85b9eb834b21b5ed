"""The verification pool: timeout, kill and replace, crash -> `error`, the memory cap, hostile input, and
real benchmark data (every MATH-500 solution, every GSM8K gold, every OlympiadBench final answer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rewards import RewardConfig, RewardPool, gsm8k_gold, status_counts

# 9^(9^(9^(9^9))): sympy evaluates integer powers eagerly, in C, so only a kill can stop this.
TOWER = r"\boxed{9^{9^{9^{9^{9}}}}}"


@pytest.fixture(scope="module")
def pool() -> Iterator[RewardPool]:
    # Default timeout (the hostile-batch budget is stated for it); one pool for the module because starting
    # workers is the slow part. Tests that kill workers also check that the pool keeps working afterwards.
    with RewardPool(workers=2) as shared:
        shared.wait_ready()  # so that timing assertions measure work, not interpreter start-up
        yield shared


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# --- one test per status through the pool -----------------------------------------------------------------


def test_pool_ok_wrong_no_answer_gold_unparseable(pool: RewardPool) -> None:
    results = pool.score([r"\boxed{2}", r"\boxed{3}", "two", r"\boxed{2}"], ["2", "2", "2", ""])
    assert [(r.reward, r.status) for r in results] == [
        (1.0, "ok"),
        (0.0, "wrong"),
        (0.0, "no_answer"),
        (None, "gold_unparseable"),
    ]


def test_pool_timeout_kills_c_level_hang_and_recovers(pool: RewardPool) -> None:
    restarts = pool.restarts
    start = time.perf_counter()
    results = pool.score([TOWER, r"\boxed{1}"], ["1", "1"])
    elapsed = time.perf_counter() - start
    assert [(r.reward, r.status) for r in results] == [(0.0, "timeout"), (1.0, "ok")]
    # One timeout while the other worker finishes the easy item; 3 s of slack for a loaded machine.
    assert pool.config.timeout_s <= elapsed < pool.config.timeout_s + 3.0, elapsed
    assert pool.restarts == restarts + 1
    # The replacement works: a full batch after the kill is judged normally.
    assert status_counts(pool.score([r"\boxed{1}"] * 6, ["1"] * 6))["ok"] == 6


def test_pool_worker_crash_is_error_and_counted(pool: RewardPool) -> None:
    killed: list[int] = []

    def kill_the_busy_worker(_: int) -> None:
        # After the easy item returns, the other worker is still on the tower: kill it from outside,
        # as the OOM killer would. Its item must become `error` (None), not `wrong`, and not hang.
        for worker in pool._workers:
            if worker.task is not None and not killed:
                os.kill(worker.process.pid, signal.SIGKILL)
                killed.append(worker.process.pid)

    errors_before = pool.counts["error"]
    results = pool.score([r"\boxed{1}", TOWER], ["1", "1"], progress=kill_the_busy_worker)
    assert killed, "the tower should still have been running when the easy item returned"
    assert results[0].status == "ok"
    assert (results[1].reward, results[1].status) == (None, "error")
    assert "exit code -9" in results[1].detail
    assert pool.counts["error"] == errors_before + 1
    assert pool.score([r"\boxed{5}"], ["5"])[0].status == "ok"


def test_interrupted_batch_leaves_no_stale_results(pool: RewardPool) -> None:
    def interrupt(_: int) -> None:
        raise KeyboardInterrupt

    # The easy item returns first and the callback interrupts while the tower is still in flight.
    with pytest.raises(KeyboardInterrupt):
        pool.score([r"\boxed{1}", TOWER], ["1", "1"], progress=interrupt)
    # The tower's worker was replaced, so the next batch neither waits for it nor receives its result.
    start = time.perf_counter()
    assert [r.status for r in pool.score([r"\boxed{2}", r"\boxed{3}"], ["2", "4"])] == ["ok", "wrong"]
    assert time.perf_counter() - start < pool.config.timeout_s


def test_worker_that_cannot_start_is_a_loud_error() -> None:
    # No interpreter imports math-verify in a millisecond: the pool must raise, naming why, not spin.
    doomed = RewardPool(workers=1, spare_workers=0, startup_timeout_s=0.001)
    with pytest.raises(RuntimeError, match="not ready after 0.001 s"):
        doomed.score([r"\boxed{1}"], ["1"])
    with pytest.raises(RuntimeError, match="not ready after 0.001 s"):
        RewardPool(workers=1, spare_workers=0, startup_timeout_s=0.001).wait_ready()
    with pytest.raises(RuntimeError, match="closed"):
        doomed.score([r"\boxed{1}"], ["1"])


def test_memory_cap_raises_memory_error_in_worker() -> None:
    # The same call a worker makes at start; 600 MiB cannot fit under a 300 MiB address-space cap.
    code = (
        "from rewards._worker import limit_memory\n"
        "limit_memory(300)\n"
        "try:\n    bytearray(600 * 1024 * 1024)\nexcept MemoryError:\n    print('capped')\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert out.stdout.strip() == "capped"


def test_pool_rejects_bad_batches(pool: RewardPool) -> None:
    with pytest.raises(ValueError, match="2 completions but 1 golds"):
        pool.score(["a", "b"], ["1"])
    with pytest.raises(TypeError, match="gold 1"):
        pool.score(["a", "b"], ["1", [1]])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="unexpected keyword argument 'timeout'"):
        RewardPool(timeout=1.0)  # the knob is timeout_s: typos are named, not ignored


def test_rewards_combines_format() -> None:
    with RewardPool(workers=1, spare_workers=0, format_weight=0.5) as weighted:
        # correct + well formatted: 1 + 0.5; correct without delimiter: 1 + 0; unjudgeable gold: None.
        got = weighted.rewards([r"<think>x</think>\boxed{2}", r"\boxed{2}", r"\boxed{2}"], ["2", "2", ""])
    assert got == [1.5, 1.0, None]


# --- hostile input ----------------------------------------------------------------------------------------


def _hostile(marker: Path) -> list[str]:
    return [
        TOWER,
        r"\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}",
        r"\boxed{(10^{10})!}",
        "x" * 1_000_000 + r"\boxed{" + "9" * 1_000_000 + "}",  # megabyte answer
        "{[(" * 400_000,  # megabyte of brackets, no box
        r"\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",  # thousands of nested braces
        r"\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",  # nested, short enough to reach the parser
        r"\boxed{__import__('os').system('touch " + str(marker) + r"')}",  # text that looks like code
    ]


def test_hostile_batch_scores_zero_fast_and_pool_recovers(pool: RewardPool, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    hostile = _hostile(marker)
    completions = [rf"<think>...</think>\boxed{{{i}}}" for i in range(56)] + hostile
    golds = [str(i) for i in range(56)] + ["1"] * len(hostile)
    # The budget: 64 completions, 8 hostile, under 30 s on 2 cores, at the default 5 s timeout.
    assert pool.config.timeout_s == RewardConfig().timeout_s and pool.config.workers == 2
    start = time.perf_counter()
    results = pool.score(completions, golds)
    elapsed = time.perf_counter() - start
    after = pool.score([r"\boxed{4}"] * 4, ["4"] * 4)
    assert elapsed < 30.0, f"hostile batch took {elapsed:.1f} s"
    assert all(r.status == "ok" for r in results[:56])
    for completion, result in zip(hostile, results[56:], strict=True):
        assert result.reward == 0.0 and result.status in ("timeout", "wrong", "no_answer"), (
            completion[:40],
            result,
        )
    assert results[56].status == "timeout"  # the tower is the case only the kill can stop
    assert not marker.exists()
    assert [r.status for r in after] == ["ok"] * 4


# --- real data --------------------------------------------------------------------------------------------


def test_math500_every_solution_matches_its_answer(pool: RewardPool, shared_data: Path) -> None:
    rows = _read_jsonl(shared_data / "math500_test.jsonl")
    results = pool.score([r["solution"] for r in rows], [r["answer"] for r in rows])
    # Each official solution ends by boxing the official answer, so every one must be judged correct.
    misses = [(r["unique_id"], res) for r, res in zip(rows, results, strict=True) if res.status != "ok"]
    assert len(rows) == 500 and misses == []


def test_gsm8k_golds_with_commas(pool: RewardPool, shared_data: Path) -> None:
    rows = _read_jsonl(shared_data / "gsm8k_test.jsonl")
    golds = [gsm8k_gold(r["answer"]) for r in rows]  # as written: 14 of them have thousands commas
    assert sum("," in g for g in golds) == 14
    plain = [int(g.replace(",", "")) for g in golds]
    right = pool.score([rf"The total is \boxed{{{v}}}." for v in plain], golds)
    # Negative control: off by one is never equal, so the verifier must say wrong for all 1319.
    off = pool.score([rf"The total is \boxed{{{v + 1}}}." for v in plain], golds)
    assert status_counts(right)["ok"] == len(rows) == 1319
    assert status_counts(off)["wrong"] == len(rows)


def _olympiad_check(pool: RewardPool, rows: list[dict]) -> None:
    # A model boxes LaTeX without the $ delimiters the dataset stores.
    completions = [r"Final answer: \boxed{" + r["final_answer"][0].strip().strip("$") + "}" for r in rows]
    results = pool.score(completions, [r["final_answer"] for r in rows])
    misses = [(r["id"], res) for r, res in zip(rows, results, strict=True) if res.status != "ok"]
    assert misses == []


def test_olympiadbench_final_answers_match_gold_lists_sample(pool: RewardPool, shared_data: Path) -> None:
    # Every 7th row (97 of 675, all answer types) in the default tier; the full set is slow (~15 s).
    rows = _read_jsonl(shared_data / "olympiadbench_test.jsonl")
    _olympiad_check(pool, rows[::7])


@pytest.mark.slow
def test_olympiadbench_final_answers_match_gold_lists(pool: RewardPool, shared_data: Path) -> None:
    rows = _read_jsonl(shared_data / "olympiadbench_test.jsonl")
    assert len(rows) == 675
    _olympiad_check(pool, rows)


@pytest.mark.slow
def test_math500_shifted_answers_are_wrong(pool: RewardPool, shared_data: Path) -> None:
    rows = _read_jsonl(shared_data / "math500_test.jsonl")
    shifted = [rows[(i + 1) % len(rows)]["answer"] for i in range(len(rows))]
    results = pool.score([r["solution"] for r in rows], shifted)
    # Neighbouring problems share an answer only by coincidence: measured 3 of 500 ("7"/"7", "3"/"3",
    # "5" vs gold "x=5", which math-verify treats as an assignment). Anything more means a lax verifier.
    assert status_counts(results)["ok"] <= 3


def test_the_paper_scheme_pays_100_10_0_by_verdict() -> None:
    """Eq. 11 of the paper: 100 when verified correct, 10 when a boxed answer was extracted but is wrong, 0 with
    no boxed answer; an unparseable gold stays None (not judged). The verdicts (and evaluation's pass@k, which
    reads `Result.reward`) are the same as under the default correctness scheme."""
    completions = [r"\boxed{2}", r"\boxed{3}", "2", r"\boxed{2}"]
    golds = ["2", "2", "2", ""]
    with RewardPool(workers=1, spare_workers=0, scheme="paper") as paper:
        judged = paper.judge(completions, golds)
    with RewardPool(workers=1, spare_workers=0) as plain:
        default = plain.judge(completions, golds)
    assert judged.rewards == [100.0, 10.0, 0.0, None]
    assert default.rewards == [1.0, 0.0, 0.0, None] == [r.reward for r in judged.results]
    assert [r.status for r in judged.results] == ["ok", "wrong", "no_answer", "gold_unparseable"]
    with pytest.raises(ValueError, match="scheme='papre'"):
        RewardPool(scheme="papre")
