#!/bin/bash
# session 52 device call 1 (run from the repo root). s51.py: session 51's gluon_step_bwd.py (git show
# 6c0a8b5:mhc_compile/kernels/gluon_step_bwd.py); four.py: this build with its ring capped at four slots
# (sed 's/st = stages or 3/st = stages or 4/'), which only the broadcast X_prev's call fits.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s $OUT/k
timeout 220 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against s51.py four.py --shapes 32768x4096 8192x7168 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|broadcast" $OUT/s.txt | tail -8; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
OUT=$OUT/k timeout 120 python benchmarks/bench_kernels.py --tokens 32768 --channels 4096 --cases "step (head, row)" "step (head)" step --budget-s 1 --compiled-shapes > $OUT/k.txt 2>&1; echo "kernels rc=$?" >> $OUT/k.txt
grep -E "^\| step|FAIL|copy bandwidth|rc=" $OUT/k.txt
timeout 60 python benchmarks/ncu_case.py "step (head, row)" bwd --split --launches 5 2>&1 | grep -E "^\||rror" | tee $OUT/split.md
