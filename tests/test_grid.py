"""rl/grid.py: the paper grid's table from run summaries, every number derived here by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rl.grid import markdown, read_cells

# pass@1 after training per (train mode, seed) in the one inference mode, and the paired lift
RUNS = {
    ("hard", 0): (0.20, 0.60, 0.01),
    ("hard", 1): (0.22, 0.62, 0.03),
    ("hard", 2): (0.24, 0.64, 0.05),
    ("multiplex", 0): (0.30, 0.70, 0.10),
    ("multiplex", 1): (0.32, 0.71, 0.12),
    ("multiplex", 2): (0.34, 0.72, 0.14),
    ("soft", 0): (0.21, 0.50, 0.00),
    ("soft", 1): (0.25, 0.55, 0.02),
    ("soft", 2): (0.20, 0.60, -0.01),
}


def write_runs(root: Path) -> None:
    for (train, seed), (p1, p8, lift) in RUNS.items():
        run = root / f"{train}_s{seed}"
        run.mkdir(parents=True)
        block = {"pass@1": p1, "pass@8": p8, "lift_pass@1": {"mean": lift, "se": 0.01, "problems": 200}}
        (run / "summary.json").write_text(json.dumps({"eval_after": {"hard_sample": block}}))


def test_table_means_intervals_and_verdicts(tmp_path: Path) -> None:
    write_runs(tmp_path)
    cells = read_cells(tmp_path, ["hard", "multiplex", "soft"], ["hard_sample"], [0, 1, 2])
    assert [c.pass1 for c in cells][1] == [0.30, 0.32, 0.34]
    lines = markdown(cells).splitlines()
    # hard: mean 0.22, s = 0.02, half-width t(2) = 4.303 · 0.02 / √3 = 0.0497; pass@8 the same numbers + 0.40
    assert lines[2] == "| hard | hard_sample | 0.220 ± 0.050 | 0.620 ± 0.050 | +0.030 |  |"
    # multiplex - hard: 0.32 - 0.22 = 0.10, se = √(0.02²/3 + 0.02²/3) = 0.0163 -> better;
    # its pass@8 s = 0.01 -> 4.303 · 0.01 / √3 = 0.0248
    assert (
        lines[3]
        == "| multiplex | hard_sample | 0.320 ± 0.050 | 0.710 ± 0.025 | +0.120 | better (+0.100 ± 0.016) |"
    )
    # soft: mean 0.22, s = √((0.01² + 0.03² + 0.02²) / 2) = 0.0265; diff 0, se = √(0.0265²/3 + 0.02²/3) = 0.0191
    se = math.sqrt((0.0007 / 3) + (0.0004 / 3))
    assert (
        lines[4]
        == f"| soft | hard_sample | 0.220 ± 0.066 | 0.550 ± 0.124 | +0.003 | tie (+0.000 ± {se:.3f}) |"
    )


def test_a_missing_run_or_mode_is_named(tmp_path: Path) -> None:
    write_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="gumbel_s0"):
        read_cells(tmp_path, ["gumbel"], ["hard_sample"], [0])
    with pytest.raises(KeyError, match="soft_sample"):
        read_cells(tmp_path, ["hard"], ["soft_sample"], [0])
