"""rl/grad_signal.py on the tiny base: which problems each batch draws, and that a term the recipe switches off is
measured too (the statistics themselves: rl/diagnostics.gradient_agreement, tests/test_diagnostics.py)."""

from __future__ import annotations

from pathlib import Path

from rewards.pool import RewardPool
from rl.grad_signal import TermSignal, markdown, term_signals
from tests.test_trainer import make_trainer, small_run


def test_batches_draw_the_same_or_fresh_problems(tiny_base: Path, tmp_path: Path) -> None:
    trainer = make_trainer(small_run(tiny_base, tmp_path, "cot=soft", "rl.loss.gaussian_weight=0"))
    seen, rollout = [], trainer.rollout
    trainer.rollout = lambda step, start: seen.append((step, start)) or rollout(step, start=start)
    with RewardPool(trainer.cfg.reward) as pool:
        for draw, starts in (("same", [0, 0]), ("fresh", [0, 4])):  # 4 problems per batch (small_run)
            seen.clear()
            rows = term_signals(trainer, pool, "cot=soft", batches=2, draw=draw)
            assert seen == [(1000 + b, s) for b, s in enumerate(starts)]
            assert [(r.term, r.draw, r.prompts, r.mode) for r in rows] == [
                ("cot", draw, 4, "soft"),
                ("answer", draw, 4, "soft"),
            ]
            # gaussian_weight=0 switches the soft CoT term off in training; the study measures it unweighted
            assert rows[0].norm > 0 and rows[1].norm > 0


def test_markdown_table_rows() -> None:
    def row(term: str, draw: str, norm: float, cos: float, snr: float) -> TermSignal:
        return TermSignal("cot=hard", "hard", 8, draw, term, norm, cos, snr, 0.2)

    rows = [row("cot", "same", 0.8, 0.33, 0.355), row("answer", "same", 0.2, 0.25, 0.27)]
    rows += [row("cot", "fresh", 0.6, -0.05, 0.0), row("answer", "fresh", 0.1, 0.04, 0.008)]
    # the norm column is the mean over the two draws: (0.8 + 0.6) / 2, (0.2 + 0.1) / 2
    assert markdown(rows).splitlines()[2] == (
        "| cot=hard | 8 | 0.700 | +0.330 / 0.355 | -0.050 / 0.000 | 0.150 | +0.250 / 0.270 | +0.040 / 0.008 |"
    )
    assert markdown(rows[:2]).splitlines()[2].endswith("| 0.200 | +0.250 / 0.270 | - |")
