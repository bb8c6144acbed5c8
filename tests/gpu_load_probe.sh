#!/usr/bin/env bash
# Issue 11 (1P1D collapses at 100 req/s): the load part of bench_pd_gpu on 2 x H200 with every
# pdserve process's CPU use sampled, to show which single-threaded host path saturates. Run from
# the repo root with pdserve importable, e.g.:
#   compose/gpu/call.sh load:580:"bash tests/gpu_load_probe.sh"   (extra args go to bench_pd_gpu)
# Prints: bench_pd_gpu's load lines (1p1d, then serve: req/s, TTFT/TPOT/ITL) and, every 2 s while
# they run, "cpu% router=.. prefill=.. decode=.. serve=.." = CPU seconds per wall second of each
# process (100 = one core busy; a Python process whose event loop / GIL is the limit sits near
# 100-130 however many cores the host has), and at the end the peak and mean per role.
# Reading it: router ~100 while decode is well below -> the router's per-token path (one gRPC
# message in + one SSE event out per token) is the ceiling; decode ~100 -> the decode's event
# loop + engine thread (GIL) are; neither -> look at KV pulls (pdserve:kv_pull_seconds on decode).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SECONDS_=${LOAD_SECONDS:-20}
python3 -m pdserve.services.bench_pd_gpu --parts load --load-seconds "$SECONDS_" --out-dir "$OUT" "$@" \
  > "$OUT/load_bench.txt" 2>&1 &
BENCH=$!
# PYSPY=path/to/py-spy: 10 s of the decode's and the router's Python stacks (raw folded, GIL
# holders only) from PYSPY_AT s after the bench started, into $OUT/pyspy-ROLE.txt.
if [ -n "${PYSPY:-}" ]; then
  (sleep "${PYSPY_AT:-50}"
   for role in decode router prefill; do
     pid=$(pgrep -f "pdserve.services.cli $role( |$)" | head -1)
     child=$(pgrep -P "${pid:-0}" | head -1)  # router --workers N: a child router serves
     [ "$role" = router ] && [ -n "$child" ] && pid=$child
     [ -n "$pid" ] && "$PYSPY" record -d 10 -r 200 -f raw --gil --nonblocking -p "$pid" \
       -o "$OUT/pyspy-$role.txt" > "$OUT/pyspy-$role.log" 2>&1 &
   done; wait) &
fi
declare -A last
: > "$OUT/load_cpu.txt"
while kill -0 "$BENCH" 2>/dev/null; do
  line=""
  for role in router prefill decode serve client; do
    total=0
    pattern="pdserve.services.cli $role( |$)"
    [ "$role" = client ] && pattern="pdserve.services.bench_pd_gpu"   # the load generator and its processes
    for pid in $(for p in $(pgrep -f "$pattern"); do echo "$p"; pgrep -P "$p"; done | sort -u); do
      # the client's children include the stack's `pdserve up` supervisor: not the client's CPU
      [ "$role" = client ] && grep -q "pdserve.services.cli" "/proc/$pid/cmdline" 2>/dev/null && continue
      t=$(awk '{print $14+$15}' "/proc/$pid/stat" 2>/dev/null) || continue
      prev=${last[$pid]:-$t}; last[$pid]=$t
      total=$((total + t - prev))
    done
    line+=" $role=$((total / 2))"   # clock ticks (100/s) over 2 s -> percent of one core
  done
  echo "cpu%$line" | tee -a "$OUT/load_cpu.txt"
  sleep 2
done
wait "$BENCH"
grep -E "^load |TTFT|TPOT" "$OUT/load_bench.txt" || tail -20 "$OUT/load_bench.txt"
# Failed requests: what the stack's processes logged about them (errors and tracebacks).
for log in /tmp/pdserve-pd-*/stack-load-*.log; do
  [ -f "$log" ] || continue
  n=$(grep -c -E "Traceback|ERROR|Error:" "$log")
  echo "$(basename "$log"): $n error lines"
  grep -E -B2 -A14 "Traceback|ERROR" "$log" | grep -v "server is overloaded" | head -60
  grep -E "Error:" "$log" | sort | uniq -c | sort -rn | head -8 | cut -c1-300
  echo "pulls failed (recomputed): $(grep -c "failed, recomputing" "$log")"
  grep "failed, recomputing" "$log" | head -3 | cut -c1-300
  # what led up to each error, for $OUT (the log itself stays on the machine)
  grep -n -B40 -A12 -E "Traceback|ERROR|Error:" "$log" | grep -v "server is overloaded" | head -400 \
    > "$OUT/errors-$(basename "$log" .log).txt"
done
rm -rf /tmp/pdserve-pd-*
python3 - "$OUT/load_cpu.txt" <<'PY'
import sys, collections
vals = collections.defaultdict(list)
for line in open(sys.argv[1]):
    for kv in line.split()[1:]:
        k, v = kv.split("="); v = int(v)
        if v > 5: vals[k].append(v)
for k, v in vals.items():
    print(f"{k}: peak {max(v)}% mean {sum(v) / len(v):.0f}% of one core over {len(v)} busy samples")
PY
