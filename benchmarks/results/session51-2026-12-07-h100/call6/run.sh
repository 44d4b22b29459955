#!/bin/bash
# session 51 device call 6 (run from the repo root; one command)
export PYTHONPATH=. PYTHONUNBUFFERED=1; nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader; for r in "step (head, row)" "step (head)" "step"; do timeout 60 python benchmarks/ncu_case.py "$r" bwd --split --launches 5 2>&1 | grep "^|" | tee -a $OUT/split.md; echo >> $OUT/split.md; done
