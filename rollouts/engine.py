"""Eager reference rollout engine: hard / soft / fuzzy CoT then a hard answer, on any Hugging Face causal LM that
accepts `inputs_embeds` and a KV cache (Llama, Qwen2, ...; tied or untied embeddings).

One rollout, following DESIGN.md section 1:
1. Prompts are left-padded (attention mask 0 on pads, position ids counted over real tokens); one prefill of the
   B prompts fills a `DynamicCache`, whose rows (and last logits) are then repeated G times contiguously, so a
   prompt is encoded once per group, not once per sample.
2. Every decode step reads the logits of the last position and, for every row at once, computes both the CoT
   action (`rollouts.modes`, chosen once by mode) and an answer-side token; each row then feeds one vector,
   picked by its phase with `torch.where`: think -> h_t (hard: E[c_t]); forced -> E[forced token];
   answer -> E[sampled token]; done -> E[pad] (ignored). So the step is a function of fixed-shape tensors: phase,
   lengths and flags live in [N] tensors, there is no per-row Python loop and no host sync inside the step.
3. Thinking ends per `rollouts.stopping` (a think-end delimiter on the id stream, or a phrase on its decoded
   text; the model's EOS; an entropy cold stop; the cap). The ending step feeds the first of the reason's forced
   tokens (`StopSpec.forced`: the delimiter, and / or the answer prefill) instead of a CoT input, the rest
   follow as forced hard tokens (recorded at the start of `answer_ids`, not actions, log-prob 0), then answer
   tokens are sampled at `answer_temperature` / `answer_top_p` until EOS (kept, an action) or
   `max_answer_tokens` sampled tokens.
4. Multi-token delimiter: its first D-1 tokens were already fed as CoT steps when the match is seen. They are
   removed from the CoT (so `answer_ids` always begins with the full delimiter and the learner's sequence
   prompt ++ CoT ++ answer is exactly what the cache saw): their KV-cache columns get attention mask 0 and the
   position counter steps back D-1, which is the same computation as never having fed them (the trick that makes
   left padding work).

Host syncs: none inside the step; every `check_every` steps (16 by default; the trainer reads every step on CPU,
`done_check_interval`) one `all rows done?` read lets the loop stop early (the static engine,
rollouts/static_engine.py, runs this same step compiled and keeps the same check). Randomness:
before each step `Stepper.draw` draws ε [N, d] (soft / fuzzy with σ > 0) and exponential race noise [N, V]
(sampled hard CoT, sampled answer) for every row from the one generator (`rollouts.modes.draw_noise`), so the
same seed gives the same rollouts, in either engine. Noise therefore depends on the
row's index in the batch: a sampled row is reproducible in the same batch layout, not alone; the deterministic
modes (greedy hard, σ = 0 soft / fuzzy) are batch-invariant and tested so.

Numerics: p, μ, entropies and log-probs are float32 whatever the model dtype; h_t is stored in float32 and cast
to the model dtype only when fed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from transformers import DynamicCache, PreTrainedModel

from rollouts.config import CotConfig
from rollouts.distributions import cot_log_probs, entropy
from rollouts.modes import StepNoise, answer_log_probs, cot_action_fn, draw_noise, sample_ids
from rollouts.record import Rollouts
from rollouts.stopping import NOT_ENDED, REASON, StopSpec, ThinkEndDetector

__all__ = ["generate", "input_embedding_matrix"]

TRANSFORMERS_MIN = (5, 24)
"""The first transformers whose model forward takes the KV cache as `cache=`. An older one swallows the
keyword into `**kwargs` and decodes WITHOUT the cache: wrong tokens, no error (pyproject.toml's floor)."""


def check_transformers(version: str) -> None:
    """Refuse a transformers older than `TRANSFORMERS_MIN`, naming the installed version.

    >>> check_transformers("5.24.0"), check_transformers("6.1.0.dev0")
    (None, None)
    >>> check_transformers("5.23.0")
    Traceback (most recent call last):
    ...
    ImportError: transformers 5.23.0 is installed; softgrpo needs >= 5.24 (pip install -U 'transformers>=5.24,<6')
    """
    major, minor = (int(part) for part in version.split(".")[:2])
    if (major, minor) < TRANSFORMERS_MIN:
        need = ".".join(map(str, TRANSFORMERS_MIN))
        raise ImportError(
            f"transformers {version} is installed; softgrpo needs >= {need} (pip install -U 'transformers>={need},<6')"
        )


check_transformers(transformers.__version__)

THINK, DELIMITER, ANSWER, DONE = 0, 1, 2, 3
"""Per-row phase codes held in `DecodeState.phase`."""


@dataclass
class DecodeState:
    """Everything a decode step reads and writes, as fixed-shape tensors (buffers are written at per-row indices)."""

    phase: torch.Tensor  # [N] int64, THINK | DELIMITER | ANSWER | DONE
    next_pos: torch.Tensor  # [N] int64, position id of the next fed input (= real tokens so far)
    column: torch.Tensor  # [] int64, the KV-cache column of the next fed input (P + steps so far)
    attention_mask: torch.Tensor  # [N, L] int64, L >= P + S; 1 on the prompt and each fed column, 0 on pads,
    # rolled-back steps and columns not fed yet
    cot_len: torch.Tensor  # [N] int64
    delim_idx: torch.Tensor  # [N] int64, next forced token (of the row's think-end reason) to feed
    answer_len: torch.Tensor  # [N] int64, answer tokens written (delimiter included)
    sampled: torch.Tensor  # [N] int64, answer tokens sampled (the max_answer_tokens budget)
    think_end: torch.Tensor  # [N] int64, index into THINK_END_REASONS
    cot_inputs: torch.Tensor | None  # [N, T, d] float32 (None for hard: inputs are E[cot_ids])
    cot_mix_ids: torch.Tensor | None  # [N, T, K] int64 (multiplex / gumbel; None otherwise)
    cot_mix_logits: torch.Tensor | None  # [N, T, K] float32 (multiplex / gumbel; None otherwise)
    cot_ids: torch.Tensor  # [N, T] int64
    cot_top1: torch.Tensor  # [N, T] int64
    cot_entropy: torch.Tensor  # [N, T] float32
    cot_logprobs: torch.Tensor  # [N, T] float32
    answer_ids: torch.Tensor  # [N, A] int64
    answer_action: torch.Tensor  # [N, A] bool
    answer_logprobs: torch.Tensor  # [N, A] float32

    @staticmethod
    def empty(prompt_mask: torch.Tensor, columns: int, cfg: CotConfig, stop: StopSpec, d: int) -> DecodeState:
        """The state before the first decode step of rows with `prompt_mask` [N, P]: room for `columns` >= S fed
        inputs after the prompt, the CoT and answer buffers of `cfg` and `stop` (CoT vectors of width `d` for
        soft / fuzzy)."""
        n, device = prompt_mask.shape[0], prompt_mask.device
        t_max = cfg.max_think_tokens
        a_buf = max(len(f) for f in stop.forced.values()) + cfg.max_answer_tokens

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        t_buf = max(t_max, 1)
        return DecodeState(
            phase=zeros(n),
            next_pos=prompt_mask.sum(dim=1),
            column=torch.tensor(prompt_mask.shape[1], dtype=torch.long, device=device),
            attention_mask=torch.cat([prompt_mask.long(), zeros(n, columns)], dim=1),
            cot_len=zeros(n),
            delim_idx=zeros(n),
            answer_len=zeros(n),
            sampled=zeros(n),
            think_end=zeros(n),
            cot_inputs=zeros(n, t_buf, d, dtype=torch.float32) if cfg.continuous else None,
            cot_mix_ids=zeros(n, t_buf, cfg.mix_width) if cfg.mixture else None,
            cot_mix_logits=zeros(n, t_buf, cfg.mix_width, dtype=torch.float32) if cfg.mixture else None,
            cot_ids=zeros(n, t_buf),
            cot_top1=zeros(n, t_buf),
            cot_entropy=zeros(n, t_buf, dtype=torch.float32),
            cot_logprobs=zeros(n, t_buf, dtype=torch.float32),
            answer_ids=zeros(n, a_buf),
            answer_action=zeros(n, a_buf, dtype=torch.bool),
            answer_logprobs=zeros(n, a_buf, dtype=torch.float32),
        )


def input_embedding_matrix(model: PreTrainedModel, detach: bool = True) -> torch.Tensor:
    """E [V, d] as the model sees it: a row is exactly what the embedding module returns for that id. That is the
    weight itself for Llama / Qwen2 / Mistral (the same tensor, no copy), and weight × `embed_scale` for models
    whose embedding module scales its output (Gemma multiplies by sqrt(d) inside the module, so a vector passed as
    `inputs_embeds` must already carry the scale). μ = p E, hard inputs E[c] and σ all use this matrix.
    `detach=False` keeps the graph to the weight (the learner: μ's gradient reaches E)."""
    module = model.get_input_embeddings()
    weight = module.weight.detach() if detach else module.weight  # [V, d]
    scale = getattr(module, "embed_scale", None)
    if scale is None:
        return weight
    return weight * scale.to(weight.dtype)  # same op and rounding as the module's forward


def _write(buf: torch.Tensor, index: torch.Tensor, value: torch.Tensor, where: torch.Tensor) -> None:
    """buf[i, index[i]] = value[i] for rows where `where[i]`, in place and sync-free. buf [N, L] or [N, L, d]."""
    idx = index.clamp(max=buf.shape[1] - 1)[:, None]  # [N, 1]
    if buf.ndim == 3:
        idx = idx[:, :, None].expand(-1, 1, buf.shape[2])  # [N, 1, d]
        value, where = value[:, None], where[:, None, None]
    else:
        value, where = value[:, None], where[:, None]
    buf.scatter_(1, idx, torch.where(where, value.to(buf.dtype), buf.gather(1, idx)))


def _left_pad(
    prompt_ids: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError(f"every prompt needs at least one token; lengths {[len(p) for p in prompt_ids]}")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)  # [B, P]
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.bool)  # [B, P]
    for row, p in enumerate(prompt_ids):
        ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p) :] = True
    return ids.to(device), mask.to(device)


