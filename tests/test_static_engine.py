"""The static engine (rollouts/static_engine.py) against the eager reference (rollouts/engine.py), on tiny random
Llama / Qwen2 models with tied and untied embeddings, float32, CPU.

The claims: with the same seed, the greedy modes are token-identical to the eager engine and their per-step CoT
inputs μ agree to 1e-5; the sampled modes draw the same noise, and their records are scored by the learner as
closely as the eager engine's are (the rollout-vs-learner gap); every stop rule (top-1 token, multi-token
delimiter with its rollback, text phrase, EOS, entropy cold stop, cap) ends thinking at the same step; the
bucket's padding rows never leak into the batch; a second call in the same shape bucket compiles nothing; how
often the loop reads `all rows done?` (every step, as the trainer does on CPU, every 16, never) changes no
record in either engine.

Most cases run the static path uncompiled (`StaticEngine(compile=False)`: the static cache, the 4-D mask, the
decode attention, the padding rows, in seconds); the `compiled` cases run the torch.compile'd kernels, which
round differently, on fewer cases because a compile takes seconds.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

from rl.data import DataConfig, load_problems
from rl.logprobs import LogProbConfig, log_prob_gap, sequence_log_probs
from rl.model import read_profile
from rl.prompts import encode_prompts
from rollouts.config import CotConfig
from rollouts.distributions import noise_sigma
from rollouts.engine import CHECK_EVERY, decode_steps, done_check_interval, generate, input_embedding_matrix
from rollouts.engines import EagerEngine, build_engine
from rollouts.record import THINK_END_REASONS as REASONS
from rollouts.record import Rollouts
from rollouts.static_engine import StaticEngine, bucket_rows
from rollouts.stopping import StopSpec, phrase_table
from tests.arch import ARCH_IDS, ARCHS, one_thread, tiny_causal_lm  # noqa: F401 (fixture)
from tests.test_rollout_engine import assert_replay_consistent

pytestmark = pytest.mark.usefixtures("one_thread")

PAD, EOS = 0, -1  # an EOS id the model never says: thinking runs to the cap unless a test sets one
PROMPTS = [
    [5, 6, 7, 8, 9],
    [10, 11],
    [12, 13, 14],
]  # left padding exercised; 3 prompts x G=2 -> 6 rows (bucket 8)
MU_ATOL = 1e-5


@functools.cache
def model_for(arch: str, tied: bool):
    return tiny_causal_lm(arch, tied, vocab_size=96, seed=0)


@functools.cache
def engine(compiled: bool) -> StaticEngine:
    return StaticEngine(compile=compiled)


def cfg_for(mode: str, sampled: bool, **kw) -> CotConfig:
    tau = {"hard": 1.0 if sampled else 0.0, "soft": 0.5, "fuzzy": 1e-4}[mode]
    base = dict(
        mode=mode,
        temperature=tau,
        noise_scale=0.33 if sampled and mode != "hard" else 0.0,
        max_think_tokens=12,
        max_answer_tokens=6,
        answer_temperature=1.0 if sampled else 0.0,
    )
    return CotConfig(**{**base, **kw})


def both(model, cfg: CotConfig, stop: StopSpec, compiled: bool, prompts=PROMPTS, group_size=2, eos_id=EOS):
    """(eager record, static record) for the same seed."""
    kw = dict(
        group_size=group_size,
        sigma=noise_sigma(input_embedding_matrix(model), cfg),
        stop=stop,
        eos_id=eos_id,
        pad_id=PAD,
    )
    eager = generate(model, prompts, cfg, generator=torch.Generator().manual_seed(0), **kw)
    static = engine(compiled).generate(model, prompts, cfg, generator=torch.Generator().manual_seed(0), **kw)
    return eager, static


def assert_same_tokens(a: Rollouts, b: Rollouts) -> None:
    for name in (
        "cot_ids",
        "cot_top1_ids",
        "cot_mask",
        "answer_ids",
        "answer_mask",
        "answer_action_mask",
        "think_end",
    ):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.cot_entropy, b.cot_entropy, atol=1e-4, rtol=0)  # nats; float32 sums over V
    torch.testing.assert_close(a.cot_logprobs, b.cot_logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.answer_logprobs, b.answer_logprobs, atol=1e-4, rtol=0)
    if a.cot_inputs is not None:
        torch.testing.assert_close(a.cot_inputs, b.cot_inputs, atol=MU_ATOL, rtol=0)  # μ_t of every step


def never_stop() -> StopSpec:
    return StopSpec.on_ids((95, 95, 95))  # the random model's top-1 stream never says 95 three times running


@pytest.mark.parametrize(("arch", "tied"), ARCHS, ids=ARCH_IDS)
@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_random_models_hard_greedy_equal_and_every_step_consistent(arch: str, tied: bool, mode: str) -> None:
    # these random models are chaotic (weights at init range 0.3): a 1e-7 rounding difference between the two
    # attention kernels grows ~30x per soft step, so two soft runs that feed their own μ part after a few steps.
    # What holds per step is the check given the same prefix: every μ_t, log-prob, entropy and top-1 of the
    # static record equals the teacher-forced replay of that record (as the eager engine's does). Hard greedy
    # feeds tokens, so it stays token-identical.
    model = model_for(arch, tied)
    cfg = cfg_for(mode, sampled=False)
    eager, static = both(model, cfg, never_stop(), compiled=False)
    assert static.cot_lengths.min() == 12  # every row ran to the cap: 12 steps checked
    assert_replay_consistent(model, static, cfg)
    if mode == "hard":
        assert_same_tokens(eager, static)


@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_sampled_records_are_consistent(mode: str) -> None:
    model = model_for("llama", True)
    cfg = cfg_for(mode, sampled=True)
    eager, static = both(model, cfg, never_stop(), compiled=False)
    assert_replay_consistent(model, static, cfg)
    if mode == "hard":  # same generator, same draws in the same order: the same sampled tokens
        assert_same_tokens(eager, static)


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_filtered_sampling_equals_eager(mode: str) -> None:
    # top-k / top-p / min-p on the CoT and top-p on the answer run through the same step code: the same tokens
    # as eager for hard (the same filtered race on the same noise), a replay-consistent record for both
    model = model_for("qwen2", True)
    cfg = cfg_for(mode, sampled=True, top_k=20, top_p=0.9, min_p=0.05, answer_top_p=0.8)
    eager, static = both(model, cfg, never_stop(), compiled=False)
    assert_replay_consistent(model, static, cfg)
    if mode == "hard":
        assert_same_tokens(eager, static)


def test_every_stop_rule_ends_where_eager_does() -> None:
    model = model_for("qwen2", False)
    cfg = cfg_for("hard", sampled=False)
    eager, _ = both(model, cfg, never_stop(), compiled=False)
    s = eager.cot_top1_ids[0].tolist()  # the first prompt's free-running greedy stream
    texts = [
        chr(0x100 + v) * 2 for v in range(96)
    ]  # two characters per token: phrases cross token boundaries
    phrase = texts[s[3]][1:] + texts[s[4]][:1]
    stops = {
        "token": StopSpec.on_ids((s[5],)),
        "delimiter": StopSpec.on_ids((s[4], s[5]), prefill=(7, 8)),  # multi-token: rollback of step 4
        "phrase": StopSpec.on_text(phrase_table(phrase, texts), (s[4], 9), (9,)),
    }
    for reason, stop in stops.items():
        eager, static = both(model, cfg, stop, compiled=False)
        assert REASONS[int(eager.think_end[0])] == reason
        assert_same_tokens(eager, static)
    eager, static = both(model, cfg, never_stop(), compiled=False, eos_id=s[6])
    assert REASONS[int(eager.think_end[0])] == "eos"
    assert_same_tokens(eager, static)
    cold = cfg_for("hard", sampled=False, entropy_stop_threshold=10.0, entropy_stop_patience=3)
    eager, static = both(model, cold, never_stop(), compiled=False)
    assert (eager.think_end == REASONS.index("entropy")).all() and (eager.cot_lengths == 3).all()
    assert_same_tokens(eager, static)


def test_padding_rows_do_not_leak_and_buckets_round_up() -> None:
    # 3 prompts x 1 sample = 3 rows in a bucket of 8: the same record as eager, with 3 rows
    model = model_for("llama", False)
    assert bucket_rows(3) == 8
    eager, static = both(model, cfg_for("hard", sampled=False), never_stop(), compiled=False, group_size=1)
    assert static.num_rollouts == 3
    assert_same_tokens(eager, static)


@functools.cache
def tiny_base_model(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def tiny_base_batch(path, problems: int = 12) -> tuple[list[list[int]], StopSpec, int]:
    """(prompts, stop rule, eos id) of the first synthetic test problems in the tiny base's own format."""
    tok = AutoTokenizer.from_pretrained(path)
    prompt = read_profile(str(path)).prompt
    questions = [p.question for p in load_problems(DataConfig(), "test")[:problems]]
    stop = StopSpec.from_tokenizer(tok, prompt.think_end, prompt.stop_on, prompt.answer_prefill)
    return encode_prompts(tok, questions, prompt), stop, tok.eos_token_id


