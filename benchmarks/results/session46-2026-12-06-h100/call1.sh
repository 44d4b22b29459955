export PYTHONUNBUFFERED=1
mkdir -p $OUT/b $OUT/s $OUT/w
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
timeout 200 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --against walk.py walk.py --against-tune "" "pace=0" --shapes 32768x4096 16384x4096 8192x4096 8192x7168 --out $OUT/b > $OUT/boundary.log 2>&1; echo boundary rc $?
grep -v Warn $OUT/boundary.log | grep "FAIL\|rror\|^| [0-9]*x\|copy" | tail -24
timeout 170 python benchmarks/gluon_step_bwd_check.py --against walk.py walk.py --against-tune "" "pace=3" --out $OUT/s > $OUT/step.log 2>&1; echo step rc $?
grep -v Warn $OUT/step.log | grep -c "| ok"; grep "FAIL\|rror" $OUT/step.log | head; grep -v Warn $OUT/step.log | grep "^| [0-9]*x\|copy\| us" | tail -16
(cd alt && timeout 150 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --against waves.py --against-tune "pace_waves=true" --shapes 8192x7168 32768x7168 --out $OUT/w > $OUT/waves.log 2>&1; echo waves rc $?)
grep -v Warn $OUT/waves.log | grep "FAIL\|rror\|^| [0-9]*x\|copy" | tail -12
