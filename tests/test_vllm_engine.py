"""The vLLM engine (rollouts/vllm_engine.py) through a stand-in with vLLM's offline interface, on Hugging Face
models (the trained tiny base, and tiny random Llamas with a toy vocabulary), float32, CPU.

vLLM cannot be installed here, so `FakeLLM` / `FakeSamplingParams` imitate the parts of `vllm.LLM.generate`,
`vllm.SamplingParams`, `RequestOutput`, `CompletionOutput` and `Logprob` the adapter relies on, written from
vLLM's documented behaviour (not from how the adapter reads it):

- `SamplingParams` is keyword-only with vLLM's names; an unknown keyword is a TypeError, as it is in vLLM.
- `LLM.generate(prompts, sampling_params, use_tqdm=...)` takes `{"prompt_token_ids": [...]}` prompts and returns
  one RequestOutput per prompt, in order, each with `n` CompletionOutputs. Greedy at temperature 0, else a draw
  from softmax(filter(z / τ)) with a generator seeded per request (vLLM V1 gives child i of an n > 1 request the
  seed `seed + i`), so a seeded request is reproducible whatever else is in the batch.
- Stops, in vLLM's order: EOS (unless `ignore_eos`), a `stop_token_ids` id (`stop_reason` = that id), a `stop`
  string found in the decoded text of the generated tokens (`stop_reason` = the string; `token_ids` keep every
  generated token, the text is cut after / before it by `include_stop_str_in_output`), then `max_tokens`
  (`finish_reason="length"`). `stop_reason` is None for EOS and length.
- `logprobs=k`: per generated token a dict id -> Logprob(logprob, rank, decoded_token) holding the sampled token
  and the top-k tokens, rank 1 = most likely; log-probs are vLLM's default `raw_logprobs` (log_softmax of the
  unprocessed logits); `logprobs=None` gives `logprobs=None`.
- `include_stop_token`: whether the token that stopped the request (EOS or a stop id) is kept in `token_ids` (and
  its log-prob entry). Current vLLM keeps it; the adapter says it does not depend on it, so both are tested.

What is tested: hard_greedy through `evaluate_mode` on the trained tiny base gives the eager engine's rows
(all but `cot_entropy`, which vLLM cannot give); every stop rule (a phrase crossing a token boundary, a
one-token delimiter, EOS, the cap, each also at exactly step T) and the answer's EOS give the eager record on a
toy vocabulary; `cot_outcome` reads each reason in the documented priority order; hard_sample's record has the
engines' format and the vLLM requests carry n = G and the answer's temperature; and what vLLM cannot do is
refused, with the reason named.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from rollouts.config import CotConfig
from rollouts.engine import generate
from rollouts.engines import EagerEngine
from rollouts.record import THINK_END_REASONS, Rollouts
from rollouts.replay import replay
from rollouts.stopping import StopSpec, phrase_table
from rollouts.vllm_engine import VllmEngine, cot_outcome, stopped_tokens, vllm_reason
from rollouts.vllm_engine import __doc__ as vllm_engine_doc
from tests.arch import one_thread, tiny_causal_lm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------------------- the vLLM stand-in

GREEDY_EPS = 1e-5  # vLLM treats temperature < 1e-5 as greedy


@dataclass
class FakeLogprob:
    """vllm.sequence.Logprob."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletionOutput:
    """vllm.outputs.CompletionOutput."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, FakeLogprob]] | None
    finish_reason: str | None = None  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop id or string; None for EOS and length


@dataclass
class FakeRequestOutput:
    """vllm.outputs.RequestOutput (for a token-id prompt, `prompt` is None)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: None
    outputs: list[FakeCompletionOutput]
    finished: bool = True


class FakeSamplingParams:
    """vllm.SamplingParams, keyword-only, with vLLM's names and value checks; any other keyword is refused."""

    def __init__(
        self,
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        max_tokens: int | None = 16,
        logprobs: int | None = None,
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}.")
        if temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {temperature}.")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        if top_k < -1:  # 0 (current vLLM) or -1 (vLLM <= 0.7) disable it
            raise ValueError(f"top_k must be 0 or -1 (disable), or at least 1, got {top_k}.")
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}.")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}.")
        if logprobs is not None and logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {logprobs}.")
        if seed is not None and not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.n, self.temperature, self.top_p, self.top_k, self.min_p = n, temperature, top_p, top_k, min_p
        self.seed, self.ignore_eos, self.max_tokens, self.logprobs = seed, ignore_eos, max_tokens, logprobs
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.stop_token_ids = list(stop_token_ids or [])
        self.skip_special_tokens = skip_special_tokens
        self.include_stop_str_in_output = include_stop_str_in_output