@pytest.mark.parametrize("compiled", [False, True], ids=["uncompiled", "compiled"])
@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_trained_model_greedy_modes_equal_eager(tiny_base, mode: str, compiled: bool) -> None:
    # the project's trained tiny model is not chaotic: the greedy modes are token-identical to the eager engine
    # over whole rollouts (CoT to its 48-step cap or its delimiter, then the answer), and every μ_t within 1e-5
    prompts, stop, eos = tiny_base_batch(tiny_base)
    cfg = cfg_for(mode, sampled=False, max_think_tokens=48, max_answer_tokens=16)
    eager, static = both(
        tiny_base_model(tiny_base), cfg, stop, compiled=compiled, prompts=prompts, eos_id=eos
    )
    assert eager.cot_lengths.float().mean() > 5
    assert_same_tokens(eager, static)


def test_compiled_sampled_record_scores_like_eager(tiny_base) -> None:
    # compiled kernels round differently, so a sampled row may part from eager's at a near-tie; what must hold is
    # that the learner scores the static record as closely as the eager one (the rollout-vs-learner gap). On the
    # tiny base, so that the compiled forward of the test above is reused (a compile costs seconds)
    model = tiny_base_model(tiny_base)
    prompts, stop, eos = tiny_base_batch(tiny_base)
    cfg = cfg_for("soft", sampled=True, max_think_tokens=48, max_answer_tokens=16)
    eager, static = both(model, cfg, stop, compiled=True, prompts=prompts, eos_id=eos)
    gaps = []
    for r in (eager, static):
        with torch.no_grad():
            gaps.append(log_prob_gap(r, sequence_log_probs(model, r, cfg, LogProbConfig())))
    assert gaps[1].cot < max(5 * gaps[0].cot, 1e-3), gaps
    assert gaps[1].answer < max(5 * gaps[0].answer, 1e-4), gaps
    same_rows = (eager.cot_ids == static.cot_ids).all(dim=1).float().mean()
    assert same_rows >= 0.5, same_rows  # the same noise: most rows coincide


