#!/usr/bin/env bash
# GPU checks of issue 17 (operator experience), for a machine with a CUDA GPU; run from the repo
# root with pdserve importable (pip install -e ".[test]" or PYTHONPATH to a pdserve tree):
#   bash tests/gpu_ops_check.sh
# Prints: (1) pytest results of the GPU tests touched by issue 17 (NVML series, the CUDA engine
# after the loader changes); (2) `pdserve serve --device cuda` start-up line; (3) the GPU series
# of its /metrics, served on their own port.
set -euo pipefail
python -m pytest -q -m gpu tests/e2e/test_observability.py tests/engine/test_gpu_engine.py tests/models
LOG=$(mktemp)
python -m pdserve.services.cli serve --device cuda --port 0 --metrics-port 0 > "$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 300); do grep -q "pdserve serving" "$LOG" && break; sleep 1; done
grep "ready in" "$LOG"                      # "pdserve serve: ready in X s (engine Y s), metrics on URL"
METRICS=$(grep -o "http://[^ ]*/metrics" "$LOG" | head -1)
curl -s "$METRICS" | grep -E "^pdserve:gpu_|^vllm:(num_requests_running|kv_cache_usage_perc)"
