export PYTHONUNBUFFERED=1
mkdir -p $OUT/b $OUT/t
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 150 python benchmarks/gluon_step_bwd_check.py --boundary --against walk.py --shapes 32768x4096 8192x7168 --out $OUT/b > $OUT/boundary.log 2>&1; echo boundary rc $?
grep -v Warn $OUT/boundary.log | grep "FAIL\|rror\|^| [0-9]*x\|copy" | tail -20
OUT=$OUT/t timeout 270 python benchmarks/bench_training.py --d 7168 --rounds 6 --variants --budget-s 235 > $OUT/training.log 2>&1; echo training rc $?
grep -v Warn $OUT/t/training.md | tail -14
