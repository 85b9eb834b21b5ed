"""Soft-trace view of rollouts: for every CoT step, the top-k tokens of p_t with their probabilities and the
entropy H(p_t), as a plain-text table (`trace_table`), a one-table HTML page (`trace_html`), or a page of whole
samples (`trace_page`: per sample its prompt, CoT steps, answer, reward and think-end reason), which
scripts/evaluate.py writes as trace.html. Every page is self-contained: inline CSS, no scripts, no external
assets, all token text HTML-escaped (`</think>` shows as text).

The top-k are recomputed by teacher-forcing the sample's stored CoT inputs through the model
(`rollouts.replay`): the engine stays lean (no [N, T, k] buffers on the hot path) and the view shows exactly what
the learner will see for the same record.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
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


@dataclass
class TracedSample:
    """One sample as `trace_page` shows it: where it came from, its CoT steps, its answer and how it was judged."""

    title: str  # e.g. the problem's uid
    prompt_ids: list[int]
    steps: list[TraceStep]  # one per CoT step (`trace_steps`)
    answer_ids: list[int]  # every answer token, the think-end delimiter and eos included
    think_end: str  # why thinking ended, one of rollouts.record.THINK_END_REASONS
    reward: float | None  # None: the reward could not judge the completion
    status: str  # the reward's verdict (rewards.STATUSES)
    gold: list[str]  # every acceptable final answer


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


def trace_sample(
    model: PreTrainedModel,
    sample: Rollout,
    cfg: CotConfig,
    *,
    title: str,
    reward: float | None,
    status: str,
    gold: Sequence[str],
    k: int = 5,
) -> TracedSample:
    """`sample` with its replayed CoT steps (`trace_steps`) and the reward's verdict on it, for `trace_page`."""
    return TracedSample(
        title=title,
        prompt_ids=list(sample.prompt_ids),
        steps=trace_steps(model, sample, cfg, k),
        answer_ids=list(sample.answer_ids),
        think_end=sample.think_end,
        reward=reward,
        status=status,
        gold=list(gold),
    )


def token_label(tokenizer, token_id: int) -> str:
    """Readable text of one id: the decoded token with whitespace made visible, or `#id` without a tokenizer."""
    if tokenizer is None:
        return f"#{token_id}"
    text = tokenizer.decode([token_id])
    return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣") or f"#{token_id}"


def _text(tokenizer, ids: list[int]) -> str:
    """Readable text of a sequence, special tokens kept (they are part of what the model saw or wrote)."""
    if tokenizer is None:
        return " ".join(f"#{i}" for i in ids)
    return tokenizer.decode(ids)


def trace_table(steps: list[TraceStep], tokenizer=None, *, header: str = "") -> str:
    """A fixed-width text table: step, entropy, chosen token, then `token p` for the top-k."""
    lines = [header] if header else []
    lines.append(f"{'step':>4}  {'H':>6}  {'chosen':<10}  top-k (p)")
    for s in steps:
        tops = "  ".join(
            f"{token_label(tokenizer, i)} {p:.3f}" for i, p in zip(s.top_ids, s.top_probs, strict=True)
        )
        lines.append(f"{s.step:>4}  {s.entropy:>6.3f}  {token_label(tokenizer, s.chosen_id):<10}  {tops}")
    return "\n".join(lines)


_CSS = """
body { font-family: ui-monospace, Menlo, Consolas, monospace; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.tok { white-space: pre; }
span.p { color: #666; font-size: 0.85em; }
td.chosen { font-weight: bold; }
td.top1 { font-weight: bold; outline: 2px solid #1f4e79; outline-offset: -2px; }
td.picked { text-decoration: underline; }
section.problem { border-top: 2px solid #999; margin-top: 2em; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.5em; }
.ok { color: #1a7f37; }
.bad { color: #b42318; }
"""


def _steps_table(steps: list[TraceStep], tokenizer) -> str:
    """One row per CoT step: step, H (nats), chosen token, then the top-k cells, each shaded by its probability.
    The top-1 cell is outlined (`top1`); a chosen token ranked below it (hard sampling) is underlined (`picked`)."""
    k = max((len(s.top_ids) for s in steps), default=0)
    head = "".join(f"<th>#{j + 1}</th>" for j in range(k))
    rows = []
    for s in steps:
        cells = []
        for rank, (i, p) in enumerate(zip(s.top_ids, s.top_probs, strict=True)):
            classes = "tok" + (" top1" if rank == 0 else " picked" if i == s.chosen_id else "")
            shade = f"background: rgba(70, 130, 180, {0.6 * p:.3f});"  # light enough to read
            cells.append(
                f'<td class="{classes}" style="{shade}">{html.escape(token_label(tokenizer, i))} '
                f'<span class="p">{p:.3f}</span></td>'
            )
        rows.append(
            f"<tr><td>{s.step}</td><td>{s.entropy:.3f}</td>"
            f'<td class="tok chosen">{html.escape(token_label(tokenizer, s.chosen_id))}</td>{"".join(cells)}</tr>'
        )
    return (
        f'<table class="steps"><tr><th>step</th><th>H (nats)</th><th>chosen</th>{head}</tr>\n'
        + "\n".join(rows)
        + "\n</table>"
    )


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def trace_html(steps: list[TraceStep], tokenizer=None, *, title: str = "soft trace") -> str:
    """A self-contained HTML page holding one sample's CoT table (`_steps_table`)."""
    return _page(title, _steps_table(steps, tokenizer))


def _verdict(s: TracedSample) -> str:
    reward = "none (cannot judge)" if s.reward is None else f"{s.reward:g}"
    mood = "ok" if s.reward is not None and s.reward > 0 else "bad"
    gold = " | ".join(s.gold)
    parts = [
        f'<span class="{mood}">reward {html.escape(reward)}</span>',
        f"<span>status {html.escape(s.status)}</span>",
        f"<span>think end: {html.escape(s.think_end)}</span>",
        f"<span>CoT steps: {len(s.steps)}</span>",
        f"<span>gold: {html.escape(gold)}</span>",
    ]
    return f'<p class="verdict">{" · ".join(parts)}</p>'


def trace_page(
    samples: list[TracedSample], tokenizer=None, *, title: str = "soft trace", note: str = ""
) -> str:
    """A self-contained HTML page with one `<section class="problem">` per sample: its title, the verdict (reward,
    status, think-end reason), the prompt, the CoT table (`_steps_table`: one row per step) and the answer."""
    sections = [
        f'<section class="problem"><h2>{j}. {html.escape(s.title)}</h2>\n{_verdict(s)}\n'
        f'<h3>prompt</h3><pre class="prompt">{html.escape(_text(tokenizer, s.prompt_ids))}</pre>\n'
        f"<h3>CoT</h3>\n{_steps_table(s.steps, tokenizer)}\n"
        f'<h3>answer</h3><pre class="answer">{html.escape(_text(tokenizer, s.answer_ids))}</pre></section>'
        for j, s in enumerate(samples)
    ]
    intro = f'<p class="note">{html.escape(note)}</p>\n' if note else ""
    return _page(title, intro + "\n".join(sections))
