export PYTHONUNBUFFERED=1
mkdir -p $OUT/t
s=$(date +%s)
OUT=$OUT/t timeout 330 python benchmarks/bench_training.py --d 7168 4096 --rounds 8 --variants --budget-s 200 > $OUT/training.log 2>&1; echo training rc $? took $(( $(date +%s) - s )) s
grep -v Warn $OUT/t/training.md | tail -12
