"""Evaluation: one inference mode, `n` samples per problem, scored by the math reward, summarised as pass@k.

Shared by `scripts/evaluate.py` and the trainer's before / periodic / after evaluations, so both report the
same numbers for the same model, mode and seed.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rewards import RewardPool, aggregate_pass_at_k, pass_at_k_per_problem, status_counts
from rl.data import Problem
from rl.prompts import PromptConfig, encode_prompts
from rollouts.config import CotConfig
from rollouts.engine import generate
from rollouts.record import THINK_END_REASONS


@dataclass
class ModeSummary:
    """What one evaluation measured. `pass_at[k]` for every power of two k <= n (unbiased estimator)."""

    mode: str
    n: int
    problems: int
    pass_at: dict[int, float]
    mean_cot_len: float
    mean_answer_len: float
    think_end: dict[str, int]
    reward_status: dict[str, int]
    sigma: float
    seconds: float
    rollouts_per_s: float  # generated rollouts per second
    per_problem_pass1: list[float | None]  # c/n per problem, in problem order (None: no sample judged)

    def flat(self, prefix: str) -> dict[str, float]:
        """Scalar metrics for logging: `{prefix}/pass@1`, ..."""
        out = {f"{prefix}/pass@{k}": v for k, v in self.pass_at.items()}
        out[f"{prefix}/cot_len"] = self.mean_cot_len
        out[f"{prefix}/answer_len"] = self.mean_answer_len
        return out


def powers_of_two(n: int) -> list[int]:
    """Every power of two k <= n.

    >>> powers_of_two(8), powers_of_two(6), powers_of_two(1)
    ([1, 2, 4, 8], [1, 2, 4], [1])
    """
    if n < 1:
        raise ValueError(f"n={n}: need at least one sample per problem")
    return [2**i for i in range(n.bit_length()) if 2**i <= n]


def special_ids(tokenizer: Any, prompt: PromptConfig) -> tuple[tuple[int, ...], int, int]:
    """(think-end delimiter ids, eos id, pad id) for the engine."""
    think_end = tuple(tokenizer(prompt.think_end, add_special_tokens=False).input_ids)
    if not think_end:
        raise ValueError(f"think_end={prompt.think_end!r} encodes to no tokens")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the answer phase could never end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return think_end, tokenizer.eos_token_id, pad


@torch.no_grad()
def evaluate_mode(
    model: Any,
    tokenizer: Any,
    problems: list[Problem],
    infer: CotConfig,
    *,
    n: int,
    pool: RewardPool,
    prompt: PromptConfig,
    sigma: float,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], ModeSummary]:
    """Roll out `n` samples of every problem in mode `infer` and score them. Returns one JSON-able row per
    problem (`uid`, `prompt_ids`, `answer`, `samples`) and the summary.

    A deterministic mode (`infer.deterministic`: greedy CoT and greedy answer) is rolled out once per problem
    and the sample repeated n times: the n samples would be identical, so every number is unchanged
    (pass@k = pass@1) at 1/n of the cost."""
    if not problems:
        raise ValueError("evaluate_mode: no problems to evaluate")
    start = time.time()
    was_training = model.training
    model.eval()
    think_end_ids, eos_id, pad_id = special_ids(tokenizer, prompt)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    rows: list[dict[str, Any]] = []
    statuses: list = []
    reasons: Counter[str] = Counter()
    cot_lens: list[int] = []
    answer_lens: list[int] = []
    generated = 0  # rollouts actually generated (a deterministic mode generates one per problem)
    bar = tqdm(total=len(problems), desc=f"eval {infer.name}", disable=not progress, leave=False)
    for lo in range(0, len(problems), batch_size):
        chunk = problems[lo : lo + batch_size]
        prompt_ids = encode_prompts(tokenizer, [p.question for p in chunk], prompt)
        drawn = 1 if infer.deterministic else n
        rollouts = generate(
            model,
            prompt_ids,
            infer,
            group_size=drawn,
            sigma=sigma,
            think_end_ids=think_end_ids,
            eos_id=eos_id,
            pad_id=pad_id,
            generator=generator,
            tokenizer=tokenizer,
        )
        generated += rollouts.num_rollouts
        golds = [p.answers for p in chunk for _ in range(drawn)]
        texts = rollouts.completion_texts(tokenizer)  # the same strings the trainer's reward judges
        results = pool.score(texts, golds)
        samples = rollouts.samples(tokenizer)
        if drawn != n:
            results = [r for r in results for _ in range(n)]
            samples = [s for s in samples for _ in range(n)]
            texts = [t for t in texts for _ in range(n)]
        statuses.extend(results)
        for j, problem in enumerate(chunk):
            mine = samples[j * n : (j + 1) * n]
            rows.append(
                {
                    "uid": problem.uid,
                    "prompt_ids": prompt_ids[j],
                    "answer": list(problem.answers),
                    "samples": [
                        {
                            "cot_top1_ids": s.cot_top1_ids,
                            "answer_ids": s.answer_ids,
                            "text": text,
                            "reward": r.reward,
                            "status": r.status,
                            "think_end": s.think_end,
                        }
                        for s, r, text in zip(
                            mine, results[j * n : (j + 1) * n], texts[j * n : (j + 1) * n], strict=True
                        )
                    ],
                }
            )
            for s in mine:
                reasons[s.think_end] += 1
                cot_lens.append(len(s.cot_ids))
                answer_lens.append(len(s.answer_ids))
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    per_problem = [[s["reward"] for s in row["samples"]] for row in rows]
    table = aggregate_pass_at_k(per_problem, powers_of_two(n))
    seconds = time.time() - start
    summary = ModeSummary(
        mode=infer.name,
        n=n,
        problems=len(problems),
        pass_at=table.values,
        mean_cot_len=sum(cot_lens) / len(cot_lens),
        mean_answer_len=sum(answer_lens) / len(answer_lens),
        think_end={r: reasons[r] for r in THINK_END_REASONS},
        reward_status=status_counts(statuses),
        sigma=sigma,
        seconds=round(seconds, 2),
        rollouts_per_s=round(generated / seconds, 2),
        per_problem_pass1=[pass_at_k_per_problem(r, 1) for r in per_problem],
    )
    return rows, summary


def write_outputs(
    out_dir: str | Path, rows: list[dict[str, Any]], summary: ModeSummary, config_yaml: str
) -> Path:
    """`samples.jsonl`, `summary.json` (pass@1 and pass@k), `config.yaml` and `passk.png` under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    body = asdict(summary)
    body["pass@1"] = summary.pass_at[1]
    body.update({f"pass@{k}": v for k, v in summary.pass_at.items()})
    (out / "summary.json").write_text(json.dumps(body, indent=2))
    (out / "config.yaml").write_text(config_yaml)
    plot_pass_at_k({summary.mode: summary.pass_at}, out / "passk.png")
    return out


def plot_pass_at_k(curves: dict[str, dict[int, float]], path: str | Path, title: str = "pass@k") -> None:
    """One line per mode, k on a log2 axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in curves.items():
        ks = sorted(values)
        ax.plot(ks, [values[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
