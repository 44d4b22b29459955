export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
for k in 128 64; do sed "s/    splits = tcom.least_idle_splits(blocks, most, tcom.num_sms(device))/    splits = max(tcom.least_idle_splits(blocks, most, tcom.num_sms(device)), tcom.cdiv(tiles, $k))/" mhc_compile/kernels/gluon_step_bwd.py > sync$k.py; grep -c "cdiv(tiles, $k)" sync$k.py; done
cp mhc_compile/kernels/gluon_step_bwd.py dpreg.py
mkdir -p $OUT/b $OUT/s
timeout 290 python benchmarks/gluon_step_bwd_check.py --boundary --against against_main.py sync128.py sync64.py --against-tune "dphi_regs=112" "stages=2" "stages=2" --out $OUT/b > $OUT/boundary.log 2>&1; echo boundary rc $?; grep -v Warn $OUT/boundary.log | grep "FAIL\|error\|^| 32768x4096\|^| 8192x7168\|copy" | tail -8
timeout 200 python benchmarks/gluon_step_bwd_check.py --against against_main.py dpreg.py --against-tune "dphi_regs=112,dh_atomic=true" "stages=4,dh_atomic=true" --out $OUT/s > $OUT/step.log 2>&1; echo step rc $?; grep -c "| ok |" $OUT/step.log; grep -v Warn $OUT/step.log | grep "FAIL\|error\|^| 32768x4096\|^| 32768x7168\|copy" | tail -8