class FakeLLM:
    """`vllm.LLM` on a Hugging Face causal LM: token-by-token decoding with full forwards (the models are tiny).
    `sampling_params` is one SamplingParams or one per prompt, as in vLLM. Every request is kept in `requests`
    as (prompt token ids, its sampling params), in the order received."""

    def __init__(self, model: Any, tokenizer: Any, eos_id: int, include_stop_token: bool = True):
        self.model, self.tokenizer, self.eos_id = model, tokenizer, eos_id
        self.include_stop_token = include_stop_token
        self.requests: list[tuple[list[int], FakeSamplingParams]] = []

    def generate(
        self, prompts: Any, sampling_params: Any = None, use_tqdm: bool = True
    ) -> list[FakeRequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts) or not all(isinstance(sp, FakeSamplingParams) for sp in params):
            raise TypeError("sampling_params must be a SamplingParams or a list of one per prompt")
        if not isinstance(prompts, list) or not all(
            isinstance(p, dict) and set(p) == {"prompt_token_ids"} for p in prompts
        ):
            raise TypeError("this stand-in takes a list of TokensPrompt dicts {'prompt_token_ids': [...]}")
        for p in prompts:
            ids = p["prompt_token_ids"]
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise TypeError(f"prompt_token_ids must be a non-empty list of ints, got {ids!r}")
        self.requests += [(list(p["prompt_token_ids"]), sp) for p, sp in zip(prompts, params, strict=True)]
        return [
            FakeRequestOutput(
                request_id=str(r),
                prompt=None,
                prompt_token_ids=list(p["prompt_token_ids"]),
                prompt_logprobs=None,
                outputs=[self._complete(p["prompt_token_ids"], sp, i) for i in range(sp.n)],
            )
            for r, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]

    def _next_token(self, logits: torch.Tensor, sp: FakeSamplingParams, gen: torch.Generator) -> int:
        if sp.temperature < GREEDY_EPS:
            return int(logits.argmax())
        z = logits / sp.temperature
        if sp.top_k > 0:
            z = z.masked_fill(z < torch.topk(z, min(sp.top_k, z.numel())).values[-1], -math.inf)
        probs = torch.softmax(z, dim=-1)
        if sp.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            drop = (sorted_p.cumsum(0) - sorted_p) >= sp.top_p
            probs = probs.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), 0.0)
        if sp.min_p > 0.0:
            probs = probs.masked_fill(probs < sp.min_p * probs.max(), 0.0)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))

    def _logprob_entry(self, raw: torch.Tensor, token: int, k: int) -> dict[int, FakeLogprob]:
        def entry(i: int) -> FakeLogprob:
            rank = int((raw >= raw[i]).sum())
            return FakeLogprob(float(raw[i]), rank, self.tokenizer.decode([i]))

        out = {token: entry(token)}  # the sampled token first, then the top-k
        for i in torch.topk(raw, k).indices.tolist() if k > 0 else []:
            out.setdefault(i, entry(i))
        return out

    @torch.no_grad()
    def _complete(self, prompt: list[int], sp: FakeSamplingParams, index: int) -> FakeCompletionOutput:
        gen = torch.Generator()
        if sp.seed is not None:
            gen.manual_seed(sp.seed + index)
        else:
            gen.seed()
        device = self.model.device
        ids: list[int] = []
        steps: list[dict[int, FakeLogprob]] = []
        finish, reason, stop_token, cut = "length", None, False, None
        while sp.max_tokens is None or len(ids) < sp.max_tokens:
            logits = (
                self.model(torch.tensor([prompt + ids], device=device)).logits[0, -1].float().cpu()
            )  # [V]
            token = self._next_token(logits, sp, gen)
            ids.append(token)
            steps.append(self._logprob_entry(torch.log_softmax(logits, -1), token, sp.logprobs or 0))
            if not sp.ignore_eos and token == self.eos_id:
                finish, stop_token = "stop", True
                break
            if token in sp.stop_token_ids:
                finish, reason, stop_token = "stop", token, True
                break
            text = self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)
            found = [(text.find(s), s) for s in sp.stop if s in text]
            if found:
                at, s = min(found)
                finish, reason = "stop", s
                cut = at + len(s) if sp.include_stop_str_in_output else at
                break
        if stop_token and not self.include_stop_token:
            ids, steps = ids[:-1], steps[:-1]
        text = self.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)
        if cut is not None:
            text = text[:cut]
        logprobs = None if sp.logprobs is None else steps
        cumulative = None if logprobs is None else sum(s[t].logprob for s, t in zip(steps, ids, strict=True))
        return FakeCompletionOutput(index, text, ids, cumulative, logprobs, finish, reason)


def test_stand_in_refuses_unknown_keywords_and_follows_vllm_stops() -> None:
    # the stand-in itself: a misspelt keyword fails as vLLM's would, and the finish / stop reasons follow vLLM
    # (EOS -> stop with stop_reason None; a stop id -> that id; cap -> length).
    with pytest.raises(TypeError):
        FakeSamplingParams(max_new_tokens=4)
    with pytest.raises(TypeError):
        FakeSamplingParams(stop_token_id=[3])
    model = toy_model()
    tok = ToyTokenizer(eos_id=1)
    free = (
        FakeLLM(model, tok, eos_id=-1)
        .generate(
            [{"prompt_token_ids": PROMPTS[0]}], FakeSamplingParams(temperature=0.0, max_tokens=6, logprobs=1)
        )[0]
        .outputs[0]
    )
    assert (free.finish_reason, free.stop_reason, len(free.token_ids)) == ("length", None, 6)
    assert all(min(s.values(), key=lambda x: x.rank).rank == 1 for s in free.logprobs)
    k = first_new(free.token_ids, 2)
    third = free.token_ids[k]
    for keep in (True, False):
        llm = FakeLLM(model, tok, eos_id=third, include_stop_token=keep)
        (at_eos,) = llm.generate([{"prompt_token_ids": PROMPTS[0]}], FakeSamplingParams(temperature=0.0))[
            0
        ].outputs
        assert (at_eos.finish_reason, at_eos.stop_reason) == ("stop", None)
        assert at_eos.token_ids == free.token_ids[: k + 1 if keep else k]
        (at_id,) = (
            FakeLLM(model, tok, eos_id=-1, include_stop_token=keep)
            .generate(
                [{"prompt_token_ids": PROMPTS[0]}],
                FakeSamplingParams(temperature=0.0, stop_token_ids=[third]),
            )[0]
            .outputs
        )
        assert (at_id.finish_reason, at_id.stop_reason) == ("stop", third)


# ------------------------------------------------ hard_greedy through evaluate_mode, on the trained tiny base

HARD_GREEDY = CotConfig(name="hard_greedy", mode="hard", temperature=0.0, answer_temperature=0.0,
                        max_think_tokens=48, max_answer_tokens=16)  # fmt: skip
K = 8  # problems


@dataclass
class Base:
    model: Any
    tokenizer: Any
    prompt: Any
    problems: list
    pool: Any
    eager: tuple = field(default=())


