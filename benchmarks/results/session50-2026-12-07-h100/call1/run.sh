#!/bin/bash
# session 50 device call 1 (untracked; deleted before commit)
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt 2>&1
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt
cat $OUT/gpu.txt
timeout 90 python benchmarks/chain_check.py --shapes 8192x7168 8192x4096 > $OUT/chain.txt 2>&1; echo "chain rc=$?" >> $OUT/chain.txt
tail -14 $OUT/chain.txt
mkdir -p $OUT/g
timeout 80 python benchmarks/gluon_check.py --out $OUT/g --shapes 8192x4096 --configs ws > $OUT/gluon.txt 2>&1; echo "gluon rc=$?" >> $OUT/gluon.txt
grep -E "bcast|FAIL|failed|rc=" $OUT/gluon.txt | tail -14; tail -4 $OUT/gluon.txt
mkdir -p $OUT/s
timeout 80 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --no-times > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "broadcast|FAIL|rc=" $OUT/s.txt | tail -8
mkdir -p $OUT/train
OUT=$OUT/train timeout 330 python benchmarks/bench_training.py --d 7168 --rounds 6 --variants opt:fold_recompute_chain=1 fused fusedbcast --budget-s 300 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
tail -25 $OUT/train.txt
