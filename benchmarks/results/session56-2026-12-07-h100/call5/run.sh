#!/bin/bash
# session 56 device call 5: what a walk's fixed cost is in the boundary (boundary_grads) at 8192 x 7168, the d = 7168
# training shape, where it runs at 79-82 % against 87-88 % at 32768 x 4096. Its plan there: 4 token splits, 32-tile
# walks, 896 programs in 6.8 waves. The same module timed with walks forced to 16 and 8 tiles (1792 and 3584
# programs): if a walk costs F tiles' time besides its own, T16 / T32 = (32 + 2F) / (32 + F) and
# T8 / T32 = (32 + 4F) / (32 + F). A large F says a persistent program (units walked back to back, the ring kept
# full across them) would gain F / (32 + F).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
cp mhc_compile/kernels/gluon_step_bwd.py walk16.py && cp mhc_compile/kernels/gluon_step_bwd.py walk8.py
mkdir -p $OUT/b
timeout 230 python benchmarks/gluon_step_bwd_check.py --boundary --out $OUT/b --against walk16.py walk8.py --against-tune walk_tiles=16,long_walk=16 walk_tiles=8,long_walk=8 --shapes 8192x7168 --l2-only > $OUT/b.txt 2>&1; echo "boundary rc=$?" >> $OUT/b.txt
grep -E "FAIL|rc=|rror|--against" $OUT/b.txt | tail -8; grep -E "^\| [0-9]+x[0-9]+ \|" $OUT/b.txt | tail -8
