#!/bin/bash
# session 57 device call 2. First, at the repo root:
#   git apply --3way benchmarks/results/session57-2026-12-07-h100/earlysplit.patch (in a copy) and copy its
#   mhc_compile/kernels/gluon_step_bwd.py to earlysplit.py (untracked).
# 2. The d = 7168 step: residual and backend=mhc; 3 interleaved rounds, then 10 paired passes with one untimed
#    lead-in step a variant (call 1's passes without it put the residual step after an mHC step at a lower clock).
# 1. The chain head's step backward (--head, 32768 x 4096) against earlysplit.py: the dphi warpgroup splits dp into its
#    hi / lo rows once the slot lands instead of after the mixer's X_i (same operations: bit-equal expected). Call 1:
#    without the dphi work the row ran 9 % faster.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s
timeout 150 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against earlysplit.py --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|against" $OUT/s.txt | tail -8; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
OUT=$OUT/train timeout 110 python benchmarks/bench_training.py --d 7168 --rounds 3 --paired 10 --lead-in 1 --variants --budget-s 90 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
grep -E "^\| 7168|rc=|rror" $OUT/train.txt
