#!/bin/bash
# session 58 device call 1 (prepared, not run: no device machine came in session 58; about 430 s of commands).
# First, at the repo root (main as of session 58):
#   python benchmarks/results/session58-2026-12-08-h100/call1/variants.py
#   (writes earlysplit, noatom, onesum, nosplit, nowgmma, vred, vredall, spread4, spread16, dbuf .py: copies of
#   kernels/gluon_step_bwd.py, untracked; delete them before committing). Their sm_90a builds (Triton 3.6) are
#   spill-free in the configurations each is timed in.
# 1. The chain head's step backward (--head, 32768 x 4096): the candidates (earlysplit: the dphi warpgroup's split
#    off the slot's path; vred, vredall, spread4: the dH partials' adds in L2, fewer or spread; vredall's dense
#    rows are the dense pass's) and noatom (timing only: plain stores instead of adds in L2, the same lane sums).
# 2. The boundary (the default path's kernel; 8192 x 7168 is the d = 7168 training shape) against spread4, vredall
#    and noatom, which apply to it too.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s $OUT/b
timeout 260 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against earlysplit.py vred.py vredall.py spread4.py noatom.py --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|against" $OUT/s.txt | tail -16; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
timeout 170 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --out $OUT/b --against spread4.py vredall.py noatom.py --shapes 8192x7168 32768x4096 > $OUT/b.txt 2>&1; echo "boundary rc=$?" >> $OUT/b.txt
grep -E "FAIL|rc=|rror" $OUT/b.txt | tail -4; grep -E "^\| [0-9]+x[0-9]+ \|" $OUT/b.txt | tail -8
