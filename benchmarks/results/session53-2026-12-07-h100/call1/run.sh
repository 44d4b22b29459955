#!/bin/bash
# session 53 device call 1: prepared, NOT run (no machine came in eight tries, and then the session's device time
# ran out). About 450 s of run time. Made first, at the repo root (untracked files the call carries):
#   python benchmarks/results/session53-2026-12-07-h100/call1/variants.py
# which writes timing-only copies of kernels/gluon_step_bwd.py (norebuild / nodh as session 52's call 2 planned):
#   norebuild.py  X's mixing loop over j runs once (a quarter of its FMAs);
#   nodphi.py     the dphi warpgroup frees each slot at once (no wgmmas; made, not timed here);
#   nodh.py       no dH partials leave the mixer;
#   lagend.py     the tile before's slot freed once this tile's TMA stores are issued, as through session 52;
#   base.py       commit 96dec17's module: before this session's barrier work (the release moved, X_prev read in a
#                 loop of its own before dX_prev is written over it); bit-equal.
# 1. The step check (--head): this build, those four, and this build with StepBwdCfg.x_dphi (X mixed by the dphi
#    warpgroup, X_DPHI; check() also holds it bit-equal to the mixer's mixing), timed interleaved.
# 2. The kernel table's step rows, x_dphi off, then on.
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader > $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" >> $OUT/gpu.txt; cat $OUT/gpu.txt
mkdir -p $OUT/s $OUT/k $OUT/kx
timeout 300 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against norebuild.py nodh.py lagend.py base.py mhc_compile/kernels/gluon_step_bwd.py --against-tune "" "" "" "" x_dphi=true --shapes 32768x4096 8192x7168 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror|dphi warpgroup" $OUT/s.txt | tail -6; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
for mode in off on; do
  flag=$([ $mode = on ] && echo True || echo False); dir=$([ $mode = on ] && echo kx || echo k)
  OUT=$OUT/$dir timeout 100 python -c "
import runpy, sys; sys.path.insert(0, '.')
from mhc_compile.kernels import triton_fused as tf; tf.configure('step_bwd', x_dphi=$flag)
sys.argv = ['bench_kernels.py', '--tokens', '32768', '--channels', '4096', '--cases', 'step (head, row)', 'step', '--budget-s', '1', '--compiled-shapes']
runpy.run_path('benchmarks/bench_kernels.py', run_name='__main__')" > $OUT/$dir.txt 2>&1; echo "kernels x_dphi $mode rc=$?" >> $OUT/$dir.txt
  grep -E "^\| step|FAIL|copy bandwidth|rc=" $OUT/$dir.txt
done
