export PYTHONUNBUFFERED=1
mkdir -p $OUT/b $OUT/s
timeout 150 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --against walk.py walk.py --against-tune "" "pace=0" --shapes 32768x4096 --out $OUT/b > $OUT/boundary.log 2>&1; echo boundary rc $?; grep -v Warn $OUT/boundary.log | grep "FAIL\|error\|^| 32768x\|copy" | tail -8
timeout 80 python benchmarks/gluon_step_bwd_check.py --no-times --out $OUT/s > $OUT/step.log 2>&1; echo step rc $?; grep -v Warn $OUT/step.log | grep -c "| ok"; grep "FAIL\|error" $OUT/step.log | head
