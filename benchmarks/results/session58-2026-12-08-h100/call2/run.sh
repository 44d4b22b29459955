#!/bin/bash
# session 58 device call 2 (prepared, not run; about 500 s of commands). First, as call 1: variants.py at the root.
# 1. The chain head's step backward against onesum (timing only: a quarter of the dH lane sums' FMAs), nosplit and
#    nowgmma (timing only: session 57's dphi cost split into the dp split and the wgmmas) and spread16.
# 2. fuse=True's step backward at every other site (a dense X_prev, not collapsed) against vredall, whose dense rows
#    take 16 more instructions a tile there (its selects) for three fewer reductions a row; its column (dH added
#    in L2, --against-tune) against this build's "dH in L2" column.
# 3. The d = 7168 step: residual, backend=mhc, fuse=True; 4 interleaved rounds, then 16 paired passes with one
#    untimed lead-in step a variant (session 57's passes without it put the residual step after an mHC step at a
#    lower clock, and every overhead a point under the rounds'): whether the lead-in brings them level.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s
timeout 200 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against onesum.py nosplit.py nowgmma.py spread16.py --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|against" $OUT/s.txt | tail -5; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
mkdir -p $OUT/f
timeout 90 python benchmarks/gluon_step_bwd_check.py --out $OUT/f --against vredall.py --against-tune dh_atomic=true --shapes 32768x4096 > $OUT/f.txt 2>&1; echo "fused step rc=$?" >> $OUT/f.txt
grep -E "FAIL|rc=|rror|against" $OUT/f.txt | tail -3; grep -E "^\| [0-9]+x[0-9]+ \|" $OUT/f.txt | tail -4
OUT=$OUT/train timeout 200 python benchmarks/bench_training.py --d 7168 --rounds 4 --paired 16 --lead-in 1 --variants fused --budget-s 170 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
grep -E "^\| 7168|rc=|rror" $OUT/train.txt
