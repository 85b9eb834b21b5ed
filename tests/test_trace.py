"""Soft-trace view: the per-step top-k equal the replayed distribution, and the text / HTML renderings show them
and depend on nothing outside the page."""

from __future__ import annotations

import re

import pytest
import torch

from rollouts.config import CotConfig
from rollouts.distributions import cot_log_probs, entropy
from rollouts.engine import generate
from rollouts.trace import trace_html, trace_steps, trace_table
from tests.arch import one_thread, tiny_causal_lm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class CharTokenizer:
    """Just enough of a tokenizer for the view: id v decodes to a distinct 2-letter string; 7 is '<b>' to check
    HTML escaping."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join("<b>" if i == 7 else chr(ord("a") + i // 26) + chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def soft_sample():
    model = tiny_causal_lm("llama", False, vocab_size=64, seed=2)
    cfg = CotConfig(mode="soft", temperature=0.5, noise_scale=0.0, max_think_tokens=6, max_answer_tokens=3)
    r = generate(
        model,
        [[3, 4, 5]],
        cfg,
        group_size=1,
        sigma=0.0,
        think_end_ids=(63, 63),
        eos_id=1,
        pad_id=0,
        generator=torch.Generator().manual_seed(0),
    )
    return model, cfg, r.samples()[0]


def test_trace_steps_match_the_cot_distribution(soft_sample) -> None:
    model, cfg, s = soft_sample
    steps = trace_steps(model, s, cfg, k=4)
    assert len(steps) == len(s.cot_ids) == 6
    # reference: p_t from an uncached forward over E[prompt] ++ h_0..h_{T-1}, position P-1+t producing input t
    emb = model.get_input_embeddings().weight.detach()
    seq = torch.cat([emb[torch.tensor(s.prompt_ids)], s.cot_inputs])  # [P + T, d]
    with torch.no_grad():
        z = model(inputs_embeds=seq[None]).logits[0, len(s.prompt_ids) - 1 : -1]  # [T, V]
    log_p = cot_log_probs(z, cfg)  # [T, V]
    for t, st in enumerate(steps):
        probs, ids = torch.topk(log_p[t].exp(), 4)
        assert st.top_ids == ids.tolist()
        assert st.top_ids[0] == s.cot_top1_ids[t]  # the view agrees with the record's top-1
        torch.testing.assert_close(
            torch.tensor(st.top_probs), probs, atol=2e-5, rtol=0
        )  # replay also holds the answer: other kernel shapes
        assert st.top_probs == sorted(st.top_probs, reverse=True) and sum(st.top_probs) <= 1 + 1e-6
        assert st.entropy == pytest.approx(entropy(log_p[t]).item(), abs=1e-5)
        assert st.entropy == pytest.approx(s.cot_entropy[t], abs=1e-4)


def test_trace_text_and_html(soft_sample) -> None:
    model, cfg, s = soft_sample
    steps = trace_steps(model, s, cfg, k=3)
    tok = CharTokenizer()
    text = trace_table(steps, tok, header="sample 0")
    lines = text.splitlines()
    assert lines[0] == "sample 0" and len(lines) == 2 + len(steps)  # header, column titles, one row per step
    for st, line in zip(steps, lines[2:], strict=True):
        for i, p in zip(st.top_ids, st.top_probs, strict=True):
            assert f"{tok.decode([i])} {p:.3f}" in line
        assert f"{st.entropy:.3f}" in line
    assert "#5" in trace_table(steps)  # without a tokenizer ids are shown as #id

    page = trace_html(steps, tok, title="soft <trace>")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for st in steps:
        for i in st.top_ids:
            assert (tok.decode([i]) if i != 7 else "&lt;b&gt;") in page
    assert "soft &lt;trace&gt;" in page and "<b>" not in page  # user text is escaped
    # self-contained: no scripts, no external resources
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"(src|href)\s*=", page) and "url(" not in page and "@import" not in page
    assert page.count("<tr>") == 1 + len(steps)
