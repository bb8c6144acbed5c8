OUT=${OUT:-/tmp/out}; mkdir -p $OUT/d
(OUT=$OUT/d LOAD_SECONDS=10 timeout 150 bash tests/gpu_load_probe.sh --load-targets 1p1d --load-transport nccl > $OUT/d/probe.txt 2>&1) &
sleep 75
P=$(pgrep -f "pdserve.services.cli prefill( |$)" | head -1)
echo "prefill pid $P"; ps -o pid,pcpu,etimes,cmd -p $P | cut -c1-250
top -H -b -n1 -p $P | head -25
grep -c . /proc/$P/task/*/comm 2>/dev/null | wc -l
kill -USR1 $P; sleep 3
LOG=$(ls /tmp/pdserve-pd-*/stack-load-1p1d.log | head -1); echo "log $LOG"
grep -n "Thread 0x\|Current thread\|File " $LOG | tail -120 | cut -c1-220
wait
tail -20 $OUT/d/probe.txt
