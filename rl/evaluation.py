"""Evaluation: one inference mode, `n` samples per problem, scored by the math reward, summarised as pass@k
and as the CoT entropy profile (mean H(p_t) at each CoT index, the paper's Fig. 4).

`evaluate_mode` is shared by `scripts/evaluate.py` and the trainer's before / periodic / after evaluations
(`Evaluator`), so both report the same numbers for the same model, mode and seed. `Evaluator.block` is what
summary.json holds for each of them: every mode's pass@k, per-problem pass@1 and, after training, each mode's
paired lift over the same problems before training (`rewards.paired_lift`); the entropy profile is left
out of it and reported by `scripts/evaluate.py` (summary.json, entropy.png). `plot_run` draws a run's
training curves and its pass@k before and after.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rewards import Result, RewardPool, aggregate_pass_at_k, paired_lift, pass_at_k_per_problem, status_counts
from rl.data import Problem
from rl.logger import plot_training_curves, read_metrics
from rl.prompts import PromptConfig, encode_prompts
from rollouts.config import CotConfig
from rollouts.distributions import sigma_from_rms
from rollouts.engines import EagerEngine, RolloutEngine
from rollouts.record import THINK_END_REASONS, Rollout
from rollouts.stopping import StopSpec


@dataclass
class ModeSummary:
    """What one evaluation measured. `pass_at[k]` for every power of two k <= n (unbiased estimator).
    `cot_entropy_by_position[t]`: mean H(p_t) in nats over the samples whose CoT has a step t (pad
    excluded), for t up to the longest CoT; `samples_at_position[t]`: how many samples that mean is over
    (`entropy_by_position`)."""

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
    cot_entropy_by_position: list[float]  # [T_max] mean CoT entropy at each CoT index, nats
    samples_at_position: list[int]  # [T_max] samples with a CoT step at that index (counts all n·problems)

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


def entropy_by_position(entropies: list[list[float]]) -> tuple[list[float], list[int]]:
    """The CoT entropy profile: for each CoT index t = 0..T_max-1 (T_max: the longest CoT), the mean of H(p_t)
    over the samples that have a step t, and how many do. `entropies[i]` holds sample i's per-step entropy,
    its real steps only, so padding never enters a mean. Every sample counts once, repeats included (a
    deterministic mode's n identical copies count n times, which gives the same means as weighting the one
    rollout by n).

    >>> entropy_by_position([[1.0, 2.0, 3.0], [3.0], []])
    ([2.0, 2.0, 3.0], [2, 1, 1])
    """
    longest = max((len(e) for e in entropies), default=0)
    sums, counts = [0.0] * longest, [0] * longest
    for e in entropies:
        for t, h in enumerate(e):
            sums[t] += h
            counts[t] += 1
    return [s / c for s, c in zip(sums, counts, strict=True)], counts


def special_ids(tokenizer: Any, prompt: PromptConfig) -> tuple[StopSpec, int, int]:
    """(the think-end rule, eos id, pad id) for the engine."""
    stop = StopSpec.from_tokenizer(tokenizer, prompt.think_end, prompt.stop_on, prompt.answer_prefill)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; the answer phase could never end")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return stop, tokenizer.eos_token_id, pad


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
    keep: int = 0,
    engine: RolloutEngine | None = None,
) -> tuple[list[dict[str, Any]], ModeSummary, list[Rollout]]:
    """Roll out `n` samples of every problem in mode `infer` and score them. Returns one JSON-able row per
    problem (`uid`, `prompt_ids`, `answer`, `samples`), the summary, and the whole record (CoT vectors included)
    of the first sample of each of the first `keep` problems (for trace.html; their verdicts are in the rows).

    A deterministic mode (`infer.deterministic`: greedy CoT and greedy answer) is rolled out once per problem
    and the sample repeated n times: the n samples would be identical, so every number is unchanged
    (pass@k = pass@1) at 1/n of the cost. `engine` generates (rollouts/engines.py; default: the eager
    reference)."""
    if not problems:
        raise ValueError("evaluate_mode: no problems to evaluate")
    start = time.time()
    was_training = model.training
    model.eval()
    stop, eos_id, pad_id = special_ids(tokenizer, prompt)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    rows: list[dict[str, Any]] = []
    statuses: list[Result] = []
    generated = 0  # rollouts actually generated (a deterministic mode generates one per problem)
    kept: list[Rollout] = []
    bar = tqdm(total=len(problems), desc=f"eval {infer.name}", disable=not progress, leave=False)
    for lo in range(0, len(problems), batch_size):
        chunk = problems[lo : lo + batch_size]
        prompt_ids = encode_prompts(tokenizer, [p.question for p in chunk], prompt)
        drawn = 1 if infer.deterministic else n
        rollouts = (engine or EagerEngine()).generate(
            model,
            prompt_ids,
            infer,
            group_size=drawn,
            sigma=sigma,
            stop=stop,
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
        kept += samples[::drawn][: max(keep - len(kept), 0)]
        if drawn != n:
            results = [r for r in results for _ in range(n)]
            samples = [s for s in samples for _ in range(n)]
            texts = [t for t in texts for _ in range(n)]
        statuses.extend(results)
        rows += _problem_rows(chunk, prompt_ids, samples, results, texts, n)
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return rows, _summarize(rows, statuses, infer.name, n, sigma, time.time() - start, generated), kept


def _problem_rows(
    problems: list[Problem],
    prompt_ids: list[list[int]],
    samples: list[Rollout],
    results: list[Result],
    texts: list[str],
    n: int,
) -> list[dict[str, Any]]:
    """One JSON-able row per problem with its n samples (the i-th problem's are samples i·n .. i·n + n - 1)."""
    rows = []
    for j, problem in enumerate(problems):
        mine = range(j * n, (j + 1) * n)
        rows.append(
            {
                "uid": problem.uid,
                "prompt_ids": prompt_ids[j],
                "answer": list(problem.answers),
                "samples": [
                    {
                        "cot_top1_ids": samples[i].cot_top1_ids,
                        "answer_ids": samples[i].answer_ids,
                        "text": texts[i],
                        "reward": results[i].reward,
                        "status": results[i].status,
                        "think_end": samples[i].think_end,
                        # H(p_t) per CoT step, nats; null when the engine cannot know it (vllm)
                        "cot_entropy": None
                        if any(math.isnan(h) for h in samples[i].cot_entropy)
                        else samples[i].cot_entropy,
                    }
                    for i in mine
                ],
            }
        )
    return rows


def _summarize(
    rows: list[dict[str, Any]],
    statuses: list[Result],
    mode: str,
    n: int,
    sigma: float,
    seconds: float,
    generated: int,
) -> ModeSummary:
    every = [s for row in rows for s in row["samples"]]
    reasons = Counter(s["think_end"] for s in every)
    per_problem = [[s["reward"] for s in row["samples"]] for row in rows]
    entropy_mean, entropy_count = entropy_by_position(
        [s["cot_entropy"] for s in every if s["cot_entropy"] is not None]
    )
    return ModeSummary(
        mode=mode,
        n=n,
        problems=len(rows),
        pass_at=aggregate_pass_at_k(per_problem, powers_of_two(n)).values,
        mean_cot_len=sum(len(s["cot_top1_ids"]) for s in every) / len(every),
        mean_answer_len=sum(len(s["answer_ids"]) for s in every) / len(every),
        think_end={r: reasons[r] for r in THINK_END_REASONS},
        reward_status=status_counts(statuses),
        sigma=sigma,
        seconds=round(seconds, 2),
        rollouts_per_s=round(generated / seconds, 2),
        per_problem_pass1=[pass_at_k_per_problem(r, 1) for r in per_problem],
        cot_entropy_by_position=entropy_mean,
        samples_at_position=entropy_count,
    )


def write_outputs(
    out_dir: str | Path, rows: list[dict[str, Any]], summary: ModeSummary, config_yaml: str
) -> Path:
    """`samples.jsonl`, `summary.json` (pass@1, pass@k and the CoT entropy profile), `config.yaml`,
    `passk.png` and `entropy.png` under `out_dir`."""
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
    plot_entropy_by_position(
        {summary.mode: summary.cot_entropy_by_position},
        out / "entropy.png",
        counts={summary.mode: summary.samples_at_position},
        title=f"CoT entropy by position: {summary.mode}",
    )
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
    _save_figure(fig, ax, path, title)


def _save_figure(fig: Any, ax: Any, path: str | Path, title: str) -> None:
    """The house style's last touches (title, grid, legend), then write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_entropy_by_position(
    curves: dict[str, list[float]],
    path: str | Path,
    *,
    counts: dict[str, list[int]] | None = None,
    title: str = "CoT entropy by position",
) -> None:
    """One line per mode or model (name -> `cot_entropy_by_position`): mean CoT entropy in nats against CoT
    index, e.g. a base model against its trained runs (the paper's Fig. 4). `counts` (name ->
    `samples_at_position`) are drawn faintly in the same colour on a second y-axis, to show where a mean rests
    on few samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    twin = ax.twinx() if counts else None
    for name, values in curves.items():
        (line,) = ax.plot(
            range(len(values)), values, marker="o" if len(values) <= 40 else None, ms=3, label=name
        )
        if twin is not None and name in counts:
            n_t = counts[name]
            twin.fill_between(range(len(n_t)), n_t, step="mid", color=line.get_color(), alpha=0.12, lw=0)
    if twin is not None:
        twin.set_ylabel("samples at position", alpha=0.6)
        twin.set_ylim(bottom=0)
        ax.set_zorder(twin.get_zorder() + 1)  # the means above the faint counts
        ax.patch.set_visible(False)
    ax.set_xlabel("CoT position t")
    ax.set_ylabel("mean H(p_t), nats")
    ax.set_ylim(bottom=0)
    _save_figure(fig, ax, path, title)


@dataclass
class Evaluator:
    """A training run's held-out evaluations: `n` samples of each of `problems` in the inference modes `modes`
    (name -> the mode's CotConfig, built by the entry script from recipes/infer/ with the training CoT's
    limits, except the CoT cap `trainer.eval_max_think_tokens` when set), `primary` first. σ of every mode is
    taken from `rms`, the rms(E) of the run's STARTING embeddings, so the noise does not drift as training moves
    E. Run on the main process only: evaluation is cheap next to training and its numbers must not depend on the
    process count."""

    tokenizer: Any
    problems: list[Problem]
    modes: dict[str, CotConfig]
    primary: str
    n: int
    batch_size: int
    prompt: PromptConfig
    rms: dict[str, float]
    seed: int
    engine: RolloutEngine = field(default_factory=EagerEngine)

    def evaluate(
        self, policy: torch.nn.Module, names: list[str], pool: RewardPool, tag: str
    ) -> dict[str, ModeSummary]:
        """Evaluate `policy` in each named mode, printing one line per mode."""
        out = {}
        for name in names:
            infer = self.modes[name]
            _, summary, _ = evaluate_mode(
                policy,
                self.tokenizer,
                self.problems,
                infer,
                n=self.n,
                pool=pool,
                prompt=self.prompt,
                sigma=sigma_from_rms(infer, self.rms),
                seed=self.seed,
                batch_size=self.batch_size,
                progress=False,
                engine=self.engine,
            )
            out[name] = summary
            print(
                f"[softgrpo] {tag} {name}: "
                + ", ".join(f"pass@{k}={v:.3f}" for k, v in summary.pass_at.items()),
                flush=True,
            )
        return out

    def block(
        self, policy: torch.nn.Module, pool: RewardPool, tag: str, before: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Evaluate every mode (the primary first) into a summary block. With `before` (the block of an earlier
        evaluation of the same problems), each mode also gets its paired pass@1 lift over it."""
        if not self.modes:  # evaluation switched off (trainer.eval_modes=[])
            return {"primary": None, "pass@1": None, "pass@k": {}}
        ordered = [self.primary] + [m for m in self.modes if m != self.primary]
        block: dict[str, Any] = {"primary": self.primary}
        for name, s in self.evaluate(policy, ordered, pool, tag).items():
            block[name] = {
                "pass@1": s.pass_at[1],
                **{f"pass@{k}": v for k, v in s.pass_at.items()},
                "cot_len": s.mean_cot_len,
                "answer_len": s.mean_answer_len,
                "think_end": s.think_end,
                "per_problem_pass@1": s.per_problem_pass1,
            }
            earlier = before.get(name, {}).get("per_problem_pass@1") if before else None
            if earlier is not None:
                lift = paired_lift(earlier, s.per_problem_pass1)
                block[name]["lift_pass@1"] = asdict(lift)
                print(
                    f"[softgrpo] {name}: pass@1 {before[name]['pass@1']:.3f} -> {s.pass_at[1]:.3f}, lift "
                    f"{lift.mean:+.3f} ± {lift.se:.3f} (paired standard error over {lift.problems} problems)",
                    flush=True,
                )
        block["pass@1"] = block[self.primary]["pass@1"]
        block["pass@k"] = {k: v for k, v in block[self.primary].items() if k.startswith("pass@")}
        return block


def plot_run(out: Path, summary: dict[str, Any]) -> None:
    """`curves.png` (training curves from metrics.jsonl) and `passk.png` (the primary mode's pass@k before and
    after training) in the run directory `out`."""
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        plot_training_curves(read_metrics(metrics), out / "curves.png")
    if summary["eval_before"]["primary"] is None:
        return
    curves = {}
    for tag in ("eval_before", "eval_after"):
        block = summary[tag]
        primary = block["primary"]
        curves[f"{primary} {tag[5:]}"] = {
            int(k[5:]): v for k, v in block[primary].items() if k.startswith("pass@")
        }
    plot_pass_at_k(curves, out / "passk.png", title="held-out pass@k, before vs after")