@pytest.fixture(scope="module")
def base(tiny_base: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewards import RewardPool
    from rewards.config import RewardConfig
    from rl.data import DataConfig, load_problems
    from rl.model import read_profile

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    problems = load_problems(DataConfig(), "test")[:K]
    with RewardPool(RewardConfig(), workers=1, spare_workers=0) as pool:
        b = Base(model, tokenizer, read_profile(tiny_base).prompt, problems, pool)
        b.eager = evaluate(b, EagerEngine())
        yield b


def evaluate(b: Base, engine: Any) -> tuple:
    from rl.evaluation import evaluate_mode

    return evaluate_mode(b.model, b.tokenizer, b.problems, HARD_GREEDY, n=2, pool=b.pool, prompt=b.prompt,
                         sigma=0.0, seed=0, batch_size=4, progress=False, engine=engine)  # fmt: skip


@pytest.mark.parametrize("include_stop_token", [True, False], ids=["stop-token-kept", "stop-token-dropped"])
def test_hard_greedy_evaluation_rows_equal_eager(base: Base, include_stop_token: bool) -> None:
    # hard_greedy is deterministic, so the eager engine and vLLM (greedy: argmax of the same logits) must write
    # the same rows for the trained tiny model: same top-1 CoT ids, answer ids, judged text, reward, status and
    # think-end reason for every sample, and the same summary (pass@k, lengths, reasons, statuses). The one
    # documented exception is `cot_entropy`: vLLM returns top-k log-probs, not p_t, so the adapter records NaN
    # at every CoT step (module doc of rollouts/vllm_engine.py). Here a row may carry either that NaN per step or
    # the documented `null` (checked strictly in the next test), never a number; the entropy profile likewise.
    eager_rows, eager_summary, _ = base.eager
    llm = FakeLLM(base.model, base.tokenizer, base.tokenizer.eos_token_id, include_stop_token)
    rows, summary, _ = evaluate(base, VllmEngine(llm, FakeSamplingParams))
    assert len(rows) == len(eager_rows) == K
    reasons = {s["think_end"] for row in eager_rows for s in row["samples"]}
    assert "token" in reasons  # the premise: the trained model closes its thinking with </think>
    for ours, eager in zip(rows, eager_rows, strict=True):
        assert {k: ours[k] for k in ("uid", "prompt_ids", "answer")} == {
            k: eager[k] for k in ("uid", "prompt_ids", "answer")
        }
        assert len(ours["samples"]) == len(eager["samples"]) == 2
        for s, e in zip(ours["samples"], eager["samples"], strict=True):
            assert set(s) == set(e)
            assert {k: v for k, v in s.items() if k != "cot_entropy"} == {
                k: v for k, v in e.items() if k != "cot_entropy"
            }
            h = s["cot_entropy"]
            assert h is None or (len(h) == len(s["cot_top1_ids"]) and all(math.isnan(x) for x in h)), h
    for name in ("mode", "n", "problems", "pass_at", "mean_cot_len", "mean_answer_len", "think_end",
                 "reward_status", "sigma", "per_problem_pass1"):  # fmt: skip
        assert getattr(summary, name) == getattr(eager_summary, name), name
    assert all(math.isnan(h) for h in summary.cot_entropy_by_position)  # NaN, or empty: no made-up profile
    assert summary.samples_at_position in ([], eager_summary.samples_at_position)
    assert "`cot_entropy` is NaN" in vllm_engine_doc  # and the adapter says so
    # a CoT request and an answer request per problem, 1 sample each (a deterministic mode is rolled out once)
    assert len(llm.requests) == 2 * K and all(sp.n == 1 for _, sp in llm.requests)


def test_evaluation_writes_null_cot_entropy_for_vllm_samples(base: Base, tmp_path: Path) -> None:
    # the adapter's module doc: "`cot_entropy` is NaN and evaluation writes `cot_entropy: null` for these
    # samples". samples.jsonl and summary.json must be standard JSON (NaN is not JSON: json.loads accepts it
    # only as a Python extension, other readers refuse it), with the sample's `cot_entropy` null.
    from rl.evaluation import write_outputs

    llm = FakeLLM(base.model, base.tokenizer, base.tokenizer.eos_token_id)
    rows, summary, _ = evaluate(base, VllmEngine(llm, FakeSamplingParams))
    write_outputs(tmp_path, rows[:2], summary, "infer: hard_greedy\n")

    def strict(text: str) -> Any:
        def refuse(name: str) -> None:
            raise ValueError(f"{name} is not valid JSON")

        return json.loads(text, parse_constant=refuse)

    for line in (tmp_path / "samples.jsonl").read_text().splitlines():
        for s in strict(line)["samples"]:
            assert s["cot_entropy"] is None
    strict((tmp_path / "summary.json").read_text())


# ------------------------------------------------------------------------------- a toy vocabulary with texts

PAD = 0
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # different lengths: the eager engine left-pads them
SINGLE = "abcdefghijklmnopqrstuvwxyz0123456789 :.#|~"
PIECES = [x + y for x in "abcd:|#." for y in "ef:|~ "]
TOY_TEXTS = ["<pad>", "<eos>", *SINGLE, *PIECES]  # 2 + 42 + 48 = 92 tokens; id 1 is the default EOS


class ToyTokenizer:
    """A tokenizer over TOY_TEXTS with what the engines and evaluation call: `decode` (the concatenated token
    texts, pad and EOS dropped when skipping special tokens), `batch_decode`, `__call__` (longest match over the
    non-special tokens; `.input_ids`), `__len__`, `eos_token_id`, `pad_token_id`."""

    def __init__(self, eos_id: int = 1):
        self.texts = TOY_TEXTS
        self.eos_token_id, self.pad_token_id = eos_id, PAD
        self.special = {PAD, eos_id}

    def __len__(self) -> int:
        return len(self.texts)

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.texts[i] for i in ids if not (skip_special_tokens and i in self.special))

    def batch_decode(self, seqs: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def __call__(self, text: str | list[str], add_special_tokens: bool = False) -> SimpleNamespace:
        if isinstance(text, list):
            return SimpleNamespace(input_ids=[self(t).input_ids for t in text])
        ids, at = [], 0
        while at < len(text):
            best = max(
                (i for i, t in enumerate(self.texts) if i not in self.special and text.startswith(t, at)),
                key=lambda i: len(self.texts[i]),
                default=None,
            )
            if best is None:  # a character the vocabulary lacks: encoded as the pad (decodes as "<pad>")
                best, step = PAD, 1
            else:
                step = len(self.texts[best])
            ids.append(best)
            at += step
        return SimpleNamespace(input_ids=ids)


@functools.cache
def toy_model():
    return tiny_causal_lm("llama", True, vocab_size=len(TOY_TEXTS), seed=0)


def greedy_stream(prompt: list[int], steps: int = 24) -> list[int]:
    """The model's greedy continuation of `prompt`, nothing stopping it."""
    llm = FakeLLM(toy_model(), ToyTokenizer(), eos_id=-1)
    params = FakeSamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0].token_ids


