#!/bin/bash
# session 56 device call 4 (warm, right after call 3): d = 7168 beside LigerMHC (last: session 37), 3 rounds.
export PYTHONPATH=. PYTHONUNBUFFERED=1; python -m pip install --no-deps -q .whl/liger_kernel-*.whl; OUT=$OUT/train timeout 400 python benchmarks/bench_training.py --d 7168 --rounds 3 --variants liger --budget-s 370 > $OUT/train.txt 2>&1; echo "train rc=$?" >> $OUT/train.txt; grep -E "^\| 7168|rc=|rror" $OUT/train.txt
