"""The `vllm` engine: hard-token evaluation (`hard_greedy` / `hard_sample`, the paper's best inference) through
vLLM, returning the same `Rollouts` record as the other engines, so evaluate.py's rows and summary are the same.

Each batch is two vLLM calls, mirroring the eager engine's phases (rollouts/engine.py):
1. CoT: the prompts' token ids, `n` = G samples each, at the CoT temperature / filters, `max_tokens` = T + 1,
   stopping on the think-end phrase (text rule) or the single delimiter token (ids rule) and on EOS, with
   `logprobs=1` (the sampled token's log-prob and the top-1 token). `cot_outcome` then reads the tokens with the
   engine's own rule, in its priority order (phrase, delimiter token, EOS, cap), so what vLLM returns around a
   stop (whether the stop token is in `token_ids` or not) does not matter.
2. Answer: prompt + CoT + the reason's forced tokens (`StopSpec.forced`), one sample each, at the answer
   temperature / top-p, at most A tokens, ending at EOS (kept, as an action).

What vLLM does not give: the CoT entropy H(p_t) (it returns top-k log-probs, not the distribution), so
`cot_entropy` is NaN in the record, evaluation writes `cot_entropy: null` for these samples and leaves them out
of the entropy profile; the entropy cold stop cannot be
applied (refused), nor a multi-token ids delimiter (refused: vLLM stops on strings or single ids, not on an id
sequence). Log-probs are vLLM's (`logprobs_mode` decides whether they are raw or processed). The supported vLLM
range is pinned in pyproject.toml's `vllm` extra; this machine cannot install vLLM, so the adapter is tested
through a stand-in with vLLM's interface (tests/test_vllm_engine.py), never against vLLM itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rollouts.config import CotConfig
from rollouts.engine import CHECK_EVERY
from rollouts.record import THINK_END_REASONS, Rollouts
from rollouts.stopping import StopSpec


def vllm_reason(model_dir: str | None, modes: list[CotConfig], device: torch.device) -> str | None:
    """Why vLLM cannot run these modes here (None: it can)."""
    import importlib.util

    if model_dir is None:
        return "vLLM evaluates a checkpoint directory; training's policy changes every step (use static or eager)"
    soft = [m.name for m in modes if m.continuous]
    if soft:
        return f"vLLM decodes hard tokens only; {soft} feed embedding mixtures"
    cold = [m.name for m in modes if m.entropy_stop_threshold > 0]
    if cold:
        return f"{cold} use the entropy cold stop, which needs H(p_t) at every step; vLLM does not return it"
    for m in modes:  # vLLM filters after the temperature, the engine before it: equal only at τ in {0, 1}
        if (
            (m.top_p < 1 or m.min_p > 0)
            and m.temperature not in (0, 1)
            or (m.answer_top_p < 1 and m.answer_temperature not in (0, 1))
        ):
            return f"{m.name}: top-p / min-p at a temperature other than 0 or 1 filter a different distribution in vLLM"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install -e '.[vllm]')"
    if device.type != "cuda":
        return f"vLLM runs on CUDA; the model is on {device}"
    return None


@dataclass
class CotOutcome:
    """How one vLLM CoT sample ends, read with the engine's rule."""

    cot: list[int]  # the CoT tokens (fed)
    top1: list[int]  # top-1 token at each CoT step
    logprobs: list[float]  # behaviour log-prob of each CoT token
    reason: str  # one of THINK_END_REASONS


def cot_outcome(
    tokens: list[int], top1: list[int], logprobs: list[float], stop: StopSpec, eos_id: int, max_think: int
) -> CotOutcome:
    """The CoT of a sample whose generated tokens are `tokens` (the stop token or EOS that ended the request
    included: `stopped_tokens`), by the engine's check at each step t (module doc of rollouts/stopping.py):
    phrase seen in tokens[:t] / token t is the delimiter, token t is EOS, t = cap.

    >>> spec = StopSpec.on_ids([9])
    >>> cot_outcome([4, 5, 9, 7], [4, 5, 9, 7], [0.0] * 4, spec, eos_id=2, max_think=8).reason
    'token'
    >>> o = cot_outcome([4, 5, 6], [4, 5, 6], [0.0] * 3, spec, eos_id=2, max_think=2); (o.cot, o.reason)
    ([4, 5], 'max_tokens')
    """
    if len(stop.delimiter) > 1:
        raise ValueError("the vllm engine supports a single-token ids delimiter only")
    table = stop.phrase_table
    state, accept = 0, (None if table is None else table.shape[0] - 1)
    for t in range(len(tokens) + 1):
        if table is not None and state == accept:
            reason = "phrase"
        elif t == len(tokens):
            reason = "max_tokens"  # the request ended short of every rule (a model length limit, an abort)
        elif stop.delimiter and tokens[t] == stop.delimiter[0]:
            reason = "token"
        elif tokens[t] == eos_id:
            reason = "eos"
        elif t >= max_think:
            reason = "max_tokens"
        else:
            if table is not None and tokens[t] < table.shape[1]:
                state = int(table[state, tokens[t]])
            continue
        return CotOutcome(tokens[:t], top1[:t], logprobs[:t], reason)
    raise AssertionError("unreachable: the loop returns at t = len(tokens) at the latest")


