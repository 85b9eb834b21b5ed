"""Teacher-forced log-probs of every action in a batch of rollouts under the current model (DESIGN.md §1, Learner).

The transformer body's last hidden states over, per row i,

    [ E[prompt_i (real tokens only)] ; CoT inputs_i ; E[answer_i] ]           length L_i = P_i + T_i + A_i

(computed with each distinct prompt encoded once, see "Shared prompts" below)

where the CoT inputs are E[cot_ids] for hard CoT and the stored vectors h_t for soft / fuzzy CoT. Each action is
scored from the hidden state one position before it:

- hard CoT step t:     log_softmax(filter(z_{t-1}) / τ)[c_t]                      (`cot_log_probs`)
- soft / fuzzy step t: log N(h_t; μ_t(θ), σ² I_d), μ_t(θ) = softmax(filter(z_{t-1}(θ)) / τ) E(θ)
                       (`cot_log_probs`, `mixture_mean`, `gaussian_log_prob`)
- multiplex / gumbel step t: `rollouts.modes.mixture_log_prob` of the stored K tokens and mix logits:
                       Σ_k log p_t(c_k) (multiplex), the Gumbel density of the perturbed logits (gumbel); the
                       input h_t = Σ_k w_k E(θ)[c_k] is rebuilt from them (weights `mixture_weights`), so E gets
                       its input gradient as in hard mode
- answer token a:      log_softmax(filter_top_p(z_{a-1}) / τ_answer)[a]  (forced think-end tokens are not scored)

The functions from `rollouts.distributions` are the ones the rollout engine uses, so rollout and learner compute
the same numbers; p_t and μ_t are float32 whatever the model dtype. The h_t are constants (float32, cast to the
model dtype only as inputs): no gradient flows through the recurrence that produced them, only through μ_t(θ),
both via z_{t-1} and via E (a parameter; tied or not to the output head).

Packing (`_packed_body`, the reference): rows are RIGHT-padded to L = max_i L_i, with position ids 0..L-1 and
an attention mask that is 1 on the first L_i positions. Real tokens then sit at the same positions 0..L_i-1 as
in an unpadded single-row pass, causal attention never lets a real position see a pad, and no query row is fully
masked (left padding would give the leading pad rows an all-masked attention row, a NaN hazard in some kernels).

Shared prompts (`_shared_prompt_body`, `LogProbConfig.share_prompts`, the default): the G rollouts of a group
share their prompt, which is most of each row on short-CoT tasks, so the body encodes each distinct prompt once
into a KV cache and runs every row's [CoT inputs ; answer] on its prompt's cache: the same positions, masks and
attention as the packed row, about G times less prompt compute, and gradients from all G rows flow back into the
one prompt pass. Models with sliding-window layers keep the packed path (a sliding cache drops old positions).

Scoring: the output head, log-softmax and μ at the scored positions are `rl.action_scorer.ActionScorer` (one
module call, in chunks of `chunk_size` positions under activation checkpointing; see its module for the memory
bound and the ZeRO-3 registration).

The body is `model.get_decoder()` and the head `model.get_output_embeddings()`, a linear layer (Llama,
Qwen2/2.5/3, Mistral, Gemma; tied and untied). `config.final_logit_softcapping` (Gemma 2) is applied as the
model's own forward does. Pass the unwrapped model (e.g. `accelerator.unwrap_model(model)`): the head is applied
outside the top-level forward.

Shape legend (see `rollouts.record`): N rollouts, P prompt, T CoT steps, A answer tokens, L packed sequence
length, M scored positions of one kind in the batch, V vocabulary, d embedding width, H model hidden size (= d).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from transformers import DynamicCache

from rl.action_scorer import ActionScores, action_scorer
from rl.scorable import check_rebuilt_mixture, check_scorable
from rollouts.config import CotConfig
from rollouts.modes import mixture_weights
from rollouts.record import Rollouts


@dataclass
class LogProbConfig:
    """`chunk_size`: scored positions per output-head chunk (0 = dense reference path: all at once).
    `mean_grad_through_embedding`: whether a soft / fuzzy step's gradient reaches E through μ = p E (the
    paper's objective, default). False detaches that factor, so the Gaussian term trains the policy only
    through the logits (an experimental departure; a tied output head still gets its logit gradient).
    `share_prompts`: encode each distinct prompt once and run the rows' CoT and answer on its KV cache (the
    same numbers up to float rounding, faster under GRPO groups); False = the packed reference path."""

    chunk_size: int = 512
    mean_grad_through_embedding: bool = True
    share_prompts: bool = True

    def __post_init__(self) -> None:
        if self.chunk_size < 0:
            raise ValueError(f"logprobs.chunk_size={self.chunk_size}: must be >= 0 (0 = dense)")


@dataclass
class SequenceLogProbs:
    """Per-action log-probs of a batch under one model (float32; zeros where the mask is False)."""

    cot_mode: str  # hard | soft | fuzzy | multiplex | gumbel
    # [N, T] log π(CoT action): token log-prob (hard), Gaussian log-density (soft / fuzzy), sum of the K draws'
    # log-probs (multiplex), Gumbel log-density (gumbel)
    cot: torch.Tensor
    cot_mask: torch.Tensor  # [N, T] bool, True on real CoT steps
    answer: torch.Tensor  # [N, A] log π(answer token) at the answer temperature
    answer_mask: torch.Tensor  # [N, A] bool, True on scored answer tokens (= Rollouts.answer_action_mask)
    mu: torch.Tensor | None  # [N, T, d] μ_t(θ) for soft/fuzzy (zeros past length); None for hard
    sigma: float  # σ of the Gaussian CoT steps (0 for hard)
    cot_entropy: torch.Tensor  # [N, T] H(p_t) nats, detached
    answer_entropy: torch.Tensor  # [N, A] entropy of the answer-token distribution, nats, detached

    def detach(self) -> SequenceLogProbs:
        """A copy with every tensor detached (the PPO "old" policy, or a reference model's numbers)."""
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).detach()
                for f in fields(self)
                if torch.is_tensor(getattr(self, f.name))
            },
        )


