#!/bin/bash
# session 52 device call 2: prepared, NOT run (no machine came, and then the session's device time ran out).
# What bounds the chain head's step backward on its broadcast row? Three timing-only copies of this build, made at
# the repo root by `python benchmarks/results/session52-2026-12-07-h100/call2/variants.py` (untracked):
#   norebuild.py  X's rebuild loop over j runs once (a quarter of its FMAs);
#   nodphi.py     the dphi warpgroup frees each slot at once (no wgmmas);
#   nodh.py       no dH partials leave the mixer.
# Then the kernel table's step rows with four slots. Run from the repo root.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s $OUT/k
timeout 150 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against norebuild.py nodphi.py nodh.py --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror" $OUT/s.txt | tail -4; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
OUT=$OUT/k timeout 100 python benchmarks/bench_kernels.py --tokens 32768 --channels 4096 --cases "step (head, row)" "step (head)" step --budget-s 1 --compiled-shapes > $OUT/k.txt 2>&1; echo "kernels rc=$?" >> $OUT/k.txt
grep -E "^\| step|FAIL|copy bandwidth|rc=" $OUT/k.txt
