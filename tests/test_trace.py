"""Soft-trace view: the per-step top-k equal the replayed distribution, and the text / HTML renderings show them
and depend on nothing outside the page. The trace page (trace.html of scripts/evaluate.py) is parsed strictly
(html.parser, every element closed in order, only the expected tags and attributes) and, where a Chromium is
installed, rendered headless."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from rollouts.config import CotConfig
from rollouts.distributions import cot_log_probs, entropy
from rollouts.engine import generate
from rollouts.stopping import StopSpec
from rollouts.trace import (
    TracedSample,
    token_label,
    trace_html,
    trace_page,
    trace_sample,
    trace_steps,
    trace_table,
)
from tests.arch import one_thread, tiny_causal_lm  # noqa: F401 (fixture)
from tests.test_evaluate_cli import evaluate

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
        stop=StopSpec.on_ids((63, 63)),
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


# --- the trace page (trace.html) ----------------------------------------------------------------------------


class ChatTokenizer(CharTokenizer):
    """CharTokenizer with chat-style special tokens, which the page must show as text: 3 is `<|im_end|>` (it opens
    every prompt below) and 63 is `</think>` (the think-end delimiter, so it opens every answer)."""

    SPECIAL = {3: "<|im_end|>", 63: "</think>"}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.SPECIAL.get(i) or CharTokenizer.decode(self, [i]) for i in ids)


VOID = frozenset({"meta"})
TAGS = frozenset(
    {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "h2",
        "h3",
        "p",
        "span",
        "section",
        "pre",
        "table",
    }
    | {"tbody", "tr", "th", "td"}  # tbody: a browser's serialised DOM adds it
)
ATTRIBUTES = frozenset({"charset", "class", "style"})


@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def find(self, tag: str, cls: str | None = None) -> list[Node]:
        """Every descendant element `tag` (with class `cls`), in document order."""
        out = []
        for c in self.children:
            if isinstance(c, Node):
                if c.tag == tag and (cls is None or cls in c.classes):
                    out.append(c)
                out += c.find(tag, cls)
        return out


class StrictTree(HTMLParser):
    """A page as a tree of `Node`s, strictly: an end tag must close the innermost open element, every element is
    closed by the end, no comments, and only `TAGS` with `ATTRIBUTES` (no script, link, img, a, iframe; no src or
    href: nothing that loads or runs anything)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.open = [self.root]
        self.doctype: str | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        assert tag in TAGS, f"unexpected <{tag}> (inside <{self.open[-1].tag}>)"
        names = {name for name, _ in attrs}
        assert names <= ATTRIBUTES, f"<{tag}> has attributes {sorted(names - ATTRIBUTES)}"
        node = Node(tag, dict(attrs))
        self.open[-1].children.append(node)
        if tag not in VOID:
            self.open.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        assert tag in VOID, f"<{tag} /> is not a void element"
        self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        assert tag not in VOID and tag == self.open[-1].tag, f"</{tag}> closes <{self.open[-1].tag}>"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.open[-1].children.append(data)

    def handle_comment(self, data: str) -> None:
        raise AssertionError(f"comment <!--{data}--> in the page")


def parse_page(page: str) -> Node:
    """The page's tree (`StrictTree`), checked self-contained: no `url(` or `@import` in its CSS."""
    parser = StrictTree()
    parser.feed(page)
    parser.close()
    assert (parser.doctype or "").lower() == "doctype html", parser.doctype
    assert len(parser.open) == 1, f"unclosed: {[n.tag for n in parser.open[1:]]}"
    (html_node,) = [c for c in parser.root.children if isinstance(c, Node)]
    assert html_node.tag == "html"
    (style,) = html_node.find("style")
    styled = [n.attrs["style"] or "" for n in [html_node, *html_node.find("td")] if "style" in n.attrs]
    for css in [style.text(), *styled]:
        assert "url(" not in css and "@import" not in css, css
    return parser.root


