export PYTHONUNBUFFERED=1
mkdir -p $OUT/p
s=$(date +%s)
PYTHONPATH=. OUT=$OUT/p timeout 330 python benchmarks/profile_step.py 7168 > $OUT/p/log.txt 2>&1; echo profile rc $? took $(( $(date +%s) - s )) s
grep -v Warn $OUT/p/*.md | head -60
