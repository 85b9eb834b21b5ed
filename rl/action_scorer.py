"""The learner's output-head scoring (rl/logprobs.py calls it): from the body's hidden states at the scored
positions, the log-prob of each action, μ for soft / fuzzy steps, and the entropies, in chunks of positions.

Memory: the output head, log-softmax and μ run over chunks of `chunk_size` scored positions (in one
`ActionScorer` call), each chunk under activation checkpointing when gradients are on, so at most one chunk of
[chunk, V] float32 logits is alive at a time, in the forward and in the backward. `chunk_size=0` is the dense
reference path (all positions at once, no checkpointing); tests/test_logprobs.py checks that both agree in
values and gradients.

Shape legend (see `rollouts.record`): M scored positions of one kind in the batch, V vocabulary, d embedding
width, H model hidden size (= d), K mixed tokens per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from rollouts.config import CotConfig
from rollouts.distributions import cot_log_probs, entropy, filter_logits, gaussian_log_prob, mixture_mean
from rollouts.engine import input_embedding_matrix
from rollouts.modes import mixture_log_prob


@dataclass
class ActionScores:
    """Per scored position, in `ActionScorer`'s input order (float32): log π of each action, μ of each soft /
    fuzzy step (None for hard), and the entropies (detached)."""

    cot: torch.Tensor  # [M_c]
    mu: torch.Tensor | None  # [M_c, d]
    cot_entropy: torch.Tensor  # [M_c]
    answer: torch.Tensor  # [M_a]
    answer_entropy: torch.Tensor  # [M_a]


SCORER_ATTR = "softgrpo_action_scorer"  # where ZeRO-3 sharding registers the scorer on the policy


class ActionScorer(torch.nn.Module):
    """Output head -> filtered log-softmax -> the log-prob of each action (for soft / fuzzy CoT also
    μ = softmax(filter(z) / τ) E and the Gaussian log-density), over the scored positions in chunks of
    `chunk_size`, as ONE module call.

    Why one module call: under DeepSpeed ZeRO-3 (rl/sharding.py) the scorer is registered on the policy with the
    output head's weight and E as its external parameters, so DeepSpeed gathers them once for the forward and
    once for the backward however many chunks a process has. (Calling the head module per chunk would gather per
    chunk, and processes have different chunk counts: unmatched collectives.) The head is applied as
    `F.linear(x, W, b)`, which is exactly `nn.Linear.forward`. Anywhere else a fresh, unattached scorer is simply
    a function of the model (`action_scorer`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or model.get_decoder() is model:
            raise TypeError(
                f"{type(model).__name__}: expected a causal LM with a decoder body and a linear output head "
                f"(got head {type(head).__name__})"
            )
        self._model = (model,)  # a tuple, not an attribute module: the model is not this module's child

    def forward(
        self,
        cot_hidden: torch.Tensor,  # [M_c, H]
        # (stored vectors h_t [M_c, d],) for soft / fuzzy, (token ids [M_c],) for hard, (mixed tokens [M_c, K],
        # mix logits [M_c, K]) for multiplex / gumbel
        cot_targets: tuple[torch.Tensor, ...],
        answer_hidden: torch.Tensor,  # [M_a, H]
        answer_tokens: torch.Tensor,  # [M_a]
        *,
        cot: CotConfig,
        sigma: float,
        answer_temperature: float,
        answer_top_p: float,
        chunk_size: int,
        mean_grad_through_embedding: bool,
    ) -> tuple[torch.Tensor | None, ...]:
        """The fields of `ActionScores`, as a tuple: DeepSpeed's backward hooks find the tensors in a tuple."""
        model = self._model[0]
        head = model.get_output_embeddings()
        softcap: float | None = getattr(model.config, "final_logit_softcapping", None)

        def logits_of(x: torch.Tensor) -> torch.Tensor:  # [M, H] -> [M, V] float32
            z = torch.nn.functional.linear(x, head.weight, head.bias).float()
            if softcap is not None:
                z = torch.tanh(z / softcap) * softcap
            return z

        mu: torch.Tensor | None = None
        if cot.gaussian:
            # [V, d]: μ's gradient reaches E here unless the config detaches it
            emb_weight = input_embedding_matrix(model, detach=not mean_grad_through_embedding)

            def soft_chunk(x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
                logp = cot_log_probs(logits_of(x), cot)  # [M, V] float32
                mu = mixture_mean(logp.exp(), emb_weight)  # [M, d] float32
                return gaussian_log_prob(h, mu, sigma), mu, entropy(logp.detach())

            cot_lp, mu, cot_ent = _chunked(soft_chunk, (cot_hidden, *cot_targets), chunk_size)
        elif cot.mixture:

            def mixture_chunk(
                x: torch.Tensor, ids: torch.Tensor, mix_logits: torch.Tensor
            ) -> tuple[torch.Tensor, ...]:
                z = logits_of(x)  # [M, V]
                logp = cot_log_probs(z, cot)  # [M, V]
                return mixture_log_prob(z, logp, ids, mix_logits, cot, sigma), entropy(logp.detach())

            cot_lp, cot_ent = _chunked(mixture_chunk, (cot_hidden, *cot_targets), chunk_size)
        else:

            def hard_chunk(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
                logp = cot_log_probs(logits_of(x), cot)  # [M, V]
                return logp.gather(1, c[:, None]).squeeze(1), entropy(logp.detach())

            cot_lp, cot_ent = _chunked(hard_chunk, (cot_hidden, *cot_targets), chunk_size)

        # answer tokens: the sampled ones only (the forced delimiter is context)
        def answer_chunk(x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, ...]:
            z = filter_logits(logits_of(x), top_p=answer_top_p) / answer_temperature
            logp = torch.log_softmax(z, dim=-1)  # [M, V]
            return logp.gather(1, a[:, None]).squeeze(1), entropy(logp.detach())

        ans_lp, ans_ent = _chunked(answer_chunk, (answer_hidden, answer_tokens), chunk_size)
        return cot_lp, mu, cot_ent.detach(), ans_lp, ans_ent.detach()


def action_scorer(model: torch.nn.Module) -> ActionScorer:
    """The scorer registered on `model` (ZeRO-3 sharding), else a fresh one."""
    attached = getattr(model, SCORER_ATTR, None)
    return attached if attached is not None else ActionScorer(model)


def _chunked(
    fn: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...], chunk_size: int
) -> tuple[torch.Tensor, ...]:
    """Apply `fn` over chunks of the leading dim of `inputs` and concatenate its outputs.

    With gradients on, each chunk runs under non-reentrant checkpointing so its [chunk, V] intermediates are
    freed after the forward and recomputed in the backward. `chunk_size=0` runs `fn` once on everything.
    """
    total = inputs[0].shape[0]
    if chunk_size == 0 or total <= chunk_size:
        return fn(*inputs)
    parts = []
    for start in range(0, total, chunk_size):
        chunk = tuple(x[start : start + chunk_size] for x in inputs)
        if torch.is_grad_enabled():
            parts.append(checkpoint(fn, *chunk, use_reentrant=False))
        else:
            parts.append(fn(*chunk))
    return tuple(torch.cat(out, dim=0) for out in zip(*parts, strict=True))