@dataclass
class SectionView:
    """One `<section class="problem">` of a parsed trace page."""

    title: str
    verdict: list[str]  # the verdict line's parts: reward, status, think end, CoT steps, gold
    prompt: str
    answer: str
    rows: list[list[Node]]  # the <td> cells of every step row (the header row excluded)


def sections(root: Node) -> list[SectionView]:
    out = []
    for sec in root.find("section", "problem"):
        (h2,), (verdict,) = sec.find("h2"), sec.find("p", "verdict")
        (prompt,), (answer,), (table,) = (
            sec.find("pre", "prompt"),
            sec.find("pre", "answer"),
            sec.find("table"),
        )
        header, *trs = table.find("tr")
        assert [th.text() for th in header.find("th")][:3] == [
            "step",
            "H (nats)",
            "chosen",
        ] and not header.find("td")
        rows = [tr.find("td") for tr in trs]
        for cells in rows:  # step, H, chosen, then the top-k, the top-1 first and alone outlined
            assert [j for j, c in enumerate(cells) if "top1" in c.classes] == [3], [c.classes for c in cells]
        out.append(SectionView(h2.text(), verdict.text().split(" · "), prompt.text(), answer.text(), rows))
    return out


@pytest.fixture(scope="module")
def traced(soft_sample) -> list[TracedSample]:
    """Three samples of different CoT lengths: the soft one (6 steps) and two hard ones sampled at τ=1 (3 steps,
    so a chosen token may rank below the top-1), judged correct, wrong and not at all."""
    model, cfg, soft = soft_sample
    hard_cfg = CotConfig(
        name="hard_sample",
        mode="hard",
        temperature=1.0,
        noise_scale=0.0,
        max_think_tokens=3,
        max_answer_tokens=3,
    )
    hard = generate(
        model,
        [[3, 4, 5], [3, 6]],
        hard_cfg,
        group_size=1,
        sigma=0.0,
        stop=StopSpec.on_ids((63, 63)),
        eos_id=1,
        pad_id=0,
        generator=torch.Generator().manual_seed(1),
    ).samples()
    return [
        trace_sample(model, soft, cfg, title="p<0>", reward=1.0, status="ok", gold=["4<5"], k=4),
        trace_sample(model, hard[0], hard_cfg, title="p1", reward=0.0, status="wrong", gold=["7"], k=4),
        trace_sample(
            model, hard[1], hard_cfg, title="p2", reward=None, status="gold_unparseable", gold=["?"], k=4
        ),
    ]


def test_trace_page_structure(traced) -> None:
    tok = ChatTokenizer()
    page = trace_page(traced, tok, title="soft trace: <mode>", note="a <note>")
    views = sections(parse_page(page))
    assert [len(s.steps) for s in traced] == [6, 3, 3]
    assert len(views) == len(traced)  # one section per sample
    for view, s in zip(views, traced, strict=True):
        assert view.title == f"{traced.index(s)}. {s.title}"
        assert len(view.rows) == len(s.steps)  # one row per CoT step
        for cells, st in zip(view.rows, s.steps, strict=True):
            assert [c.text() for c in cells[:3]] == [
                str(st.step),
                f"{st.entropy:.3f}",
                tok.decode([st.chosen_id]),
            ]
            tops = [f"{tok.decode([i])} {p:.3f}" for i, p in zip(st.top_ids, st.top_probs, strict=True)]
            assert [c.text() for c in cells[3:]] == tops
            # a chosen token ranked below the top-1 (hard sampling) is marked too
            below = [st.top_ids.index(st.chosen_id)] if st.chosen_id in st.top_ids[1:] else []
            assert [j for j, c in enumerate(cells[3:]) if "picked" in c.classes] == below
        # special tokens are text: escaped in the source, the decoded string in the parsed page
        assert view.prompt == tok.decode(s.prompt_ids) and view.prompt.startswith("<|im_end|>")
        assert view.answer == tok.decode(s.answer_ids) and view.answer.startswith("</think>")
        assert view.verdict[1:4] == [
            f"status {s.status}",
            f"think end: {s.think_end}",
            f"CoT steps: {len(s.steps)}",
        ]
        assert view.verdict[4] == f"gold: {' | '.join(s.gold)}"
    assert [v.verdict[0] for v in views] == ["reward 1", "reward 0", "reward none (cannot judge)"]
    assert "&lt;/think&gt;" in page and "&lt;|im_end|&gt;" in page and "p&lt;0&gt;" in page
    assert not re.search(r"</think>|<\|im_end\|>|<b>|<mode>|<note>|4<5", page)
    assert "soft trace: &lt;mode&gt;" in page and "a &lt;note&gt;" in page


