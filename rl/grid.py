"""The paper's train × inference grid on one task (scripts/paper_grid.py): gathering the runs into a table.

Each run directory `<root>/<train mode>_s<seed>/` holds the trainer's `summary.json`, whose `eval_after` block has
pass@1 and pass@k of every inference mode after training and the paired lift of pass@1 over the same problems.
Per (train mode, inference mode) the table gives the mean over seeds of pass@1 and pass@8 after training, with a
95% interval mean ± t₀.₉₇₅(n-1) · s / √n over the n seeds, and the mean lift of pass@1. Each soft-type train mode
is compared with hard training in the same inference mode by the difference of seed means and its standard
error √(s_a²/n_a + s_h²/n_h): `better` / `worse` when the difference exceeds two standard errors, else `tie`.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Student-t 97.5% quantiles by degrees of freedom (a 95% two-sided interval); 1.96 beyond."""


@dataclass
class Cell:
    """One (train mode, inference mode) cell over seeds."""

    train: str
    infer: str
    seeds: int
    pass1: list[float]  # per seed, after training
    pass8: list[float]
    lift: list[float]  # per seed, paired pass@1 lift

    @staticmethod
    def summary(values: list[float]) -> tuple[float, float]:
        """(mean, 95% half-width) over seeds; the half-width is nan for one seed.

        >>> [round(x, 4) for x in Cell.summary([0.2, 0.4])]  # t(1) = 12.706, s = 0.1414, n = 2
        [0.3, 1.2706]
        """
        mean = statistics.fmean(values)
        if len(values) < 2:
            return mean, math.nan
        t = T_975.get(len(values) - 1, 1.96)
        return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def run_dir(root: Path, train: str, seed: int) -> Path:
    return root / f"{train}_s{seed}"


def read_cells(root: Path, trains: list[str], infers: list[str], seeds: list[int]) -> list[Cell]:
    """Every cell from the runs' summary.json; a missing or unfinished run is an error naming it."""
    after: dict[tuple[str, int], dict] = {}
    for train in trains:
        for seed in seeds:
            path = run_dir(root, train, seed) / "summary.json"
            if not path.exists():
                raise FileNotFoundError(
                    f"{path}: the run train={train} seed={seed} has no summary (not finished?)"
                )
            block = json.loads(path.read_text()).get("eval_after")
            if block is None:
                raise KeyError(f"{path}: no eval_after block (the run did not finish its final evaluation)")
            after[train, seed] = block
    cells = []
    for train in trains:
        for infer in infers:
            blocks = []
            for seed in seeds:
                if infer not in after[train, seed]:
                    raise KeyError(f"{run_dir(root, train, seed)}/summary.json: no {infer!r} in eval_after")
                blocks.append(after[train, seed][infer])
            cells.append(
                Cell(
                    train=train,
                    infer=infer,
                    seeds=len(seeds),
                    pass1=[b["pass@1"] for b in blocks],
                    pass8=[b["pass@8"] for b in blocks],
                    lift=[b["lift_pass@1"]["mean"] for b in blocks],
                )
            )
    return cells


def compare(a: list[float], b: list[float]) -> tuple[float, float, str]:
    """(mean(a) - mean(b), its standard error, better | worse | tie at two standard errors).

    >>> diff, se, verdict = compare([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])  # se = sqrt(2 * 0.01 / 3)
    >>> round(diff, 4), round(se, 4), verdict
    (0.4, 0.0816, 'better')
    """
    diff = statistics.fmean(a) - statistics.fmean(b)
    var = sum(statistics.variance(x) / len(x) if len(x) > 1 else math.nan for x in (a, b))
    se = math.sqrt(var)
    verdict = "tie" if not se > 0 or abs(diff) <= 2 * se else ("better" if diff > 0 else "worse")
    return diff, se, verdict


def markdown(cells: list[Cell], baseline: str = "hard") -> str:
    """The grid as a markdown table: one row per cell, the comparison with `baseline` training in pass@1."""

    def fmt(values: list[float]) -> str:
        mean, half = Cell.summary(values)
        return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"

    base = {c.infer: c for c in cells if c.train == baseline}
    lines = [
        f"| train | inference | pass@1 (95% CI) | pass@8 (95% CI) | lift pass@1 | vs {baseline} training (pass@1) |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        versus = ""
        if c.train != baseline and c.infer in base:
            diff, se, verdict = compare(c.pass1, base[c.infer].pass1)
            versus = f"{verdict} ({diff:+.3f} ± {se:.3f})"
        lift = statistics.fmean(c.lift)
        lines.append(f"| {c.train} | {c.infer} | {fmt(c.pass1)} | {fmt(c.pass8)} | {lift:+.3f} | {versus} |")
    return "\n".join(lines)
