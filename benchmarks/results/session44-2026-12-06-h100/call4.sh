mkdir -p $OUT/t && OUT=$OUT/t timeout 230 python benchmarks/bench_training.py --d 7168 --rounds 10 --variants --budget-s 200 > $OUT/training.log 2>&1
