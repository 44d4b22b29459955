#!/bin/bash
# session 56 device call 2: the d = 7168 training step, and where its mHC time goes.
# 1. 10 interleaved rounds: plain residual, backend=mhc, backend=mhc with fold_recompute_chain (session 50: bit-equal
#    on the GPU, 87-443 us saved a run, the step within noise in two runs), and without recompute (what recompute costs).
# 2. profile_step.py at d = 7168: every mHC kernel's in-step time and bandwidth, default and with the chain.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
OUT=$OUT/train timeout 330 python benchmarks/bench_training.py --d 7168 --rounds 10 --variants opt:fold_recompute_chain=1 norecompute --budget-s 300 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
grep -E "^\| 7168|rc=|rror" $OUT/train.txt
OUT=$OUT/prof timeout 170 python benchmarks/profile_step.py 7168 --opt fold_recompute_chain=1 > $OUT/prof.txt 2>&1; echo "prof rc=$?" >> $OUT/prof.txt
tail -60 $OUT/prof.txt
