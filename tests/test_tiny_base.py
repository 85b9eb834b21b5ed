"""The tiny base model, its tokenizer and the synthetic task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.config import compose, to_object
from rl.synthetic import SyntheticConfig, make_examples
from rl.tiny_base import REPORT_FILE, TinyBaseConfig, make_tiny_base
from rl.tokenizer import SPECIAL_TOKENS, build_char_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_tokenizer_round_trips_every_shared_file_without_unknowns(shared_data: Path) -> None:
    tok = build_char_tokenizer()
    assert tok.unk_token_id is None  # there is no unknown token at all: byte fallback covers everything
    for path in sorted(shared_data.glob("*.jsonl")):
        text = path.read_text(encoding="utf-8")
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text, path.name
        # one token per ASCII character; a non-ASCII character costs one token per UTF-8 byte
        assert len(ids) == sum(1 if ord(c) < 128 else len(c.encode()) for c in text), path.name


def test_special_tokens_are_single_tokens_and_the_template_renders() -> None:
    tok = build_char_tokenizer()
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "1+1?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<s>Q: 1+1?\nA: "


def test_synthetic_splits_are_disjoint_deterministic_and_correct() -> None:
    cfg = SyntheticConfig(num_train=2000, num_test=300, max_steps=3, max_digits=2, ops="+-x")
    train, test = make_examples(cfg, "train"), make_examples(cfg, "test")
    assert len(train) == 2000 and len(test) == 300
    assert not {e.question for e in train} & {e.question for e in test}
    assert make_examples(cfg, "test") == test  # same seed, same problems
    assert (
        make_examples(
            SyntheticConfig(num_train=10, num_test=300, max_steps=3, max_digits=2, ops="+-x"), "test"
        )
        == test
    )
    for ex in train + test:
        value = None
        for step in ex.steps:  # every step is a true equation that continues from the previous result
            lhs, rhs = step.split("=")
            a, op, b = next((lhs.partition(o) for o in "+-x" if o in lhs[1:]), None)
            assert value is None or int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "x": int(a) * int(b)}[op]
            assert value == int(rhs) and value >= 0
        assert value == ex.answer and cfg.min_steps <= len(ex.steps) <= cfg.max_steps
    with pytest.raises(ValueError, match="synthetic.ops"):
        SyntheticConfig(ops="/")


def test_build_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    """Two builds of a shrunken recipe give identical weights (the full build is the cached fixture's)."""
    over = ["sft.steps=3", "sft.batch_size=4", "eval_problems=4", "arch.hidden_size=32", "arch.num_layers=1",
            "arch.num_heads=2", "arch.intermediate_size=64", "synthetic.num_train=50"]  # fmt: skip
    reports = []
    for name in ("a", "b"):
        cfg = to_object(compose("tiny_base", [*over, f"output_dir={tmp_path / name}"]), TinyBaseConfig)
        reports.append(make_tiny_base(cfg, progress=False))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert reports[0]["fingerprint"] == reports[1]["fingerprint"]
    assert reports[0]["final_sft_loss"] == reports[1]["final_sft_loss"]


def test_cached_tiny_base_meets_its_contract(tiny_base: Path) -> None:
    report = json.loads((tiny_base / REPORT_FILE).read_text())
    # 1-5M parameters; held-out greedy accuracy between 0.2 and 0.8 so that RL has both signal and room
    assert 1_000_000 <= report["params"] <= 5_000_000, report
    assert 0.2 <= report["heldout_accuracy"] <= 0.8, report
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == report["params"]
    assert tok.decode(tok("x²</think>", add_special_tokens=False).input_ids) == "x²</think>"


def test_make_tiny_base_script_prints_json_last(tmp_path: Path) -> None:
    over = ["sft.steps=2", "sft.batch_size=2", "eval_problems=2", "arch.hidden_size=32", "arch.num_layers=1",
            "arch.num_heads=2", "arch.intermediate_size=64", "synthetic.num_train=20"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "scripts/make_tiny_base.py", f"output_dir={tmp_path / 'm'}", *over],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(last) >= {"heldout_accuracy", "params"}
    assert (tmp_path / "m" / "config.json").exists() and (tmp_path / "m" / "tokenizer.json").exists()


def test_processes_started_together_build_the_tiny_base_once(tmp_path: Path, monkeypatch) -> None:
    """`accelerate launch` starts every process on a missing tiny base: one builds under the file lock, the
    others wait and find its build (the build itself is stood in for: it writes the report after a pause)."""
    import threading
    import time

    import rl.tiny_base as tb

    cfg = to_object(compose("tiny_base", [f"output_dir={tmp_path / 'tiny_base'}"]), TinyBaseConfig)
    builds = []

    def slow_build(c: TinyBaseConfig) -> dict:
        builds.append(c.output_dir)
        time.sleep(0.5)
        out = Path(c.output_dir)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        report = {"fingerprint": c.fingerprint()}
        (out / REPORT_FILE).write_text(json.dumps(report))
        return report

    monkeypatch.setattr(tb, "is_tiny_base", lambda path: True)
    monkeypatch.setattr(tb, "build_pinned", slow_build)
    reports = []
    workers = [threading.Thread(target=lambda: reports.append(tb.ensure_tiny_base(cfg))) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(builds) == 1 and len(reports) == 3 and all(r == reports[0] for r in reports)
