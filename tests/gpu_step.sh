# Sourced by the tests/gpu_*.sh checks: their set-up (results to $OUT, the part to run in $WHAT from
# the script's first argument, $PY the interpreter, $START the clock) and `step NAME LIMIT_S
# COMMAND...`, which runs one step under its own time limit and reports it (done / FAILED / TIMED
# OUT) without stopping the script.
set -uo pipefail
OUT=${OUT:-.}
WHAT=${1:-all}
PY=${PYTHON:-python}
mkdir -p "$OUT"
START=$(date +%s)

step() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    echo "=== [$(($(date +%s) - START)) s] $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "=== $name: TIMED OUT after ${limit} s"
    elif [ $rc -ne 0 ]; then
        echo "=== $name: FAILED (exit $rc)"
    else
        echo "=== $name: done at $(($(date +%s) - START)) s"
    fi
}