def first_new(stream: list[int], start: int) -> int:
    """The first index >= start whose token did not occur before it."""
    return next(k for k in range(start, len(stream)) if stream[k] not in stream[:k])


def crossing_phrase(stream: list[int], min_len: int = 3) -> tuple[str, int]:
    """(phrase, j): a phrase of >= `min_len` characters whose FIRST occurrence in the decoded stream starts inside
    token j - 1 and ends inside token j (so it crosses their boundary), j as small as possible."""
    text, starts = "", []
    for t in stream:
        starts.append(len(text))
        text += TOY_TEXTS[t]
    for j in range(2, len(stream)):
        a, b = TOY_TEXTS[stream[j - 1]], TOY_TEXTS[stream[j]]
        for la in range(1, len(a) + 1):
            for lb in range(1, len(b) + 1):
                phrase = a[-la:] + b[:lb]
                if len(phrase) >= min_len and text.find(phrase) == starts[j - 1] + len(a) - la:
                    return phrase, j
    raise AssertionError(f"no boundary-crossing phrase in {text!r}")


def never_phrase(tok: ToyTokenizer) -> StopSpec:
    """The text rule with a phrase no token's text has a character of: it never matches."""
    prefill = tok(" #").input_ids
    return StopSpec.on_text(phrase_table("@@", TOY_TEXTS), capped=prefill, prefill=prefill, phrase="@@")


def hard(temperature: float = 0.0, **kw: Any) -> CotConfig:
    base = dict(
        name="hard_greedy" if temperature == 0 else "hard_sample",
        mode="hard",
        temperature=temperature,
        noise_scale=0.0,
        answer_temperature=0.0,
        max_think_tokens=16,
        max_answer_tokens=5,
    )
    return CotConfig(**{**base, **kw})


def run_both(
    cfg: CotConfig, stop: StopSpec, tok: ToyTokenizer, include_stop_token: bool, group_size: int = 1
) -> tuple[Rollouts, Rollouts, FakeLLM]:
    """(the vLLM adapter's record, the eager engine's record, the stand-in) for the same request."""
    model = toy_model()
    kw = dict(group_size=group_size, sigma=0.0, stop=stop, eos_id=tok.eos_token_id, pad_id=PAD, tokenizer=tok)
    llm = FakeLLM(model, tok, tok.eos_token_id, include_stop_token)
    ours = VllmEngine(llm, FakeSamplingParams).generate(
        model, PROMPTS, cfg, generator=torch.Generator().manual_seed(0), **kw
    )
    eager = generate(model, PROMPTS, cfg, generator=torch.Generator().manual_seed(0), **kw)
    return ours, eager, llm


def assert_same_record(ours: Rollouts, eager: Rollouts, dropped_eos: int | None = None) -> None:
    """Token for token the eager record; log-probs to float32 rounding (the eager engine runs a left-padded
    batch on a KV cache, the stand-in full unpadded forwards: ~1e-6 apart); the CoT entropy is NaN on every real
    CoT step (vLLM does not return it, module doc of rollouts/vllm_engine.py) and 0 past the CoT.
    `dropped_eos`: the EOS id when vLLM left the stopping token out of token_ids and logprobs; the adapter then
    cannot know the answer EOS's log-prob, which may be NaN (`_token_logprobs`: "NaN ... when absent"), never
    another number."""
    for name in (
        "prompt_ids", "prompt_mask", "group_index", "cot_ids", "cot_top1_ids", "cot_mask",
        "answer_ids", "answer_mask", "answer_action_mask",
    ):  # fmt: skip
        assert torch.equal(getattr(ours, name), getattr(eager, name)), name
    reasons = lambda r: [THINK_END_REASONS[i] for i in r.think_end.tolist()]
    assert reasons(ours) == reasons(eager)
    torch.testing.assert_close(ours.cot_logprobs, eager.cot_logprobs, atol=1e-4, rtol=0)
    known = ~torch.isnan(ours.answer_logprobs)
    may_be_unknown = ours.answer_action_mask & (ours.answer_ids == dropped_eos)
    assert (known | may_be_unknown).all(), "NaN answer log-prob where vLLM gave one"
    torch.testing.assert_close(ours.answer_logprobs[known], eager.answer_logprobs[known], atol=1e-4, rtol=0)
    assert ours.answer_texts == eager.answer_texts
    assert torch.isnan(ours.cot_entropy[ours.cot_mask]).all()
    assert (ours.cot_entropy[~ours.cot_mask] == 0).all()
    assert (ours.cot_mode, ours.sigma, ours.temperature, ours.sampling) == (
        eager.cot_mode, eager.sigma, eager.temperature, eager.sampling
    )  # fmt: skip


# ----------------------------------------------- the stop rules against the eager engine, on a toy vocabulary


