"""The GRPO training loop: rollouts → rewards → advantages → PPO update, with held-out evaluation,
checkpoints, exact resume and multi-process data parallelism.

One step (global batch = `prompts_per_step` prompts × G samples):
1. Draw the step's prompts from a seeded permutation of the train split (the data position is one integer).
   Process r of W takes a contiguous share, so the G samples of a prompt stay on one process.
2. Roll out in chunks of `rollout_chunk` prompts; each chunk's generator is seeded from (seed, step, index of
   its first prompt in the global batch), so the rollouts do not depend on the number of processes, and a
   resumed run draws exactly what the uninterrupted one would have.
3. Score the decoded completions in the reward pool; RLOO / GRPO / Dr. GRPO advantages per group.
4. `num_iterations` PPO passes over the rollouts in micro-batches. The loss of every micro-batch is divided by
   the GLOBAL normaliser (all micro-batches of all processes), and gradients are summed across processes, so
   the update equals a 1-process run with the same global batch.
   Sharding (`trainer.sharding`, rl/sharding.py): `none` replicates the model; `fsdp2` (chosen automatically
   under recipes/accelerate/fsdp2.yaml) shards every decoder layer with `fully_shard`, gathers the layers for
   generation, and gathers whole state dicts for checkpoints and the final model; `zero2` / `zero3` (chosen
   under recipes/accelerate/zero2.yaml / zero3.yaml) wrap the trainer's AdamW in a DeepSpeed ZeRO engine; under
   zero3 generation and evaluation run on a whole copy of the policy refreshed after every update.
5. Guarded optimizer step (a non-finite loss or gradient skips the step and is counted), metrics, checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from rewards import STATUSES, RewardPool, combine_rewards, format_reward, paired_lift
from rl.advantages import AdvantageConfig, compute_advantages
from rl.checkpoint import (
    DEEPSPEED_TAG,
    TrainState,
    latest_verified_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from rl.data import Problem, load_problems, require_problems
from rl.evaluation import ModeSummary, evaluate_mode, plot_pass_at_k, special_ids
from rl.logger import MetricsLogger, NullLogger, drop_rows_after, plot_training_curves, read_metrics
from rl.logprobs import LogProbConfig, SequenceLogProbs, log_prob_gap, sequence_log_probs
from rl.loss import LossConfig, loss_normalizer, policy_loss
from rl.model import ModelProfile, load_policy
from rl.optim import OptimConfig, StepResult, build_optimizer, build_scheduler, clip_and_step, fit_warmup
from rl.prompts import encode_prompts
from rl.rundir import CONFIG_FILE, RESUME_MODES, RunPlan, plan_run
from rl.runtime import resolve_device, seed_everything
from rl.sharding import (
    SHARDINGS,
    GenerationCopy,
    deepspeed_config,
    full_state_dicts,
    gathered,
    init_deepspeed,
    is_sharded,
    local_param_fraction,
    prepare_zero3,
    shard_decoder_layers,
)
from rollouts.distributions import embedding_rms_by_kind, sigma_from_rms
from rollouts.engine import generate, input_embedding_matrix
from rollouts.record import THINK_END_REASONS, Rollouts, concat_rollouts

INFER_MODES = ("hard_greedy", "hard_sample", "soft_greedy", "soft_sample", "fuzzy_greedy", "fuzzy_sample")


@dataclass
class RLConfig:
    """The RL algorithm: G samples per prompt, PPO iterations per batch, and the objective's pieces."""

    group_size: int = 8
    num_iterations: int = 1
    micro_batch: int = 0  # rollouts per forward/backward (0 = all of a process's rollouts at once)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logprobs: LogProbConfig = field(default_factory=LogProbConfig)

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"rl.group_size={self.group_size}: group advantages need at least 2 samples")
        if self.num_iterations < 1 or self.micro_batch < 0:
            raise ValueError(f"rl.num_iterations={self.num_iterations}, rl.micro_batch={self.micro_batch}")


