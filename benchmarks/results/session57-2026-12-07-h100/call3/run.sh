#!/bin/bash
# session 57 device call 3 (prepared, not run: the session's device time ran out after failed starts; about 400 s of
# commands). First, at the repo root:
#   git worktree add /tmp/es HEAD && (cd /tmp/es && git apply <repo>/benchmarks/results/session57-2026-12-07-h100/earlysplit.patch)
#   cp /tmp/es/mhc_compile/kernels/gluon_step_bwd.py earlysplit.py   (untracked; delete it before committing)
# 1. The chain head's step backward (--head, 32768 x 4096) against earlysplit.py: the dphi warpgroup splits dp into its
#    hi / lo rows once the slot lands instead of after the mixer's X_i (the same operations: bit-equal expected; its
#    sm_90a builds are spill-free, as main's). Call 1: without the dphi work the row ran at 87 % of its floor against
#    79 %; this says whether the part of that after the mixer's `mixed` is the split's.
# 2. The d = 7168 step: residual, backend=mhc and fuse=True; 4 interleaved rounds, then 16 paired passes with one
#    untimed lead-in step a variant (call 1's passes without it put the residual step after an mHC step at a lower
#    clock, and every overhead a point under the rounds'): whether the lead-in brings them level.
# 3. profile_step.py at d = 7168 with fuse=True beside the default: why fuse=True, about 10 % fewer bytes a site by
#    cost.traffic (4 of 8 sites recomputed), times within the rounds' spread of the default (every mHC kernel's in-step
#    time and bandwidth).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s
timeout 150 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against earlysplit.py --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|against" $OUT/s.txt | tail -8; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
OUT=$OUT/train timeout 200 python benchmarks/bench_training.py --d 7168 --rounds 4 --paired 16 --lead-in 1 --variants fused --budget-s 170 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
grep -E "^\| 7168|rc=|rror" $OUT/train.txt
OUT=$OUT/prof timeout 150 python benchmarks/profile_step.py 7168 --fused > $OUT/prof.txt 2>&1; echo "prof rc=$?" >> $OUT/prof.txt
tail -60 $OUT/prof.txt