@pytest.mark.parametrize("include_stop_token", [True, False], ids=["stop-token-kept", "stop-token-dropped"])
@pytest.mark.parametrize("case", ["phrase", "phrase-at-T", "phrase-at-T+1", "cap"])
def test_phrase_rule_equals_eager(case: str, include_stop_token: bool) -> None:
    # The phrase is derived from prompt 0's greedy stream so that its first occurrence starts in token j-1 and
    # ends in token j (a boundary-crossing match: vLLM finds it as a stop string in the decoded text, the eager
    # engine with its character automaton). Completed by token j (0-based), the CoT keeps tokens 0..j and the
    # NEXT step ends with reason `phrase` (rollouts/stopping.py), forcing only the prefill. T = j + 1 puts the
    # completing token exactly at the T-th step (phrase still wins over the cap); T = j makes it the (T+1)-th,
    # which the cap reaches first (max_tokens, then the phrase + prefill are forced). `cap`: a phrase of
    # characters no token has, so every row runs to T. Rows 1 and 2 end however they end: they must match too.
    phrase, j = crossing_phrase(greedy_stream(PROMPTS[0]))
    tok = ToyTokenizer(eos_id=1)
    t_cap, expect = {"phrase": (16, "phrase"), "phrase-at-T": (j + 1, "phrase"), "phrase-at-T+1": (j, "max_tokens"),
                     "cap": (16, "max_tokens")}[case]  # fmt: skip
    stop = StopSpec.from_tokenizer(tok, phrase, "text", prefill=" #") if case != "cap" else never_phrase(tok)
    cfg = hard(max_think_tokens=t_cap)
    ours, eager, llm = run_both(cfg, stop, tok, include_stop_token)
    dropped = None if include_stop_token else tok.eos_token_id
    assert THINK_END_REASONS[int(eager.think_end[0])] == expect  # the premise of the case
    if case == "phrase":
        assert int(eager.cot_lengths[0]) == j + 1
    assert_same_record(ours, eager, dropped)
    cot_requests, answer_requests = llm.requests[: len(PROMPTS)], llm.requests[len(PROMPTS) :]
    for prompt, (ids, sp) in zip(PROMPTS, cot_requests, strict=True):
        assert ids == prompt and sp.stop == [stop.phrase] and sp.include_stop_str_in_output
        assert sp.max_tokens == t_cap + 1 and sp.stop_token_ids == [] and not sp.skip_special_tokens
    forced = [list(stop.forced[r]) for r in (THINK_END_REASONS[i] for i in ours.think_end.tolist())]
    assert forced[0] == list(stop.forced[expect])
    for s, (body, _), f in zip(ours.samples(), answer_requests, forced, strict=True):
        assert body == s.prompt_ids + s.cot_ids + f  # the answer continues prompt + CoT + forced tokens


@pytest.mark.parametrize("include_stop_token", [True, False], ids=["stop-token-kept", "stop-token-dropped"])
@pytest.mark.parametrize("at_cap", [False, True], ids=["before-T", "at-T"])
def test_eos_in_the_cot_equals_eager(at_cap: bool, include_stop_token: bool) -> None:
    # EOS = a token prompt 0's greedy stream says first at step k: thinking ends there with reason `eos` (the EOS
    # is not fed; the phrase + prefill are forced). With T = k the EOS comes exactly at step T, where it still
    # wins over the cap (priority 2 before 4). The greedy answers may say this EOS too, ending the answer there.
    stream = greedy_stream(PROMPTS[0])
    k = first_new(stream, 4)
    tok = ToyTokenizer(eos_id=stream[k])
    stop = never_phrase(tok)
    cfg = hard(max_think_tokens=k if at_cap else 16)
    ours, eager, _ = run_both(cfg, stop, tok, include_stop_token)
    dropped = None if include_stop_token else tok.eos_token_id
    assert THINK_END_REASONS[int(eager.think_end[0])] == "eos" and int(eager.cot_lengths[0]) == k
    assert_same_record(ours, eager, dropped)


@pytest.mark.parametrize("include_stop_token", [True, False], ids=["stop-token-kept", "stop-token-dropped"])
@pytest.mark.parametrize("at_cap", [False, True], ids=["before-T", "at-T"])
def test_single_token_delimiter_equals_eager(at_cap: bool, include_stop_token: bool) -> None:
    # the ids rule with a one-token delimiter: vLLM stops on it as a stop id (stop_reason = the id); the CoT ends
    # with reason `token` at the step whose token is the delimiter, also when that step is T (priority 1 before
    # the cap). The adapter claims not to depend on whether vLLM keeps the stop token in token_ids.
    stream = greedy_stream(PROMPTS[0])
    k = first_new(stream, 4)
    tok = ToyTokenizer(eos_id=1)
    stop = StopSpec.on_ids([stream[k]], prefill=tok(" #").input_ids)
    cfg = hard(max_think_tokens=k if at_cap else 16)
    ours, eager, llm = run_both(cfg, stop, tok, include_stop_token)
    dropped = None if include_stop_token else tok.eos_token_id
    assert THINK_END_REASONS[int(eager.think_end[0])] == "token" and int(eager.cot_lengths[0]) == k
    assert_same_record(ours, eager, dropped)
    for _, sp in llm.requests[: len(PROMPTS)]:
        assert sp.stop_token_ids == [stream[k]] and sp.stop == []


@pytest.mark.parametrize("include_stop_token", [True, False], ids=["stop-token-kept", "stop-token-dropped"])
def test_answer_ending_at_eos_equals_eager(include_stop_token: bool) -> None:
    # the answer phase ends at EOS, which is kept in answer_ids as an action with its log-prob. The CoT runs to
    # the cap (a phrase that never matches), so only the answer is at stake. EOS = the first token of prompt 0's
    # greedy answer (found from an EOS-free eager run) said neither in its CoT nor earlier in the answer, at
    # answer step m >= 1, so the answer is [forced..., a_0 .. a_{m-1}, EOS]. When vLLM leaves the EOS out of
    # token_ids (and out of `logprobs`), the adapter appends it itself: the record must still equal the eager
    # one, the EOS's log-prob included.
    tok = ToyTokenizer(eos_id=1)
    stop, cfg = never_phrase(tok), hard(max_think_tokens=6)
    probe = generate(toy_model(), PROMPTS, cfg, group_size=1, sigma=0.0, stop=stop, eos_id=-1, pad_id=PAD,
                     generator=torch.Generator().manual_seed(0)).samples()[0]  # fmt: skip
    answer = probe.answer_ids[len(stop.forced["max_tokens"]) :]
    m = next(m for m in range(1, len(answer)) if answer[m] not in probe.cot_ids + answer[:m])
    tok = ToyTokenizer(eos_id=answer[m])
    ours, eager, _ = run_both(cfg, never_phrase(tok), tok, include_stop_token)
    dropped = None if include_stop_token else tok.eos_token_id
    row0 = eager.samples()[0]
    assert (
        row0.think_end == "max_tokens" and row0.answer_ids[-1] == answer[m]
    )  # the premise: EOS ends the answer
    assert_same_record(ours, eager, dropped)


