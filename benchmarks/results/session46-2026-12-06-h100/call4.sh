export PYTHONUNBUFFERED=1
mkdir -p $OUT/w
timeout 110 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --against cur.py --against-tune "pace_waves=false" --shapes 16384x7168 8192x7168 --out $OUT/w > $OUT/waves.log 2>&1; echo waves rc $?
grep -v Warn $OUT/waves.log | grep "FAIL\|rror\|^| [0-9]*x\|copy" | tail -10
