export PYTHONUNBUFFERED=1
mkdir -p $OUT/b $OUT/t
timeout 210 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --against walk.py walk.py --against-tune "walk_tiles=0" "walk_tiles=32" --shapes 32768x4096 32768x2048 16384x4096 8192x4096 32768x7168 --out $OUT/b > $OUT/boundary.log 2>&1; echo boundary rc $?; grep -v Warn $OUT/boundary.log | grep "FAIL\|error\|^| 32768x4096 |\|^| 8192x4096 |\|^| 32768x2048 |\|^| 16384x4096 |\|^| 32768x7168 |\|copy" | tail -18
OUT=$OUT/t timeout 280 python benchmarks/bench_training.py --d 7168 --rounds 6 --variants fused --budget-s 250 > $OUT/training.log 2>&1; echo training rc $?; grep -v Warn $OUT/t/training.md | tail -12
