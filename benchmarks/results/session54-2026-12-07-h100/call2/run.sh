#!/bin/bash
# session 54 device call 2: what 284 s of device time left allows after six failed starts (call 1 never ran).
# After call1/variants.py of session 53 (dxg.py at the repo root). The boundary's check (every check shape, dxg.py's
# outputs against this build's) and its times at 32768 x 4096, this build and dxg.py interleaved.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/b
timeout 140 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --out $OUT/b --against dxg.py --shapes 32768x4096 > $OUT/b.txt 2>&1; echo "boundary rc=$?" >> $OUT/b.txt
grep -E "FAIL|rc=|rror|--against" $OUT/b.txt | tail -12; grep -E "^\| [0-9]+x[0-9]+ \| [0-9] \|" $OUT/b.txt
