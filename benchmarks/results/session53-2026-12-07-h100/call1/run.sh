#!/bin/bash
# session 53 device call 1. The timing-only variants below were dropped from it, as device time ran short; they are
# made at the repo root by `python benchmarks/results/session53-2026-12-07-h100/call1/variants.py` (untracked
# copies of kernels/gluon_step_bwd.py, as session 52's call 2 planned them) and run as --against builds:
#   norebuild.py  X's mixing loop over j runs once (a quarter of its FMAs);
#   nodphi.py     the dphi warpgroup frees each slot at once (no wgmmas; made, not run: device time);
#   nodh.py       no dH partials leave the mixer.
# Then this build with StepBwdCfg.x_dphi (X mixed by the dphi warpgroup, X_DPHI), checked bit-equal and timed;
# the kernel table's step rows with x_dphi on (the head check times it off and on, interleaved); Nsight Compute's stall samples of the row's Gluon kernel with x_dphi on.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s $OUT/k
timeout 240 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against mhc_compile/kernels/gluon_step_bwd.py --against-tune x_dphi=true --shapes 32768x4096 8192x7168 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|dphi warpgroup" $OUT/s.txt | tail -6; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
mkdir -p $OUT/kx; OUT=$OUT/kx timeout 100 python -c "
import runpy, sys; sys.path.insert(0, '.')
from mhc_compile.kernels import triton_fused as tf; tf.configure('step_bwd', x_dphi=True)
sys.argv = ['bench_kernels.py', '--tokens', '32768', '--channels', '4096', '--cases', 'step (head, row)', 'step', '--budget-s', '1', '--compiled-shapes']
runpy.run_path('benchmarks/bench_kernels.py', run_name='__main__')" > $OUT/kx.txt 2>&1; echo "kernels x_dphi rc=$?" >> $OUT/kx.txt
grep -E "^\| step|FAIL|copy bandwidth|rc=" $OUT/kx.txt
for mode in on; do  # off: the variants above say what bounds it (device time is short this session)
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
