"""The GRPO training loop: rollouts → rewards → update, with held-out evaluation, checkpoints, exact resume and
multi-process data parallelism. The parts are built by the entry script (scripts/train.py) and handed in.

One step (global batch = `prompts_per_step` prompts × G samples):
1. Draw the step's prompts from a seeded permutation of the train split (the data position is one integer).
   Process r of W takes a contiguous share, so the G samples of a prompt stay on one process.
2. Roll out in chunks of `rollout_chunk` prompts on the strategy's generation view of the policy; each chunk's
   generator is seeded from (seed, step, index of its first prompt in the global batch), so the rollouts do not
   depend on the number of processes, and a resumed run draws exactly what the uninterrupted one would have.
3. Judge the decoded completions in the reward pool (`RewardPool.judge`).
4. The update (rl/learner.py): advantages, `num_iterations` PPO passes, the optimizer step through the parallel
   strategy (rl/parallel.py), which makes N processes give the 1-process update.
5. Metrics of the global batch (rl/stats.py), a checkpoint every `save_every` steps.

Around the loop: the held-out evaluation before training, every `eval_every` steps and after it
(rl/evaluation.py), the final checkpoint and the final policy in `output_dir/final`, and SIGTERM (finish the
step, checkpoint, exit 143).

Model selection (`trainer.select_best`, the paper's "the best checkpoint is the one tested"): the pre-training
evaluation and every periodic one (the last step's included) are candidates; one whose primary pass@1 beats every
earlier candidate's is saved whole into `output_dir/best/`. The base weights are saved there at the start, so
best/ always holds the selection and step 0 needs no special case later. After training they are loaded into the
policy, and the after-evaluation, summary.json's `selected` and `final/` are theirs.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rewards import STATUSES, Judged, RewardPool
from rl import learner
from rl.checkpoint import TrainState, check_model_keys, latest_verified_checkpoint
from rl.data import Problem
from rl.evaluation import Evaluator, plot_run, special_ids
from rl.logger import MetricsLogger, NullLogger, drop_rows_after
from rl.lora import has_lora, load_plain
from rl.model import ModelProfile
from rl.optim import fit_warmup
from rl.parallel import Parallel
from rl.prompts import encode_prompts
from rl.rundir import BEST_DIR, CONFIG_FILE, RunPlan, config_yaml
from rl.sharding import load_full_state_dicts
from rl.stats import StepSample, StepStats, merge_stats, step_stats
from rollouts.config import CotConfig
from rollouts.distributions import embedding_rms_by_kind, sigma_from_rms
from rollouts.engine import done_check_interval, input_embedding_matrix
from rollouts.engines import EagerEngine, RolloutEngine
from rollouts.record import Rollouts, concat_rollouts


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
        out.append(problems[epoch_order(seed, epoch, len(problems))[index]])
    return out


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    """The permutation of n problems that epoch `epoch` of run seed `seed` draws them in, computed once per epoch:
    shuffling the synthetic task's 20k problems takes ~4 ms, and shuffling once per drawn prompt cost ~60 ms of
    every step of the default run.

    >>> sorted(epoch_order(0, 1, 5)) == list(range(5)) and epoch_order(0, 1, 5) != epoch_order(0, 2, 5)
    True
    """
    order = list(range(n))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(order)
    return tuple(order)


SELECTED_FILE = "selected.json"  # best/selected.json: which evaluation selected it (`Selection`)


@dataclass(frozen=True)
class Selection:
    """What `output_dir/best/` holds under trainer.select_best: the weights of step `step` (0: the base model),
    whose held-out pass@1 `pass1` in mode `by` no earlier evaluation of the run reached.

    It lives in best/selected.json beside the weights it describes, not in the checkpoints: best/ is written when
    a step is selected, possibly after the newest checkpoint, and a resumed run must compare with what best/ holds.
    An exact resume re-evaluates the steps after its checkpoint to the same pass@1, which does not beat the
    record, so it keeps the selection the uninterrupted run would have made."""

    step: int
    pass1: float
    by: str

    def summary(self) -> dict[str, Any]:
        """summary.json's `selected` block (and selected.json's content)."""
        return {"step": self.step, "pass@1": self.pass1, "by": self.by}

    def save(self, directory: Path) -> None:
        (directory / SELECTED_FILE).write_text(json.dumps(self.summary(), indent=2) + "\n")

    @staticmethod
    def load(directory: Path) -> Selection:
        file = directory / SELECTED_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} is missing: a trainer.select_best run keeps its selected policy and this record in "
                f"{directory} from its first evaluation on, so this run cannot be resumed with its selection"
            )
        data = json.loads(file.read_text())
        return Selection(int(data["step"]), float(data["pass@1"]), str(data["by"]))


@dataclass
class RunParts:
    """What the entry script builds and the loop runs on (scripts/train.py `build_trainer`)."""

    plan: RunPlan  # resume or start fresh (rl/rundir.py), decided before anything was loaded
    parallel: Parallel  # the backend of this launch (rl/parallel.py)
    model: torch.nn.Module  # the policy, whole, as loaded (the strategy wraps it)
    tokenizer: Any
    ref: torch.nn.Module | None  # frozen reference for the KL term (None when rl.loss.kl_coef = 0)
    train_problems: list[Problem]
    eval_problems: list[Problem]
    eval_modes: dict[str, CotConfig] = field(default_factory=dict)  # name -> inference mode, primary first
    # rollouts and evaluations (rollouts/engines.py)
    engine: RolloutEngine = field(default_factory=EagerEngine)


class Trainer:
    """The run's loop over its parts; `run()` trains, evaluates, saves and returns summary.json's content."""

    def __init__(self, cfg: Any, parts: RunParts) -> None:
        self.cfg, self.plan, self.parallel = cfg, parts.plan, parts.parallel
        self.main, self.world, self.device = self.parallel.main, self.parallel.world, self.parallel.device
        self.model, self.tokenizer, self.ref = parts.model, parts.tokenizer, parts.ref
        self.engine = parts.engine
        self.train_problems = parts.train_problems
        self.out = Path(cfg.output_dir)
        self.config_yaml = config_yaml(cfg)
        self.model.train()
        rms = embedding_rms_by_kind(input_embedding_matrix(self.model))  # whole until the strategy shards it
        self.stop, self.eos_id, self.pad_id = special_ids(self.tokenizer, cfg.model.prompt)
        optim_cfg, note = fit_warmup(cfg.rl.optim, cfg.trainer.max_steps)
        if note and self.main:
            print(f"[softgrpo] {note}", flush=True)
        self.opt, self.sched = self.parallel.prepare(self.model, optim_cfg, cfg.trainer.max_steps)
        self.local_param_fraction = self.parallel.local_param_fraction()
        self.state = TrainState(rms=rms, sigma=sigma_from_rms(cfg.cot, rms))
        self.state.reward_status = dict.fromkeys(STATUSES, 0)
        self.resumed_from = self._maybe_resume()
        tcfg = cfg.trainer
        self.evaluator = Evaluator(
            self.tokenizer, parts.eval_problems, parts.eval_modes, tcfg.eval_primary, tcfg.eval_n,
            tcfg.eval_batch_size, cfg.model.prompt, self.state.rms, tcfg.seed, self.engine,
        )  # fmt: skip
        self._stop = False
        self.best: Selection | None = None  # trainer.select_best: what best/ holds (same on every process)

    def _maybe_resume(self) -> Path | None:
        if not self.plan.resume:
            return None
        found = latest_verified_checkpoint(
            self.out / "checkpoints", warn=lambda msg: print(msg, flush=True) if self.main else None
        )
        if found is None:
            return None
        self.state = self.parallel.resume(found, self.sched)
        if self.main:
            print(f"[softgrpo] resumed from {found} (step {self.state.step})", flush=True)
        return found

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop = True  # finish the current step, checkpoint, exit (see run())

    # ---------------------------------------------------------------- one step
    def rollout(self, step: int, start: int | None = None) -> tuple[Rollouts, list[Problem]]:
        """This process's rollouts for `step` (see the module docstring for how randomness is keyed), of the
        prompts from data position `start` on (default: where the run stands)."""
        tcfg = self.cfg.trainer
        share = tcfg.prompts_per_step // self.world
        first = (self.state.consumed if start is None else start) + self.parallel.rank * share
        problems = draw_prompts(self.train_problems, tcfg.seed, first, share)
        parts = []
        for lo in range(0, share, tcfg.rollout_chunk):
            chunk = problems[lo : lo + tcfg.rollout_chunk]
            seed = chunk_seed(tcfg.seed, step, self.parallel.rank * share + lo)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self.model.eval()
            with torch.no_grad(), self.parallel.generation_view() as policy:
                parts.append(
                    self.engine.generate(
                        policy,
                        encode_prompts(self.tokenizer, [p.question for p in chunk], self.cfg.model.prompt),
                        self.cfg.cot,
                        group_size=self.cfg.rl.group_size,
                        sigma=self.state.sigma,
                        stop=self.stop,
                        eos_id=self.eos_id,
                        pad_id=self.pad_id,
                        generator=gen,
                        check_every=done_check_interval(self.device),  # gen serves this call only
                    )
                )
            self.model.train()
        return concat_rollouts(parts), problems

    def judge(self, pool: RewardPool, rollouts: Rollouts, problems: list[Problem]) -> Judged:
        """The rewards of `rollouts` (G per problem, in order) and the verdicts behind them."""
        golds = [p.answers for p in problems for _ in range(self.cfg.rl.group_size)]
        return pool.judge(rollouts.completion_texts(self.tokenizer), golds)

    def train_step(self, pool: RewardPool) -> StepStats:
        start = time.time()
        step = self.state.step
        rollouts, problems = self.rollout(step)
        judged = self.judge(pool, rollouts, problems)
        every = self.cfg.trainer.diag_every
        update = learner.update(
            self.model,
            rollouts,
            judged.rewards,
            self.cfg.rl,
            self.cfg.cot,
            self.parallel,
            self.sched,
            ref=self.ref,
            diagnose=bool(every) and step % every == 0 and self.parallel.can_diagnose,
        )
        self.state.step += 1
        self.state.consumed += self.cfg.trainer.prompts_per_step
        self.state.skipped_steps += int(update.skipped)
        # metrics describe the global batch, not one process's share
        sample = StepSample.merge(
            self.parallel.gather(StepSample.of(rollouts, judged.rewards, judged.results))
        )
        update = merge_stats(self.parallel.gather(update))
        for status in sample.statuses:
            self.state.reward_status[status] += 1
        return step_stats(sample, update, self.cfg.rl.advantages, time.time() - start)

    # ---------------------------------------------------------------- checkpoints
    def profile(self, step: int | None = None) -> ModelProfile:
        """What the trained policy's directories say about it: the prompt format, the CoT limits its run
        evaluated it with (the training cap, or `trainer.eval_max_think_tokens` when set: the paper trains at 128
        and tests at 512), the rms(E) its noise scale refers to (rl/model.py), and the step its weights are from
        (default: the current one)."""
        step = self.state.step if step is None else step
        written_by = f"softgrpo train step {step} (cot={self.cfg.cot.name}, from {self.cfg.model.path})"
        limits = {
            "max_think_tokens": self.cfg.trainer.eval_max_think_tokens or self.cfg.cot.max_think_tokens,
            "max_answer_tokens": self.cfg.cot.max_answer_tokens,
        }
        return ModelProfile(
            self.cfg.model.prompt, **limits, embedding_rms=self.state.rms, written_by=written_by
        )

    def checkpoint(self) -> None:
        self.parallel.save_checkpoint(
            self.out / "checkpoints",
            self.tokenizer,
            self.sched,
            self.state,
            self.cfg.trainer.keep_last,
            self.profile(),
        )

    # ---------------------------------------------------------------- the run
    def evaluate(
        self, pool: RewardPool, tag: str, before: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """Every evaluation mode's summary block (main process; None elsewhere). Collective: every process
        enters the generation view."""
        with self.parallel.generation_view() as policy:
            return self.evaluator.block(policy, pool, tag, before) if self.main else None

    def run(self) -> dict[str, Any]:
        tcfg = self.cfg.trainer
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
            MetricsLogger(self.out, self.cfg.logger, {"config": self.config_yaml})
            if self.main
            else NullLogger()
        )
        previous = signal.signal(signal.SIGTERM, self.on_sigterm)
        try:
            with RewardPool(self.cfg.reward) as pool:
                self._start(pool, summary, summary_path)
                saved_step = self._loop(pool, logger)
                if self._stop:
                    self._exit_on_sigterm(saved_step)
                if saved_step != self.state.step:
                    self.checkpoint()  # the last weights, before the selected ones replace them in the policy
                self._finish(pool, summary, summary_path)
        finally:
            signal.signal(signal.SIGTERM, previous)
            logger.close()
        return summary

    def _start(self, pool: RewardPool, summary: dict[str, Any], summary_path: Path) -> None:
        """The pre-training evaluation into `summary` and, under trainer.select_best, the base weights as the first
        candidate; a resumed run keeps both (its evaluation in summary.json, its selection in best/)."""
        select = self.cfg.trainer.select_best
        if "eval_before" in summary:
            self.best = Selection.load(self.out / BEST_DIR) if select else None
            return
        summary["eval_before"] = self.evaluate(pool, "before")
        if select:  # best/ is written before summary.json, so a run that has the one has the other
            self._select(self.state.step, summary["eval_before"]["pass@1"] if self.main else None)
        if self.main:
            summary_path.write_text(json.dumps(summary, indent=2))

    def _finish(self, pool: RewardPool, summary: dict[str, Any], summary_path: Path) -> None:
        """After training: under trainer.select_best the selected weights into the policy; the after-evaluation,
        summary.json, `final/` (the policy evaluated) and the plots."""
        step = self.state.step
        if self.cfg.trainer.select_best:
            self._load_best()
            step = self.best.step
            summary["selected"] = self.best.summary()
        summary["eval_after"] = self.evaluate(pool, "after", before=summary["eval_before"])
        if self.main:
            summary["train"] = self._train_summary()
            summary_path.write_text(json.dumps(summary, indent=2))
        self.parallel.save_model(self.out / "final", self.tokenizer, self.profile(step))
        if self.main:
            plot_run(self.out, summary)

    def _loop(self, pool: RewardPool, logger: MetricsLogger | NullLogger) -> int | None:
        """Train until `max_steps` or SIGTERM; returns the step of the newest checkpoint (None: none yet)."""
        tcfg = self.cfg.trainer
        saved_step = self.state.step if self.resumed_from else None
        bar = tqdm(total=tcfg.max_steps, initial=self.state.step, desc="train", disable=not self.main)
        while self.state.step < tcfg.max_steps and not self._stop:
            stats = self.train_step(pool)
            step = self.state.step
            logger.log(stats.as_metrics(), step=step)
            bar.update(1)
            bar.set_postfix(reward=f"{stats.reward_mean:.3f}", cot=f"{stats.cot_len:.1f}")
            if self._eval_due(step):
                pass1 = self._evaluate_primary(pool, logger, step)
                if tcfg.select_best:
                    self._select(step, pass1)
            if step % tcfg.save_every == 0 or self._stop:
                self.checkpoint()
                saved_step = step
        bar.close()
        return saved_step

    def _eval_due(self, step: int) -> bool:
        """Whether the primary mode is evaluated after `step`: every `eval_every` steps, except after the last,
        which the after-evaluation covers, unless the last weights compete for selection (trainer.select_best)."""
        tcfg = self.cfg.trainer
        if not (tcfg.eval_modes and tcfg.eval_every):
            return False
        if step == tcfg.max_steps:
            return tcfg.select_best
        return step % tcfg.eval_every == 0

    def _evaluate_primary(
        self, pool: RewardPool, logger: MetricsLogger | NullLogger, step: int
    ) -> float | None:
        """The primary mode's pass@1 at `step`, logged (main process; None elsewhere). Collective."""
        primary = self.cfg.trainer.eval_primary
        with self.parallel.generation_view() as policy:
            if not self.main:
                return None
            evals = self.evaluator.evaluate(policy, [primary], pool, f"step {step}")
        logger.log(evals[primary].flat(f"eval/{primary}"), step=step)
        return evals[primary].pass_at[1]

    # ---------------------------------------------------------------- model selection (trainer.select_best)
    def _select(self, step: int, pass1: float | None) -> None:
        """The policy of `step` becomes best/ when its primary pass@1 (`pass1`, measured on the main process,
        None elsewhere) is strictly above every earlier candidate's. Collective."""
        pass1 = self.parallel.all_sum(pass1 if self.main else 0.0)  # every process decides alike
        if self.best is not None and pass1 <= self.best.pass1:
            return
        self.best = Selection(step, pass1, self.cfg.trainer.eval_primary)
        best, tmp, old = (self.out / name for name in (BEST_DIR, f"{BEST_DIR}.tmp", f"{BEST_DIR}.old"))
        if self.main and tmp.exists():  # an interrupted earlier write
            shutil.rmtree(tmp)
        self.parallel.barrier()
        self.parallel.save_model(tmp, self.tokenizer, self.profile(step))
        if self.main:
            self.best.save(tmp)
            # two renames: an interruption never leaves a best/ that mixes two steps' files
            if best.exists():
                os.replace(best, old)
            os.replace(tmp, best)
            shutil.rmtree(old, ignore_errors=True)
            print(
                f"[softgrpo] step {step}: {self.best.by} pass@1 {pass1:.3f}, the best so far, in {best}",
                flush=True,
            )
        self.parallel.barrier()

    def _load_best(self) -> None:
        """Load best/'s whole weights into the policy the strategy generates with and saves from (`saveable()`,
        made current by `whole_state`: under zero3 that is the whole generation copy). Collective; every process
        reads best/. This mirrors `save_model` and belongs beside it in rl/parallel.py."""
        from safetensors.torch import load_file

        path = self.out / BEST_DIR
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(path.glob("*.safetensors")):
            weights.update(load_file(shard))
        if not weights:
            raise FileNotFoundError(f"{path} has no *.safetensors: the selected policy is missing")
        self.parallel.whole_state(with_optimizer=False)
        model = self.parallel.saveable()
        if has_lora(model):  # best/ holds the merged plain weights (rl/lora.py)
            check_model_keys(path, model, *load_plain(model, weights))
            return
        expected = set(model.state_dict())
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        check_model_keys(path, model, missing, unexpected)
        load_full_state_dicts(model, None, {k: v for k, v in weights.items() if k in expected}, None)

    def _exit_on_sigterm(self, saved_step: int | None) -> None:
        # a step under way when the signal came finished and was checkpointed in the loop
        done = (
            "no training step was taken, no checkpoint written"
            if saved_step is None
            else f"the newest checkpoint is step {saved_step}"
        )
        if self.main:
            print(f"[softgrpo] SIGTERM at step {self.state.step}: {done}; exiting", flush=True)
        raise SystemExit(143)

    def _train_summary(self) -> dict[str, Any]:
        return {
            "steps": self.state.step,
            "skipped_steps": self.state.skipped_steps,
            "sigma": self.state.sigma,
            "rms": self.state.rms,
            "reward_status": self.state.reward_status,
            "processes": self.world,
            "sharding": self.parallel.sharding,
            "local_param_fraction": self.local_param_fraction,
        }
