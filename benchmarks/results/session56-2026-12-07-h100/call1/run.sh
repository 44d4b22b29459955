#!/bin/bash
# session 55 device call 3, on main with session 53's STORE_LAG release undone (4ed5d08; call 2: lagend.py times as
# base.py does). Made first, at the repo root: python benchmarks/results/session55-2026-12-07-h100/call3/variants.py
# and python benchmarks/results/session53-2026-12-07-h100/call1/variants.py (its norebuild.py: X_i's loop over j run
# once, 1307 -> 1088 instructions a tile on the row, outputs wrong, timing only: what mixing with 2 FMAs an element a stream,
# X_i = h_post_i y + (sum_j h_res[i, j]) row, could save at most; it stops with an error after writing norebuild.py)
# 1. The chain head's step check (--head) against lag2.py (the row's slot freed two tiles late: its four slots
#    leave the loader one; the dense pass's three keep a lag of one), at 32768 x 4096 and 8192 x 7168.
# 2. The kernel table's step rows on this build (the fused path's backward kernels).
# 3. d = 7168 training overhead, fused (fuse=True) against the plain residual model (session 51: +8.2 %).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s
timeout 220 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against lag2.py norebuild.py --shapes 32768x4096 8192x7168 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|--against" $OUT/s.txt | tail -8; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
OUT=$OUT/k timeout 100 python benchmarks/bench_kernels.py --tokens 32768 --channels 4096 --cases "step (head, row)" step --budget-s 1 --compiled-shapes > $OUT/k.txt 2>&1; echo "kernels rc=$?" >> $OUT/k.txt
grep -E "^\| step|FAIL|copy bandwidth|rc=" $OUT/k.txt
OUT=$OUT/train timeout 250 python benchmarks/bench_training.py --d 7168 --rounds 6 --variants fused --budget-s 220 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt
tail -30 $OUT/train.txt
