export PYTHONUNBUFFERED=1
mkdir -p $OUT/b
timeout 270 python benchmarks/gluon_step_bwd_check.py --boundary --against against_main.py msync64.py msync32.py --against-tune "dphi_regs=112" --out $OUT/b > $OUT/boundary.log 2>&1; echo boundary rc $?; grep -v Warn $OUT/boundary.log | grep "FAIL\|error\|^| 32768x4096\|^| 8192x7168\|^| 32768x7168\|^| 8192x4096\|copy" | tail -14