def stopped_tokens(sample: Any, eos_id: int) -> list[int]:
    """A vLLM CompletionOutput's generated tokens with the token that stopped it at the end, whether this vLLM
    kept it in `token_ids` or not: the stop token id (`stop_reason` an int) or EOS (`finish_reason` "stop" with
    no `stop_reason`). A stop string's tokens are always in `token_ids`."""
    tokens = list(sample.token_ids)
    if sample.finish_reason == "stop":
        last = eos_id if sample.stop_reason is None else sample.stop_reason
        if isinstance(last, int) and tokens[-1:] != [last]:
            tokens.append(last)
    return tokens


def _token_logprobs(sample: Any, tokens: list[int]) -> tuple[list[float], list[int]]:
    """(log-prob of each token, top-1 token at each step) from a vLLM CompletionOutput's `logprobs` (per step a
    dict token id -> Logprob with `.logprob` and `.rank`). A stop token vLLM left out of `token_ids` (appended by
    `stopped_tokens`) has no entry: NaN, and itself as top-1."""
    given = list(sample.logprobs or [])
    if not given and sample.token_ids:
        raise ValueError("vLLM returned no logprobs although the request asked for them")
    steps = given + [None] * (len(tokens) - len(given))
    lps, top1 = [], []
    for tok, step in zip(tokens, steps, strict=False):
        if not step:
            lps.append(math.nan)
            top1.append(tok)
            continue
        lps.append(step[tok].logprob if tok in step else math.nan)
        top1.append(min(step, key=lambda i: step[i].rank if step[i].rank is not None else math.inf))
    return lps, top1


class VllmEngine:
    """`generate` on a vLLM `LLM` (or any object with its `generate(prompts, sampling_params)` interface)."""

    name = "vllm"

    def __init__(self, llm: Any, sampling_params: Any):
        self.llm, self.sampling_params = llm, sampling_params  # vllm.LLM, vllm.SamplingParams (the class)

    @staticmethod
    def load(model_dir: str) -> VllmEngine:
        from vllm import LLM, SamplingParams

        return VllmEngine(LLM(model=model_dir, dtype="auto", gpu_memory_utilization=0.6), SamplingParams)

    def _params(self, **kw: Any) -> Any:
        return self.sampling_params(**kw)

    def generate(
        self,
        model: Any,
        prompt_ids: list[list[int]],
        cfg: CotConfig,
        *,
        group_size: int,
        sigma: float,
        stop: StopSpec,
        eos_id: int,
        pad_id: int,
        generator: torch.Generator,
        tokenizer: Any = None,
        check_every: int = CHECK_EVERY,
    ) -> Rollouts:
        """As `rollouts.engine.generate` for a hard mode (`model` is not used: vLLM holds its own copy; nor is
        `check_every`: vLLM ends each request itself). The seed of each vLLM request comes from `generator`, so a
        run is reproducible on the same vLLM."""
        if cfg.continuous or sigma != 0:
            raise ValueError(f"the vllm engine decodes hard tokens only, got cot.mode={cfg.mode}")
        if tokenizer is None:
            raise ValueError("the vllm engine needs the tokenizer (to decode the answers)")
        if stop.stop_on == "text" and not stop.phrase:
            raise ValueError("the vllm engine stops on the phrase's text: build the StopSpec with its phrase")
        if len(stop.delimiter) > 1:
            raise ValueError(
                "the vllm engine supports a single-token ids delimiter only (vLLM stops on ids, not id sequences)"
            )
        cot_seed, answer_seed = torch.randint(
            0, 2**31 - 1, (2,), generator=generator, device=generator.device
        ).tolist()
        cot_params = self._params(
            n=group_size,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k if cfg.top_k > 0 else -1,
            min_p=cfg.min_p,
            max_tokens=cfg.max_think_tokens + 1,
            stop=[stop.phrase] if stop.phrase else [],
            stop_token_ids=list(stop.delimiter),
            include_stop_str_in_output=True,
            logprobs=1,
            seed=cot_seed,
            skip_special_tokens=False,
        )
        cot_out = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], cot_params, use_tqdm=False)
        outcomes, bodies = [], []
        for prompt, request in zip(prompt_ids, cot_out, strict=True):
            for sample in request.outputs:
                tokens = stopped_tokens(sample, eos_id)
                lps, top1 = _token_logprobs(sample, tokens)
                o = cot_outcome(tokens, top1, lps, stop, eos_id, cfg.max_think_tokens)
                outcomes.append(o)
                bodies.append({"prompt_token_ids": prompt + o.cot + list(stop.forced[o.reason])})
        answer_params = [  # one seed per answer: samples that share a CoT draw independent answers
            self._params(
                n=1,
                temperature=cfg.answer_temperature,
                top_p=cfg.answer_top_p,
                max_tokens=cfg.max_answer_tokens,
                logprobs=0,
                seed=answer_seed + i,
                skip_special_tokens=False,
            )
            for i in range(len(bodies))
        ]
        answers = []
        for request in self.llm.generate(bodies, answer_params, use_tqdm=False):
            sample = request.outputs[0]
            tokens = stopped_tokens(sample, eos_id)[: cfg.max_answer_tokens]
            answers.append((tokens, _token_logprobs(sample, tokens)[0]))
        prompts = [p for p in prompt_ids for _ in range(group_size)]
        return _record(prompts, outcomes, answers, stop, cfg, group_size, pad_id, tokenizer)


