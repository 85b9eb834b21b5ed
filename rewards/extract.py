"""Where the final answer is: the answer phase, the last box in it, and the shapes gold answers come in.

Policy, decided once here:

1. The answer phase is the text after the LAST `think_end` delimiter. Without a delimiter the whole text is
   the answer phase, so plain (non-thinking) models and hard-CoT baselines can be scored; the format reward
   is what penalises a missing delimiter.
2. The final answer is the content of the LAST `\\boxed{...}` / `\\fbox{...}` / `\\boxed x` in the answer
   phase. Only the last one counts, even when it is malformed (an unclosed brace from a truncated
   generation): a model that boxed twice and was cut off did not finish its answer, and falling back to an
   earlier box would reward it.
3. No box means no answer (status `no_answer`, reward 0). There is deliberately no "last number in the
   text" fallback: it would reward unformatted answers and picks intermediate numbers by accident.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# `\boxed` or `\fbox` as a whole control word (so `\boxedfoo` is not a box).
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# The characters that matter for brace matching: a backslash escapes the next character (`\{`, `\}`, `\\`).
_BRACE_RE = re.compile(r"[\\{}]")
# `\boxed 42` (no braces): the next run of non-space characters, stopping at a math delimiter.
_BARE_RE = re.compile(r"[ \t]+([^\s$]+)")
# GSM8K writes thousands with commas (`1,450,000`); only exact groups of three are a thousands separator,
# so `1,2` (a list) is left alone.
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")

GoldAnswer = str | Sequence[str]


def answer_phase(text: str, think_end: str) -> str:
    """The text after the last `think_end`, or the whole text when the delimiter is absent.

    >>> answer_phase("<think>try \\\\boxed{1}</think>so \\\\boxed{2}", "</think>")
    'so \\\\boxed{2}'
    >>> answer_phase("no thinking here", "</think>")
    'no thinking here'
    """
    cut = text.rfind(think_end)
    return text if cut < 0 else text[cut + len(think_end) :]


def _braced_content(text: str, open_at: int) -> str | None:
    """Content of the group whose `{` is at `open_at`, or None if it never closes. Linear in the text."""
    depth = 0
    pos = open_at
    while True:
        match = _BRACE_RE.search(text, pos)
        if match is None:
            return None
        char = match.group()
        if char == "\\":
            pos = match.end() + 1  # skip the escaped character, whatever it is
            continue
        depth += 1 if char == "{" else -1
        pos = match.end()
        if depth == 0:
            return text[open_at + 1 : match.start()]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, `\\fbox{...}` or `\\boxed x` in `text`; None if there is none.

    Nested braces are matched; `\\{` and `\\}` are literal braces and do not count.

    >>> last_boxed(r"first \\boxed{1}, then \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> last_boxed(r"\\fbox{\\{1, 2\\}}")
    '\\\\{1, 2\\\\}'
    >>> last_boxed(r"so $\\boxed 7$")
    '7'
    >>> last_boxed(r"cut off: \\boxed{12") is None
    True
    >>> last_boxed("no box") is None
    True
    """
    last = None
    for last in _BOX_RE.finditer(text):  # noqa: B007 - only the last match is wanted; finditer is C-speed
        pass
    if last is None:
        return None
    after = last.end()
    stripped = len(text) - len(text[after:].lstrip())
    if stripped < len(text) and text[stripped] == "{":
        return _braced_content(text, stripped)
    bare = _BARE_RE.match(text, after)
    return bare.group(1) if bare else None


def normalize_gold(gold: str) -> str:
    """One gold answer as bare LaTeX: surrounding `$...$` removed, GSM8K thousands commas removed.

    >>> normalize_gold("1,450,000")
    '1450000'
    >>> normalize_gold("$\\\\frac{2}{5}$")
    '\\\\frac{2}{5}'
    >>> normalize_gold("1,2")
    '1,2'
    """
    gold = gold.strip()
    if len(gold) >= 2 and gold.startswith("$") and gold.endswith("$") and "$" not in gold[1:-1]:
        gold = gold[1:-1].strip()
    if _THOUSANDS_RE.fullmatch(gold):
        gold = gold.replace(",", "")
    return gold


def gold_candidates(gold: GoldAnswer) -> tuple[str, ...]:
    """The acceptable answers of one problem, normalised. A `str` is one answer; a sequence (OlympiadBench
    `final_answer`) is a list of acceptable answers, any one of which is correct.

    >>> gold_candidates("1,450,000")
    ('1450000',)
    >>> gold_candidates(["$2$", "$\\\\frac{4}{2}$"])
    ('2', '\\\\frac{4}{2}')
    """
    if isinstance(gold, str):
        return (normalize_gold(gold),)
    if not all(isinstance(item, str) for item in gold):
        raise TypeError(f"gold answers must be str or a sequence of str, got {gold!r:.200}")
    return tuple(normalize_gold(item) for item in gold)


def gsm8k_gold(solution: str) -> str:
    """The final answer of a GSM8K `answer` field: the text after `####`, as written (commas kept).

    >>> gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\\n#### 1,800")
    '1,800'
    """
    head, sep, tail = solution.rpartition("####")
    if not sep:
        raise ValueError(f"GSM8K solution has no '####' final-answer marker: {solution[-200:]!r}")
    return tail.strip()
