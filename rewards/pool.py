"""A pool of verification worker processes that never hangs: per-item deadlines, kill and replace.

The learner calls `RewardPool.score` from its main process with a batch; the pool keeps every worker busy
(one item in flight per worker, the next sent as soon as one returns) and enforces a wall-clock deadline per
item from the parent. A worker past its deadline is SIGKILLed, whatever it is doing (C-level big-integer
work included, which no in-process alarm can interrupt), its item becomes `timeout`, and a replacement is
started while a warm spare takes over. A worker that dies (segfault, OOM kill, unexpected exception) turns
its item into `error`. Workers are fresh interpreters (see `rewards._worker` for why not multiprocessing).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import TracebackType
from typing import Any

from rewards.config import SCHEMES, RewardConfig
from rewards.extract import GoldAnswer, gold_candidates
from rewards.format import combine_rewards, format_reward
from rewards.verify import Result, status_counts

READY = "ready"  # what rewards._worker sends once warm
_PIPE_ERRORS = (EOFError, BrokenPipeError, ConnectionResetError, OSError)
# The folder holding the `rewards` package, so a worker finds it without the package being installed.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    started_at: float
    ready: bool = False
    task: int | None = None
    deadline: float = float("inf")


def _kill_all(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


@dataclass
class Judged:
    """A batch's rewards (None: cannot judge) and the correctness verdicts behind them, item by item."""

    rewards: list[float | None]
    results: list[Result]


def _checked_batch(completions: Sequence[str], golds: Sequence[GoldAnswer]) -> list[GoldAnswer]:
    """The golds as they travel to workers (tuples: any sequence of str is accepted, but only builtins pickle
    cheaply), after checking the batch: equal lengths, string completions, usable golds (errors name the item)."""
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
    for i, (completion, gold) in enumerate(zip(completions, golds, strict=True)):
        if not isinstance(completion, str):
            raise TypeError(f"completion {i} is {type(completion).__name__}, expected str")
        try:
            gold_candidates(gold)
        except TypeError as err:
            raise TypeError(f"gold {i}: {err}") from err
    return [g if isinstance(g, str) else tuple(g) for g in golds]


