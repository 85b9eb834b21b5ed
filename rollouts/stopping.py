"""End-of-thinking detection (DESIGN.md section 1), held entirely in tensors so the decode step never syncs.

At CoT step t (for every row still thinking) the reasons are checked in this priority order:
1. `token` / `delimiter`: the stream token of step t completes the think-end delimiter. The stream is the top-1
   token of p_t (before noise) for soft / fuzzy and the *sampled* token for hard mode (it is the action that
   would be fed, so a hard CoT never contains the delimiter). A single-token delimiter reports `token`; a
   multi-token one reports `delimiter` and is detected on the id stream (the previous D-1 stream tokens and this
   one equal the delimiter ids), not on decoded text, so it is tokenizer-free and sync-free.
2. `entropy` (cold stop, when `entropy_stop_threshold` > 0): the last `entropy_stop_patience` *recorded* CoT
   steps all had H(p) < threshold. Counting recorded steps makes the rule checkable from the rollout record.
3. `max_tokens`: `max_think_tokens` CoT inputs have been fed.
Step t then produces no CoT input; the engine appends the delimiter as forced hard tokens instead.
"""

from __future__ import annotations

import torch

from rollouts.config import CotConfig
from rollouts.record import THINK_END_REASONS

NOT_ENDED = -1
REASON = {name: i for i, name in enumerate(THINK_END_REASONS)}


class ThinkEndDetector:
    """Tensor state for N rows: the last D-1 stream tokens and the count of consecutive cold steps."""

    def __init__(self, cfg: CotConfig, think_end_ids: torch.Tensor, num_rows: int):
        if think_end_ids.ndim != 1 or think_end_ids.numel() == 0:
            raise ValueError(
                f"think_end_ids must be a non-empty 1-D id tensor, got shape {tuple(think_end_ids.shape)}"
            )
        self.delimiter = think_end_ids  # [D]
        self.max_think = cfg.max_think_tokens
        self.threshold = cfg.entropy_stop_threshold
        self.patience = cfg.entropy_stop_patience
        device = think_end_ids.device
        d = think_end_ids.numel()
        self.match_reason = REASON["token"] if d == 1 else REASON["delimiter"]
        self.window = torch.full((num_rows, d - 1), -1, dtype=torch.long, device=device)  # [N, D-1]
        self.cold = torch.zeros(num_rows, dtype=torch.long, device=device)  # [N]

    def check(self, stream_ids: torch.Tensor, cot_len: torch.Tensor) -> torch.Tensor:
        """Reason index per row ([N] int64, NOT_ENDED = go on) for the step whose stream token is `stream_ids`."""
        match = stream_ids == self.delimiter[-1]  # [N]
        if self.window.shape[1]:
            match &= (self.window == self.delimiter[:-1]).all(dim=-1)
        reason = torch.where(cot_len >= self.max_think, REASON["max_tokens"], NOT_ENDED)  # [N]
        if self.threshold > 0:
            reason = torch.where(self.cold >= self.patience, REASON["entropy"], reason)
        return torch.where(match, self.match_reason, reason)

    def record(self, stream_ids: torch.Tensor, step_entropy: torch.Tensor, fed: torch.Tensor) -> None:
        """Account for the rows in `fed` [N] bool that just recorded a CoT step."""
        if self.window.shape[1]:
            shifted = torch.cat([self.window[:, 1:], stream_ids[:, None]], dim=1)  # [N, D-1]
            self.window = torch.where(fed[:, None], shifted, self.window)
        colder = torch.where(step_entropy < self.threshold, self.cold + 1, 0)
        self.cold = torch.where(fed, colder, self.cold)
