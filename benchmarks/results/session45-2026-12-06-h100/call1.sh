export PYTHONUNBUFFERED=1
mkdir -p $OUT/s
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
timeout 200 python benchmarks/op_split.py --out $OUT/s --shapes 32768x4096 16384x4096 8192x7168 --tune "" "walk_tiles=0" "walk_tiles=32" > $OUT/split.log 2>&1; echo split rc $?
grep -v Warn $OUT/s/op_split.md | grep "copy\|##\|whole\|_step_bwd\|in all"
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__cycles_elapsed.avg.per_second,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct
for cc in none base; do timeout 150 ncu --clock-control $cc --metrics $M -k regex:"_step_bwd_ws|neg" python benchmarks/op_split.py --launch-only --shapes 32768x4096 --tune "" "walk_tiles=0" > $OUT/ncu-$cc.txt 2>&1; echo ncu $cc rc $?; grep "_step_bwd_ws\|neg\|duration\|dram__\|cycles_elapsed\|hit_rate" $OUT/ncu-$cc.txt | sed 's/  */ /g' | head -60; done
