"""Gather a Hydra multirun sweep into a table and a heatmap.

    python scripts/train.py -m cot.noise_scale=0.1,0.33,1.0 cot.temperature=0.25,0.5
    python scripts/sweep_report.py multirun --x cot.noise_scale --y cot.temperature [--metric after/pass@1]

Prints a markdown table (one row per run) and writes ROOT/sweep.md, ROOT/sweep.json and, when --x and --y
are given, ROOT/sweep_heatmap.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _bootstrap  # noqa: F401

from rl.sweep import find_runs, heatmap, markdown_table, read_run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="the multirun directory")
    parser.add_argument(
        "--metric", default="after/pass@1", help="metric for the heatmap (default after/pass@1)"
    )
    parser.add_argument("--mode", default=None, help="inference mode to report (default: each run's primary)")
    parser.add_argument("--x", default=None, help="swept key on the heatmap's x axis")
    parser.add_argument("--y", default=None, help="swept key on the heatmap's y axis")
    args = parser.parse_args()

    runs = [read_run(p, args.mode) for p in find_runs(args.root)]
    if not runs:
        raise SystemExit(f"no Hydra runs under {args.root}")
    metric_keys = sorted({k for r in runs for k in r.metrics}, key=lambda k: (k.split("/")[0] != "before", k))
    table = markdown_table(runs, metric_keys)
    print(table)
    (args.root / "sweep.md").write_text(table + "\n")
    rows = [
        {"path": str(r.path), "overrides": r.overrides, "metrics": r.metrics, "status": r.status}
        for r in runs
    ]
    (args.root / "sweep.json").write_text(json.dumps(rows, indent=2))
    if args.x and args.y:
        heatmap(runs, args.x, args.y, args.metric, args.root / "sweep_heatmap.png")
        print(f"heatmap: {args.root / 'sweep_heatmap.png'}")


if __name__ == "__main__":
    main()
