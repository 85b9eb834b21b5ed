#!/usr/bin/env bash
# The device check of the static engine (issue 14), prepared to run as ONE call on a lent H100 / H200 within about
# 8 minutes (the `device` tool: `bash scripts/gpu_checks.sh`; it writes its figures under $OUT, at most 8 files).
# It assumes a CUDA torch and the project's dependencies are importable there (carry them as wheels, see the
# device tool's README), and the tiny base in .cache/tiny_base (carry `.cache/tiny_base`).
#   1. the `gpu`-marked tests: the eager engine and the learner on CUDA (tests/test_gpu.py) and the static engine's
#      CUDA-graph path against the eager engine (tests/test_static_engine.py);
#   2. scripts/bench_rollout.py at Qwen2.5-0.5B, Qwen2.5-1.5B and Llama-3.2-3B shapes, random bf16 weights,
#      B = 64 and 256, prompt 128, 256 new tokens: tokens/s of eager / static / generate() per CoT mode,
#      compile seconds apart.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
timeout 180 python -m pytest -m gpu -q -s tests/test_gpu.py tests/test_static_engine.py 2>&1 | tee -a "$OUT/device.txt"
for preset in qwen2.5-0.5b qwen2.5-1.5b llama-3.2-3b; do
  for batch in 64 256; do
    timeout 50 python scripts/bench_rollout.py --preset "$preset" --device cuda --dtype bfloat16 --batch "$batch" \
      --prompt-len 128 --new-tokens 256 --repeats 2 --out "$OUT/bench_${preset}_b${batch}.json" >/dev/null 2>>"$OUT/device.txt" \
      || echo "bench $preset b$batch: exit $?" | tee -a "$OUT/device.txt"
  done
done
