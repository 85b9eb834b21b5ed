"""End-of-thinking detection (DESIGN.md section 1), held entirely in tensors so the decode step never syncs.

Two ways to recognise the think-end delimiter (`StopSpec.stop_on`):

- `ids`: the delimiter is the token-id sequence of a string such as `</think>`, matched on the id stream. The
  stream token of the step that completes it is not fed; the delimiter is forced in its place (and a multi-token
  delimiter's earlier D-1 steps are rolled back by the engine).
- `text` (the paper's rule, App. C): the delimiter is a phrase such as `The final answer is:`, matched on the
  DECODED text of the stream, so a phrase BPE merges with what follows (`is:\\n`, `: $`) is still found. The
  match runs as a character automaton (Knuth-Morris-Pratt) whose per-token transitions are tabulated once over
  the vocabulary ([S+1, V] for a phrase of S characters): one gather per step, no decoding, no host sync. The
  step whose token completes the phrase is fed as an ordinary CoT step (the phrase is part of the CoT, as in the
  paper); the NEXT step ends thinking with reason `phrase`.

The stream is the top-1 token of p_t (before noise) for soft / fuzzy (the paper's greedy "shadow" sequence) and
the *sampled* token for hard mode (the action that is fed).

At CoT step t, for every row still thinking, the reasons are checked in this priority order:
1. `phrase` (text rule): the stream up to step t-1 contains the phrase.
   `token` / `delimiter` (ids rule): the stream token of step t completes the delimiter (`token` for a
   single-token delimiter, `delimiter` for a multi-token one).
2. `eos`: the stream token of step t is the model's end-of-sequence token. A model that ends its turn in the
   middle of a CoT would otherwise be fed its own end-of-turn token and continue into an invented new turn.
3. `entropy` (cold stop, when `entropy_stop_threshold` > 0): the last `entropy_stop_patience` *recorded* CoT
   steps all had H(p) < threshold. Counting recorded steps makes the rule checkable from the rollout record.
4. `max_tokens`: `max_think_tokens` CoT inputs have been fed.
Step t then produces no CoT input; the engine feeds the reason's forced tokens (`StopSpec.forced`) instead:
the delimiter then the answer prefill (ids rule), the prefill alone after a `phrase` stop, the phrase then the
prefill after any other stop (text rule; the paper's `\\boxed{` vs `The final answer is: \\boxed{`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rollouts.config import CotConfig
from rollouts.record import THINK_END_REASONS

NOT_ENDED = -1
REASON = {name: i for i, name in enumerate(THINK_END_REASONS)}
STOP_RULES = ("ids", "text")


def _phrase_dfa(phrase: str) -> tuple[np.ndarray, dict[str, int]]:
    """The Knuth-Morris-Pratt automaton of `phrase` over character classes: `delta[q, c]` is the state (characters
    of the phrase matched so far, S = accepted, absorbing) after reading a character of class c in state q. Classes:
    one per distinct phrase character, then `other` (any other character: back to 0), then `pad` (no character:
    the state stays), which pads token texts to one width."""
    alphabet = {c: i for i, c in enumerate(sorted(set(phrase)))}
    other, pad, size = len(alphabet), len(alphabet) + 1, len(phrase)
    delta = np.zeros((size + 1, pad + 1), dtype=np.int64)
    delta[0, alphabet[phrase[0]]] = 1
    restart = 0  # the state the automaton would be in on the phrase shifted by one character
    for q in range(1, size):
        delta[q, :other] = delta[restart, :other]
        delta[q, alphabet[phrase[q]]] = q + 1
        restart = delta[restart, alphabet[phrase[q]]]
    delta[size, :] = size
    delta[:, pad] = np.arange(size + 1)
    return delta, alphabet


def phrase_table(phrase: str, token_texts: Sequence[str]) -> torch.Tensor:
    """[S+1, V] int64: entry (q, v) is the automaton state after reading token v's text from state q, for a
    phrase of S characters (state S = the text read so far contains the phrase). Feeding a stream's tokens through
    it from state 0 reaches S exactly when the concatenated token texts contain `phrase`.

    >>> table = phrase_table("is:", ["is", ":", " is:\\n", "x"])
    >>> table[0].tolist(), table[2, 1].item(), table[3].tolist()
    ([2, 0, 3, 0], 3, [3, 3, 3, 3])
    """
    if not phrase:
        raise ValueError("phrase_table: empty phrase")
    delta, alphabet = _phrase_dfa(phrase)
    other, pad = len(alphabet), len(alphabet) + 1
    width = max((len(t) for t in token_texts), default=0)
    chars = np.full((len(token_texts), max(width, 1)), pad, dtype=np.int64)  # [V, L]
    for v, text in enumerate(token_texts):
        chars[v, : len(text)] = [alphabet.get(c, other) for c in text]
    state = np.repeat(np.arange(len(phrase) + 1)[:, None], len(token_texts), axis=1)  # [S+1, V]
    for j in range(chars.shape[1]):
        state = delta[state, chars[None, :, j]]
    return torch.from_numpy(state)


@dataclass(frozen=True)
class StopSpec:
    """How thinking ends and what is forced after it (see the module docstring). `forced[reason]`: the hard
    tokens fed after a stop for that reason (recorded at the start of `answer_ids`, not actions)."""

    stop_on: str
    delimiter: tuple[int, ...]  # ids rule: the id sequence matched on the stream; text rule: ()
    forced: dict[str, tuple[int, ...]]
    phrase_table: torch.Tensor | None = None  # text rule: [S+1, V] (`phrase_table`)
    phrase: str = ""  # text rule: the phrase itself, when known (an engine that stops on strings needs it)

    def __post_init__(self) -> None:
        if self.stop_on not in STOP_RULES:
            raise ValueError(f"stop_on={self.stop_on!r}: expected one of {STOP_RULES}")
        if (self.stop_on == "ids") != bool(self.delimiter) or (self.stop_on == "text") != (
            self.phrase_table is not None
        ):
            raise ValueError("StopSpec: the ids rule needs a delimiter, the text rule a phrase table (only)")
        if set(self.forced) != set(THINK_END_REASONS):
            raise ValueError(
                f"StopSpec.forced must name every reason {THINK_END_REASONS}, got {sorted(self.forced)}"
            )

    @staticmethod
    def on_ids(delimiter: Sequence[int], prefill: Sequence[int] = ()) -> StopSpec:
        """The ids rule: stop when the stream completes `delimiter`; force delimiter + `prefill` after any stop."""
        if not delimiter:
            raise ValueError("StopSpec.on_ids: the think-end delimiter has no tokens")
        forced = tuple(delimiter) + tuple(prefill)
        return StopSpec("ids", tuple(delimiter), dict.fromkeys(THINK_END_REASONS, forced))

    @staticmethod
    def on_text(
        table: torch.Tensor, capped: Sequence[int], prefill: Sequence[int] = (), phrase: str = ""
    ) -> StopSpec:
        """The text rule with the phrase automaton `table`: force `prefill` after a phrase stop and `capped` (the
        phrase followed by the prefill, tokenized together) after any other stop."""
        if table.ndim != 2 or table.shape[0] < 2:
            raise ValueError(f"StopSpec.on_text: a phrase table is [S+1, V], got shape {tuple(table.shape)}")
        forced = dict.fromkeys(THINK_END_REASONS, tuple(capped))
        forced["phrase"] = tuple(prefill)
        return StopSpec("text", (), forced, table, phrase)

    @staticmethod
    def from_tokenizer(tokenizer: Any, think_end: str, stop_on: str = "ids", prefill: str = "") -> StopSpec:
        """The rule for a tokenizer: `think_end` is the delimiter string (ids rule) or the phrase (text rule);
        `prefill` is the answer's forced opening (e.g. ` \\boxed{`)."""

        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []

        if not think_end:
            raise ValueError("the think-end delimiter / phrase is empty")
        if stop_on == "ids":
            return StopSpec.on_ids(ids(think_end), ids(prefill))
        if stop_on != "text":
            raise ValueError(f"stop_on={stop_on!r}: expected one of {STOP_RULES}")
        return StopSpec.on_text(
            tokenizer_phrase_table(tokenizer, think_end), ids(think_end + prefill), ids(prefill), think_end
        )

    def forced_table(self, pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """([R, F] forced ids per reason, right-padded with `pad_id`; [R] their lengths), R = every reason."""
        rows = [self.forced[r] for r in THINK_END_REASONS]
        width = max(1, *(len(r) for r in rows))
        table = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            table[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return table.to(device), lengths.to(device)


@functools.lru_cache(maxsize=4)
def tokenizer_phrase_table(tokenizer: Any, phrase: str) -> torch.Tensor:
    """`phrase_table` over `tokenizer`'s vocabulary, built once per (tokenizer, phrase): it decodes every token, and
    every evaluation and rollout call asks for it again (read-only; never modify the returned tensor)."""
    return phrase_table(phrase, token_texts(tokenizer))


def token_texts(tokenizer: Any) -> list[str]:
    """Every token's text decoded alone, checked to concatenate to the decoded text of a sequence (true of
    byte-level BPE: GPT-2, Llama-3, Qwen2, SmolLM2). A tokenizer whose pieces decode differently in context
    (SentencePiece drops a piece's leading space when it decodes alone) is refused, naming it."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    probe = "Step 1: 12 + 30 = 42.\nThe final answer is: \\boxed{42}. Done:\t$x^2$ is: 7"
    probe_ids = list(tokenizer(probe, add_special_tokens=False).input_ids)
    joined, whole = "".join(texts[i] for i in probe_ids), tokenizer.decode(probe_ids)
    if joined != whole:
        raise ValueError(
            f"stop_on=text: {type(tokenizer).__name__}'s tokens do not decode independently ({joined!r} != "
            f"{whole!r}), so a phrase cannot be matched token by token; use stop_on=ids"
        )
    return texts


class ThinkEndDetector:
    """Tensor state for N rows: the last D-1 stream tokens (ids rule), the phrase automaton's state (text rule)
    and the count of consecutive cold steps."""

    def __init__(
        self,
        cfg: CotConfig,
        stop: StopSpec,
        eos_id: int,
        num_rows: int,
        vocab_size: int,
        device: torch.device,
    ):
        self.max_think = cfg.max_think_tokens
        self.threshold = cfg.entropy_stop_threshold
        self.patience = cfg.entropy_stop_patience
        self.eos_id = eos_id
        self.delimiter = torch.tensor(
            stop.delimiter, dtype=torch.long, device=device
        )  # [D] (D = 0: text rule)
        self.match_reason = REASON["token"] if len(stop.delimiter) == 1 else REASON["delimiter"]
        self.window = torch.full(
            (num_rows, max(len(stop.delimiter) - 1, 0)), -1, dtype=torch.long, device=device
        )
        self.cold = torch.zeros(num_rows, dtype=torch.long, device=device)  # [N]
        self.table = None
        if stop.phrase_table is not None:
            table = stop.phrase_table.to(device)  # [S+1, V_tok]
            if table.shape[1] < vocab_size:  # embedding rows past the tokenizer's vocabulary: no text
                keep = torch.arange(table.shape[0], device=device)[:, None].expand(
                    -1, vocab_size - table.shape[1]
                )
                table = torch.cat([table, keep], dim=1)
            self.table, self.accept = table, table.shape[0] - 1
            self.state = torch.zeros(num_rows, dtype=torch.long, device=device)  # [N]

    def check(self, stream_ids: torch.Tensor, cot_len: torch.Tensor) -> torch.Tensor:
        """Reason index per row ([N] int64, NOT_ENDED = go on) for the step whose stream token is `stream_ids`."""
        reason = torch.where(cot_len >= self.max_think, REASON["max_tokens"], NOT_ENDED)  # [N]
        if self.threshold > 0:
            reason = torch.where(self.cold >= self.patience, REASON["entropy"], reason)
        reason = torch.where(stream_ids == self.eos_id, REASON["eos"], reason)
        if self.delimiter.numel():
            match = stream_ids == self.delimiter[-1]  # [N]
            if self.window.shape[1]:
                match &= (self.window == self.delimiter[:-1]).all(dim=-1)
            reason = torch.where(match, self.match_reason, reason)
        if self.table is not None:
            reason = torch.where(self.state == self.accept, REASON["phrase"], reason)
        return reason

    def record(self, stream_ids: torch.Tensor, step_entropy: torch.Tensor, fed: torch.Tensor) -> None:
        """Account for the rows in `fed` [N] bool that just recorded a CoT step (in place: the state tensors keep
        their addresses, see rollouts.engine.Stepper)."""
        if self.window.shape[1]:
            shifted = torch.cat([self.window[:, 1:], stream_ids[:, None]], dim=1)  # [N, D-1]
            self.window.copy_(torch.where(fed[:, None], shifted, self.window))
        colder = torch.where(step_entropy < self.threshold, self.cold + 1, 0)
        self.cold.copy_(torch.where(fed, colder, self.cold))
        if self.table is not None:
            self.state.copy_(torch.where(fed, self.table[self.state, stream_ids], self.state))
