#!/usr/bin/env bash
# GPU check of issue 13 (small-batch int4 / fp8 GEMVs: old kernels vs version 2), one H100/H200,
# from the repo root with pdserve importable (pip install -e ".[test]" or PYTHONPATH to a pdserve tree):
#   OUT=/dir/for/results bash tests/gpu_quant_check.sh [all|sweep|engines|tests]      (all: <= ~9.5 min)
# Every step has its own time limit and prints as it goes; a step that fails or times out is
# reported and the next one still runs. Steps (in order of what matters most):
#   sweep    bench_gemv: every 8B weight (K x N) at M = 1 / 4 / 16, bf16 cuBLAS vs the best int4
#            config (columns v1 = old kernels, v2 = gemv_int_v2) and the best fp8 config (v1 or
#            gemv_fp8_v2), us per call in a CUDA graph with the weights rotated past L2, GB/s of
#            weight bytes; "M = 1, one layer's 4 GEMVs" totals; then the "TUNED entries" lines to
#            paste into kernels/gemv_config.py. Writes $OUT/gemv_table.json, $OUT/gemv_sweep.json.
#   engines  bench_quant with that table: 8B bf16 / fp8 / AWQ int4 engines (dummy weights), W1 tok/s
#            and batch-1 ms per token with their ratios to bf16 (targets: fp8 b1 <= 0.6x and W1
#            >= 1.4x, AWQ b1 <= 0.35x). Writes $OUT/bench_quant.json.
#   tests    pytest -m gpu of the GEMVs (both versions, odd N, fp16, split-K in a CUDA graph) and of
#            int_matmul / fp8 dispatch.
source "$(dirname "$0")/gpu_step.sh"  # OUT, WHAT (the first argument), PY, START; step NAME LIMIT_S COMMAND...

if [ "$WHAT" = all ] || [ "$WHAT" = sweep ]; then
    step sweep 250 "$PY" -m pdserve.services.bench_gemv --budget-s 120 --total-s 215 --workers 12 \
        --table-out "$OUT/gemv_table.json" --json-out "$OUT/gemv_sweep.json"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = engines ]; then
    TABLE=()
    if [ -s "$OUT/gemv_table.json" ]; then
        TABLE=(--gemv-table "$OUT/gemv_table.json")
    else
        echo "=== engines: no $OUT/gemv_table.json: the engines run the built-in TUNED table"
    fi
    step engines 230 "$PY" -m pdserve.services.bench_quant --skip-kernel-tests --skip-kernel-timing "${TABLE[@]}" \
        --only "8B bf16,8B fp8,8B awq-int4" --w2-requests 64 --budget-s 170 --json-out "$OUT/bench_quant.json"
fi
if [ "$WHAT" = all ] || [ "$WHAT" = tests ]; then
    step tests 90 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_quant_gemv.py \
        tests/kernels/test_quant_kernels.py -k "gemv or int_matmul or graph"
fi
echo "=== finished in $(($(date +%s) - START)) s"
