#!/bin/bash
# base-model evaluation of the four paper inference modes on 48 held-out word problems
cd /work/main; . .venv/bin/activate
MODEL="$1"; OUT="$2"; shift 2
for mode in hard_greedy soft_greedy hard_sample soft_sample; do
  n=4; case $mode in *greedy) n=1;; esac
  OMP_NUM_THREADS=1 python scripts/evaluate.py $MODEL data=word_problems data.limit=48 infer=$mode n=$n batch_size=48 trace_problems=2 output_dir=$OUT/$mode "$@"
done
