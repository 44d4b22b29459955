#!/bin/bash
# session 54 device call 1. Made first, at the repo root (untracked files the call carries):
#   python benchmarks/results/session53-2026-12-07-h100/call1/variants.py
# Ordered by what a timeout may cut:
# 1. The boundary's check and times (boundary_grads, the default path's backward kernel) against base.py (96dec17:
#    before session 53's split loop over j, 12 -> 8 barriers a tile) and dxg.py (dX_prev_j over dX_j's tile, one
#    allocation a stream: 8 -> 4), each checked against this build.
# 2. The chain head's step check (--head) against base.py and this build with StepBwdCfg.x_dphi (check() also holds
#    x_dphi bit-equal to the mixer's mixing), at 32768 x 4096. (Cut to fit what device time was left after four
#    failed starts and a machine taken back mid-call: unrollb.py, lagend.py and 8192 x 7168 dropped.)
# 3. The kernel table's step rows, x_dphi off, then on.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/b $OUT/s $OUT/k $OUT/kx
timeout 170 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --out $OUT/b --against base.py dxg.py --shapes 32768x4096 8192x7168 > $OUT/b.txt 2>&1; echo "boundary rc=$?" >> $OUT/b.txt
grep -E "FAIL|rc=|rror|--against" $OUT/b.txt | tail -12; grep -E "^\| [0-9]+x[0-9]+ \| [0-9] \|" $OUT/b.txt
timeout 170 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against base.py mhc_compile/kernels/gluon_step_bwd.py --against-tune "" x_dphi=true --shapes 32768x4096 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|dphi warpgroup|--against" $OUT/s.txt | tail -12; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
for mode in off on; do
  flag=$([ $mode = on ] && echo True || echo False); dir=$([ $mode = on ] && echo kx || echo k)
  OUT=$OUT/$dir timeout 70 python -c "
import runpy, sys; sys.path.insert(0, '.')
from mhc_compile.kernels import triton_fused as tf; tf.configure('step_bwd', x_dphi=$flag)
sys.argv = ['bench_kernels.py', '--tokens', '32768', '--channels', '4096', '--cases', 'step (head, row)', '--budget-s', '1', '--compiled-shapes']
runpy.run_path('benchmarks/bench_kernels.py', run_name='__main__')" > $OUT/$dir.txt 2>&1; echo "kernels x_dphi $mode rc=$?" >> $OUT/$dir.txt
  grep -E "^\| step|FAIL|copy bandwidth|rc=" $OUT/$dir.txt
done
