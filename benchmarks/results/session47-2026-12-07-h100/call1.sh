export PYTHONUNBUFFERED=1
mkdir -p $OUT/s $OUT/t $OUT/k
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python -c "import torch, triton; print(torch.__version__, triton.__version__)"
s=$(date +%s)
timeout 170 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against walk.py > $OUT/s/log.txt 2>&1; echo check rc $? took $(( $(date +%s) - s )) s
grep -v Warn $OUT/s/log.txt | grep -i "fail\|rror\|summed\|^| [0-9]*x[0-9]* |\|copy" | tail -24
s=$(date +%s)
OUT=$OUT/t timeout 300 python benchmarks/bench_training.py --d 7168 --rounds 6 --variants opt:fold_post_res_proj=1 --budget-s 250 > $OUT/training.log 2>&1; echo training rc $? took $(( $(date +%s) - s )) s
grep -v Warn $OUT/t/training.md | tail -8
s=$(date +%s)
OUT=$OUT/k timeout 90 python benchmarks/bench_kernels.py --budget-s 1 --compiled-shapes --tokens 32768 --channels 4096 --cases "step (head)" step post_res_proj boundary > $OUT/kernels.log 2>&1; echo kernels rc $? took $(( $(date +%s) - s )) s
grep -v Warn $OUT/kernels.log | grep "^|" | tail -12
