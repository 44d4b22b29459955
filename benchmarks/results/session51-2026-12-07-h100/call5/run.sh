#!/bin/bash
# session 51 device call 5 (run from the repo root; one command)
export PYTHONPATH=. PYTHONUNBUFFERED=1; nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv; mkdir -p $OUT/k; OUT=$OUT/k timeout 200 python benchmarks/bench_kernels.py --tokens 32768 --channels 4096 --cases "step (head, row)" "step (head)" step --budget-s 1 --compiled-shapes > $OUT/k.txt 2>&1; echo "rc=$?"; grep -E "^\| step|FAIL|copy bandwidth" $OUT/k.txt
