"""A character-level Hugging Face tokenizer with byte fallback, for the tiny base model.

Every printable ASCII character (plus newline and tab) is one token; any other character is encoded as its
UTF-8 bytes (`<0xNN>` tokens), so every UTF-8 text encodes with no unknown token and decodes back exactly.
Special tokens: bos `<s>`, eos `</s>`, pad `<pad>`, think start `<think>` and think end `</think>`, each one
token. The chat template renders `User: ...` / `Assistant: ...` turns after the bos token.

>>> tok = build_char_tokenizer()
>>> ids = tok("x²<think>", add_special_tokens=False).input_ids
>>> len(ids), tok.decode(ids)
(4, 'x²<think>')
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, THINK_START, THINK_END = "<pad>", "<s>", "</s>", "<think>", "</think>"
SPECIAL_TOKENS = (PAD, BOS, EOS, THINK_START, THINK_END)
CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))

# Terse role markers: every prompt character costs SFT and rollout time on 2 CPU cores.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}S: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}A: {{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A: {% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer: ids 0-4 are the special tokens, then the characters, then the 256 byte tokens."""
    pieces = list(SPECIAL_TOKENS) + list(CHARS) + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # No merges: BPE then splits text into single characters, and byte_fallback covers everything else.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, fuse_unk=False))
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[THINK_START, THINK_END],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
