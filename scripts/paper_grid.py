"""The paper's grid on the tiny task: every train mode × seed with the embedded default's recipe, each run evaluated
in every inference mode, gathered into a table of means and 95% intervals (`rl.grid`).

    python scripts/paper_grid.py --root runs/grid                  # 5 train modes × 3 seeds, 2 runs at a time
    python scripts/paper_grid.py --root runs/grid --report-only    # the table of finished runs

Runs are `python scripts/train.py cot=<mode> trainer.seed=<s> output_dir=<root>/<mode>_s<s>` with one thread each,
`--jobs` at a time (a run already finished is resumed, i.e. skipped, by train.py itself). The table is printed and
written to `<root>/grid.md`; each run's log is `<root>/<mode>_s<s>.log`. The remaining arguments are Hydra
overrides applied to every run.
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import _bootstrap  # noqa: F401

from rl.config import INFER_MODES
from rl.grid import markdown, read_cells, run_dir

TRAIN_MODES = ("hard", "soft", "fuzzy", "multiplex", "gumbel")
INFER = ("hard_greedy", "hard_sample", "soft_sample", "fuzzy_sample", "multiplex_sample", "gumbel_sample")


def launch(
    root: Path, train: str, seed: int, infers: list[str], overrides: list[str]
) -> tuple[str, int, float]:
    """One training run as a subprocess (one thread); (its name, return code, seconds)."""
    name = run_dir(root, train, seed).name
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("train.py")),
        f"cot={train}",
        f"trainer.seed={seed}",
        f"output_dir={run_dir(root, train, seed)}",
        f"trainer.eval_modes=[{','.join(infers)}]",
        f"trainer.eval_primary={train}_sample",
        *overrides,
    ]
    start = time.time()
    with open(root / f"{name}.log", "w") as log:
        rc = subprocess.run(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        ).returncode
    return name, rc, time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="where the runs, their logs and grid.md go")
    ap.add_argument("--train", nargs="+", default=list(TRAIN_MODES), choices=TRAIN_MODES)
    ap.add_argument("--infer", nargs="+", default=list(INFER), choices=INFER_MODES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    ap.add_argument("--report-only", action="store_true", help="only gather the finished runs into the table")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = ap.parse_intermixed_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        jobs = [(t, s) for s in args.seeds for t in args.train]
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(launch, root, t, s, args.infer, args.overrides) for t, s in jobs]
            for k, fut in enumerate(futures, 1):
                name, rc, seconds = fut.result()
                state = "done" if rc == 0 else f"FAILED (exit {rc}, see {root / name}.log)"
                print(f"[{k}/{len(jobs)}] {name}: {state} in {seconds:.0f} s", flush=True)
                if rc != 0:
                    raise SystemExit(f"run {name} failed: {root / name}.log")
    table = markdown(read_cells(root, args.train, args.infer, args.seeds))
    (root / "grid.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