CHROMIUM = next(
    (
        p
        for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"))
        if p
    ),
    None,
)


@pytest.mark.skipif(
    CHROMIUM is None, reason="no headless Chromium on this machine (Debian: apt-get install chromium)"
)
def test_trace_page_renders_in_headless_chromium(traced, tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "trace.html"
    path.write_text(trace_page(traced, ChatTokenizer(), title="soft trace"), encoding="utf-8")
    # root needs --no-sandbox; the rest keeps Chromium off the (closed) network and out of the user's profile
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dump = subprocess.run(
        [*browser, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dump.returncode == 0, dump.stderr[-2000:]
    views = sections(parse_page(dump.stdout))  # the DOM Chromium built, serialised back
    assert [len(v.rows) for v in views] == [len(s.steps) for s in traced]
    assert all(v.answer.startswith("</think>") and v.prompt.startswith("<|im_end|>") for v in views)
    shot = tmp_path / "trace.png"
    done = subprocess.run(
        [*browser, "--window-size=1000,1400", f"--screenshot={shot}", path.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1000, 1400)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 16, (
        colours
    )  # text, shaded cells, outlines: not a blank page


def test_evaluate_writes_trace_html(tiny_base: Path, tmp_path: Path) -> None:
    """scripts/evaluate.py on the tiny model in a sampled mode: trace.html holds the first `trace_problems`
    problems, each with the first evaluated sample of its samples.jsonl row (the same CoT, answer and verdict,
    not a fresh draw)."""
    from transformers import AutoTokenizer

    out = tmp_path / "eval"
    done = evaluate(f"model.path={tiny_base}", "data=synthetic", "data.limit=3", "infer=soft_sample", "n=2",
                    "trace_problems=2", f"output_dir={out}", "reward.workers=1", "reward.spare_workers=0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    page = (out / "trace.html").read_text(encoding="utf-8")
    views = sections(parse_page(page))
    assert len(rows) == 3 and len(views) == 2
    tok = AutoTokenizer.from_pretrained(tiny_base)
    for j, (view, row) in enumerate(zip(views, rows[:2], strict=True)):
        s = row["samples"][0]
        assert view.title == f"{j}. {row['uid']}"
        assert len(view.rows) == len(s["cot_top1_ids"])  # one row per CoT step
        assert [r[2].text() for r in view.rows] == [
            token_label(tok, t) for t in s["cot_top1_ids"]
        ]  # the same CoT
        assert view.answer == tok.decode(s["answer_ids"]) and view.answer.startswith("</think>")
        assert view.verdict[:3] == [
            f"reward {s['reward']:g}",
            f"status {s['status']}",
            f"think end: {s['think_end']}",
        ]
    assert "&lt;/think&gt;" in page and "</think>" not in page

    off = tmp_path / "off"
    done = evaluate(f"model.path={tiny_base}", "data=synthetic", "data.limit=1", "infer=hard_greedy", "n=1",
                    "trace_problems=0", f"output_dir={off}", "reward.workers=1", "reward.spare_workers=0")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (off / "samples.jsonl").exists() and not (off / "trace.html").exists()