@dataclass
class LogProbGap:
    """Rollout-vs-learner health metric: mean |behaviour log-prob - learner log-prob| per step type (nats)."""

    cot: float
    answer: float


def sequence_log_probs(
    model: torch.nn.Module,
    rollouts: Rollouts,
    cot: CotConfig,
    cfg: LogProbConfig | None = None,
    *,
    answer_temperature: float = 1.0,
    answer_top_p: float = 1.0,
) -> SequenceLogProbs:
    """Score every CoT step and every sampled answer token of `rollouts` under `model` (see module docstring).

    `cot` must be the CotConfig the rollouts were generated with: its mode, temperature and CoT filter
    (top_k / top_p / min_p) are reused to score, and must equal the ones the rollouts record, else ValueError.
    `answer_temperature` / `answer_top_p`: how the answer tokens were sampled (training: 1.0 / 1.0; a greedy
    temperature 0 is scored at 1), i.e. `cot.answer_temperature` / `cot.answer_top_p` of the rollout config;
    `answer_top_p` must equal the recorded `rollouts.answer_top_p` (ValueError otherwise; the answer temperature
    is not recorded, so it is not checked). Scoring under another filter than the one that drew the tokens would
    silently give other log-probs: up to 0.23 nats per action on average in tests/test_logprobs.py.
    Runs with gradients when called under grad mode; call under `torch.no_grad()` for a reference model.
    """
    cfg = cfg or LogProbConfig()
    check_scorable(rollouts, cot, answer_top_p)
    embedding = model.get_input_embeddings()
    decoder = model.get_decoder()
    scorer = action_scorer(model)
    device = embedding.weight.device

    prompt_mask = rollouts.prompt_mask.to(device)  # [N, P]
    cot_mask = rollouts.cot_mask.to(device)  # [N, T]
    answer_mask = rollouts.answer_mask.to(device)  # [N, A]
    action_mask = rollouts.answer_action_mask.to(device) & answer_mask  # [N, A]
    p_len, t_len, a_len = _lengths(prompt_mask, cot_mask, answer_mask)  # [N] each
    n, t_max = cot_mask.shape
    a_max = answer_mask.shape[1]

    suffix, s_len, h_all = _suffixes(embedding, rollouts, t_len, a_len, cot)  # [N, S, d], [N], [N, T, d]
    prompt_ids = _prompts_first(rollouts.prompt_ids.to(device), prompt_mask, p_len)  # [N, P]
    shared = cfg.share_prompts and not _has_sliding_layers(model.config)
    body = _shared_prompt_body if shared else _packed_body
    hidden_at = body(decoder, embedding, prompt_ids, p_len, suffix, s_len)

    # --- scored positions: each CoT step and each sampled answer token, from the position before it
    rows, steps = cot_mask.nonzero(as_tuple=True)  # [M_c]
    cot_hidden = hidden_at(rows, p_len[rows] + steps - 1)  # [M_c, H]
    if cot.gaussian:
        assert h_all is not None
        cot_targets: tuple[torch.Tensor, ...] = (h_all[rows, steps],)  # [M_c, d] the stored vectors h_t
    elif cot.mixture:
        assert rollouts.cot_mix_ids is not None and rollouts.cot_mix_logits is not None
        cot_targets = (  # [M_c, K] each: the mixed tokens and their logits
            rollouts.cot_mix_ids.to(device)[rows, steps],
            rollouts.cot_mix_logits.to(device)[rows, steps],
        )
    else:
        cot_targets = (rollouts.cot_ids.to(device)[rows, steps],)  # [M_c] the sampled tokens c_t
    a_rows, a_steps = action_mask.nonzero(as_tuple=True)  # [M_a]
    ans_hidden = hidden_at(a_rows, p_len[a_rows] + t_len[a_rows] + a_steps - 1)  # [M_a, H]
    tokens = rollouts.answer_ids.to(device)[a_rows, a_steps]  # [M_a]
    scores = ActionScores(
        *scorer(
            cot_hidden,
            cot_targets,
            ans_hidden,
            tokens,
            cot=cot,
            sigma=rollouts.sigma,
            answer_temperature=answer_temperature if answer_temperature > 0 else 1.0,
            answer_top_p=answer_top_p,
            chunk_size=cfg.chunk_size,
            mean_grad_through_embedding=cfg.mean_grad_through_embedding,
        )
    )

    def scatter(rows_: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, width: int) -> torch.Tensor:
        return torch.zeros(n, width, *values.shape[1:], device=device).index_put((rows_, cols), values)

    return SequenceLogProbs(
        cot_mode=cot.mode,
        cot=scatter(rows, steps, scores.cot, t_max),  # [N, T]
        cot_mask=cot_mask,
        answer=scatter(a_rows, a_steps, scores.answer, a_max),  # [N, A]
        answer_mask=action_mask,
        mu=None if scores.mu is None else scatter(rows, steps, scores.mu, t_max),  # [N, T, d]
        sigma=rollouts.sigma if cot.gaussian else 0.0,
        cot_entropy=scatter(rows, steps, scores.cot_entropy, t_max),
        answer_entropy=scatter(a_rows, a_steps, scores.answer_entropy, a_max),
    )


