#!/bin/bash
# session 49 device call 1 (untracked; deleted before commit)
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv > $OUT/gpu.txt 2>&1
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt
timeout 90 python benchmarks/chain_check.py > $OUT/chain.txt 2>&1; echo "chain rc=$?" >> $OUT/chain.txt
tail -20 $OUT/chain.txt
mkdir -p $OUT/train
OUT=$OUT/train timeout 340 python benchmarks/bench_training.py --d 7168 --rounds 6 --variants opt:fold_recompute_chain=1 opt:fold_recompute_chain=1,fold_post_res_proj=1 gluonlaunch --budget-s 290 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
tail -30 $OUT/train.txt
timeout 120 python benchmarks/launch_check.py --quick --gluon > $OUT/launch.txt 2>&1; echo "launch rc=$?" >> $OUT/launch.txt
tail -25 $OUT/launch.txt
