#!/bin/bash
# session 51 device call 2 (run from the repo root; against_s50.py: session 50's kernels/gluon_step_bwd.py)
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt 2>&1
cat $OUT/gpu.txt
mkdir -p $OUT/s
timeout 300 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against against_s50.py --shapes 32768x4096 8192x7168 32768x7168 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "broadcast|FAIL|rc=|error" $OUT/s.txt | tail -12
grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
