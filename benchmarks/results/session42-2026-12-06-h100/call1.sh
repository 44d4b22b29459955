export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 150 python benchmarks/gluon_step_bwd_check.py --boundary --against against_main.py split_ring.py --against-tune "" "g_stages=2" --out $OUT/b > $OUT/boundary.log 2>&1; echo boundary rc $?; grep -v Warn $OUT/boundary.log | grep "FAIL\|^| 32768x4096\|^| 8192x7168\|copy" | tail -12
timeout 75 python benchmarks/gluon_step_bwd_check.py --no-times --out $OUT/s > $OUT/stepcheck.log 2>&1; echo stepcheck rc $?; grep -c "| ok |" $OUT/stepcheck.log; grep FAIL $OUT/stepcheck.log | head -5
