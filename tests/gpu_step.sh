# Sourced by the tests/gpu_*.sh checks: `step NAME LIMIT_S COMMAND...` runs one step under its own
# time limit and reports it (done / FAILED / TIMED OUT) without stopping the script. Needs $START.
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
