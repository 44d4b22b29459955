#!/bin/bash
# session 57 device call 1. First, at the repo root:
#   python benchmarks/results/session53-2026-12-07-h100/call1/variants.py   (writes nodh.py, nodphi.py, norebuild.py;
#   stops with a ValueError at a transform that no longer applies: expected)
# 1. The d = 7168 training step: residual, backend=mhc, backend=mhc with the two opt-in forward / recompute folds
#    (fold_post_res_proj, fold_recompute_chain: each within noise alone, sessions 47-56) and fuse=True; 2 interleaved
#    rounds, then 40 paired passes (bench_training --paired: one step of every variant back to back, so the clock's
#    drift over seconds cancels).
# 2. session 56's prepared call 5: the chain head's step backward against nodh / nodphi / norebuild / dh planes, and
#    the boundary at 8192 x 7168 with its walks forced to 16 and 8 tiles.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
OUT=$OUT/train timeout 200 python benchmarks/bench_training.py --d 7168 --rounds 2 --paired 40 --variants fused opt:fold_post_res_proj=1,fold_recompute_chain=1 --budget-s 160 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
grep -E "^\| 7168|rc=|rror" $OUT/train.txt
bash benchmarks/results/session56-2026-12-07-h100/call5/run.sh
