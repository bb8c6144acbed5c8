#!/usr/bin/env bash
# Issue 13 on one GPU: calibrated GPTQ / AWQ with the layers on CUDA. Runs the gpu-marked
# calibration tests (CUDA vs CPU int4 weights), calibrates the packaged SmolLM2 on CUDA with
# `pdserve quantize` (timed), and generates from the results on the GPU's int4 kernels.
# From the repo root inside compose/gpu/call.sh, with the GGUF joined into /tmp/models.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
G=${GGUF:-/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf}
python3 -m pytest -q -m gpu tests/quantization/test_calibrate.py -p no:cacheprovider 2>&1 | tail -4
printf 'What is the capital of France?\nName three primary colors.\nWrite one sentence about the sea.\n' > /tmp/calib-prompts.txt
for m in awq gptq; do
  start=$(date +%s%N)
  python3 -m pdserve.services.cli quantize --model "$G" --method "$m" --group-size 64 --output "/tmp/q-$m" \
    --device cuda > "$OUT/quantize-$m.txt" 2>&1
  echo "quantize $m on cuda: rc=$? $(( ($(date +%s%N) - start) / 1000000 )) ms; $(tail -1 "$OUT/quantize-$m.txt" | cut -c1-160)"
  python3 -m pdserve.services.cli generate --model "/tmp/q-$m" --chat --input /tmp/calib-prompts.txt \
    --output "$OUT/generate-$m.jsonl" --max-tokens 24 --temperature 0 > "$OUT/generate-$m.log" 2>&1
  echo "generate $m: rc=$?"; cut -c1-240 "$OUT/generate-$m.jsonl"
done
