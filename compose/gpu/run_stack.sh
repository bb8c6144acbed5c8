#!/usr/bin/env bash
# On the GPU machine, from the repo root: install the carried wheels, make the repo importable as
# `pdserve`, then start a stack with `pdserve up` (or run any command in that environment).
#
#   compose/gpu/run_stack.sh [pdserve up flags]   default: 1 prefill on GPU 0, 1 decode on GPU 1,
#                                                 --kv-transport nccl, Llama-3-8B shape dummy weights
#   compose/gpu/run_stack.sh --run CMD [ARGS]     e.g. --run python3 -m pdserve.services.bench_pd_gpu
#
# Wheels come from compose/gpu/prepare_wheels.sh (.whl/, carried with the call); the pdserve
# package is a folder of symlinks to the repo's top-level folders (docs/gpu.md). NVLink
# multicast stays off in every process started from here (the machine's rule).
set -euo pipefail
cd "$(dirname "$0")/../.."
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
mkdir -p "$SITE/pdserve"
for d in common kernels services proto; do ln -sfn "$PWD/$d" "$SITE/pdserve/$d"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

if [ "${1:-}" = --run ]; then
  shift
  exec "$@"
fi
if [ $# -eq 0 ]; then
  MODEL=$(python3 -m pdserve.services.bench_pd_gpu --write-model /tmp/pdserve-llama3-8b)
  set -- --prefill 1 --decode 1 --prefill-devices 0 --decode-devices 1 --kv-transport nccl --model "$MODEL" \
    --worker-args "--load-format dummy --max-model-len 4096" --router-args "--disagg-min-prompt-tokens 0"
fi
exec python3 -m pdserve.services.cli up "$@"
