#!/bin/bash
# session 57 device call 2: where the d = 7168 step's mHC time goes under fuse=True and under the two opt-in folds,
# beside the default: every mHC kernel's in-step time and bandwidth (profile_step.py), for the paired overheads of
# call 1.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
OUT=$OUT/prof timeout 300 python benchmarks/profile_step.py 7168 --fused --opt fold_post_res_proj=1,fold_recompute_chain=1 > $OUT/prof.txt 2>&1; echo "prof rc=$?" >> $OUT/prof.txt
tail -90 $OUT/prof.txt
