#!/usr/bin/env bash
# Where a TP=2 batch-1 decode step's host time goes (issue 12): `bench_gpu latency -tp 2` with a
# 3,000-token request and, mid-decode, 5 s of py-spy (native, active samples, raw folded) of rank 0
# (the bench process) and rank 1 (the worker). From the repo root with pdserve importable:
#   compose/gpu/call.sh 'tpprof:150:PYSPY=$PWD/.tools/py-spy bash tests/gpu_tp_profile.sh'
# Prints the latency line and, per rank, the top frames by share of samples; raw stacks in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PYSPY=${PYSPY:?set PYSPY to a py-spy binary}
python3 -m pdserve.services.bench_gpu latency -tp 2 --no-profile --latency-tokens 3000 > "$OUT/tp_latency.txt" 2>&1 &
BENCH=$!
for _ in $(seq 90); do grep -q "engine up" "$OUT/tp_latency.txt" && break; sleep 1; done
sleep 4  # warm-up requests, then the latency request's decode (~9 s at 3 ms per token)
WORKER=$(pgrep -f "from pdserve.common.engine.tp_workers import" | head -1)
"$PYSPY" record -d 5 -r 500 -f raw --native -p "$BENCH" -o "$OUT/tp-rank0.txt" > /dev/null 2>&1 &
[ -n "$WORKER" ] && "$PYSPY" record -d 5 -r 500 -f raw --native -p "$WORKER" -o "$OUT/tp-rank1.txt" > /dev/null 2>&1 &
wait "$BENCH"
sleep 1
grep -E "latency pdserve|engine up" "$OUT/tp_latency.txt"
for f in "$OUT"/tp-rank0.txt "$OUT"/tp-rank1.txt; do
  [ -f "$f" ] || continue
  echo "== $(basename "$f"): frames by share of samples (inclusive, main thread and all)"
  python3 - "$f" <<'PY'
import collections, sys
inc, total = collections.Counter(), 0
for line in open(sys.argv[1]):
    stack, _, n = line.rstrip().rpartition(" ")
    if not n.isdigit():
        continue
    n = int(n); total += n
    for frame in set(f.split(" (")[0] + " " + f.rsplit("/", 1)[-1] for f in stack.split(";")):
        inc[frame] += n
for frame, n in inc.most_common(40):
    print(f"{100 * n / total:5.1f} {frame[:150]}")
PY
done
