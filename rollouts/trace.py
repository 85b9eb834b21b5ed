"""Soft-trace view of one rollout: for every CoT step, the top-k tokens of p_t with their probabilities and the
entropy H(p_t), as a plain-text table or a self-contained HTML page (inline CSS, no scripts, no external assets).

The top-k are recomputed by teacher-forcing the sample's stored CoT inputs through the model
(`rollouts.replay`): the engine stays lean (no [N, T, k] buffers on the hot path) and the view shows exactly what
the learner will see for the same record.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from rollouts.config import CotConfig
from rollouts.distributions import entropy
from rollouts.record import Rollout
from rollouts.replay import replay


@dataclass
class TraceStep:
    """One CoT step of the view."""

    step: int
    chosen_id: int  # the stream token: hard = the fed token; soft / fuzzy = top-1 of p_t
    top_ids: list[int]  # k most likely tokens of p_t, most likely first
    top_probs: list[float]
    entropy: float  # nats


def trace_steps(model: PreTrainedModel, sample: Rollout, cfg: CotConfig, k: int = 5) -> list[TraceStep]:
    """Top-k of p_t and H(p_t) for every CoT step of `sample` (teacher-forced; see the module docstring)."""
    log_p = replay(model, sample, cfg).cot_log_probs  # [T, V]
    k = min(k, log_p.shape[-1])
    probs, ids = torch.topk(log_p.exp(), k, dim=-1)  # [T, k]
    ents = entropy(log_p)  # [T]
    return [
        TraceStep(
            step=t,
            chosen_id=sample.cot_ids[t],
            top_ids=ids[t].tolist(),
            top_probs=probs[t].tolist(),
            entropy=float(ents[t]),
        )
        for t in range(len(sample.cot_ids))
    ]


def _token(tokenizer, token_id: int) -> str:
    """Readable text of one id: the decoded token with whitespace made visible, or `#id` without a tokenizer."""
    if tokenizer is None:
        return f"#{token_id}"
    text = tokenizer.decode([token_id])
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or f"#{token_id}"


def trace_table(steps: list[TraceStep], tokenizer=None, *, header: str = "") -> str:
    """A fixed-width text table: step, entropy, chosen token, then `token p` for the top-k."""
    lines = [header] if header else []
    lines.append(f"{'step':>4}  {'H':>6}  {'chosen':<10}  top-k (p)")
    for s in steps:
        tops = "  ".join(
            f"{_token(tokenizer, i)} {p:.3f}" for i, p in zip(s.top_ids, s.top_probs, strict=True)
        )
        lines.append(f"{s.step:>4}  {s.entropy:>6.3f}  {_token(tokenizer, s.chosen_id):<10}  {tops}")
    return "\n".join(lines)


_CSS = """
body { font-family: ui-monospace, Menlo, Consolas, monospace; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.tok { white-space: pre; }
span.p { color: #666; font-size: 0.85em; }
td.chosen { font-weight: bold; }
"""


def trace_html(steps: list[TraceStep], tokenizer=None, *, title: str = "soft trace") -> str:
    """A self-contained HTML page: one row per CoT step, each top-k cell shaded by its probability."""
    k = max((len(s.top_ids) for s in steps), default=0)
    head = "".join(f"<th>#{j + 1}</th>" for j in range(k))
    rows = []
    for s in steps:
        cells = []
        for i, p in zip(s.top_ids, s.top_probs, strict=True):
            shade = f"background: rgba(70, 130, 180, {p:.3f});"
            cells.append(
                f'<td class="tok" style="{shade}">{html.escape(_token(tokenizer, i))} <span class="p">{p:.3f}</span></td>'
            )
        rows.append(
            f"<tr><td>{s.step}</td><td>{s.entropy:.3f}</td>"
            f'<td class="tok chosen">{html.escape(_token(tokenizer, s.chosen_id))}</td>{"".join(cells)}</tr>'
        )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n"
        f"<table><tr><th>step</th><th>H (nats)</th><th>chosen</th>{head}</tr>\n"
        + "\n".join(rows)
        + "\n</table></body></html>\n"
    )
