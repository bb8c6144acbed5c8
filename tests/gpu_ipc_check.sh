#!/usr/bin/env bash
# GPU checks of the ipc KV transport (issue 11), for a host with 2 GPUs with peer access (H200 x2);
# run from the repo root with pdserve importable, e.g. on the device machine:
#   compose/gpu/call.sh ipc:580:"bash tests/gpu_ipc_check.sh"
# Prints: (1) pytest of the GPU KV tests (ipc between two processes on GPU 0 through a CUDA IPC
# mapping, the in-process local pull) and the copy_blocks kernel; (2) the 256 MiB handoff bench, prefill
# process on GPU 0, decode process on GPU 1, each seeing only its GPU: ipc and nccl GB/s, "% ceil"
# = % of the plain GPU0->GPU1 copy_ of the same run (target: ipc >= 80), and the phase table
# (ipc: request = PullRequest round trip, scatter/[gpu] = the one copy kernel, recv = the PullDone
# round trip, 0 here as a worker's leases announce their expiry, other = thread hand-offs);
# (3) ipc again with the PullDone lease check on every pull (--ipc-lease-check: its cost is the
# recv column); (4) ipc with both processes seeing both GPUs (--unmasked); (5) greedy 1P1D over
# ipc == generate (prefill on GPU 0, decode on GPU 1, bench_pd_gpu's dummy model).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pytest -q -rs tests/kv_transfer/test_gpu.py tests/kernels/test_kernels.py -k "copy_blocks or ipc or local"
python3 -m pdserve.common.kv_transfer.bench --device cuda --backends ipc,nccl --server-gpu 0 --client-gpu 1 \
  --json-out "$OUT/ipc_bench_masked.json" | grep -v '^{'
python3 -m pdserve.common.kv_transfer.bench --device cuda --backends ipc --server-gpu 0 --client-gpu 1 --ipc-lease-check \
  --json-out "$OUT/ipc_bench_checked.json" | grep -v '^{'
python3 -m pdserve.common.kv_transfer.bench --device cuda --backends ipc --server-gpu 0 --client-gpu 1 --unmasked \
  --json-out "$OUT/ipc_bench_unmasked.json" | grep -v '^{'
python3 -m pdserve.services.bench_pd_gpu --parts greedy --greedy-transport ipc --out-dir "$OUT" 2>&1 | tail -n 5
