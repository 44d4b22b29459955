export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
mkdir -p $OUT/b $OUT/k
timeout 320 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --against against_main.py walk.py walk.py walk.py --against-tune "" "walk_tiles=32" "walk_tiles=16" "walk_tiles=64" --shapes 32768x4096 8192x4096 8192x7168 32768x7168 16384x4096 --out $OUT/b > $OUT/boundary.log 2>&1; echo boundary rc $?; grep -v Warn $OUT/boundary.log | grep "FAIL\|error\|^| 32768x\|^| 8192x\|^| 16384x\|copy" | tail -18
OUT=$OUT/k timeout 170 python benchmarks/bench_kernels.py --tokens 32768 8192 --channels 4096 7168 --cases "enter (collapsed)" "enter (collapsed, acc rows)" "step (head)" "boundary" --budget-s 1 --compiled-shapes > $OUT/kernels.log 2>&1; echo kernels rc $?; grep -v Warn $OUT/kernels.log | tail -22