class Stepper:
    """The decode step: static context (embedding, mode function, limits) plus `__call__`, which updates the state
    tensors in place and returns the [N, d] float32 inputs to feed. Pure tensor code with no host reads and no
    randomness of its own (the step's `StepNoise` comes in), so the static engine compiles exactly this code;
    every state update is in place, so the tensors keep their addresses from step to step (a CUDA graph's static
    inputs)."""

    def __init__(
        self,
        cfg: CotConfig,
        sigma: float,
        embedding: torch.Tensor,
        stop: StopSpec,
        detector: ThinkEndDetector,
        eos_id: int,
        pad_id: int,
    ):
        self.cfg, self.sigma, self.embedding = cfg, sigma, embedding
        self.action = cot_action_fn(cfg, sigma)
        self.d_len = len(stop.delimiter)  # ids rule: the delimiter rolled back on a multi-token match
        self.forced, self.forced_len = stop.forced_table(pad_id, embedding.device)  # [R, F], [R]
        self.detector, self.eos_id, self.pad_id = detector, eos_id, pad_id

    def draw(self, rows: int, generator: torch.Generator) -> StepNoise:
        """The next step's noise for `rows` rows (`rollouts.modes.draw_noise`)."""
        vocab, width = self.embedding.shape
        return draw_noise(self.cfg, self.sigma, rows, vocab, width, generator)

    def __call__(self, st: DecodeState, logits: torch.Tensor, noise: StepNoise) -> torch.Tensor:
        d_len = self.d_len
        # --- CoT side: p_t, its entropy and top-1, and the mode's action, for every row
        log_p = cot_log_probs(logits, self.cfg)  # [N, V] float32
        step_entropy = entropy(log_p)  # [N]
        top1 = log_p.argmax(dim=-1)  # [N]
        act = self.action(log_p, self.embedding, noise.cot, logits)

        thinking = st.phase == THINK  # [N]
        reason = self.detector.check(act.ids, st.cot_len)  # [N]
        ending = thinking & (reason != NOT_ENDED)
        if d_len > 1:
            # roll back the D-1 partial-delimiter CoT steps, fed in the D-1 columns before this step's (module doc, 4.)
            drop = ending & (reason == REASON["delimiter"])  # [N]
            cols = torch.arange(st.attention_mask.shape[1], device=logits.device)  # [L]
            dropped_cols = (cols >= st.column - d_len + 1) & (cols < st.column)  # [L]
            st.attention_mask.masked_fill_(drop[:, None] & dropped_cols[None, :], 0)
            st.cot_len.sub_(drop.long() * (d_len - 1))
            st.next_pos.sub_(drop.long() * (d_len - 1))
        st.think_end.copy_(torch.where(ending, reason, st.think_end))
        nothing_forced = self.forced_len[reason.clamp(min=0)] == 0  # e.g. a phrase stop with no prefill
        st.phase.copy_(torch.where(ending, torch.where(nothing_forced, ANSWER, DELIMITER), st.phase))
        thinking = st.phase == THINK

        if st.cot_inputs is not None:
            _write(st.cot_inputs, st.cot_len, act.inputs, thinking)
        if st.cot_mix_ids is not None and st.cot_mix_logits is not None:
            _write(st.cot_mix_ids, st.cot_len, act.mix_ids, thinking)
            _write(st.cot_mix_logits, st.cot_len, act.mix_logits, thinking)
        _write(st.cot_ids, st.cot_len, act.ids, thinking)
        _write(st.cot_top1, st.cot_len, top1, thinking)
        _write(st.cot_entropy, st.cot_len, step_entropy, thinking)
        _write(st.cot_logprobs, st.cot_len, act.logprobs, thinking)
        st.cot_len.add_(thinking.long())
        self.detector.record(act.ids, step_entropy, thinking)

        # --- token side: forced token (of the row's think-end reason) or sampled answer token
        ans_log_p = answer_log_probs(logits, self.cfg)  # [N, V]
        ans_tok = sample_ids(ans_log_p, noise.answer)  # [N]
        in_delim = st.phase == DELIMITER
        in_answer = st.phase == ANSWER
        delim_tok = self.forced[st.think_end, st.delim_idx.clamp(max=self.forced.shape[1] - 1)]  # [N]
        tok = torch.where(in_delim, delim_tok, torch.where(in_answer, ans_tok, self.pad_id))  # [N]
        tok_lp = torch.where(in_answer, ans_log_p.gather(-1, tok[:, None]).squeeze(-1), 0.0)  # [N]
        writing = in_delim | in_answer
        _write(st.answer_ids, st.answer_len, tok, writing)
        _write(st.answer_action, st.answer_len, in_answer, writing)
        _write(st.answer_logprobs, st.answer_len, tok_lp, writing)
        st.answer_len.add_(writing.long())
        st.delim_idx.add_(in_delim.long())
        st.sampled.add_(in_answer.long())
        finished = in_answer & ((tok == self.eos_id) | (st.sampled >= self.cfg.max_answer_tokens))
        st.phase.copy_(
            torch.where(in_delim & (st.delim_idx >= self.forced_len[st.think_end]), ANSWER, st.phase)
        )
        st.phase.copy_(torch.where(finished, DONE, st.phase))
        # this step's input goes in the column after the last one fed, at the row's next position
        st.attention_mask.index_fill_(1, st.column.clamp(max=st.attention_mask.shape[1] - 1).view(1), 1)
        return torch.where(thinking[:, None], act.inputs, self.embedding[tok])  # [N, d]

    def advance(self, st: DecodeState) -> None:
        """After the fed inputs went through the model: the next input goes one column and one position on."""
        st.next_pos.add_(1)
        st.column.add_(1)


