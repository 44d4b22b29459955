#!/bin/bash
# session 56 device call 5 (prepared, not run). First, at the repo root:
#   python benchmarks/results/session53-2026-12-07-h100/call1/variants.py
# It writes norebuild.py, nodphi.py and nodh.py (timing-only copies of main's module, outputs wrong), then stops with
# a ValueError at its lagend transform: expected.
# 1. The chain head's step backward (--head) at 32768 x 4096 against three timing-only copies, each without one
#    suspect of the row's gap to 85 % (never timed so far: nodh, nodphi):
#    nodh: no dH partials leave the mixer (no atomic adds to L2: n + n of them a token a channel block on the row,
#    about 34 M a call at 32768 x 4096); nodphi: the dphi warpgroup's split and wgmmas gone; norebuild: the X
#    rebuild loop run once (session 56 call 1: 3.8 % faster, the reference point).
#    planes: main's module with dh_atomic off (each channel block's dH partials in a plane of its own, summed by
#    finish: about 8 KB a token more than the atomics), the way out if nodh shows the atomics cost.
# 2. The boundary at 8192 x 7168 (the d = 7168 training shape, 32-tile walks, 6.8 waves) with its walks forced to
#    16 and 8 tiles, the same module: if a walk costs F tiles' time besides its tiles, T16 / T32 = (32 + 2F) / (32 + F)
#    and T8 / T32 = (32 + 4F) / (32 + F); a persistent program would gain at most F / (32 + F) there.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s $OUT/b
cp mhc_compile/kernels/gluon_step_bwd.py planes.py
timeout 260 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against nodh.py nodphi.py norebuild.py planes.py --against-tune "" "" "" dh_atomic=false --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror" $OUT/s.txt | tail -4; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
cp mhc_compile/kernels/gluon_step_bwd.py walk16.py && cp mhc_compile/kernels/gluon_step_bwd.py walk8.py
timeout 200 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --out $OUT/b --against walk16.py walk8.py --against-tune walk_tiles=16,long_walk=16 walk_tiles=8,long_walk=8 --shapes 8192x7168 > $OUT/b.txt 2>&1; echo "boundary rc=$?" >> $OUT/b.txt
grep -E "FAIL|rc=|rror" $OUT/b.txt | tail -4; grep -E "^\| [0-9]+x[0-9]+ \|" $OUT/b.txt | tail -4
