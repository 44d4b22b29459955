#!/bin/bash
# session 57 device call 3: call 2's first part alone (the device time left after failed starts: 302 s). First, at the
# repo root, copy earlysplit.patch's module to earlysplit.py (untracked), as call 2's run.sh says.
# The chain head's step backward (--head, 32768 x 4096) against earlysplit.py: the dphi warpgroup splits dp into its
# hi / lo rows once the slot lands instead of after the mixer's X_i (same operations: bit-equal expected).
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s
timeout 150 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against earlysplit.py --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|against" $OUT/s.txt | tail -8; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
