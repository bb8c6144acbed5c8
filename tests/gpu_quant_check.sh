#!/usr/bin/env bash
# GPU check of issue 13 (small-batch int4 / fp8 GEMVs), for a machine with an H100/H200; run from
# the repo root with pdserve importable (pip install -e ".[test]" or PYTHONPATH to a pdserve tree):
#   OUT=/dir/for/results bash tests/gpu_quant_check.sh          (~6-8 min)
# Prints: (1) pytest of the GEMVs on the GPU (shapes of Llama-3-8B, split-K inside a CUDA graph) and
# of int_matmul's dispatch; (2) bench_quant: the GEMV config sweep (best config per 8B weight and
# M = 1 / 4 / 16 next to bf16 cuBLAS, then the "TUNED entries" lines to paste into
# kernels/gemv_config.py) and the 8B engines (bf16, fp8, AWQ int4) run with the sweep's best configs.
# Writes $OUT/gemv_table.json (gemv_config.load_tuned) and $OUT/bench_quant.json.
set -euo pipefail
OUT=${OUT:-.}
python -m pytest -q -m gpu tests/kernels/test_quant_gemv.py tests/kernels/test_quant_kernels.py -k "gemv or int_matmul or graph"
python -m pdserve.services.bench_quant --skip-kernel-tests --only "8B bf16,8B fp8,8B awq-int4" \
    --gemv-table-out "$OUT/gemv_table.json" --json-out "$OUT/bench_quant.json"
