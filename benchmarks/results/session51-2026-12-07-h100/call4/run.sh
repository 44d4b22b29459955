#!/bin/bash
# session 51 device call 4 (run from the repo root)
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt 2>&1
mkdir -p $OUT/s $OUT/train
timeout 200 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --against mhc_compile/kernels/gluon_step_bwd.py --against-tune store_lag=0 --shapes 32768x4096 8192x7168 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror" $OUT/s.txt | tail -5; grep -E "^\| [0-9]+x[0-9]+ \| [0-9] \|" $OUT/s.txt
OUT=$OUT/train timeout 270 python benchmarks/bench_training.py --d 7168 --rounds 6 --variants fused --budget-s 240 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
tail -22 $OUT/train.txt
