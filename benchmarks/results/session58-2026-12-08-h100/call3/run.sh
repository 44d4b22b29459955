#!/bin/bash
# session 58 device call 3 (prepared, not run; about 340 s of commands).
# 1. The d = 7168 step: residual, backend=mhc, fuse=True; 4 interleaved rounds, then 16 paired passes with one
#    untimed lead-in step a variant (session 57's passes without it put the residual step after an mHC step at a
#    lower clock, and every overhead a point under the rounds'): whether the lead-in brings them level.
# 2. profile_step.py at d = 7168 with fuse=True beside the default: why fuse=True, about 10 % fewer bytes a site by
#    cost.traffic, times within the rounds' spread of the default (every mHC kernel's in-step time).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
OUT=$OUT/train timeout 200 python benchmarks/bench_training.py --d 7168 --rounds 4 --paired 16 --lead-in 1 --variants fused --budget-s 170 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
grep -E "^\| 7168|rc=|rror" $OUT/train.txt
OUT=$OUT/prof timeout 140 python benchmarks/profile_step.py 7168 --fused > $OUT/prof.txt 2>&1; echo "prof rc=$?" >> $OUT/prof.txt
tail -60 $OUT/prof.txt