def _record(
    prompts: list[list[int]],
    outcomes: list[CotOutcome],
    answers: list[tuple[list[int], list[float]]],
    stop: StopSpec,
    cfg: CotConfig,
    group_size: int,
    pad_id: int,
    tokenizer: Any,
) -> Rollouts:
    """The `Rollouts` of N samples (left-padded prompts, right-padded CoT and answer, NaN CoT entropy)."""
    n = len(outcomes)
    width = max(len(p) for p in prompts)
    t_len = max(1, max(len(o.cot) for o in outcomes))
    forced = [list(stop.forced[o.reason]) for o in outcomes]
    a_len = max(1, max(len(f) + len(a) for f, (a, _) in zip(forced, answers, strict=True)))

    def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype)

    prompt_ids, prompt_mask = torch.full((n, width), pad_id), zeros(n, width, dtype=torch.bool)
    cot_ids, top1, cot_mask = (
        torch.full((n, t_len), pad_id),
        torch.full((n, t_len), pad_id),
        zeros(n, t_len, dtype=torch.bool),
    )
    cot_lp = zeros(n, t_len, dtype=torch.float32)
    answer_ids, answer_mask = torch.full((n, a_len), pad_id), zeros(n, a_len, dtype=torch.bool)
    action, answer_lp = zeros(n, a_len, dtype=torch.bool), zeros(n, a_len, dtype=torch.float32)
    for i, (p, o, f, (a, a_lp)) in enumerate(zip(prompts, outcomes, forced, answers, strict=True)):
        prompt_ids[i, width - len(p) :], prompt_mask[i, width - len(p) :] = torch.tensor(p), True
        t = len(o.cot)
        cot_ids[i, :t], top1[i, :t], cot_lp[i, :t], cot_mask[i, :t] = (
            torch.tensor(o.cot, dtype=torch.long),
            torch.tensor(o.top1, dtype=torch.long),
            torch.tensor(o.logprobs),
            True,
        )
        seq = f + a
        answer_ids[i, : len(seq)], answer_mask[i, : len(seq)] = torch.tensor(seq, dtype=torch.long), True
        action[i, len(f) : len(seq)] = True
        answer_lp[i, len(f) : len(seq)] = torch.tensor(a_lp, dtype=torch.float32)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a, _ in answers]
    return Rollouts(
        cot_mode=cfg.mode,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        group_index=torch.arange(n // group_size).repeat_interleave(group_size),
        cot_ids=cot_ids,
        cot_inputs=None,
        cot_top1_ids=top1,
        cot_mask=cot_mask,
        cot_entropy=torch.full((n, t_len), math.nan).masked_fill(~cot_mask, 0.0),
        cot_logprobs=cot_lp,
        answer_ids=answer_ids,
        answer_mask=answer_mask,
        answer_action_mask=action,
        answer_logprobs=answer_lp,
        think_end=torch.tensor([THINK_END_REASONS.index(o.reason) for o in outcomes], dtype=torch.long),
        sigma=0.0,
        temperature=cfg.temperature,
        answer_texts=texts,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=cfg.min_p,
        answer_top_p=cfg.answer_top_p,
    )
