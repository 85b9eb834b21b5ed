"""Typed records that carry rollouts from the engine to rewards, the learner and the evaluation writer.

Shape legend (used on every tensor line in this project):
    N  rollouts in a batch (= prompts × G samples; the G samples of one prompt are contiguous)
    G  samples per prompt
    P  prompt length (left-padded to the longest prompt in the batch)
    T  CoT steps (right-padded to the longest CoT in the batch)
    A  answer tokens (right-padded), beginning with the think-end delimiter
    V  vocabulary size
    d  hidden size (embedding width)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SAMPLING_FIELDS = ("top_k", "top_p", "min_p", "answer_top_p")
"""The `CotConfig` filter settings a `Rollouts` records, under the same names: top-k / top-p / min-p of the CoT
distribution p_t = softmax(filter(z) / τ) and the answer tokens' nucleus. Every behaviour log-prob was computed
under them, so the learner refuses to score the rollouts under other ones (rl.logprobs.sequence_log_probs)."""

THINK_END_REASONS = ("token", "delimiter", "entropy", "max_tokens", "eos", "phrase")
"""Why thinking ended, indexed by `Rollouts.think_end` (rollouts/stopping.py):
token = the top-1 token was the think-end token (hard mode: the sampled token was);
delimiter = the top-1 stream ended with a multi-token think-end string; entropy = cold stop; max_tokens = T cap;
eos = the top-1 token was the model's end-of-sequence token; phrase = the decoded top-1 stream contains the
think-end phrase (the text rule)."""


@dataclass
class Rollout:
    """One sample, as plain Python values, for writing JSONL and for the soft-trace view."""

    prompt_ids: list[int]
    cot_mode: str
    cot_ids: list[int]  # hard: the sampled CoT tokens (= inputs); soft/fuzzy: equal to cot_top1_ids
    cot_inputs: torch.Tensor | None  # [T_i, d] float32 vectors h_t for soft/fuzzy; None for hard
    cot_top1_ids: list[int]  # element t: argmax of the distribution that produced CoT input t
    cot_entropy: list[float]  # H(p_t) in nats, per CoT step
    cot_logprobs: list[float]  # behaviour log-prob per CoT step (Gaussian density for vectors)
    answer_ids: list[int]  # every hard token after the CoT inputs, beginning with the think delimiter
    answer_logprobs: list[float]  # behaviour log-prob per answer token (0.0 for forced delimiter tokens)
    answer_text: str
    think_end: str  # one of THINK_END_REASONS


@dataclass
class Rollouts:
    """A batch of N rollouts in fixed-shape tensors (see the shape legend above).

    A teacher-forced sequence for row i is prompt_ids[i][prompt_mask[i]] ++ CoT inputs[:cot_lengths[i]] ++
    answer_ids[i][:answer_lengths[i]]. CoT input t was produced from the logits at the position before it.
    """

    cot_mode: str  # hard | soft | fuzzy | multiplex | gumbel
    prompt_ids: torch.Tensor  # [N, P] int64, left-padded with the pad id
    prompt_mask: torch.Tensor  # [N, P] bool, True on real prompt tokens
    group_index: torch.Tensor  # [N] int64, which prompt (0..N/G-1) each row belongs to
    # [N, T] int64, the stream tokens (rollouts.modes.CotAction.ids): hard = sampled ids; soft / fuzzy = top-1
    # ids; multiplex = the first draw; gumbel = the Gumbel-max token; pad past length
    cot_ids: torch.Tensor
    # [N, T, d] float32 h_t, the fed vectors of soft / fuzzy / multiplex / gumbel (zeros past length); None for hard
    cot_inputs: torch.Tensor | None
    cot_top1_ids: torch.Tensor  # [N, T] int64
    cot_mask: torch.Tensor  # [N, T] bool, True on real CoT steps
    cot_entropy: torch.Tensor  # [N, T] float32, H(p_t) of the (filtered, tempered) CoT distribution, nats
    cot_logprobs: torch.Tensor  # [N, T] float32 behaviour log-prob of each CoT action
    answer_ids: torch.Tensor  # [N, A] int64, right-padded with the pad id
    answer_mask: torch.Tensor  # [N, A] bool, True on real answer tokens (delimiter included)
    answer_action_mask: torch.Tensor  # [N, A] bool, True on sampled answer tokens (forced delimiter excluded)
    answer_logprobs: torch.Tensor  # [N, A] float32 behaviour log-prob (0 where not an action)
    think_end: torch.Tensor  # [N] int64 index into THINK_END_REASONS
    sigma: float  # noise scale of the CoT steps: Gaussian std σ (soft / fuzzy), Gumbel β (gumbel); else 0
    temperature: float  # CoT temperature τ
    answer_texts: list[str] = field(default_factory=list)  # N decoded answer phases (filled by the engine)
    # How the tokens were drawn, which the learner must reuse to score them (see `SAMPLING_FIELDS`):
    top_k: int = 0  # CoT filter top-k (CotConfig.top_k; 0 = off)
    top_p: float = 1.0  # CoT filter nucleus mass (CotConfig.top_p; 1.0 = off)
    min_p: float = 0.0  # CoT filter min-p floor (CotConfig.min_p; 0.0 = off)
    answer_top_p: float = 1.0  # nucleus of the answer tokens (CotConfig.answer_top_p; 1.0 = off)
    # multiplex / gumbel (None otherwise): the K tokens each step mixes (multiplex: its draws; gumbel: the top-k
    # support) [N, T, K] int64, and their logits [N, T, K] float32 (multiplex: log p_t of each draw; gumbel: the
    # perturbed logits x), from which the weights are a function (`rollouts.modes.mixture_weights`)
    cot_mix_ids: torch.Tensor | None = None
    cot_mix_logits: torch.Tensor | None = None

    @property
    def sampling(self) -> dict[str, int | float]:
        """The recorded filter settings by `CotConfig` field name (`SAMPLING_FIELDS`)."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS}

    @property
    def num_rollouts(self) -> int:
        return int(self.prompt_ids.shape[0])

    @property
    def cot_lengths(self) -> torch.Tensor:  # [N]
        return self.cot_mask.sum(dim=1)

    @property
    def answer_lengths(self) -> torch.Tensor:  # [N]
        return self.answer_mask.sum(dim=1)

    def samples(self, tokenizer=None) -> list[Rollout]:
        """The per-sample view (CPU, plain Python values). `answer_text` comes from `answer_texts` when the engine
        filled it, else from decoding the sampled answer tokens with `tokenizer`, else ""."""
        cpu = {
            name: getattr(self, name).cpu()
            for name in (
                "prompt_ids",
                "prompt_mask",
                "cot_ids",
                "cot_top1_ids",
                "cot_mask",
                "cot_entropy",
                "cot_logprobs",
                "answer_ids",
                "answer_mask",
                "answer_action_mask",
                "answer_logprobs",
                "think_end",
            )
        }
        inputs = None if self.cot_inputs is None else self.cot_inputs.detach().float().cpu()  # [N, T, d]
        out = []
        for i in range(self.num_rollouts):
            t, a = int(cpu["cot_mask"][i].sum()), int(cpu["answer_mask"][i].sum())
            answer_ids = cpu["answer_ids"][i, :a]
            if self.answer_texts:
                text = self.answer_texts[i]
            elif tokenizer is not None:
                text = tokenizer.decode(
                    answer_ids[cpu["answer_action_mask"][i, :a]].tolist(), skip_special_tokens=True
                )
            else:
                text = ""
            out.append(
                Rollout(
                    prompt_ids=cpu["prompt_ids"][i][cpu["prompt_mask"][i]].tolist(),
                    cot_mode=self.cot_mode,
                    cot_ids=cpu["cot_ids"][i, :t].tolist(),
                    cot_inputs=None if inputs is None else inputs[i, :t].clone(),
                    cot_top1_ids=cpu["cot_top1_ids"][i, :t].tolist(),
                    cot_entropy=cpu["cot_entropy"][i, :t].tolist(),
                    cot_logprobs=cpu["cot_logprobs"][i, :t].tolist(),
                    answer_ids=answer_ids.tolist(),
                    answer_logprobs=cpu["answer_logprobs"][i, :a].tolist(),
                    answer_text=text,
                    think_end=THINK_END_REASONS[int(cpu["think_end"][i])],
                )
            )
        return out

    def completion_texts(self, tokenizer) -> list[str]:
        """Per rollout, the decoded top-1 CoT stream followed by every answer token (delimiter and EOS
        included): what the reward judges and what evaluation writes as `text`."""
        cot = self.cot_top1_ids.masked_fill(~self.cot_mask, -1).tolist()
        ans = self.answer_ids.masked_fill(~self.answer_mask, -1).tolist()
        return [tokenizer.decode([t for t in c + a if t >= 0]) for c, a in zip(cot, ans, strict=True)]

    def select(self, rows: slice) -> Rollouts:
        """The rollouts in `rows` (a contiguous slice; group indices are kept as they are)."""

        def take(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows]

        return Rollouts(
            cot_mode=self.cot_mode,
            prompt_ids=take(self.prompt_ids),
            prompt_mask=take(self.prompt_mask),
            group_index=take(self.group_index),
            cot_ids=take(self.cot_ids),
            cot_inputs=take(self.cot_inputs),
            cot_mix_ids=take(self.cot_mix_ids),
            cot_mix_logits=take(self.cot_mix_logits),
            cot_top1_ids=take(self.cot_top1_ids),
            cot_mask=take(self.cot_mask),
            cot_entropy=take(self.cot_entropy),
            cot_logprobs=take(self.cot_logprobs),
            answer_ids=take(self.answer_ids),
            answer_mask=take(self.answer_mask),
            answer_action_mask=take(self.answer_action_mask),
            answer_logprobs=take(self.answer_logprobs),
            think_end=take(self.think_end),
            sigma=self.sigma,
            temperature=self.temperature,
            answer_texts=self.answer_texts[rows] if self.answer_texts else [],
            **self.sampling,
        )


