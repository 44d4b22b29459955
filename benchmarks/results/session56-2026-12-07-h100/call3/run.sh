#!/bin/bash
# session 56 device call 3: the d = 4096 training step beside every baseline of the issue (last run: session 47 for
# backend=mhc, session 37 for LigerMHC), 4 interleaved rounds. liger-kernel 0.8.5 from the carried wheel (.whl/).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -m pip install --no-deps -q .whl/liger_kernel-*.whl >> $OUT/gpu.txt 2>&1
python -c "import torch,triton,liger_kernel;from importlib.metadata import version;print(torch.__version__,triton.__version__,'liger',version('liger-kernel'))" >> $OUT/gpu.txt 2>&1; cat $OUT/gpu.txt
OUT=$OUT/train timeout 430 python benchmarks/bench_training.py --d 4096 --rounds 4 --variants naive liger --budget-s 400 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
grep -E "^\| 4096|rc=|rror" $OUT/train.txt
