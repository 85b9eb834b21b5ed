"""Teacher-forced replay of one rollout: a single uncached forward over E[prompt] ++ CoT inputs ++ E[answer]
(the sequence the learner rebuilds) giving the logits that produced every CoT input and answer token.

It is the plain reference the engine is checked against (KV cache, rollback of a multi-token delimiter,
behaviour log-probs) and the source of the per-step top-k for the soft-trace view, which keeps the engine free of
[N, T, k] bookkeeping. Shape legend: see `rollouts.record`; here T and A are one sample's lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from rollouts.config import CotConfig
from rollouts.distributions import cot_log_probs, mixture_mean
from rollouts.engine import input_embedding_matrix
from rollouts.record import Rollout


@dataclass
class Replay:
    cot_log_probs: torch.Tensor  # [T, V] float32, log p_t recomputed with `cot_log_probs`
    cot_means: torch.Tensor  # [T, d] float32, μ_t = p_t E
    answer_logits: torch.Tensor  # [A, V] float32, the logits each answer token was produced from


def sequence_embeds(model: PreTrainedModel, sample: Rollout) -> torch.Tensor:
    """[P + T + A, d] in the model dtype: E[prompt] ++ CoT inputs (h_t, or E[c_t] for hard) ++ E[answer]."""
    emb = input_embedding_matrix(model)  # [V, d]
    device = emb.device

    def tok(ids: list[int]) -> torch.Tensor:
        return emb[torch.tensor(ids, dtype=torch.long, device=device)]

    cot = tok(sample.cot_ids) if sample.cot_inputs is None else sample.cot_inputs.to(device, emb.dtype)
    return torch.cat([tok(sample.prompt_ids), cot.reshape(-1, emb.shape[1]), tok(sample.answer_ids)], dim=0)


@torch.no_grad()
def replay(model: PreTrainedModel, sample: Rollout, cfg: CotConfig) -> Replay:
    """Recompute p_t, μ_t and the answer logits of one sample from the stored record (no cache, no padding)."""
    embeds = sequence_embeds(model, sample)  # [L, d]
    logits = model(inputs_embeds=embeds[None], use_cache=False).logits[0].float()  # [L, V]
    p, t, a = len(sample.prompt_ids), len(sample.cot_ids), len(sample.answer_ids)
    cot_logits = logits[p - 1 : p - 1 + t]  # [T, V] position j predicts input j + 1
    log_p = cot_log_probs(cot_logits, cfg)  # [T, V]
    emb32 = input_embedding_matrix(model).float()  # [V, d]
    return Replay(
        cot_log_probs=log_p,
        cot_means=mixture_mean(log_p.exp(), emb32),
        answer_logits=logits[p - 1 + t : p - 1 + t + a],
    )
