#!/bin/bash
# session 55 device call 2. Call 1 (session 54's call1/run.sh) found this build's chain-head step 6.5 % slower than
# base.py (96dec17, before session 53) on the dense pass and 1.4 % on the row. Which of session 53's changes did it:
# lagend.py is this build with the slot freed as through session 52 (session 53's STORE_LAG move undone).
# Made first, at the repo root: python benchmarks/results/session53-2026-12-07-h100/call1/variants.py
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s
timeout 280 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against lagend.py base.py lagend.py --against-tune "" "" x_dphi=true --shapes 32768x4096 8192x7168 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|--against" $OUT/s.txt | grep -v bit-equal | tail -12; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
grep -E "^\| T x C" $OUT/s.txt | head -2
