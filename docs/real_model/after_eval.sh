#!/bin/bash
# a trained policy's evaluation on the same 48 held-out word problems and seed as the base's: greedy modes n=1,
# sampled modes n=2 (the base's sampled modes used n=4; per-problem pass@1 estimates pair all the same)
cd /work/main; . .venv/bin/activate
RUN="$1"; shift
for mode in hard_greedy soft_greedy hard_sample soft_sample; do
  n=2; case $mode in *greedy) n=1;; esac
  OMP_NUM_THREADS=${THREADS:-1} python scripts/evaluate.py model.path=$RUN/final data=word_problems data.limit=48 infer=$mode n=$n batch_size=48 trace_problems=2 output_dir=$RUN/eval/$mode "$@"
done
