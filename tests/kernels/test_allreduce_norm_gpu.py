"""The fused all-reduce + residual add + RMSNorm (kernels/allreduce_norm.py) on two GPUs.

Runs `pdserve.services.bench_allreduce --check-only` (one process per GPU): bit-equal to NCCL's
all-reduce followed by the rms_norm kernel for 1-256 rows of hidden 4096 / 8192, eagerly and
over 200 replays of a CUDA graph of 64 calls with different inputs (a barrier or region-reuse
race would read another call's data); and a call whose peer never comes fails with a CUDA error
after the barrier's timeout instead of spinning. On CPU the model-side change (the all-reduce inside the
norm after each row-parallel output) is covered by tests/engine/test_tensor_parallel.py (gloo).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def test_fused_allreduce_norm_equals_nccl_then_norm():
    run = subprocess.run([sys.executable, "-m", "pdserve.services.bench_allreduce", "--check-only"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "FAILED" not in run.stdout
    assert run.stdout.count(" ok ") >= 10, run.stdout[-3000:]
    # a call whose peer never comes fails (the barrier traps after its timeout) instead of hanging
    assert "(timeout 2 s): failed after" in run.stdout, run.stdout[-3000:]
