#!/bin/bash
# session 49 device call 2 (untracked; deleted before commit): the chain head's step backward paced
export PYTHONPATH=.
mkdir -p $OUT/s
timeout 400 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against mhc_compile/kernels/gluon_step_bwd.py --against-tune "pace=3" --shapes 32768x4096 16384x4096 8192x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
tail -40 $OUT/s.txt
