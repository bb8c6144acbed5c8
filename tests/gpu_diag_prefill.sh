#!/usr/bin/env bash
# Diagnosis of a 1P1D stack whose prefill process spins (seen once on the GPU host: ~3,400 % CPU,
# nothing served; docs/benchmarks.md, fourth 2 x H200 session). Runs the 10 s load probe
# (tests/gpu_load_probe.sh) and, every 5 s, if the prefill process used more than 8 cores since
# the last look: its busiest threads (top -H) and every Python thread's stack (SIGUSR1 ->
# faulthandler, written into the stack's log), once. From the repo root with pdserve importable:
#   compose/gpu/call.sh 'diag:180:bash tests/gpu_diag_prefill.sh'
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/d"
(OUT=$OUT/d LOAD_SECONDS=${LOAD_SECONDS:-10} bash tests/gpu_load_probe.sh --load-targets 1p1d "$@" \
  > "$OUT/d/probe.txt" 2>&1) &
PROBE=$!
dumped=0; last=0
while kill -0 "$PROBE" 2>/dev/null; do
  sleep 5
  P=$(pgrep -f "pdserve.services.cli prefill( |$)" | head -1)
  [ -n "$P" ] || continue
  t=$(awk '{print $14+$15}' "/proc/$P/stat" 2>/dev/null) || continue
  if [ "$last" = 0 ]; then last=$t; continue; fi
  busy=$(( (t - last) / 5 )); last=$t   # percent of one core over the 5 s
  if [ "$dumped" = 0 ] && [ "$busy" -gt 800 ]; then
    echo "prefill $P at ${busy} % of a core: its threads and stacks"
    top -H -b -n1 -p "$P" | head -25
    echo "threads by name:"; cat /proc/"$P"/task/*/comm | sort | uniq -c | sort -rn | head
    kill -USR1 "$P"; sleep 2
    for log in /tmp/pdserve-pd-*/stack-load-*.log; do grep -A12 "Thread 0x\|Current thread" "$log" | head -150; done
    dumped=1
    for round in 1 2; do
      for log in /tmp/pdserve-pd-*/stack-load-*.log; do
        echo "== $log: pulls failed $(grep -c "failed, recomputing" "$log"), pairs ended $(grep -c "KV pair with" "$log")"
        grep -E "failed, recomputing|KV pair with|WARNING|Error" "$log" | grep -v overloaded \
          | sed -E 's/^[0-9-]+ [0-9:,]+ //; s/(lease|for) [^ ]+/\1 X/g' | cut -c1-220 | sort | uniq -c | sort -rn | head -12
        grep -E "failed, recomputing|KV pair with" "$log" | head -3 | cut -c1-300
      done
      [ "$round" = 1 ] && sleep 15
    done
    kill $PROBE 2>/dev/null; pkill -f bench_pd_gpu; sleep 3; pkill -9 -f "pdserve.services"; break
  fi
done
tail -20 "$OUT/d/probe.txt"