# ----------------------------------------------------------------------------------------- cot_outcome itself

TEXTS = ["x", "i", "s", ":", "is", ":\n", "y", "</s>"]  # the phrase "is:" can cross "is" | ":\n"
X, I_, S, COLON, IS, COLON_NL, Y, EOS_T = range(8)
PHRASE = StopSpec.on_text(phrase_table("is:", TEXTS), capped=[IS, COLON], phrase="is:")
IDS = StopSpec.on_ids([9])


def outcome(tokens: list[int], stop: StopSpec, max_think: int, eos: int = EOS_T) -> tuple[list[int], str]:
    top1 = [t + 100 for t in tokens]  # distinct from the tokens: shows that top-1 and log-probs are cut alike
    o = cot_outcome(tokens, top1, [float(i) for i in range(len(tokens))], stop, eos, max_think)
    assert o.top1 == [t + 100 for t in o.cot] and o.logprobs == [float(i) for i in range(len(o.cot))]
    return o.cot, o.reason


@pytest.mark.parametrize(
    "tokens,stop,max_think,expect",
    [
        # ids rule: the delimiter at step t ends the CoT before it, reason token
        ([4, 5, 9, 7], IDS, 8, ([4, 5], "token")),
        ([4, 5, 9], IDS, 2, ([4, 5], "token")),  # delimiter exactly at step T: token wins over the cap
        ([9], IDS, 0, ([], "token")),  # T = 0: the first step is step T
        ([4, 5, 6], IDS, 2, ([4, 5], "max_tokens")),  # T+1 tokens, none a stop: the cap
        ([4, 5, 6, 9], IDS, 2, ([4, 5], "max_tokens")),  # the delimiter one step past T comes too late
        ([5], IDS, 0, ([], "max_tokens")),
        # EOS (generate puts back an EOS vLLM left out of token_ids: `stopped_tokens`, tested below)
        ([4, EOS_T, 6], IDS, 8, ([4], "eos")),
        ([4, 5, EOS_T], IDS, 2, ([4, 5], "eos")),  # EOS exactly at step T: eos wins over the cap
        ([4, 5], IDS, 8, ([4, 5], "max_tokens")),  # ended short of every rule (a length limit, an abort)
        ([], IDS, 8, ([], "max_tokens")),
        ([4, 5, 9], StopSpec.on_ids([5]), 8, ([4], "token")),
        (
            [4, EOS_T],
            StopSpec.on_ids([EOS_T]),
            8,
            ([4], "token"),
        ),  # delimiter = EOS: token first (priority 1)
        # text rule: the step after the phrase's last character ends the CoT, the phrase's tokens stay in it
        ([X, IS, COLON_NL, Y, Y], PHRASE, 8, ([X, IS, COLON_NL], "phrase")),
        ([X, IS, COLON_NL], PHRASE, 8, ([X, IS, COLON_NL], "phrase")),  # vLLM stopped on the stop string
        ([X, IS, COLON_NL], PHRASE, 3, ([X, IS, COLON_NL], "phrase")),  # completed by the T-th token
        ([X, IS, COLON_NL, Y], PHRASE, 2, ([X, IS], "max_tokens")),  # completed by the (T+1)-th token
        ([X, I_, S, COLON, EOS_T], PHRASE, 8, ([X, I_, S, COLON], "phrase")),  # phrase before EOS
        ([X, IS, EOS_T], PHRASE, 8, ([X, IS], "eos")),  # half a phrase does not stop
        ([I_, S, 99, COLON], PHRASE, 8, ([I_, S, 99, COLON], "phrase")),  # an id with no text keeps the state
        ([I_, X, S, COLON, Y], PHRASE, 8, ([I_, X, S, COLON, Y], "max_tokens")),  # "ixs:y" has no "is:"
        ([IS, IS, COLON], PHRASE, 8, ([IS, IS, COLON], "phrase")),  # "isis:" (KMP fallback)
    ],
)
def test_cot_outcome_reasons_and_priority(tokens, stop, max_think, expect) -> None:
    # each reason read from the generated tokens by the engine's check at each step t, in the order of
    # rollouts/stopping.py: phrase (seen in tokens[:t]) / delimiter (token t), then EOS (token t), then the cap
    # (t = T); t = len(tokens) with nothing else: the request ended short (max_tokens, the cap reason).
    assert outcome(tokens, stop, max_think) == expect


@pytest.mark.parametrize(
    "token_ids,finish,stop_reason,expect",
    [
        ([4, 5], "stop", None, [4, 5, EOS_T]),  # EOS left out of token_ids: put back
        ([4, EOS_T], "stop", None, [4, EOS_T]),  # EOS kept: unchanged
        ([4], "stop", 9, [4, 9]),  # a stop token id left out: put back
        ([4, 9], "stop", 9, [4, 9]),
        ([4, IS, COLON_NL], "stop", "is:", [4, IS, COLON_NL]),  # a stop string's tokens are always there
        ([4, 5, 6], "length", None, [4, 5, 6]),
        ([], "stop", None, [EOS_T]),  # EOS as the very first token, left out
    ],
)
def test_stopped_tokens_put_back_the_stop_token(token_ids, finish, stop_reason, expect) -> None:
    sample = FakeCompletionOutput(
        index=0, text="", token_ids=token_ids, cumulative_logprob=None, logprobs=None, finish_reason=finish,
        stop_reason=stop_reason,
    )  # fmt: skip
    assert stopped_tokens(sample, EOS_T) == expect