def test_same_bucket_compiles_nothing_new(tiny_base) -> None:
    from torch._dynamo.utils import counters

    model = tiny_base_model(tiny_base)
    prompts, stop, eos = tiny_base_batch(tiny_base)
    cfg = cfg_for("hard", sampled=False, max_think_tokens=48, max_answer_tokens=16)
    kw = dict(compiled=True, eos_id=eos)
    both(model, cfg, stop, prompts=prompts, group_size=2, **kw)  # 24 rows -> bucket 32 (the test above's)
    before = counters["stats"]["unique_graphs"]
    both(model, cfg, stop, prompts=prompts[3:], group_size=3, **kw)  # 27 rows, other prompts and widths
    both(model, cfg, stop, prompts=prompts[4:], group_size=4, **kw)  # 32 rows
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_reading_done_every_step_gives_the_same_record(tiny_base, mode: str) -> None:
    # the trainer reads `all rows done?` every step on CPU (rollouts.engine.done_check_interval): in both engines
    # the record is the one reading every 16 steps, or never (running all decode steps), gives, field for field,
    # and the loop stops sooner (fewer model forwards), on sampled rollouts of the trained model whose rows end
    # at different steps
    model = tiny_base_model(tiny_base)
    prompts, stop, eos = tiny_base_batch(tiny_base)
    cfg = cfg_for(mode, sampled=True, max_think_tokens=48, max_answer_tokens=16)
    kw = dict(
        group_size=2, sigma=noise_sigma(input_embedding_matrix(model), cfg), stop=stop, eos_id=eos, pad_id=PAD
    )
    forwards = [0]
    hook = model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        for name, run in (("eager", generate), ("static", engine(False).generate)):
            records, calls = [], []
            for every in (10**6, CHECK_EVERY, done_check_interval(torch.device("cpu"))):
                forwards[0] = 0
                gen = torch.Generator().manual_seed(0)
                records.append(run(model, prompts, cfg, generator=gen, check_every=every, **kw))
                calls.append(forwards[0])
            longest = int((records[0].cot_lengths + records[0].answer_lengths).max())
            assert longest < decode_steps(cfg, stop) - 16, (name, longest)  # the rows end well before the cap
            # reading never runs every decode step: the prefill and every step but the last are forwards
            assert calls[0] == decode_steps(cfg, stop), (name, calls)
            assert calls[0] > calls[1] >= calls[2], (name, calls)
            # reading every step stops at the step that ends the last row: each step writes one CoT or answer
            # entry (the tiny base's delimiter is one id: nothing is rolled back), the prefill is a forward too
            assert calls[2] == longest, (name, calls, longest)
            for record in records[1:]:
                for field in dataclasses.fields(Rollouts):
                    a, b = getattr(records[0], field.name), getattr(record, field.name)
                    assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, (name, field.name)
    finally:
        hook.remove()


