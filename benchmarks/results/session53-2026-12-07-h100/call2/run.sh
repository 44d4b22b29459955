#!/bin/bash
# session 53 device call 2: prepared, NOT run. About 300 s. After call1/variants.py (base.py at the repo root).
# 1. The boundary's check and times (the default path's backward kernel, boundary_grads) against base.py: what the
#    split loop over j (12 -> 8 barriers a tile) does to it; and against unrollb.py (session 54: the dX_prev loop
#    unrolled, 8 -> 7 barriers a tile, more code) and dxg.py (session 54: dX_prev_j over dX_j's tile,
#    8 -> 4 barriers a tile).
# 2. Nsight Compute's stall samples of the chain head's call on its row, x_dphi on, then off.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
mkdir -p $OUT/b
timeout 200 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --out $OUT/b --against base.py unrollb.py dxg.py --shapes 32768x4096 8192x7168 > $OUT/b.txt 2>&1; echo "boundary rc=$?" >> $OUT/b.txt
grep -E "FAIL|rc=|rror" $OUT/b.txt | tail -5; grep -E "^\| [0-9]+x[0-9]+ \| [0-9] \|" $OUT/b.txt
for mode in on off; do
  flag=$([ $mode = on ] && echo True || echo False)
  timeout 100 ncu --clock-control none --set full --import-source yes -k regex:_step_bwd_ws --launch-skip 2 --launch-count 1 -o $OUT/prof_$mode python -c "
import runpy, sys; sys.path.insert(0, '.')
from mhc_compile.kernels import triton_fused as tf; tf.configure('step_bwd', x_dphi=$flag)
sys.argv = ['ncu_case.py', 'step (head, row)', 'bwd']; runpy.run_path('benchmarks/ncu_case.py', run_name='__main__')" > $OUT/ncu_$mode.txt 2>&1; echo "ncu rc=$?" >> $OUT/ncu_$mode.txt
  tail -1 $OUT/ncu_$mode.txt
  ncu -i $OUT/prof_$mode.ncu-rep --page source --csv --print-source sass > $OUT/prof_$mode.csv 2>/dev/null
  ncu -i $OUT/prof_$mode.ncu-rep --page details --csv > $OUT/details_$mode.csv 2>/dev/null
  python benchmarks/ncu_stalls.py $OUT/prof_$mode.csv --top 24 > $OUT/stalls_$mode.txt 2>&1; head -30 $OUT/stalls_$mode.txt
  grep -E '"Duration"|"SM Frequency"|"Memory Throughput"|"Issue Slots Busy"' $OUT/details_$mode.csv | head -6
  gzip -f $OUT/prof_$mode.csv; rm -f $OUT/prof_$mode.ncu-rep
done
