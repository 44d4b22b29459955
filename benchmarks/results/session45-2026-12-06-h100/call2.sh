export PYTHONUNBUFFERED=1
mkdir -p $OUT/s
timeout 330 python benchmarks/op_split.py --out $OUT/s --shapes 32768x4096 16384x4096 8192x7168 8192x4096 --tune "" "pace=3" "pace=3,walk_tiles=0" "pace=3,pace_group=2" "pace=6" > $OUT/split.log 2>&1; echo split rc $?
grep -v Warn $OUT/s/op_split.md | grep "copy\|##\|whole\|_step_bwd\|against"; grep -i "error\|Traceback" -A3 $OUT/split.log | head -20
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__cycles_elapsed.avg.per_second,lts__t_sector_hit_rate.pct
timeout 120 ncu --clock-control none --metrics $M -k regex:"_step_bwd_ws|neg" python benchmarks/op_split.py --launch-only --shapes 32768x4096 --tune "" "pace=3" "pace=3,walk_tiles=0" > $OUT/ncu-none.txt 2>&1; echo ncu rc $?; grep "_step_bwd_ws\|neg\|duration\|dram__\|cycles_elapsed\|hit_rate" $OUT/ncu-none.txt | sed 's/  */ /g' | grep -v "==PROF==" | head -60
