"""Prompt rendering: question -> the text (and token ids) a policy continues with its chain of thought.

Every prompt ends with the think-start delimiter, so the first generated position is the first CoT step
(hard, soft or fuzzy) and the rollout never has to decide whether the model is "in" its thinking yet.

Two renderings:

1. With a chat template (`use_chat_template` and `tokenizer.chat_template` set): the messages (system
   first when set, then each worked example of `examples` as a user turn and an assistant reply, then the user
   message) go through `tokenizer.apply_chat_template(...,
   add_generation_prompt=True)`. The template carries its own special tokens (bos, role markers).
2. Without one (base models, the character-level tiny model): `f"{bos_token}{user}\\n"`, with
   `system` (when set) as a first paragraph `f"{system}\\n\\n"` and each worked example (`examples`) as a
   paragraph `f"{user}\\n{think_start}{answer}\\n\\n"` before the question. The bos token is written as text (when
   the tokenizer has one) so that a rendered prompt always holds all its special tokens, exactly as a chat
   template does; hence there is one tokenisation rule for both cases: `add_special_tokens=False`.

The user message is `f"{question}\\n{instruction}"`, or the bare question when the instruction is empty; with a
`template` (a whole prompt text holding `{question}`, as the paper's App. B prompt) it is the template with the
question in its place, and the plain rendering adds nothing after it (no newline).

Think-start: appended unless the rendered text already ends with it, ignoring trailing whitespace.
Templates of reasoning models (DeepSeek-R1 distills, some Qwen3 variants) already open the block as
`<think>\\n`; that text is then kept verbatim, trailing newline included, because it is what the model was
trained to continue from. So "ends with think_start" holds up to trailing whitespace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Example:
    """One worked example shown before the question (few-shot): a user turn and the assistant's reply."""

    question: str
    answer: str  # the whole reply, chain of thought and final answer, as the model should write it


@dataclass
class PromptConfig:
    """How a question becomes a prompt. `system=None` sends no system message. `examples`: worked examples shown
    first, each as a user turn (rendered like the question, instruction included) and the assistant's reply."""

    instruction: str = "Think step by step, then give the final answer in \\boxed{}."
    system: str | None = None
    think_start: str = "<think>"
    think_end: str = "</think>"
    use_chat_template: bool = True  # False forces the plain rendering even when a template exists
    # the user message with `{question}` where the question goes (replaces question + instruction); None = unused
    template: str | None = None
    # how the CoT's end is recognised (rollouts/stopping.py): "ids" = the stream's token ids complete `think_end`;
    # "text" = the stream's decoded text contains `think_end` (a phrase, as the paper's "The final answer is:")
    stop_on: str = "ids"
    # forced after the think-end (e.g. " \\boxed{"): the answer's opening, as the paper prefills it
    answer_prefill: str = ""
    examples: list[Example] = field(default_factory=list)

    def __post_init__(self) -> None:
        # a profile read back from JSON (rl/model.py) holds the examples as plain mappings
        self.examples = [e if isinstance(e, Example) else Example(**e) for e in self.examples]
        if self.stop_on not in ("ids", "text"):
            raise ValueError(f"prompt.stop_on={self.stop_on!r}: expected 'ids' or 'text'")
        if not self.think_end:
            raise ValueError("prompt.think_end is empty: the CoT needs a delimiter (or phrase) to end on")
        if self.template is not None and self.template.count("{question}") != 1:
            raise ValueError(f"prompt.template must hold '{{question}}' exactly once: {self.template!r}")


def user_message(question: str, cfg: PromptConfig) -> str:
    """The user turn: the question, then the instruction on its own line (when there is one).

    >>> user_message("1+1?", PromptConfig(instruction=""))
    '1+1?'
    >>> user_message("1+1?", PromptConfig(instruction="Be brief."))
    '1+1?\\nBe brief.'
    >>> user_message("1+1?", PromptConfig(template="User: {question} Assistant:"))
    'User: 1+1? Assistant:'
    """
    if cfg.template is not None:
        return cfg.template.replace("{question}", question)
    return f"{question}\n{cfg.instruction}" if cfg.instruction else question


def render_prompt(tokenizer: Any, question: str, cfg: PromptConfig) -> str:
    """The full prompt text for `question`, ending with `cfg.think_start` (up to trailing whitespace).

    A tokenizer without a chat template (here a stand-in with only the attributes read) gets the plain
    rendering:

    >>> from types import SimpleNamespace
    >>> tok = SimpleNamespace(chat_template=None, bos_token="<s>")
    >>> render_prompt(tok, "What is 2+3?", PromptConfig(instruction="Answer in \\\\boxed{}."))
    '<s>What is 2+3?\\nAnswer in \\\\boxed{}.\\n<think>'
    """
    if not question.strip():
        raise ValueError(f"render_prompt: empty question {question!r}")
    user = user_message(question, cfg)
    shots = [(user_message(e.question, cfg), f"{cfg.think_start}{e.answer}") for e in cfg.examples]
    if cfg.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": cfg.system}] if cfg.system is not None else []
        for asked, replied in shots:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": replied}]
        messages.append({"role": "user", "content": user})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(text, str):
            kind = type(text).__name__
            raise TypeError(f"apply_chat_template(tokenize=False) returned {kind}, expected a str")
    else:
        bos = getattr(tokenizer, "bos_token", None) or ""
        system = f"{cfg.system}\n\n" if cfg.system is not None else ""
        sep = "" if cfg.template is not None else "\n"
        shown = "".join(f"{asked}{sep}{replied}\n\n" for asked, replied in shots)
        text = f"{bos}{system}{shown}{user}{sep}"
    if cfg.think_start and not text.rstrip().endswith(cfg.think_start):
        text += cfg.think_start
    return text


def encode_prompts(tokenizer: Any, questions: Sequence[str], cfg: PromptConfig) -> list[list[int]]:
    """Render and tokenize each question. `add_special_tokens=False` because the rendered text already
    holds every special token (from the chat template, or the bos written by the plain rendering);
    letting the tokenizer add its own would double the bos (and some tokenizers would append an eos)."""
    texts = [render_prompt(tokenizer, q, cfg) for q in questions]
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