def prefill(
    model: PreTrainedModel,
    embedding: torch.Tensor,
    prompt_ids: list[list[int]],
    group_size: int,
    pad_id: int,
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode each distinct prompt once (left-padded) and give each of its G samples a copy: (the cache [N rows],
    the last logits [N, V] float32, the prompts [N, P], their mask [N, P])."""
    unique_prompts, unique_mask = _left_pad(prompt_ids, pad_id, model.device)  # [B, P]
    cache = DynamicCache(config=model.config)
    out = model(
        inputs_embeds=embedding[unique_prompts],  # [B, P, d]
        attention_mask=unique_mask.long(),
        position_ids=(unique_mask.long().cumsum(dim=1) - 1).clamp(min=0),  # [B, P]
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(group_size)  # [B, ...] -> [N, ...]
    logits = out.logits[:, -1].float().repeat_interleave(group_size, dim=0)  # [N, V]
    prompts = unique_prompts.repeat_interleave(group_size, dim=0)  # [N, P]
    return cache, logits, prompts, unique_mask.repeat_interleave(group_size, dim=0)


def check_request(group_size: int, sigma: float, cfg: CotConfig) -> None:
    """The arguments every engine refuses alike."""
    if group_size < 1:
        raise ValueError(f"group_size={group_size}: must be >= 1")
    if sigma < 0 or (sigma > 0 and not (cfg.gaussian or cfg.mode == "gumbel")):
        raise ValueError(
            f"sigma={sigma} with cot.mode={cfg.mode}: need sigma >= 0, and 0 for hard and multiplex"
        )


CHECK_EVERY = 16
"""Decode steps between two reads of `all rows done?` (the engines' default `check_every`)."""


def done_check_interval(device: torch.device) -> int:
    """`check_every` for a caller whose generator serves one call only (the trainer seeds one per rollout chunk):
    every step on CPU, where the read waits on no queue of launched work and each step run past the last row's
    end is a whole forward of the batch (with every 16, a training rollout of the tiny default ran up to 15 such
    steps of ~45); `CHECK_EVERY` on an accelerator, where each read stalls the stream of launched kernels. The
    stopping step cannot change the rollouts: it comes once every row is done, and only the noise of the steps
    not run (which nothing reads) is left undrawn. A caller whose generator spans calls (the evaluator) keeps
    the default, so that how far a call ran never shifts the noise of the next.

    >>> done_check_interval(torch.device("cpu")), done_check_interval(torch.device("cuda", 0))
    (1, 16)
    """
    return 1 if device.type == "cpu" else CHECK_EVERY


def decode_steps(cfg: CotConfig, stop: StopSpec) -> int:
    """The most decode steps a row can take: T CoT inputs, the longest forced sequence F, A answer tokens."""
    return cfg.max_think_tokens + max(len(f) for f in stop.forced.values()) + cfg.max_answer_tokens


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    cfg: CotConfig,
    *,
    group_size: int,
    sigma: float,
    stop: StopSpec,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
    tokenizer=None,
    check_every: int = CHECK_EVERY,
) -> Rollouts:
    """Roll out G = `group_size` samples of every prompt (see the module docstring).

    `sigma` is the noise std σ, computed once by the caller with `noise_sigma(input_embedding_matrix(model), cfg)`
    from the starting embeddings (0 for hard or noiseless modes). `stop` is the think-end rule and what is forced
    after it (`StopSpec.from_tokenizer`). `generator` must live on the model's device. When `tokenizer` is
    given, `answer_texts` holds the decoded sampled answer tokens (delimiter excluded, special tokens skipped).
    `check_every`: decode steps between two reads of `all rows done?` (`done_check_interval`).
    The record carries `cfg`'s mode, τ and filters (top_k / top_p / min_p, answer_top_p) and σ: the learner
    scores it only under the same ones.
    """
    check_request(group_size, sigma, cfg)
    embedding = input_embedding_matrix(model)  # [V, d] model dtype
    emb32 = embedding.float()  # [V, d] float32 (the same tensor when the model is float32)
    cache, logits, prompts, prompt_mask = prefill(model, embedding, prompt_ids, group_size, pad_id)
    n, width = prompts.shape
    steps = decode_steps(cfg, stop)
    st = DecodeState.empty(prompt_mask, steps, cfg, stop, emb32.shape[1])
    detector = ThinkEndDetector(cfg, stop, eos_id, n, emb32.shape[0], model.device)
    stepper = Stepper(cfg, sigma, emb32, stop, detector, eos_id, pad_id)
    for step in range(steps):
        feed = stepper(st, logits, stepper.draw(n, generator))  # [N, d] float32
        if step == steps - 1 or ((step + 1) % check_every == 0 and bool((st.phase == DONE).all())):
            break
        out = model(
            inputs_embeds=feed[:, None].to(embedding.dtype),  # [N, 1, d]
            attention_mask=st.attention_mask[:, : width + step + 1],
            position_ids=st.next_pos[:, None],  # [N, 1]
            cache=cache,
            use_cache=True,
        )
        stepper.advance(st)
        logits = out.logits[:, -1].float()  # [N, V]
    return finish(st, cfg, prompts, prompt_mask, group_size, sigma, pad_id, tokenizer)


def finish(
    st: DecodeState,
    cfg: CotConfig,
    prompts: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
    sigma: float,
    pad_id: int,
    tokenizer,
) -> Rollouts:
    """Trim the buffers to the longest CoT / answer and blank everything past each row's length."""
    t_len, a_len = int(st.cot_len.max()), int(st.answer_len.max())  # the one sync at the end
    cot_mask = torch.arange(t_len, device=prompts.device)[None] < st.cot_len[:, None]  # [N, T]
    answer_mask = torch.arange(a_len, device=prompts.device)[None] < st.answer_len[:, None]  # [N, A]
    answer_ids = st.answer_ids[:, :a_len].masked_fill(~answer_mask, pad_id)  # [N, A]
    answer_action = st.answer_action[:, :a_len] & answer_mask  # [N, A]
    texts: list[str] = []
    if tokenizer is not None:
        texts = [
            tokenizer.decode(ids[act].tolist(), skip_special_tokens=True)
            for ids, act in zip(answer_ids.cpu(), answer_action.cpu(), strict=True)
        ]
    cot_inputs = None
    if st.cot_inputs is not None:
        cot_inputs = st.cot_inputs[:, :t_len] * cot_mask[:, :, None]  # [N, T, d]
    mix_ids = mix_logits = None
    if st.cot_mix_ids is not None and st.cot_mix_logits is not None:
        mix_ids = st.cot_mix_ids[:, :t_len].masked_fill(~cot_mask[:, :, None], pad_id)  # [N, T, K]
        mix_logits = st.cot_mix_logits[:, :t_len].masked_fill(~cot_mask[:, :, None], 0.0)  # [N, T, K]
    return Rollouts(
        cot_mode=cfg.mode,
        prompt_ids=prompts,
        prompt_mask=prompt_mask,
        group_index=torch.arange(prompts.shape[0] // group_size, device=prompts.device).repeat_interleave(
            group_size
        ),
        cot_ids=st.cot_ids[:, :t_len].masked_fill(~cot_mask, pad_id),
        cot_inputs=cot_inputs,
        cot_mix_ids=mix_ids,
        cot_mix_logits=mix_logits,
        cot_top1_ids=st.cot_top1[:, :t_len].masked_fill(~cot_mask, pad_id),
        cot_mask=cot_mask,
        cot_entropy=st.cot_entropy[:, :t_len] * cot_mask,
        cot_logprobs=st.cot_logprobs[:, :t_len] * cot_mask,
        answer_ids=answer_ids,
        answer_mask=answer_mask,
        answer_action_mask=answer_action,
        answer_logprobs=st.answer_logprobs[:, :a_len] * answer_action,
        think_end=st.think_end,
        sigma=float(sigma),
        temperature=cfg.temperature,
        answer_texts=texts,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=cfg.min_p,
        answer_top_p=cfg.answer_top_p,
    )