def _lengths(
    prompt_mask: torch.Tensor, cot_mask: torch.Tensor, answer_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's prompt, CoT and answer length [N], after checking the CoT and answer are right-padded and no
    prompt is empty."""
    _check_right_padded(cot_mask, "cot_mask")
    _check_right_padded(answer_mask, "answer_mask")
    p_len = prompt_mask.sum(dim=1)  # [N]
    if bool((p_len == 0).any()):
        raise ValueError(f"rows {(p_len == 0).nonzero().flatten().tolist()} have an empty prompt")
    return p_len, cot_mask.sum(dim=1), answer_mask.sum(dim=1)


def _suffixes(
    embedding: torch.nn.Module, rollouts: Rollouts, t_len: torch.Tensor, a_len: torch.Tensor, cot: CotConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each row's suffix [CoT inputs ; answer tokens ; right padding] as input vectors [N, S, d] (S = the longest
    suffix), its length s_len [N], and the stored CoT vectors h [N, T, d] as float32 constants (soft / fuzzy;
    None otherwise). Hard CoT inputs are E[c_t] and mixture inputs Σ_k w_k E[c_k], both through the embedding
    module (with E's gradient)."""
    device, dtype = embedding.weight.device, embedding.weight.dtype
    n, t_max = rollouts.cot_mask.shape
    a_max = rollouts.answer_mask.shape[1]
    s_len = t_len + a_len  # [N]
    width = int(s_len.max())
    spos = torch.arange(width, device=device).unsqueeze(0)  # [1, S]
    in_cot = spos < t_len[:, None]  # [N, S]
    in_answer = (spos >= t_len[:, None]) & (spos < s_len[:, None])  # [N, S]
    cot_index = spos.clamp(0, max(t_max - 1, 0)).expand(n, -1)  # [N, S] CoT step at each position
    answer_index = (spos - t_len[:, None]).clamp(0, a_max - 1)  # [N, S]
    suffix_ids = torch.where(in_answer, rollouts.answer_ids.to(device).gather(1, answer_index), 0)  # [N, S]
    if cot.mode == "hard" and t_max > 0:
        suffix_ids = torch.where(in_cot, rollouts.cot_ids.to(device).gather(1, cot_index), suffix_ids)
    suffix = embedding(suffix_ids)  # [N, S, d]
    h_all: torch.Tensor | None = None
    cot_vectors = None  # [N, T, d] the CoT inputs, for the vector modes
    if cot.gaussian:
        assert rollouts.cot_inputs is not None
        h_all = rollouts.cot_inputs.to(device=device, dtype=torch.float32).detach()  # [N, T, d] constants
        cot_vectors = h_all
    elif cot.mixture:
        cot_vectors = _mixture_inputs(embedding, rollouts, cot)
    if cot_vectors is not None and t_max > 0:
        h_seq = cot_vectors.gather(1, cot_index[..., None].expand(-1, -1, cot_vectors.shape[-1]))  # [N, S, d]
        suffix = torch.where(in_cot[..., None], h_seq.to(dtype), suffix)
    return suffix, s_len, h_all


def _mixture_inputs(embedding: torch.nn.Module, rollouts: Rollouts, cot: CotConfig) -> torch.Tensor:
    """h_t = Σ_k w_k E(θ)[c_k] [N, T, d] float32 from the stored tokens and mix logits (`mixture_weights`), after
    checking they rebuild the vectors the rollout fed (another τ_g or weighting would silently train on other
    inputs than the ones that produced the rewards)."""
    assert rollouts.cot_mix_ids is not None and rollouts.cot_mix_logits is not None
    device = embedding.weight.device
    ids = rollouts.cot_mix_ids.to(device)  # [N, T, K]
    w = mixture_weights(rollouts.cot_mix_logits.to(device), cot)  # [N, T, K]
    h = (embedding(ids).float() * w[..., None]).sum(dim=-2)  # [N, T, d], as `rollouts.modes.mixture_inputs`
    check_rebuilt_mixture(h, rollouts, cot)
    return h


def _prompts_first(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, p_len: torch.Tensor) -> torch.Tensor:
    """[N, P] each row's real prompt tokens moved to the front, in order, then -1 (prompts are left-padded; any
    mask pattern works)."""
    device = prompt_ids.device
    order = torch.argsort((~prompt_mask).to(torch.int8), dim=1, stable=True)  # [N, P]
    return torch.where(
        torch.arange(order.shape[1], device=device)[None] < p_len[:, None],
        prompt_ids.gather(1, order),
        -1,
    )


def log_prob_gap(rollouts: Rollouts, learner: SequenceLogProbs) -> LogProbGap:
    """Mean |rollout behaviour log-prob - learner log-prob| over CoT steps and over sampled answer tokens.

    Large CoT gaps in soft/fuzzy mode mean the rollout's μ differs from the learner's (DESIGN.md, Numerics).
    """
    cot_mask = learner.cot_mask
    ans_mask = learner.answer_mask
    cot_diff = (rollouts.cot_logprobs.to(learner.cot.device) - learner.cot.detach()).abs()[cot_mask]
    ans_diff = (rollouts.answer_logprobs.to(learner.answer.device) - learner.answer.detach()).abs()[ans_mask]
    return LogProbGap(
        cot=cot_diff.mean().item() if cot_diff.numel() else 0.0,
        answer=ans_diff.mean().item() if ans_diff.numel() else 0.0,
    )


def _has_sliding_layers(config) -> bool:
    """Whether a KV cache of this model keeps only a window of positions in some layer."""
    return any(DynamicCache(config=config).is_sliding)


HiddenAt = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""hidden_at(rows [M], positions [M]) -> [M, H]: the body's last hidden state of row `rows[m]` at position
`positions[m]` of its sequence [prompt ; suffix] (positions counted from the prompt's first real token)."""


def _packed_body(
    decoder: torch.nn.Module,
    embedding: torch.nn.Module,
    prompt_ids: torch.Tensor,  # [N, P] real tokens first, then -1
    p_len: torch.Tensor,  # [N]
    suffix: torch.Tensor,  # [N, S, d] input vectors of each row's CoT and answer
    s_len: torch.Tensor,  # [N]
) -> HiddenAt:
    """Reference body: one forward over rows [prompt ; suffix], right-padded to L = max (P_i + S_i), position ids
    0..L-1 and an attention mask that is 1 on each row's first P_i + S_i positions."""
    n = prompt_ids.shape[0]
    seq_len = p_len + s_len  # [N]
    length = int(seq_len.max())
    pos = torch.arange(length, device=suffix.device).unsqueeze(0)  # [1, L]
    in_prompt = pos < p_len[:, None]  # [N, L]
    ids = prompt_ids.gather(1, pos.clamp(max=prompt_ids.shape[1] - 1).expand(n, -1)).clamp(min=0)  # [N, L]
    from_suffix = suffix.gather(
        1, (pos - p_len[:, None]).clamp(0, suffix.shape[1] - 1)[..., None].expand(-1, -1, suffix.shape[-1])
    )  # [N, L, d]
    inputs_embeds = torch.where(in_prompt[..., None], embedding(ids), from_suffix)  # [N, L, d]
    hidden = decoder(
        inputs_embeds=inputs_embeds,
        attention_mask=(pos < seq_len[:, None]).long(),
        position_ids=pos.expand(n, -1),
        use_cache=False,
    ).last_hidden_state  # [N, L, H]
    return lambda rows, positions: hidden[rows, positions]


def _shared_prompt_body(
    decoder: torch.nn.Module,
    embedding: torch.nn.Module,
    prompt_ids: torch.Tensor,  # [N, P] real tokens first, then -1
    p_len: torch.Tensor,  # [N]
    suffix: torch.Tensor,  # [N, S, d]
    s_len: torch.Tensor,  # [N]
) -> HiddenAt:
    """The same computation with each DISTINCT prompt encoded once (the G samples of a GRPO group share one):
    a forward over the U distinct prompts (right-padded to P) fills a KV cache, its rows are indexed out to the N
    rows (autograd carries every row's gradient back to its prompt), and a second forward runs the suffixes on it
    with position ids P_i.. and an attention mask [prompt real tokens ; suffix real positions]. Causal attention
    over the cache lets suffix position k see exactly the prompt's real tokens and suffix positions <= k, as in
    the packed row. Two body calls whatever the data (the same collective count on every process under
    sharding)."""
    device = suffix.device
    unique, inverse = torch.unique(prompt_ids, dim=0, return_inverse=True)  # [U, P], [N]
    u_len = (unique >= 0).sum(dim=1)  # [U]
    width = unique.shape[1]
    ppos = torch.arange(width, device=device).unsqueeze(0)  # [1, P]
    cache = DynamicCache(config=decoder.config)
    prompt_hidden = decoder(
        inputs_embeds=embedding(unique.clamp(min=0)),
        attention_mask=(ppos < u_len[:, None]).long(),
        position_ids=ppos.expand(unique.shape[0], -1),
        cache=cache,
        use_cache=True,
    ).last_hidden_state  # [U, P, H]
    cache.batch_select_indices(inverse)  # [U, ...] -> [N, ...]
    spos = torch.arange(suffix.shape[1], device=device).unsqueeze(0)  # [1, S]
    suffix_hidden = decoder(
        inputs_embeds=suffix,
        attention_mask=torch.cat([ppos < p_len[:, None], spos < s_len[:, None]], dim=1).long(),  # [N, P + S]
        position_ids=p_len[:, None] + spos,  # [N, S]
        cache=cache,
        use_cache=True,
    ).last_hidden_state  # [N, S, H]

    def hidden_at(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # only a prompt's last token is ever scored from: the first CoT step (or answer token) of the row
        in_prompt = (positions < p_len[rows])[:, None]  # [M, 1]
        from_prompt = prompt_hidden[inverse[rows], positions.clamp(max=width - 1)]  # [M, H]
        from_suffix = suffix_hidden[rows, (positions - p_len[rows]).clamp(min=0)]  # [M, H]
        return torch.where(in_prompt, from_prompt, from_suffix)

    return hidden_at


def _check_right_padded(mask: torch.Tensor, name: str) -> None:
    """A right-padded mask is True exactly on the first `length` entries of each row."""
    lengths = mask.sum(dim=1, keepdim=True)  # [N, 1]
    expected = torch.arange(mask.shape[1], device=mask.device)[None] < lengths
    if not torch.equal(mask, expected):
        bad = (mask != expected).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{name} must be right-padded (True then False); rows {bad} are not")
