#!/bin/bash
# session 58 device call 2 (prepared, not run; about 500 s of commands). First, as call 1: variants.py at the root.
# 1. dbuf (the dphi warpgroup splits the next tile's dp while this tile's wgmmas run) alone, on the chain head's
#    step backward and on the boundary at 8192 x 7168: a new wait order, so a hang there costs only its timeout.
# 2. The chain head's step backward against onesum (timing only: a quarter of the dH lane sums' FMAs), nosplit and
#    nowgmma (timing only: session 57's dphi cost split into the dp split and the wgmmas) and spread16.
# 3. fuse=True's step backward at every other site (a dense X_prev, not collapsed) against vredall, whose dense rows
#    take 16 more instructions a tile there (its selects) for three fewer reductions a row; its column (dH added
#    in L2, --against-tune) against this build's "dH in L2" column.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s
mkdir -p $OUT/d $OUT/db
timeout 100 python benchmarks/gluon_step_bwd_check.py --out $OUT/d --head --against dbuf.py --shapes 32768x4096 > $OUT/d.txt 2>&1; echo "dbuf step rc=$?" >> $OUT/d.txt
grep -E "FAIL|rc=|rror|against" $OUT/d.txt | tail -4; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/d.txt
timeout 90 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --out $OUT/db --against dbuf.py --shapes 8192x7168 > $OUT/db.txt 2>&1; echo "dbuf boundary rc=$?" >> $OUT/db.txt
grep -E "FAIL|rc=|rror" $OUT/db.txt | tail -4; grep -E "^\| [0-9]+x[0-9]+ \|" $OUT/db.txt | tail -4
timeout 200 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against onesum.py nosplit.py nowgmma.py spread16.py --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|against" $OUT/s.txt | tail -5; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
mkdir -p $OUT/f
timeout 90 python benchmarks/gluon_step_bwd_check.py --out $OUT/f --against vredall.py --against-tune dh_atomic=true --shapes 32768x4096 > $OUT/f.txt 2>&1; echo "fused step rc=$?" >> $OUT/f.txt
grep -E "FAIL|rc=|rror|against" $OUT/f.txt | tail -3; grep -E "^\| [0-9]+x[0-9]+ \|" $OUT/f.txt | tail -4