@dataclass
class TrainerConfig:
    """Run length, batch, evaluation and checkpoint cadence. `eval_modes` names recipes in recipes/infer/;
    the final evaluation runs all of them, `eval_primary` is the one evaluated periodically."""

    max_steps: int = 100
    prompts_per_step: int = 16  # global, over all processes
    rollout_chunk: int = 16  # prompts per engine call (keys the rollout randomness; see module docstring)
    seed: int = 0
    device: str = "auto"
    eval_every: int = 0  # 0 = evaluate only before and after training
    eval_problems: int = 200
    eval_n: int = 8
    eval_batch_size: int = 64
    eval_primary: str = "soft_sample"
    eval_modes: list[str] = field(default_factory=lambda: list(INFER_MODES))
    save_every: int = 50
    keep_last: int = 2  # 0 = keep every checkpoint
    diag_every: int = 10  # steps between CoT-term gradient norms (an extra backward pass); 0 = never
    # auto = continue the run in output_dir when its config agrees (rl/rundir.py); never = start fresh, refuse a
    # used output_dir; overwrite = delete the run in output_dir and start fresh
    resume: str = "auto"
    # none | fsdp2 | zero2 | zero3 (rl/sharding.py) | auto = what the accelerate launch config asks for
    sharding: str = "auto"
    # zero3: parameters with fewer elements stay whole on every process (DeepSpeed's default 1e5)
    zero3_persistence_threshold: int = 100_000

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.prompts_per_step < 1 or self.rollout_chunk < 1:
            raise ValueError(
                f"trainer.max_steps={self.max_steps}, prompts_per_step={self.prompts_per_step}, "
                f"rollout_chunk={self.rollout_chunk}: must be >= 1"
            )
        if self.resume not in RESUME_MODES:
            raise ValueError(f"trainer.resume={self.resume!r}: expected one of {RESUME_MODES}")
        if self.save_every < 1:
            raise ValueError(
                f"trainer.save_every={self.save_every}: must be >= 1 (steps between checkpoints)"
            )
        for key in ("eval_every", "keep_last", "diag_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key}={getattr(self, key)}: must be >= 0 (0 = off)")
        for key in ("eval_problems", "eval_n", "eval_batch_size"):
            if self.eval_modes and getattr(self, key) < 1:
                raise ValueError(
                    f"trainer.{key}={getattr(self, key)}: must be >= 1 (or trainer.eval_modes=[])"
                )
        if self.sharding not in ("auto", *SHARDINGS):
            raise ValueError(f"trainer.sharding={self.sharding!r}: expected 'auto' or one of {SHARDINGS}")
        if self.zero3_persistence_threshold < 0:
            raise ValueError(
                f"trainer.zero3_persistence_threshold={self.zero3_persistence_threshold}: must be >= 0"
            )
        unknown = sorted(set(self.eval_modes) - set(INFER_MODES))
        if unknown or (self.eval_modes and self.eval_primary not in INFER_MODES):
            raise ValueError(
                f"trainer.eval_modes={self.eval_modes}, eval_primary={self.eval_primary!r}: modes must be in {INFER_MODES}"
            )


@dataclass
class StepStats:
    """Per-step metrics, logged to metrics.jsonl / W&B under these names (see `as_metrics`)."""

    reward_mean: float
    reward_std: float
    reward_status: dict[str, int]
    adv_mean: float
    adv_std: float
    adv_abs_mean: float
    cot_len: float
    answer_len: float
    think_end: dict[str, float]  # fraction of rollouts per reason
    cot_entropy: float
    noise_ratio: float  # ‖h - μ‖ / ‖μ‖ averaged over CoT steps (soft / fuzzy); 0 for hard
    gap_cot: float  # mean |rollout - learner| log-prob per CoT step (nats)
    gap_answer: float
    clip_fraction: float
    kl_cot: float
    kl_answer: float
    loss: float
    cot_term: float
    answer_term: float
    grad_norm: float
    cot_grad_norm: float  # ‖∇ unweighted CoT term‖ (first micro-batch, first iteration), every `diag_every` steps, else NaN
    lr: float
    skipped: bool
    tokens_per_s: float
    step_time: float

    def as_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, value in asdict(self).items():
            if isinstance(value, dict):
                prefix = "reward_status" if name == "reward_status" else "think_end"
                out.update({f"{prefix}/{k}": float(v) for k, v in value.items()})
            else:
                out[name] = float(value)
        return out


def chunk_seed(seed: int, step: int, first_prompt: int) -> int:
    """Seed of the rollout chunk starting at global prompt index `first_prompt` of step `step`.

    >>> chunk_seed(0, 3, 16) == chunk_seed(0, 3, 16) != chunk_seed(0, 3, 32)
    True
    """
    return zlib.crc32(f"{seed}/{step}/{first_prompt}".encode())


def draw_prompts(problems: list[Problem], seed: int, start: int, count: int) -> list[Problem]:
    """Problems `start .. start+count-1` of the endless stream of seeded per-epoch permutations.

    >>> ps = [Problem(str(i), "q", ("1",), "t") for i in range(5)]
    >>> [p.uid for p in draw_prompts(ps, 0, 3, 4)] == [p.uid for p in draw_prompts(ps, 0, 0, 7)][3:]
    True
    """
    out = []
    for position in range(start, start + count):
        epoch, index = divmod(position, len(problems))
        order = list(range(len(problems)))
        random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
        out.append(problems[order[index]])
    return out


def resolve_sharding(distributed_type: str, requested: str, world: int, zero_stage: str | None = None) -> str:
    """The sharding a run uses: `requested`, where auto = fsdp2 under accelerate's FSDP launch, zero2 / zero3
    under its DeepSpeed launch (`zero_stage` = ACCELERATE_DEEPSPEED_ZERO_STAGE), else none; always none for one
    process. Other ZeRO stages, and a sharding that contradicts the DeepSpeed launch, are refused rather than
    silently run as something else."""
    if distributed_type == "DEEPSPEED":
        stage = f"zero{zero_stage}"
        if stage not in ("zero2", "zero3") or requested not in ("auto", stage):
            raise NotImplementedError(
                f"accelerate DeepSpeed launch with zero_stage={zero_stage} and trainer.sharding={requested}: the "
                "trainer runs ZeRO stages 2 and 3 (recipes/accelerate/zero2.yaml, zero3.yaml) with "
                "trainer.sharding=auto or the launch's own stage"
            )
        requested = stage
    if requested == "auto":
        requested = "fsdp2" if distributed_type == "FSDP" else "none"
    return requested if world > 1 else "none"