class RewardPool:
    """Verification worker pool; use as a context manager.

    Keyword overrides are `RewardConfig` fields (an unknown one is a TypeError naming it).

    >>> with RewardPool(workers=1, spare_workers=0, timeout_s=5.0) as pool:
    ...     pool.score(["<think>...</think> \\\\boxed{1/2}", "no box"], ["0.5", "0.5"])
    [Result(reward=1.0, status='ok', detail=''), Result(reward=0.0, status='no_answer', detail='')]
    """

    def __init__(self, config: RewardConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or RewardConfig(), **overrides)
        #: Cumulative status counts over every `score` call, for logging.
        self.counts: dict[str, int] = status_counts([])
        #: Workers killed on timeout or found dead, and replaced.
        self.restarts = 0
        self._closed = False
        size = self.config.workers + self.config.spare_workers
        self._workers: list[_Worker] = [self._start() for _ in range(size)]
        # Kill the workers if the pool is garbage-collected or the interpreter exits without close(): an
        # idle worker exits on EOF by itself, but one busy on a hostile item would run on.
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    def _start(self) -> _Worker:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        process = subprocess.Popen(
            [sys.executable, "-m", "rewards._worker", str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
            # Own session: a Ctrl-C aimed at the trainer must not kill workers mid-item behind the pool's back.
            start_new_session=True,
        )
        # Drop our copy of the worker's end so that a dead worker reads as EOF on ours.
        theirs.close()
        conn = Connection(ours.detach())
        conn.send(self.config)
        return _Worker(process=process, conn=conn, started_at=time.monotonic())

    def _stop(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.wait()
        worker.conn.close()

    def _replace(self, worker: _Worker) -> None:
        self._stop(worker)
        self._workers[self._workers.index(worker)] = self._start()
        self.restarts += 1

    def wait_ready(self) -> None:
        """Block until every worker has started (about a second), so the first batch's timing is all work.

        Optional: `score` starts sending to workers as soon as each is ready.
        """
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        while starting := [w for w in self._workers if not w.ready]:
            deadline = min(w.started_at for w in starting) + self.config.startup_timeout_s
            for conn in wait([w.conn for w in starting], timeout=max(0.0, deadline - time.monotonic())):
                worker = next(w for w in starting if w.conn is conn)
                try:
                    message = worker.conn.recv()
                except _PIPE_ERRORS:
                    raise self._startup_failed(worker, f"exit code {worker.process.wait()}") from None
                if message != READY:
                    raise self._startup_failed(worker, f"sent {message!r:.100} before ready")
                worker.ready = True
            if time.monotonic() >= deadline and any(not w.ready for w in starting):
                raise self._startup_failed(starting[0], f"not ready after {self.config.startup_timeout_s} s")

    def _abandon_in_flight(self) -> None:
        if self._closed:
            return
        for worker in list(self._workers):
            if worker.task is not None:
                self._replace(worker)

    def _startup_failed(self, worker: _Worker, why: str) -> RuntimeError:
        # A worker that cannot start will not start on retry either: shut the pool rather than spin.
        self.close()
        return RuntimeError(
            f"reward worker failed to start ({why}); check RewardConfig.memory_mb={self.config.memory_mb} "
            f"and that math-verify imports in a fresh process"
        )

    def score(
        self,
        completions: Sequence[str],
        golds: Sequence[GoldAnswer],
        progress: Callable[[int], None] | None = None,
    ) -> list[Result]:
        """Judge `completions[i]` against `golds[i]` for every i, in parallel; results in input order.

        `progress(m)` is called as results arrive, with the number that just arrived.
        """
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        golds = _checked_batch(completions, golds)
        results: list[Result | None] = [None] * len(completions)
        queue = deque(range(len(completions)))
        remaining = len(completions)

        def finish(index: int, result: Result) -> None:
            nonlocal remaining
            results[index] = result
            remaining -= 1
            if progress is not None:
                progress(1)

        try:
            while remaining:
                self._dispatch(queue, completions, golds)
                self._receive(finish)
                self._enforce_deadlines(finish)
        except BaseException:
            # Interrupted (Ctrl-C, a failed start): results still in flight would land in the next batch,
            # so their workers are replaced rather than trusted.
            self._abandon_in_flight()
            raise

        final = [r for r in results if r is not None]
        assert len(final) == len(results), "every item gets exactly one result"
        for status, count in status_counts(final).items():
            self.counts[status] += count
        return final

    def _dispatch(self, queue: deque[int], completions: Sequence[str], golds: list[GoldAnswer]) -> None:
        """Hand queued items to idle ready workers."""
        for worker in list(self._workers):
            # Spares are ready workers too; the cap keeps at most `workers` items running at once.
            busy = sum(w.task is not None for w in self._workers)
            if worker.ready and worker.task is None and queue and busy < self.config.workers:
                index = queue.popleft()
                try:
                    worker.conn.send((index, completions[index], golds[index]))
                except _PIPE_ERRORS:
                    queue.appendleft(index)  # it died idle: the item was never seen, so retry it
                    self._replace(worker)
                    continue
                worker.task = index
                worker.deadline = time.monotonic() + self.config.timeout_s

    def _receive(self, finish: Callable[[int, Result], None]) -> None:
        """Wait until a worker speaks or the next deadline passes; take its result, readiness or death."""
        now = time.monotonic()
        next_deadline = min(
            w.deadline if w.ready else w.started_at + self.config.startup_timeout_s for w in self._workers
        )
        # Idle spares have no deadline; some worker is always busy or starting while items remain.
        timeout = None if next_deadline == float("inf") else max(0.0, next_deadline - now)
        signalled = wait([w.conn for w in self._workers], timeout=timeout)
        for worker in list(self._workers):
            if worker.conn not in signalled:
                continue
            try:
                message: Any = worker.conn.recv()
            except _PIPE_ERRORS:  # EOF: the worker died
                exit_code = worker.process.wait()
                if not worker.ready:
                    raise self._startup_failed(worker, f"exit code {exit_code}") from None
                if worker.task is not None:
                    finish(worker.task, Result.of("error", f"worker died (exit code {exit_code})"))
                self._replace(worker)
                continue
            if message == READY:
                worker.ready = True
            else:
                index, result = message
                worker.task = None
                worker.deadline = float("inf")
                finish(index, result)

    def _enforce_deadlines(self, finish: Callable[[int, Result], None]) -> None:
        """Kill a worker past its item's timeout (the item times out) or past its startup budget (an error)."""
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.ready and worker.task is not None and now >= worker.deadline:
                finish(worker.task, Result.of("timeout", f"killed after {self.config.timeout_s} s"))
                self._replace(worker)
            elif not worker.ready and now >= worker.started_at + self.config.startup_timeout_s:
                raise self._startup_failed(worker, f"not ready after {self.config.startup_timeout_s} s")

    def judge(self, completions: Sequence[str], golds: Sequence[GoldAnswer]) -> Judged:
        """Each completion's reward (its verdict's reward under `config.scheme`, plus `format_weight` times the
        format reward, see `combine_rewards`) and its verdict (`Result`, whose status is counted and logged)."""
        results = self.score(completions, golds)
        scheme = SCHEMES[self.config.scheme]
        verdicts = [scheme[r.status] for r in results]
        if self.config.format_weight == 0:
            return Judged(verdicts, results)
        fmt = format_reward(completions, golds, self.config)
        return Judged(combine_rewards([verdicts, fmt], [1.0, self.config.format_weight]), results)

    def rewards(self, completions: Sequence[str], golds: Sequence[GoldAnswer]) -> list[float | None]:
        """The rewards of `judge` alone."""
        return self.judge(completions, golds).rewards

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except _PIPE_ERRORS:
                pass  # already dead: nothing to tell it
        for worker in self._workers:
            try:
                worker.process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass  # busy on a hostile item: _stop kills it
            self._stop(worker)

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def math_reward(
    completions: Sequence[str], answers: Sequence[GoldAnswer], config: RewardConfig | None = None
) -> list[float | None]:
    """Correctness reward as a pure function, with a pool for this call only (training should keep one
    `RewardPool` open instead: starting workers costs about a second).

    >>> math_reward(["\\\\boxed{1,450,000}", "\\\\boxed{7}", "\\\\boxed{1}"], ["1450000", "8", ""],
    ...             RewardConfig(workers=1, spare_workers=0))
    [1.0, 0.0, None]
    """
    with RewardPool(config) as pool:
        return [r.reward for r in pool.score(completions, answers)]