def test_engine_choice_says_which_and_refuses_what_it_cannot_run() -> None:
    model = model_for("llama", True)
    cfgs = [cfg_for("soft", sampled=True)]
    chosen, note = build_engine("auto", model, key="trainer.engine", modes=cfgs)
    assert isinstance(chosen, EagerEngine) and "on CPU" in note  # auto compiles on CUDA only (engines.py)
    chosen, note = build_engine("static", model, key="trainer.engine", modes=cfgs)
    assert isinstance(chosen, StaticEngine) and "static" in note
    chosen, note = build_engine("eager", model, key="trainer.engine", modes=cfgs)
    assert isinstance(chosen, EagerEngine)
    with pytest.raises(ValueError, match="trainer.engine=static: the policy is sharded"):
        build_engine("static", model, key="trainer.engine", modes=cfgs, sharding="fsdp2")
    sliding = tiny_mistral_sliding()
    with pytest.raises(ValueError, match="engine=static: .*full attention"):
        build_engine("static", sliding, key="engine", modes=cfgs)
    with pytest.raises(ValueError, match="engine=vllm: vLLM decodes hard tokens only"):
        build_engine("vllm", model, key="engine", modes=cfgs, vllm_model="some/dir")
    with pytest.raises(ValueError, match="expected one of"):
        build_engine("turbo", model, key="engine", modes=cfgs)


def tiny_mistral_sliding():
    config = MistralConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=16,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["hard", "soft", "fuzzy"])
def test_cuda_graph_static_engine_equals_eager(tiny_base, mode: str) -> None:
    # on CUDA the static engine's forward is a CUDA graph (torch.compile mode="reduce-overhead"); float32, so the
    # greedy modes stay token-identical to the eager engine on the same GPU and every μ_t within 1e-5
    model = tiny_base_model(tiny_base).to("cuda")
    try:
        prompts = [[1, 5 + i, 7, 9 + i % 5, 3] for i in range(16)]
        vocab = model.get_input_embeddings().weight.shape[0]
        stop = StopSpec.on_ids((vocab - 1, vocab - 2, vocab - 3))  # never completes: the cap ends thinking
        cfg = cfg_for(mode, sampled=False, max_think_tokens=48, max_answer_tokens=16)
        kw = dict(group_size=4, sigma=0.0, stop=stop, eos_id=-1, pad_id=PAD)
        eager = generate(model, prompts, cfg, generator=torch.Generator("cuda").manual_seed(0), **kw)
        static = engine(True).generate(
            model, prompts, cfg, generator=torch.Generator("cuda").manual_seed(0), **kw
        )
        again = engine(True).generate(
            model, prompts, cfg, generator=torch.Generator("cuda").manual_seed(0), **kw
        )
        assert_same_tokens(eager, static)
        assert_same_tokens(static, again)  # a replayed graph gives the recorded one's result
    finally:
        model.to("cpu")


def test_the_engine_keys_are_checked_at_config_time() -> None:
    from rl.config import EvaluateConfig, TrainerConfig

    with pytest.raises(ValueError, match="trainer.engine='turbo': expected one of"):
        TrainerConfig(engine="turbo")
    with pytest.raises(ValueError, match="trainer.engine=vllm: vLLM serves evaluate.py's hard modes"):
        TrainerConfig(engine="vllm")
    with pytest.raises(ValueError, match="engine='turbo': expected one of"):
        EvaluateConfig(engine="turbo")
    assert TrainerConfig().engine == EvaluateConfig().engine == "auto"
