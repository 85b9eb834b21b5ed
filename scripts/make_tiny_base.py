"""Build the tiny base model: `python scripts/make_tiny_base.py output_dir=DIR [seed=S] [sft.steps=N ...]`.

Builds in a child process pinned to one thread and AVX2 kernels (rl/tiny_base.py), so the weights are the same
on every machine. The last line printed is JSON with `heldout_accuracy` (greedy, synthetic test split) and
`params`.
"""

import json

import _bootstrap  # noqa: F401
import hydra

from rl.config import RECIPES_DIR, register_configs, to_object
from rl.tiny_base import TinyBaseConfig, build_pinned

register_configs()


@hydra.main(config_path=str(RECIPES_DIR), config_name="tiny_base", version_base="1.3")
def main(cfg) -> None:
    report = build_pinned(to_object(cfg, TinyBaseConfig))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