def test_cot_outcome_refuses_a_multi_token_delimiter() -> None:
    with pytest.raises(ValueError, match="single-token"):
        cot_outcome([4, 5], [4, 5], [0.0, 0.0], StopSpec.on_ids([4, 5]), eos_id=1, max_think=8)


# ------------------------------------------------------------------------------------------------ hard_sample


@pytest.mark.parametrize("include_stop_token", [True, False], ids=["stop-token-kept", "stop-token-dropped"])
def test_hard_sample_record_and_requests(include_stop_token: bool) -> None:
    # G = 4 sampled CoTs per prompt at τ = 1, an answer at τ_a = 0.5 / top-p 0.9: the record has the engines'
    # format (N = B·G rows, the G samples of a prompt contiguous, prefix masks, answer_ids opening with the
    # forced delimiter + prefill, which are not actions), the CoT request asked vLLM for n = G samples at the CoT
    # temperature and the answer request one sample each at the answer temperature. The CoT log-probs and top-1
    # are checked against a teacher-forced replay (at τ = 1 without filters vLLM's raw log-probs are the
    # engine's); the same generator seed gives the same record (a seeded vLLM request is reproducible).
    model, tok, group = toy_model(), ToyTokenizer(eos_id=1), 4
    stream = greedy_stream(PROMPTS[0])
    delim, prefill = stream[first_new(stream, 2)], tok(" #").input_ids
    stop = StopSpec.on_ids([delim], prefill=prefill)
    forced = [delim, *prefill]
    cfg = hard(1.0, answer_temperature=0.5, answer_top_p=0.9, max_think_tokens=10, max_answer_tokens=4)

    def once(seed: int) -> tuple[Rollouts, FakeLLM]:
        llm = FakeLLM(model, tok, tok.eos_token_id, include_stop_token)
        r = VllmEngine(llm, FakeSamplingParams).generate(
            model, PROMPTS, cfg, group_size=group, sigma=0.0, stop=stop, eos_id=1, pad_id=PAD,
            generator=torch.Generator().manual_seed(seed), tokenizer=tok,
        )  # fmt: skip
        return r, llm

    r, llm = once(0)
    n = len(PROMPTS) * group
    assert r.num_rollouts == n and r.group_index.tolist() == [
        b for b in range(len(PROMPTS)) for _ in range(group)
    ]
    t_len, a_len = r.cot_ids.shape[1], r.answer_ids.shape[1]
    for name, shape in [("prompt_ids", (n, 5)), ("prompt_mask", (n, 5)), ("cot_top1_ids", (n, t_len)),
                        ("cot_mask", (n, t_len)), ("cot_entropy", (n, t_len)), ("cot_logprobs", (n, t_len)),
                        ("answer_mask", (n, a_len)), ("answer_action_mask", (n, a_len)),
                        ("answer_logprobs", (n, a_len)), ("think_end", (n,))]:  # fmt: skip
        assert tuple(getattr(r, name).shape) == shape, name
    assert r.cot_inputs is None and len(r.answer_texts) == n
    assert (r.cot_mode, r.temperature, r.sigma, r.sampling) == ("hard", 1.0, 0.0, {
        "top_k": 0, "top_p": 1.0, "min_p": 0.0, "answer_top_p": 0.9})  # fmt: skip
    positions = lambda m: torch.arange(m.shape[1])[None]
    assert torch.equal(r.cot_mask, positions(r.cot_mask) < r.cot_lengths[:, None])  # prefix masks
    assert torch.equal(r.answer_mask, positions(r.answer_mask) < r.answer_lengths[:, None])
    assert torch.equal(r.answer_action_mask, r.answer_mask & (positions(r.answer_mask) >= len(forced)))
    assert (r.answer_logprobs[~r.answer_action_mask] == 0).all() and (
        r.answer_logprobs[r.answer_action_mask] < 0
    ).all()
    samples = r.samples(tok)
    for i, s in enumerate(samples):
        assert s.prompt_ids == PROMPTS[i // group]
        assert s.answer_ids[: len(forced)] == forced  # the forced tokens open the answer
        assert s.think_end in ("token", "eos", "max_tokens")  # what the ids rule without cold stop can give
        assert delim not in s.cot_ids and 1 not in s.cot_ids and len(s.cot_ids) <= cfg.max_think_tokens
        assert (len(s.cot_ids) == cfg.max_think_tokens) or s.think_end != "max_tokens"
        assert all(math.isnan(h) for h in s.cot_entropy)
        rep = replay(model, s, cfg)
        expect = rep.cot_log_probs.gather(-1, torch.tensor(s.cot_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(s.cot_logprobs), expect, atol=1e-4, rtol=0)
        assert s.cot_top1_ids == rep.cot_log_probs.argmax(-1).tolist()
    assert any(len({tuple(s.cot_ids) for s in samples[b * group : (b + 1) * group]}) > 1 for b in range(3))
    assert len(llm.requests) == len(PROMPTS) + n
    cot_requests, answer_requests = llm.requests[: len(PROMPTS)], llm.requests[len(PROMPTS) :]
    for prompt, (ids, sp) in zip(PROMPTS, cot_requests, strict=True):
        assert ids == prompt and (sp.n, sp.temperature, sp.top_p, sp.max_tokens) == (group, 1.0, 1.0, 11)
        assert sp.top_k in (0, -1) and sp.min_p == 0.0 and sp.logprobs >= 1 and isinstance(sp.seed, int)
    for s, (body, sp) in zip(samples, answer_requests, strict=True):
        assert body == s.prompt_ids + s.cot_ids + forced
        assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens) == (1, 0.5, 0.9, 4)
    again, _ = once(0)
    assert torch.equal(again.cot_ids, r.cot_ids) and torch.equal(again.answer_ids, r.answer_ids)
    other, _ = once(1)
    assert not torch.equal(other.cot_ids, r.cot_ids)


def test_sampled_answers_of_one_cot_are_independent_draws() -> None:
    # a greedy CoT with a sampled answer (τ_a = 1): the G samples of a prompt share their CoT, and their answers
    # are G independent draws in the eager engine, so on this near-uniform random model (V = 92, 5 tokens) they
    # differ. The adapter sends G identical answer requests (same prompt + CoT + forced, same seed); a seeded
    # vLLM request is reproducible, so it gets G copies of one answer, and pass@k would be pass@1.
    tok, group = ToyTokenizer(eos_id=1), 6
    stream = greedy_stream(PROMPTS[0])
    stop = StopSpec.on_ids([stream[first_new(stream, 2)]])
    cfg = hard(0.0, name="greedy_cot_sampled_answer", answer_temperature=1.0, max_think_tokens=6)
    ours, eager, _ = run_both(cfg, stop, tok, include_stop_token=True, group_size=group)
    for r in (eager, ours):
        assert r.cot_ids.view(len(PROMPTS), group, -1).unique(dim=1).shape[1] == 1  # one CoT per prompt
    distinct = lambda r, b: len({tuple(r.answer_ids[i].tolist()) for i in range(b * group, (b + 1) * group)})
    assert all(distinct(eager, b) > 1 for b in range(len(PROMPTS)))  # the premise, on the eager engine
    assert all(distinct(ours, b) > 1 for b in range(len(PROMPTS))), [distinct(ours, b) for b in range(3)]


# --------------------------------------------------------------------------------------------------- refusals


def test_vllm_reason_refusals() -> None:
    # why vLLM cannot run a request, each reason named: no checkpoint (training), a soft / fuzzy mode, the
    # entropy cold stop (needs H(p_t) every step), vLLM missing (here), a model that is not on CUDA
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    soft = CotConfig(name="soft_greedy", mode="soft", temperature=0.5, noise_scale=0.0)
    cold = hard(name="hard_cold", entropy_stop_threshold=0.3)
    assert "checkpoint directory" in vllm_reason(None, [hard()], cuda)
    for mixture in (
        CotConfig(name="multiplex_greedy", mode="multiplex", temperature=0.0, noise_scale=0.0),
        CotConfig(name="gumbel_sample", mode="gumbel", noise_scale=1.0),
    ):  # a mixture of embeddings is fed: not a token vLLM can take
        assert "hard tokens only" in vllm_reason("ckpt", [hard(), mixture], cuda)
        assert mixture.name in vllm_reason("ckpt", [hard(), mixture], cuda)
    assert "hard tokens only" in vllm_reason("ckpt", [hard(), soft], cuda) and "soft_greedy" in vllm_reason(
        "ckpt", [hard(), soft], cuda
    )
    assert "entropy cold stop" in vllm_reason("ckpt", [cold], cuda) and "hard_cold" in vllm_reason(
        "ckpt", [cold], cuda
    )
    if importlib.util.find_spec("vllm") is None:
        assert "vllm is not installed" in vllm_reason("ckpt", [hard()], cuda)
    else:
        assert "CUDA" in vllm_reason("ckpt", [hard()], cpu)


def test_generate_refuses_what_vllm_cannot_do() -> None:
    # refused before any vLLM request: a soft config, σ > 0, no tokenizer, a text rule without its phrase;
    # and a multi-token ids delimiter (vLLM stops on single ids) is refused, not decoded wrongly
    model, tok = toy_model(), ToyTokenizer()
    llm = FakeLLM(model, tok, eos_id=1)
    engine = VllmEngine(llm, FakeSamplingParams)
    kw = dict(group_size=1, stop=StopSpec.on_ids([3]), eos_id=1, pad_id=PAD, generator=torch.Generator())
    soft = CotConfig(name="soft_sample", mode="soft", temperature=0.5, noise_scale=0.33)
    with pytest.raises(ValueError, match="hard tokens only"):
        engine.generate(model, PROMPTS, soft, sigma=0.1, tokenizer=tok, **kw)
    with pytest.raises(ValueError, match="hard tokens only"):
        engine.generate(model, PROMPTS, CotConfig(name="soft_greedy", mode="soft", noise_scale=0.0), sigma=0.0,
                        tokenizer=tok, **kw)  # fmt: skip
    with pytest.raises(ValueError, match="hard tokens only"):
        engine.generate(model, PROMPTS, hard(), sigma=0.1, tokenizer=tok, **kw)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(model, PROMPTS, hard(), sigma=0.0, **kw)
    no_phrase = StopSpec.on_text(phrase_table("#|", TOY_TEXTS), capped=[1])
    with pytest.raises(ValueError, match="phrase"):
        engine.generate(model, PROMPTS, hard(), sigma=0.0, tokenizer=tok, **{**kw, "stop": no_phrase})
    assert llm.requests == []
    with pytest.raises(ValueError, match="single-token"):
        engine.generate(
            model, PROMPTS, hard(), sigma=0.0, tokenizer=tok, **{**kw, "stop": StopSpec.on_ids([3, 4])}
        )


@pytest.mark.gpu
def test_generate_with_the_cuda_generator_evaluation_passes() -> None:
    # vLLM only runs for a model on CUDA, and evaluate_mode then hands the engine a CUDA generator
    # (torch.Generator(device=model.device)); the adapter draws its vLLM seed from it.
    model, tok = toy_model().to("cuda"), ToyTokenizer()
    try:
        llm = FakeLLM(model, tok, eos_id=1)
        r = VllmEngine(llm, FakeSamplingParams).generate(
            model, PROMPTS, hard(), group_size=1, sigma=0.0, stop=StopSpec.on_ids([3]), eos_id=1, pad_id=PAD,
            generator=torch.Generator(device="cuda").manual_seed(0), tokenizer=tok,
        )  # fmt: skip
        assert r.num_rollouts == len(PROMPTS) and isinstance(llm.requests[0][1].seed, int)
    finally:
        model.to("cpu")