class Trainer:
    """Holds the run's model, optimizer and state; `run()` trains and writes summary.json.

    The run directory is checked first, before anything is loaded or written (rl/rundir.py)."""

    def __init__(self, cfg: Any) -> None:
        from accelerate import PartialState
        from omegaconf import OmegaConf

        self.cfg = cfg
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        self.plan: RunPlan = plan_run(cfg.output_dir, self.config_yaml, cfg.trainer.resume)
        self.dist = PartialState(cpu=cfg.trainer.device == "cpu")
        self.rank, self.world = self.dist.process_index, self.dist.num_processes
        kind = str(self.dist.distributed_type).rsplit(".", 1)[-1]
        zero_stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        self.sharding = resolve_sharding(kind, cfg.trainer.sharding, self.world, zero_stage)
        if self.sharding.startswith("zero") and cfg.rl.micro_batch:
            raise ValueError(
                f"rl.micro_batch={cfg.rl.micro_batch}: {self.sharding} sharding runs one backward per optimizer "
                "step; use rl.micro_batch=0"
            )
        self.main = self.dist.is_main_process
        if cfg.trainer.prompts_per_step % self.world:
            raise ValueError(
                f"trainer.prompts_per_step={cfg.trainer.prompts_per_step} must divide evenly over {self.world} processes"
            )
        self.device = self.dist.device if self.world > 1 else resolve_device(cfg.trainer.device)
        self.out = Path(cfg.output_dir)
        if self.plan.overwrite:
            if self.main:
                print(f"[softgrpo] trainer.resume=overwrite: deleting the run in {self.out}", flush=True)
                self.plan.clear()
            if self.world > 1:
                dist.barrier()
        # the data first: a bad file or an empty split fails before a model is loaded
        data = cfg.data
        self.train_problems = require_problems(load_problems(data, data.train_split), data, data.train_split)
        self.eval_problems = load_problems(data, data.eval_split)[: cfg.trainer.eval_problems]
        if cfg.trainer.eval_modes:
            require_problems(self.eval_problems, data, data.eval_split)
        seed_everything(cfg.trainer.seed)
        self.model, self.tokenizer = load_policy(cfg.model, self.device)
        self.model.train()
        emb = input_embedding_matrix(self.model)  # whole on every process until sharding starts
        rms = embedding_rms_by_kind(emb)
        self.layers = shard_decoder_layers(self.model) if self.sharding == "fsdp2" else []
        self.copy = GenerationCopy(self.model) if self.sharding == "zero3" else None
        if self.copy is not None:
            prepare_zero3(self.model)
        self.ref = None
        if cfg.rl.loss.kl_coef > 0:
            self.ref, _ = load_policy(cfg.model, self.device)
            self.ref.eval().requires_grad_(False)
        self.think_end_ids, self.eos_id, self.pad_id = special_ids(self.tokenizer, cfg.model.prompt)
        # per-parameter AdamW loops: foreach kernels refuse a group that mixes sharded and replicated tensors
        self.opt = build_optimizer(self.model, cfg.rl.optim, foreach=False if self.layers else None)
        optim_cfg, note = fit_warmup(cfg.rl.optim, cfg.trainer.max_steps)
        if note and self.main:
            print(f"[softgrpo] {note}", flush=True)
        self.sched = build_scheduler(self.opt, optim_cfg, total_steps=cfg.trainer.max_steps)
        self.engine = (
            init_deepspeed(
                self.model,
                self.opt,
                deepspeed_config(
                    int(self.sharding[-1]),
                    cfg.rl.optim.grad_clip,
                    next(self.model.parameters()).dtype,
                    cfg.trainer.zero3_persistence_threshold,
                ),
            )
            if self.sharding.startswith("zero")
            else None
        )
        self.local_param_fraction = local_param_fraction(self.model)
        self.state = TrainState(rms=rms, sigma=sigma_from_rms(cfg.cot, rms))
        self.state.reward_status = dict.fromkeys(STATUSES, 0)
        self.resumed_from = self._maybe_resume()
        self._stop = False

    # ---------------------------------------------------------------- setup helpers
    def _maybe_resume(self) -> Path | None:
        if not self.plan.resume:
            return None
        found = latest_verified_checkpoint(
            self.out / "checkpoints", warn=lambda msg: print(msg, flush=True) if self.main else None
        )
        if found is None:
            return None
        self.state = load_checkpoint(
            found, self.model, self.opt, self.sched, sharding=self.sharding, engine=self.engine
        )
        if self.copy is not None:
            self.copy.mark_stale()
        if self.main:
            print(f"[softgrpo] resumed from {found} (step {self.state.step})", flush=True)
        return found

    @contextmanager
    def generation_policy(self) -> Iterator[torch.nn.Module]:
        """The whole policy to generate with, for the duration (collective: every process enters it): the model
        itself, with its decoder layers gathered under fsdp2, or under zero3 the refreshed `GenerationCopy`."""
        if self.copy is not None:
            yield self.copy.refreshed(self.model)
            return
        with gathered(self.layers) if self.layers else nullcontext():
            yield self.model

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop = True  # finish the current step, checkpoint, exit (see run())

    # ---------------------------------------------------------------- one step
    def rollout(self, step: int) -> tuple[Rollouts, list[Problem]]:
        """This process's rollouts for `step` (see the module docstring for how randomness is keyed)."""
        tcfg = self.cfg.trainer
        share = tcfg.prompts_per_step // self.world
        start = self.state.consumed + self.rank * share
        problems = draw_prompts(self.train_problems, tcfg.seed, start, share)
        parts = []
        for lo in range(0, share, tcfg.rollout_chunk):
            chunk = problems[lo : lo + tcfg.rollout_chunk]
            gen = torch.Generator(device=self.device).manual_seed(
                chunk_seed(tcfg.seed, step, self.rank * share + lo)
            )
            self.model.eval()
            with torch.no_grad(), self.generation_policy() as policy:
                parts.append(
                    generate(
                        policy,
                        encode_prompts(self.tokenizer, [p.question for p in chunk], self.cfg.model.prompt),
                        self.cfg.cot,
                        group_size=self.cfg.rl.group_size,
                        sigma=self.state.sigma,
                        think_end_ids=self.think_end_ids,
                        eos_id=self.eos_id,
                        pad_id=self.pad_id,
                        generator=gen,
                    )
                )
            self.model.train()
        return concat_rollouts(parts), problems

    def rewards(
        self, rollouts: Rollouts, problems: list[Problem], pool: RewardPool
    ) -> tuple[list[float | None], list]:
        texts = rollouts.completion_texts(self.tokenizer)
        golds = [p.answers for p in problems for _ in range(self.cfg.rl.group_size)]
        results = pool.score(texts, golds)
        correctness = [r.reward for r in results]
        if self.cfg.reward.format_weight == 0:
            return correctness, results
        fmt = format_reward(texts, golds, self.cfg.reward)
        return combine_rewards([correctness, fmt], [1.0, self.cfg.reward.format_weight]), results

    def _all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def _all_reduce_grads(self) -> None:
        """Sum gradients over processes (each process already divided by the global normaliser)."""
        if self.world == 1:
            return
        # fsdp2-sharded layers were already reduce-scattered (as sums) by their backward hooks
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and not is_sharded(p.grad)]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def score(self, model: torch.nn.Module, rollouts: Rollouts) -> SequenceLogProbs:
        """The learner's log-probs of `rollouts` under `model` (the policy or the reference), with the run's CoT
        config and the answer temperature / top-p the rollouts were sampled with."""
        return sequence_log_probs(
            model,
            rollouts,
            self.cfg.cot,
            self.cfg.rl.logprobs,
            answer_temperature=self.cfg.cot.answer_temperature,
            answer_top_p=self.cfg.cot.answer_top_p,
        )

    def update(self, rollouts: Rollouts, rewards: list[float | None]) -> dict[str, float]:
        """PPO iterations over this process's rollouts; returns loss statistics."""
        rl = self.cfg.rl
        adv = compute_advantages(rewards, rollouts.group_index, rl.advantages)
        n = rollouts.num_rollouts
        size = rl.micro_batch or n
        slices = [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]
        parts = [rollouts.select(s) for s in slices]
        part_adv = [adv.select(s) for s in slices]
        with torch.no_grad():
            old = (
                [self.score(self.model, p).detach() for p in parts]
                if rl.num_iterations > 1
                else [None] * len(parts)
            )
            ref = (
                [self.score(self.ref, p).detach() for p in parts]
                if self.ref is not None
                else [None] * len(parts)
            )
        stats: dict[str, float] = {
            "cot_grad_norm": float("nan")
        }  # NaN (null in metrics.jsonl) when not measured
        for iteration in range(rl.num_iterations):
            new_all = []
            total = 0.0
            outs = []
            # the normaliser depends only on masks and advantages: sum it over micro-batches and processes
            norm = self._all_sum(
                sum(loss_normalizer(p, a, rl.loss) for p, a in zip(parts, part_adv, strict=True))
            )
            for i, (part, a) in enumerate(zip(parts, part_adv, strict=True)):
                new = self.score(self.model, part)
                out = policy_loss(new, a, rl.loss, old=old[i], ref=ref[i], normalizer=norm)
                if iteration == 0 and i == 0 and self._diagnose():
                    stats["cot_grad_norm"] = self._cot_grad_norm(new, a, old[i], ref[i], norm)
                if self.engine is None:
                    out.loss.backward()
                total += float(out.loss.detach())
                outs.append(out)
                if iteration == 0:
                    new_all.append((part, new))
            if self.engine is None:
                self._all_reduce_grads()
                result = clip_and_step(
                    self.model.parameters(),
                    self.opt,
                    None,
                    total,
                    rl.optim.grad_clip,
                    sharded=bool(self.layers),
                )
            else:
                result = self._engine_step(outs[0].loss, total)
            stats["skipped"] = stats.get("skipped", 0.0) + float(result.skipped)
            if iteration == 0:
                stats.update(loss_stats(outs, new_all, result.grad_norm, result.lr))
        self.sched.step()
        return stats

    def _engine_step(self, loss: torch.Tensor, total: float) -> StepResult:
        """zero2 / zero3: backward and step through DeepSpeed (one micro-batch per process; it reduces, clips, steps).
        DeepSpeed AVERAGES gradients over processes, so the loss (already divided by the global normaliser) is
        multiplied by the world size to keep the summed update. A non-finite loss on any process skips everywhere."""
        lr = float(self.opt.param_groups[0]["lr"])
        if self._all_sum(0.0 if math.isfinite(total) else 1.0) > 0:
            return StepResult(grad_norm=float("nan"), skipped=True, lr=lr)
        self.engine.backward(loss * self.world)
        self.engine.step()
        if self.copy is not None:
            self.copy.mark_stale()
        norm = self.engine.get_global_grad_norm()
        return StepResult(grad_norm=float("nan") if norm is None else float(norm), skipped=False, lr=lr)

    def _diagnose(self) -> bool:
        every = self.cfg.trainer.diag_every
        # autograd.grad cannot reach fsdp2's sharded parameters (their gradients arrive through hooks)
        return bool(every) and self.state.step % every == 0 and not self.layers and self.engine is None

    def _cot_grad_norm(self, new: Any, adv: Any, old: Any, ref: Any, norm: float) -> float:
        """‖∇ CoT term‖ alone, UNWEIGHTED (cot_weight = gaussian_weight = 1): how hard the Gaussian (or hard-CoT)
        term would push, also when the recipe switches it off, for diagnosing soft training."""
        unweighted = replace(self.cfg.rl.loss, cot_weight=1.0, gaussian_weight=1.0)
        out = policy_loss(new, adv, unweighted, old=old, ref=ref, normalizer=norm)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not out.cot_loss.requires_grad:
            return 0.0
        grads = torch.autograd.grad(out.cot_loss, params, retain_graph=True, allow_unused=True)
        return math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))

    # ---------------------------------------------------------------- evaluation
    def evaluate(
        self, policy: torch.nn.Module, modes: list[str], pool: RewardPool, tag: str
    ) -> dict[str, ModeSummary]:
        """Evaluate `policy` (from `generation_policy`) in each named inference mode (main process only:
        evaluation is cheap next to training and its numbers must not depend on the process count)."""
        from rl.config import load_infer_recipe

        tcfg = self.cfg.trainer
        out = {}
        for name in modes:
            infer = load_infer_recipe(name, self.cfg.cot)
            sigma = sigma_from_rms(infer, self.state.rms)  # the run's starting embeddings
            _, summary = evaluate_mode(
                policy,
                self.tokenizer,
                self.eval_problems,
                infer,
                n=tcfg.eval_n,
                pool=pool,
                prompt=self.cfg.model.prompt,
                sigma=sigma,
                seed=tcfg.seed,
                batch_size=tcfg.eval_batch_size,
                progress=False,
            )
            out[name] = summary
            print(
                f"[softgrpo] {tag} {name}: "
                + ", ".join(f"pass@{k}={v:.3f}" for k, v in summary.pass_at.items()),
                flush=True,
            )
        return out

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        cfg, tcfg = self.cfg, self.cfg.trainer
        summary_path = self.out / "summary.json"
        # a resumed run keeps its pre-training evaluation (the same config evaluated the same base)
        summary: dict[str, Any] = (
            json.loads(summary_path.read_text()) if self.plan.resume and summary_path.exists() else {}
        )
        if "eval_after" in summary and self.state.step >= tcfg.max_steps and (self.out / "final").is_dir():
            if self.main:
                print(
                    f"[softgrpo] {self.out} holds this run, complete at step {self.state.step}: nothing to do "
                    f"(a larger trainer.max_steps trains on)",
                    flush=True,
                )
            return summary
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / CONFIG_FILE).write_text(self.config_yaml)
            drop_rows_after(self.out / "metrics.jsonl", self.state.step)  # steps past the checkpoint rerun
        logger = (
            MetricsLogger(self.out, cfg.logger, {"config": self.config_yaml}) if self.main else NullLogger()
        )
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        saved_step = self.state.step if self.resumed_from else None  # the step of the newest checkpoint
        try:
            with RewardPool(cfg.reward) as pool:
                if "eval_before" not in summary:
                    with self.generation_policy() as policy:  # every process; only the main one evaluates
                        if self.main:
                            summary["eval_before"] = self._eval_block(policy, tcfg.eval_modes, pool, "before")
                            summary_path.write_text(json.dumps(summary, indent=2))
                bar = tqdm(total=tcfg.max_steps, initial=self.state.step, desc="train", disable=not self.main)
                while self.state.step < tcfg.max_steps and not self._stop:
                    stats = self.train_step(pool)
                    logger.log(stats.as_metrics(), step=self.state.step)
                    bar.update(1)
                    bar.set_postfix(reward=f"{stats.reward_mean:.3f}", cot=f"{stats.cot_len:.1f}")
                    step = self.state.step
                    if (
                        tcfg.eval_modes
                        and tcfg.eval_every
                        and step % tcfg.eval_every == 0
                        and step < tcfg.max_steps
                    ):
                        with self.generation_policy() as policy:
                            if self.main:
                                evals = self.evaluate(policy, [tcfg.eval_primary], pool, f"step {step}")
                                logger.log(
                                    evals[tcfg.eval_primary].flat(f"eval/{tcfg.eval_primary}"), step=step
                                )
                    if step % tcfg.save_every == 0 or self._stop:
                        self.checkpoint()
                        saved_step = step
                bar.close()
                if self._stop:
                    # a step under way when the signal came finished and was checkpointed in the loop
                    done = (
                        "no training step was taken, no checkpoint written"
                        if saved_step is None
                        else f"the newest checkpoint is step {saved_step}"
                    )
                    if self.main:
                        print(f"[softgrpo] SIGTERM at step {self.state.step}: {done}; exiting", flush=True)
                    raise SystemExit(143)
                if saved_step != self.state.step:
                    self.checkpoint()
                with self.generation_policy() as policy:
                    if self.main:
                        summary["eval_after"] = self._eval_block(
                            policy, tcfg.eval_modes, pool, "after", before=summary["eval_before"]
                        )
                final_state = self._full_state(with_optimizer=False)[0]
                if self.main:
                    summary["train"] = {
                        "steps": self.state.step,
                        "skipped_steps": self.state.skipped_steps,
                        "sigma": self.state.sigma,
                        "rms": self.state.rms,
                        "reward_status": self.state.reward_status,
                        "processes": self.world,
                        "sharding": self.sharding,
                        "local_param_fraction": self.local_param_fraction,
                    }
                    summary_path.write_text(json.dumps(summary, indent=2))
                    self._saveable().save_pretrained(self.out / "final", state_dict=final_state)
                    self.tokenizer.save_pretrained(self.out / "final")
                    self.profile().save(self.out / "final")
                    self._plot(summary)
        finally:
            signal.signal(signal.SIGTERM, previous)
            logger.close()
        return summary

    def _eval_block(
        self,
        policy: torch.nn.Module,
        modes: list[str],
        pool: RewardPool,
        tag: str,
        before: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Evaluate every mode in `modes` (the primary first) into a summary block. With `before` (the block of
        an earlier evaluation of the same problems), each mode also gets its paired pass@1 lift over it."""
        if not modes:  # evaluation switched off (trainer.eval_modes=[])
            return {"primary": None, "pass@1": None, "pass@k": {}}
        primary = self.cfg.trainer.eval_primary
        ordered = [primary] + [m for m in modes if m != primary]
        results = self.evaluate(policy, ordered, pool, tag)
        block: dict[str, Any] = {"primary": primary}
        for name, s in results.items():
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
        block["pass@1"] = block[primary]["pass@1"]
        block["pass@k"] = {k: v for k, v in block[primary].items() if k.startswith("pass@")}
        return block

    def _plot(self, summary: dict[str, Any]) -> None:
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            plot_training_curves(read_metrics(metrics), self.out / "curves.png")
        if summary["eval_before"]["primary"] is None:
            return
        curves = {}
        for tag in ("eval_before", "eval_after"):
            block = summary[tag]
            primary = block["primary"]
            curves[f"{primary} {tag[5:]}"] = {
                int(k[5:]): v for k, v in block[primary].items() if k.startswith("pass@")
            }
        plot_pass_at_k(curves, self.out / "passk.png", title="held-out pass@k, before vs after")

    def _full_state(self, with_optimizer: bool = True) -> tuple[dict | None, dict | None]:
        """Whole model (and optimizer) state dicts gathered from fsdp2 shards, or under zero3 the whole weights
        of the refreshed generation copy (its AdamW state is in DeepSpeed's checkpoint); collective. (None, None)
        when nothing is sharded: the checkpoint code then reads the live model and optimizer."""
        if self.copy is not None:
            return self.copy.refreshed(self.model).state_dict(), None
        if not self.layers:
            return None, None
        return full_state_dicts(self.model, self.opt if with_optimizer else None)

    def _saveable(self) -> torch.nn.Module:
        """The module whose `save_pretrained` writes the policy: the model, or under zero3 its whole generation
        copy (refreshed by `_full_state`, which the callers run first)."""
        return self.copy.module if self.copy is not None else self.model

    def profile(self) -> ModelProfile:
        """What the trained policy's directories say about it: the prompt format and the CoT limits it was
        trained with (rl/model.py)."""
        written_by = (
            f"softgrpo train step {self.state.step} (cot={self.cfg.cot.name}, from {self.cfg.model.path})"
        )
        limits = {
            "max_think_tokens": self.cfg.cot.max_think_tokens,
            "max_answer_tokens": self.cfg.cot.max_answer_tokens,
        }
        return ModelProfile(
            self.cfg.model.prompt, **limits, embedding_rms=self.state.rms, written_by=written_by
        )

    def checkpoint(self) -> None:
        if self.world > 1:
            dist.barrier()
        model_state, optimizer_state = self._full_state()
        extra: dict[str, Path] = {}
        if self.engine is not None:  # partitioned AdamW state: every process writes its part (collective)
            staging = self.out / "checkpoints" / f".deepspeed_step_{self.state.step:06d}"
            self.engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG)
            dist.barrier()
            extra["deepspeed"] = staging
        if self.main:
            save_checkpoint(
                self.out / "checkpoints",
                self._saveable(),
                self.tokenizer,
                self.opt,
                self.sched,
                self.state,
                self.cfg.trainer.keep_last,
                sharding=self.sharding,
                model_state=model_state,
                optimizer_state=optimizer_state,
                extra_dirs=extra,
                profile=self.profile(),
            )
        if self.world > 1:
            dist.barrier()

    def train_step(self, pool: RewardPool) -> StepStats:
        start = time.time()
        step = self.state.step
        rollouts, problems = self.rollout(step)
        rewards, results = self.rewards(rollouts, problems, pool)
        update_stats = self.update(rollouts, rewards)
        self.state.step += 1
        self.state.consumed += self.cfg.trainer.prompts_per_step
        skipped = bool(update_stats["skipped"])
        self.state.skipped_steps += int(skipped)
        sample, loss_part = StepSample.of(rollouts, rewards, results), update_stats
        if self.world > 1:  # metrics describe the global batch, not one process's share
            samples: list = [None] * self.world
            losses: list = [None] * self.world
            dist.all_gather_object(samples, sample)
            dist.all_gather_object(losses, update_stats)
            sample, loss_part = StepSample.merge(samples), merge_loss_stats(losses)
        for status in sample.statuses:
            self.state.reward_status[status] += 1
        return step_stats(sample, loss_part, self.cfg.rl.advantages, skipped, time.time() - start)


def _weighted_mean(pairs: list[tuple[float, float]]) -> float:
    """Σ value·weight / Σ weight over (value, weight) pairs; 0 when the weights sum to 0."""
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else 0.0


def loss_stats(outs: list, new_all: list, grad_norm: float, lr: float) -> dict[str, float]:
    """Loss statistics of one update from the micro-batches' `LossOutput`s: terms are summed (each was
    already divided by the global normaliser), per-step means are weighted by each micro-batch's step count.
    The step counts behind each mean ride along under `count/...` (see `MEAN_WEIGHTS`), so that
    `merge_loss_stats` can weight processes the same way."""
    cot_steps = [int(new.cot_mask.sum()) for _, new in new_all]
    answer_steps = [int(new.answer_mask.sum()) for _, new in new_all]
    gaps = [log_prob_gap(part, new) for part, new in new_all]
    return {
        "noise_ratio": noise_ratio(new_all),
        "loss": sum(float(o.loss.detach()) for o in outs),
        "cot_term": sum(o.cot_term for o in outs),
        "answer_term": sum(o.answer_term for o in outs),
        "clip_fraction": _weighted_mean(
            [(o.clip_fraction, o.num_cot_steps + o.num_answer_steps) for o in outs]
        ),
        "kl_cot": _weighted_mean([(o.kl_cot, o.num_cot_steps) for o in outs]),
        "kl_answer": _weighted_mean([(o.kl_answer, o.num_answer_steps) for o in outs]),
        "gap_cot": _weighted_mean([(g.cot, n) for g, n in zip(gaps, cot_steps, strict=True)]),
        "gap_answer": _weighted_mean([(g.answer, n) for g, n in zip(gaps, answer_steps, strict=True)]),
        "grad_norm": grad_norm,
        "lr": lr,
        "count/scored_cot": float(sum(cot_steps)),
        "count/scored_answer": float(sum(answer_steps)),
        "count/loss_cot": float(sum(o.num_cot_steps for o in outs)),
        "count/loss_answer": float(sum(o.num_answer_steps for o in outs)),
        "count/loss_all": float(sum(o.num_cot_steps + o.num_answer_steps for o in outs)),
    }


MEAN_WEIGHTS = {
    "noise_ratio": "count/scored_cot",
    "gap_cot": "count/scored_cot",
    "gap_answer": "count/scored_answer",
    "kl_cot": "count/loss_cot",
    "kl_answer": "count/loss_answer",
    "clip_fraction": "count/loss_all",
}
"""Per-step means of `loss_stats` and the step count each one averages over."""


LOSS_FIELDS = (
    "noise_ratio", "gap_cot", "gap_answer", "clip_fraction", "kl_cot", "kl_answer", "loss", "cot_term",
    "answer_term", "grad_norm", "cot_grad_norm", "lr",
)  # fmt: skip
"""StepStats fields that come straight from the update's loss statistics."""


@dataclass
class StepSample:
    """Per-rollout facts of one step that the metrics need: small enough to gather from every process."""

    rewards: list[float | None]
    statuses: list[str]
    group_index: list[int]
    cot_len: list[int]
    answer_len: list[int]
    think_end: list[int]
    entropy_sum: float  # Σ H(p_t) over real CoT steps
    entropy_steps: int

    @staticmethod
    def of(rollouts: Rollouts, rewards: list[float | None], results: list) -> StepSample:
        return StepSample(
            rewards=list(rewards),
            statuses=[r.status for r in results],
            group_index=rollouts.group_index.tolist(),
            cot_len=rollouts.cot_lengths.tolist(),
            answer_len=rollouts.answer_lengths.tolist(),
            think_end=rollouts.think_end.tolist(),
            entropy_sum=float(rollouts.cot_entropy[rollouts.cot_mask].sum()),
            entropy_steps=int(rollouts.cot_mask.sum()),
        )

    @staticmethod
    def merge(parts: list[StepSample]) -> StepSample:
        """One sample of all processes' rollouts (group indices offset so that groups stay distinct)."""
        merged = StepSample([], [], [], [], [], [], 0.0, 0)
        for p in parts:
            offset = max(merged.group_index, default=-1) + 1
            merged.rewards += p.rewards
            merged.statuses += p.statuses
            merged.group_index += [g + offset for g in p.group_index]
            merged.cot_len += p.cot_len
            merged.answer_len += p.answer_len
            merged.think_end += p.think_end
            merged.entropy_sum += p.entropy_sum
            merged.entropy_steps += p.entropy_steps
        return merged


def step_stats(
    sample: StepSample,
    ls: dict[str, float],
    adv_cfg: AdvantageConfig,
    skipped: bool,
    seconds: float,
) -> StepStats:
    """The metrics of one step from its (global) rollout facts and loss statistics `ls`."""
    judged = torch.tensor([r for r in sample.rewards if r is not None], dtype=torch.float32)
    adv = compute_advantages(sample.rewards, torch.tensor(sample.group_index), adv_cfg)
    adv_vals = adv.values[adv.mask]
    cot_len = torch.tensor(sample.cot_len, dtype=torch.float32)
    ans_len = torch.tensor(sample.answer_len, dtype=torch.float32)
    n = len(sample.rewards)
    reasons = torch.bincount(torch.tensor(sample.think_end), minlength=len(THINK_END_REASONS)).float()
    tokens = float(cot_len.sum() + ans_len.sum())
    return StepStats(
        reward_mean=float(judged.mean()) if judged.numel() else float("nan"),
        reward_std=float(judged.std(unbiased=False)) if judged.numel() else float("nan"),
        reward_status={s: sample.statuses.count(s) for s in STATUSES},
        adv_mean=float(adv_vals.mean()) if adv_vals.numel() else 0.0,
        adv_std=float(adv_vals.std(unbiased=False)) if adv_vals.numel() else 0.0,
        adv_abs_mean=float(adv_vals.abs().mean()) if adv_vals.numel() else 0.0,
        cot_len=float(cot_len.mean()),
        answer_len=float(ans_len.mean()),
        think_end={r: float(reasons[i] / n) for i, r in enumerate(THINK_END_REASONS)},
        cot_entropy=sample.entropy_sum / sample.entropy_steps if sample.entropy_steps else 0.0,
        **{name: ls[name] for name in LOSS_FIELDS},
        skipped=skipped,
        tokens_per_s=tokens / seconds,
        step_time=seconds,
    )


def merge_loss_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    """Loss statistics of all processes, as one process holding the whole batch would compute them: the loss
    terms and step counts add up (each process's part of the global objective); grad norm, lr and the skip flag
    are already global; per-step means are weighted by each process's step count (`MEAN_WEIGHTS`); anything
    else (the CoT-term gradient norm each process measures on its own share) is averaged.

    >>> merge_loss_stats([{"gap_cot": 0.25, "count/scored_cot": 1.0, "lr": 0.1},
    ...                   {"gap_cot": 0.625, "count/scored_cot": 2.0, "lr": 0.1}])
    {'gap_cot': 0.5, 'count/scored_cot': 3.0, 'lr': 0.1}
    """
    summed, shared = ("loss", "cot_term", "answer_term"), ("grad_norm", "lr", "skipped")
    out = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        if key in summed or key.startswith("count/"):
            out[key] = sum(values)
        elif key in shared:
            out[key] = values[0]
        elif key in MEAN_WEIGHTS:
            out[key] = _weighted_mean([(p[key], p[MEAN_WEIGHTS[key]]) for p in parts])
        else:
            out[key] = sum(values) / len(values)
    return out


def noise_ratio(scored: list[tuple[Rollouts, Any]]) -> float:
    """Mean over CoT steps of ‖h_t - μ_t‖ / ‖μ_t‖: how loud the exploration noise is next to the mixture
    (0 for hard CoT). μ_t is the learner's, from the same forward pass as the loss."""
    num, count = 0.0, 0
    for part, new in scored:
        if new.mu is None or part.cot_inputs is None:
            continue
        mu = new.mu.detach().float()  # [N, T, d]
        ratio = (part.cot_inputs.to(mu.device) - mu).norm(dim=-1) / mu.norm(dim=-1).clamp(min=1e-12)  # [N, T]
        num += float(ratio[new.cot_mask].sum())
        count += int(new.cot_mask.sum())
    return num / count if count else 0.0
