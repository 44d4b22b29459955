export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
cp mhc_compile/kernels/gluon_step_bwd.py dpreg.py
mkdir -p $OUT/b $OUT/s
timeout 230 python benchmarks/gluon_step_bwd_check.py --boundary --against against_main.py dpreg.py --against-tune "dphi_regs=112" "stages=2" --out $OUT/b > $OUT/boundary.log 2>&1; echo boundary rc $?; grep -v Warn $OUT/boundary.log | grep "FAIL\|error\|^| 32768x4096\|^| 8192x7168\|^| 32768x7168\|copy" | tail -16
timeout 200 python benchmarks/gluon_step_bwd_check.py --against against_main.py dpreg.py --against-tune "dphi_regs=112" "stages=4" --out $OUT/s > $OUT/step.log 2>&1; echo step rc $?; grep -c "| ok |" $OUT/step.log; grep -v Warn $OUT/step.log | grep "FAIL\|error\|^| 32768x4096\|^| 32768x7168\|copy" | tail -10
