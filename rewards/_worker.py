"""One verification worker: a fresh interpreter started by `RewardPool` as `python -m rewards._worker FD`.

A fresh interpreter (not multiprocessing's fork/forkserver/spawn) because the parent is a training process:
forking it would copy torch's threads and CUDA state, and multiprocessing's spawn and forkserver re-import
the parent's `__main__` in every worker, pulling torch (gigabytes of address space) under the memory cap.

The worker reads its `RewardConfig` from the socket FD, caps its own address space, warms math-verify up,
says it is ready, then judges one item per message until the socket closes. It catches only the resource
errors that a hostile answer can provoke; any other exception kills it, and the pool counts the item as
`error` and starts a replacement.
"""

from __future__ import annotations

import resource
import sys
from multiprocessing.connection import Connection

from rewards.config import RewardConfig
from rewards.verify import Result, judge, silence_math_verify

READY = "ready"


def limit_memory(memory_mb: int) -> None:
    """Cap this process's address space; allocations past it raise MemoryError instead of swapping the box."""
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(conn: Connection) -> None:
    config = conn.recv()
    if not isinstance(config, RewardConfig):
        raise TypeError(
            f"first message to a reward worker must be a RewardConfig, got {type(config).__name__}"
        )
    limit_memory(config.memory_mb)
    silence_math_verify()
    # The first parse builds the LaTeX grammar: keep that out of item budgets. It must also succeed, or
    # every item would be judged by a broken verifier (math-verify turns its own failures into "no match").
    warm = judge("\\boxed{1}", "1", config)
    if warm.status != "ok":
        raise RuntimeError(
            f"math-verify does not work in this worker (memory_mb={config.memory_mb}?): {warm}"
        )
    conn.send(READY)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the pool closed the socket: shut down quietly
            return
        if message is None:
            return
        index, completion, gold = message
        try:
            result = judge(completion, gold, config)
        except MemoryError:
            result = Result.of("error", f"MemoryError under the {config.memory_mb} MiB cap")
        except RecursionError:
            result = Result.of("error", "RecursionError (deeply nested input)")
        conn.send((index, result))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
