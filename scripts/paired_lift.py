"""Paired lift between evaluations of the same problems: before (a base model) and after (each trained policy),
every inference mode present in both, from evaluate.py's output folders. Prints a markdown table (pass@1 before
and after, the paired lift with its standard error over problems, and lift / SE) and writes it as JSON too.

    python scripts/paired_lift.py --before out/base --after out/hard out/soft --modes hard_greedy soft_sample \
        --json docs/real_model/lifts.json --entropy hard_sample --entropy-plot docs/real_model/entropy.png

Each folder holds one evaluation per mode, `<folder>/<mode>/samples.jsonl` (evaluate.py's `output_dir`).
Problems are paired by `uid`; a folder whose problems differ from the base's is an error naming both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _bootstrap  # noqa: F401

from rewards import paired_lift, pass_at_k_per_problem
from rl.evaluation import plot_entropy_by_position


def per_problem_pass1(path: Path) -> dict[str, float | None]:
    """{uid: pass@1 of its samples} from an evaluate.py samples.jsonl."""
    if not path.is_file():
        raise SystemExit(
            f"{path} does not exist: expected an evaluate.py output_dir per mode, <folder>/<mode>/"
        )
    out = {}
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                out[row["uid"]] = pass_at_k_per_problem([s["reward"] for s in row["samples"]], 1)
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: line {line_no}: not an evaluate.py row ({err})") from None
    return out


def lifts(before: Path, afters: list[Path], modes: list[str]) -> list[dict]:
    rows = []
    for mode in modes:
        base = per_problem_pass1(before / mode / "samples.jsonl")
        for after in afters:
            trained = per_problem_pass1(after / mode / "samples.jsonl")
            if set(base) != set(trained):
                raise ValueError(
                    f"{before / mode} and {after / mode} evaluated different problems "
                    f"({len(base)} vs {len(trained)}, {len(set(base) ^ set(trained))} not in both)"
                )
            uids = sorted(base)
            b, a = [base[u] for u in uids], [trained[u] for u in uids]
            lift = paired_lift(b, a)
            judged = [(x, y) for x, y in zip(b, a, strict=True) if x is not None and y is not None]
            rows.append(
                {
                    "mode": mode,
                    "after": str(after),
                    "problems": lift.problems,
                    "pass@1_before": sum(x for x, _ in judged) / len(judged),
                    "pass@1_after": sum(y for _, y in judged) / len(judged),
                    "lift": lift.mean,
                    "se": lift.se,
                }
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | mode | problems | pass@1 before → after | lift ± SE | lift / SE |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["lift"] / r["se"] if r["se"] and r["se"] == r["se"] else float("nan")
        lines.append(
            f"| {r['after']} | {r['mode']} | {r['problems']} | {r['pass@1_before']:.3f} → {r['pass@1_after']:.3f} "
            f"| {r['lift']:+.3f} ± {r['se']:.3f} | {ratio:+.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, nargs="+", required=True)
    ap.add_argument("--modes", nargs="+", required=True)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--entropy", help="a mode whose CoT entropy profiles (summary.json) to plot, base and after"
    )
    ap.add_argument("--entropy-plot", type=Path, help="where the profile plot goes (with --entropy)")
    args = ap.parse_args()
    if bool(args.entropy) != bool(args.entropy_plot):
        ap.error("--entropy and --entropy-plot go together")
    rows = lifts(args.before, args.after, args.modes)
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if args.entropy:
        curves, counts = {}, {}
        for folder in [args.before, *args.after]:
            summary = json.loads((folder / args.entropy / "summary.json").read_text())
            curves[str(folder)] = summary["cot_entropy_by_position"]
            counts[str(folder)] = summary["samples_at_position"]
        args.entropy_plot.parent.mkdir(parents=True, exist_ok=True)
        plot_entropy_by_position(
            curves, args.entropy_plot, counts=counts, title=f"CoT entropy, {args.entropy}"
        )


if __name__ == "__main__":
    main()
