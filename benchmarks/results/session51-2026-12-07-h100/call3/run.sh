#!/bin/bash
# session 51 device call 3 (run from the repo root; lag1.py: this build with gluon_step_bwd.STORE_LAG = 1)
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt 2>&1
mkdir -p $OUT/s $OUT/b
timeout 150 python benchmarks/gluon_step_bwd_check.py --out $OUT/s --head --against lag1.py --shapes 32768x4096 8192x7168 > $OUT/s.txt 2>&1; echo "step rc=$?" >> $OUT/s.txt
grep -E "FAIL|rc=|rror" $OUT/s.txt | tail -5; grep -E "^\| [0-9]+x[0-9]+ \| (dense|row)" $OUT/s.txt
timeout 170 python benchmarks/gluon_step_bwd_check.py --boundary --l2-only --out $OUT/b --against lag1.py --shapes 32768x4096 8192x7168 > $OUT/b.txt 2>&1; echo "boundary rc=$?" >> $OUT/b.txt
grep -E "FAIL|rc=|rror" $OUT/b.txt | tail -5; grep -E "^\| [0-9]+x[0-9]+ \| [0-9] \|" $OUT/b.txt
timeout 150 ncu --clock-control none --set full --import-source yes -k regex:_step_bwd_ws --launch-skip 2 --launch-count 1 -o $OUT/prof python benchmarks/ncu_case.py "step (head, row)" bwd > $OUT/ncu.txt 2>&1; echo "ncu rc=$?" >> $OUT/ncu.txt
tail -3 $OUT/ncu.txt
ncu -i $OUT/prof.ncu-rep --page source --csv --print-source sass > $OUT/prof.csv 2>/dev/null
ncu -i $OUT/prof.ncu-rep --page details --csv > $OUT/details.csv 2>/dev/null
python benchmarks/ncu_stalls.py $OUT/prof.csv --top 14 > $OUT/stalls.txt 2>&1; head -60 $OUT/stalls.txt
rm -f $OUT/prof.csv