def _pad_to(
    x: torch.Tensor, length: int, dim: int, value: float | int | bool, left: bool = False
) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    pad = torch.full(shape, value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=dim)


def concat_rollouts(parts: list[Rollouts], pad_id: int = 0) -> Rollouts:
    """Stack batches row-wise: prompts re-left-padded, CoT and answers re-right-padded, group indices offset
    so that groups stay distinct. All parts must share mode, σ, τ and the filter settings (`SAMPLING_FIELDS`)."""
    if not parts:
        raise ValueError("concat_rollouts: nothing to concatenate")
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if (p.cot_mode, p.sigma, p.temperature) != (first.cot_mode, first.sigma, first.temperature):
            raise ValueError("concat_rollouts: parts differ in cot_mode, sigma or temperature")
    for i, p in enumerate(parts[1:], start=1):
        differ = [
            f"{name}={getattr(first, name)} in part 0 but {name}={getattr(p, name)} in part {i}"
            for name in SAMPLING_FIELDS
            if getattr(p, name) != getattr(first, name)
        ]
        if differ:
            raise ValueError(
                f"concat_rollouts: parts were sampled with different filters: {'; '.join(differ)}"
            )
    width = max(p.prompt_ids.shape[1] for p in parts)
    t_len = max(p.cot_mask.shape[1] for p in parts)
    a_len = max(p.answer_mask.shape[1] for p in parts)
    offset, groups = 0, []
    for p in parts:
        groups.append(p.group_index + offset)
        offset += int(p.group_index.max()) + 1 if p.group_index.numel() else 0

    def cat(name: str, length: int, value: float | int | bool, left: bool = False) -> torch.Tensor:
        return torch.cat([_pad_to(getattr(p, name), length, 1, value, left) for p in parts])

    return Rollouts(
        cot_mode=first.cot_mode,
        prompt_ids=cat("prompt_ids", width, pad_id, left=True),
        prompt_mask=cat("prompt_mask", width, False, left=True),
        group_index=torch.cat(groups),
        cot_ids=cat("cot_ids", t_len, pad_id),
        cot_inputs=None if first.cot_inputs is None else cat("cot_inputs", t_len, 0.0),
        cot_mix_ids=None if first.cot_mix_ids is None else cat("cot_mix_ids", t_len, pad_id),
        cot_mix_logits=None if first.cot_mix_logits is None else cat("cot_mix_logits", t_len, 0.0),
        cot_top1_ids=cat("cot_top1_ids", t_len, pad_id),
        cot_mask=cat("cot_mask", t_len, False),
        cot_entropy=cat("cot_entropy", t_len, 0.0),
        cot_logprobs=cat("cot_logprobs", t_len, 0.0),
        answer_ids=cat("answer_ids", a_len, pad_id),
        answer_mask=cat("answer_mask", a_len, False),
        answer_action_mask=cat("answer_action_mask", a_len, False),
        answer_logprobs=cat("answer_logprobs", a_len, 0.0),
        think_end=torch.cat([p.think_end for p in parts]),
        sigma=first.sigma,
        temperature=first.temperature,
        answer_texts=[t for p in parts for t in p.answer_texts] if all(p.answer_texts for p in parts) else [],
        **first.sampling,
    )
