#!/bin/bash
# session 51 device call 1 (run from the repo root)
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt 2>&1
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt
cat $OUT/gpu.txt
mkdir -p $OUT/k
OUT=$OUT/k timeout 380 python benchmarks/bench_kernels.py --tokens 32768 --channels 4096 --budget-s 360 > $OUT/k.txt 2>&1; echo "kernels rc=$?" >> $OUT/k.txt
tail -5 $OUT/k.txt
mkdir -p $OUT/p
timeout 170 python benchmarks/gluon_proj_bwd_check.py --out $OUT/p --pace --shapes 32768x4096 --rounds 2 > $OUT/p.txt 2>&1; echo "pace rc=$?" >> $OUT/p.txt
tail -8 $OUT/p.txt
