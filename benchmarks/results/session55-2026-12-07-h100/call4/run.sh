#!/bin/bash
# session 55 device call 4: call 3 cut to what 547 s of device time allows after five failed starts.
# Made first, at the repo root: python benchmarks/results/session55-2026-12-07-h100/call3/variants.py
# and python benchmarks/results/session53-2026-12-07-h100/call1/variants.py (its norebuild.py: X_i's loop over j run
# once, 1307 -> 1088 instructions a tile on the row, outputs wrong, timing only: what mixing with 2 FMAs an element a stream,
# X_i = h_post_i y + (sum_j h_res[i, j]) row, could save at most; it stops with an error after writing norebuild.py)
# 1. The chain head's step check (--head) against lag2.py at 32768 x 4096 (every check shape for bit-equality).
# 2. The kernel table's step (head, row) row on this build.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s
timeout 190 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against lag2.py norebuild.py --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|--against" $OUT/s.txt | tail -8; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
OUT=$OUT/k timeout 80 python benchmarks/bench_kernels.py --tokens 32768 --channels 4096 --cases "step (head, row)" --budget-s 1 --compiled-shapes > $OUT/k.txt 2>&1; echo "kernels rc=$?" >> $OUT/k.txt
grep -E "^\| step|FAIL|copy bandwidth|rc=" $OUT/k.txt
