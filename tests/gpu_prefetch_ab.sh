#!/usr/bin/env bash
# GPU A/B of the small-batch GEMVs' weight prefetch before the PDL wait (kernels/pdl.py), one
# H100/H200, from the repo root with pdserve importable:
#   OUT=/dir bash tests/gpu_prefetch_ab.sh [tests] "VARIANT..."
# A VARIANT is LINES:QUANT (QUANT: bf16 | awq | fp8 | gptq-head): `bench_gpu latency --no-profile`
# (Llama-3-8B shape, dummy weights, batch 1) in its own process with $PDSERVE_GEMV_PREFETCH_LINES
# = LINES (0 = no prefetch), in the order given (interleave them: the machine drifts); its line
# goes to $OUT/ab.txt. "tests" first runs the GPU tests of the kernels concerned.
source "$(dirname "$0")/gpu_step.sh"
if [ "$WHAT" = tests ]; then
    step tests 170 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_pdl.py \
        tests/kernels/test_quant_gemv.py -k "int_gemv or fp8_gemv or graph or pdl"
    shift
fi
for v in ${1:-}; do
    lines=${v%%:*}; quant=${v#*:}
    case $quant in
        bf16) q=() ;;
        gptq-head) q=(--quantization gptq --quantized-lm-head) ;;
        *) q=(--quantization "$quant") ;;
    esac
    PDSERVE_GEMV_PREFETCH_LINES=$lines step "$v" 120 "$PY" -m pdserve.services.bench_gpu latency --no-profile \
        "${q[@]}" --json-out "$OUT/lat-$lines-$quant.json" > "$OUT/lat-$lines-$quant.log" 2>&1
    echo "$v $(grep -o 'TTFT [0-9.]* ms, [0-9.]* ms per output token' "$OUT/lat-$lines-$quant.log" | head -1)" \
        | tee -a "$OUT/ab.txt"
done
echo "=== finished in $(($(date +%s) - START)) s"
