"""Prompt rendering against small local tokenizers: with a chat template, without one, and with a template
that already opens the think block."""

from __future__ import annotations

import string

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rl.prompts import PromptConfig, encode_prompts, render_prompt

# A role-tagged template in the style of Llama/Qwen chat templates; the text it renders is easy to
# write out by hand, which is what lets the tests below state their expected strings.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# A DeepSeek-R1-distill-like template: the generation prompt already opens the think block.
THINKING_TEMPLATE = CHAT_TEMPLATE.replace("<|assistant|>", "<|assistant|><think>\n")


def char_tokenizer(chat_template: str | None = None, bos: str | None = "<s>") -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one id per printable character) with `<think>`/`</think>` as special
    tokens, so a prompt's ids can be checked character by character."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in sorted(set(string.printable)):
        vocab.setdefault(c, len(vocab))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    model.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token=bos,
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=["<think>", "</think>"],
    )
    tok.chat_template = chat_template
    return tok


CFG = PromptConfig(instruction="Box it.")


def test_plain_rendering_without_template() -> None:
    tok = char_tokenizer(chat_template=None)
    # bos as text, question, newline, instruction, newline, then the opened think block.
    assert render_prompt(tok, "2+3?", CFG) == "<s>2+3?\nBox it.\n<think>"


def test_plain_rendering_system_and_no_bos() -> None:
    tok = char_tokenizer(chat_template=None, bos=None)
    cfg = PromptConfig(instruction="", system="You add.")
    assert render_prompt(tok, "2+3?", cfg) == "You add.\n\n2+3?\n<think>"


def test_chat_template_rendering_with_system_first() -> None:
    tok = char_tokenizer(CHAT_TEMPLATE)
    cfg = PromptConfig(instruction="Box it.", system="Be exact.")
    expected = "<s><|system|>Be exact.\n<|user|>2+3?\nBox it.\n<|assistant|><think>"
    assert render_prompt(tok, "2+3?", cfg) == expected


def test_empty_instruction_sends_bare_question() -> None:
    tok = char_tokenizer(CHAT_TEMPLATE)
    assert render_prompt(tok, "2+3?", PromptConfig(instruction="")) == "<s><|user|>2+3?\n<|assistant|><think>"


def test_use_chat_template_false_forces_plain() -> None:
    tok = char_tokenizer(CHAT_TEMPLATE)
    cfg = PromptConfig(instruction="Box it.", use_chat_template=False)
    assert render_prompt(tok, "2+3?", cfg) == "<s>2+3?\nBox it.\n<think>"


def test_template_that_opens_think_block_is_kept_verbatim() -> None:
    tok = char_tokenizer(THINKING_TEMPLATE)
    text = render_prompt(tok, "2+3?", CFG)
    # The template's own "<think>\n" stays (the model was trained on that newline); no second delimiter.
    assert text == "<s><|user|>2+3?\nBox it.\n<|assistant|><think>\n"
    assert text.count("<think>") == 1


def test_custom_think_start_is_appended() -> None:
    tok = char_tokenizer(THINKING_TEMPLATE)
    # The template opens "<think>", but this config's delimiter is different, so it must still be appended.
    text = render_prompt(tok, "2+3?", PromptConfig(instruction="", think_start="[T]"))
    assert text.endswith("<think>\n[T]")


def test_empty_question_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty question"):
        render_prompt(char_tokenizer(), "  ", CFG)


@pytest.mark.parametrize("template", [None, CHAT_TEMPLATE, THINKING_TEMPLATE])
def test_encode_prompts_matches_rendering_with_one_bos(template: str | None) -> None:
    tok = char_tokenizer(template)
    questions = ["2+3?", "Ann has 4 pens."]
    ids = encode_prompts(tok, questions, CFG)
    assert len(ids) == 2
    for q, row in zip(questions, ids, strict=True):
        # Character-level ids decode back to exactly the rendered text: nothing added, nothing lost.
        assert tok.decode(row) == render_prompt(tok, q, CFG)
        assert row.count(tok.bos_token_id) == 1 and row[0] == tok.bos_token_id
        assert tok.convert_tokens_to_ids("<think>") in row[-2:]


def test_encode_prompts_empty() -> None:
    assert encode_prompts(char_tokenizer(), [], CFG) == []


SHOT = PromptConfig(
    instruction="Box it.", examples=[{"question": "1+1?", "answer": "1+1=2 \\boxed{2}</think>"}]
)


def test_worked_examples_come_first_as_user_and_assistant_turns() -> None:
    """`examples` (few-shot): each example is a user turn rendered like the question (instruction included) and
    the assistant's reply opened by think_start, before the question; read back from a profile's plain mappings."""
    expected = (
        "<s><|user|>1+1?\nBox it.\n<|assistant|><think>1+1=2 \\boxed{2}</think>\n"
        "<|user|>2+3?\nBox it.\n<|assistant|><think>"
    )
    assert render_prompt(char_tokenizer(CHAT_TEMPLATE), "2+3?", SHOT) == expected
    plain = "<s>1+1?\nBox it.\n<think>1+1=2 \\boxed{2}</think>\n\n2+3?\nBox it.\n<think>"
    assert render_prompt(char_tokenizer(None), "2+3?", SHOT) == plain
    assert SHOT.examples[0].answer.endswith("</think>")  # a mapping became an Example
