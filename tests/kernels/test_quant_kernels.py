"""Quantized-weight kernels (int_gemm, fp8 KV in the attention kernels) against their references.

Same two backends as test_kernels.py: `gpu` (CUDA, Llama-sized shapes, marked gpu) and the
Triton interpreter on CPU (tiny shapes, TRITON_INTERPRET=1):
    TRITON_INTERPRET=1 python -m pytest tests/kernels/test_quant_kernels.py -q
"""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.kernels import reference as ref
from pdserve.kernels import triton_available
from pdserve.kernels.testing import rel_error, tolerance

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RUN_GPU = triton_available() and torch.cuda.is_available() and not INTERPRET
RUN_INTERPRET = triton_available() and INTERPRET
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def backends(gpu_cases: list, interpret_cases: list) -> list:
    skip_gpu = pytest.mark.skipif(not RUN_GPU, reason="needs CUDA and triton (without TRITON_INTERPRET)")
    skip_interp = pytest.mark.skipif(not RUN_INTERPRET, reason="set TRITON_INTERPRET=1 to run on CPU")
    return ([pytest.param("cuda", c, marks=[pytest.mark.gpu, skip_gpu], id=f"gpu-{c}") for c in gpu_cases]
            + [pytest.param("cpu", c, marks=skip_interp, id=f"interp-{c}") for c in interpret_cases])


def random_int_weight(k: int, n: int, bits: int, group: int, dtype, device, seed: int = 0):
    """Packed [K/P, N] int32 of random values, scales ~ 0.01-0.03, integer zero points."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 1 << bits, (k, n), generator=gen)
    per_word = 32 // bits
    shifts = (torch.arange(per_word) * bits).view(1, per_word, 1)
    words = (q.view(k // per_word, per_word, n).long() << shifts).sum(1)
    qweight = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    scales = (0.01 + 0.02 * torch.rand(k // group, n, generator=gen)).to(dtype)
    zeros = torch.randint(0, 1 << bits, (k // group, n), generator=gen).to(dtype)
    return qweight.to(device), scales.to(device), zeros.to(device)


INT_GPU = [(m, k, n, b, g, dt) for m in (1, 7, 64, 256) for (k, n) in ((4096, 6144), (14336, 4096))
           for b, g in ((4, 128), (8, 32)) for dt in (BF16, FP16)]
INT_INTERP = [(1, 64, 32, 4, 32, FP32), (1, 128, 48, 8, 32, BF16), (1, 256, 16, 4, 128, FP32),
              (5, 64, 40, 4, 32, FP32), (33, 128, 72, 4, 64, BF16), (3, 64, 24, 8, 32, FP16)]


@pytest.mark.parametrize("device,case", backends(INT_GPU, INT_INTERP))
@pytest.mark.parametrize("with_bias", [False, True])
def test_int_matmul(device, case, with_bias):
    from pdserve.kernels.int_gemm import int_matmul
    m, k, n, bits, group, dtype = case
    qweight, scales, zeros = random_int_weight(k, n, bits, group, dtype, device, seed=m + k)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    out = int_matmul(x, qweight, scales, zeros, bits, group, bias)
    expected = ref.int_matmul_ref(x, qweight, scales, zeros, bits, group, bias)
    assert out.shape == (m, n) and out.dtype == dtype
    err = rel_error(out, expected)
    assert err <= tolerance(dtype), f"relative error {err:.2e}"


@pytest.mark.parametrize("device,case", backends([(4096, 4096, 4, 128), (14336, 4096, 4, 128)],
                                                 [(256, 8, 4, 64), (128, 24, 8, 32)]))
def test_int_gemv_split_k(device, case):
    """The split-K path (fp32 atomics) equals the one-pass path."""
    from pdserve.kernels.int_gemm import int_matmul
    k, n, bits, group = case
    qweight, scales, zeros = random_int_weight(k, n, bits, group, BF16, device)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(device, BF16)
    expected = ref.int_matmul_ref(x, qweight, scales, zeros, bits, group)
    for split in (1, 2, 4):
        out = int_matmul(x, qweight, scales, zeros, bits, group, gemv=(16, split))
        assert rel_error(out, expected) <= tolerance(BF16), split


@pytest.mark.parametrize("device,case", backends([(1, 4096, BF16), (256, 14336, BF16), (3, 4096, FP16)],
                                                 [(1, 64, FP32), (5, 200, BF16), (2, 48, FP16)]))
def test_quantize_fp8_per_token(device, case):
    from pdserve.kernels.fp8_linear import quantize_fp8_per_token
    m, k, dtype = case
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3).to(device, dtype)
    x[0, 0] = 0  # a zero next to large values
    q, scale = quantize_fp8_per_token(x)
    q_ref, scale_ref = ref.fp8_quantize_per_row_ref(x)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    # the same fp8 codes up to one rounding step where x / scale sits on a rounding boundary
    assert (q.float() - q_ref.float()).abs().le(q_ref.float().abs() * 0.0625 + 1e-6).all()
    assert (q.float() == q_ref.float()).float().mean() > 0.99


@pytest.mark.parametrize("device,case", backends([(4096, 4096, BF16), (14336, 4096, BF16), (4096, 28672, FP16)],
                                                 [(64, 32, FP32), (200, 24, BF16), (128, 40, FP16)]))
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp8_gemv(device, case, with_bias):
    from pdserve.kernels.fp8_linear import fp8_gemv
    k, n, dtype = case
    gen = torch.Generator().manual_seed(k + n)
    weight = (torch.randn(n, k, generator=gen) * 50).to(torch.float8_e4m3fn).to(device)
    scale = (torch.rand(n, generator=gen) * 1e-3 + 1e-4).to(device)
    x = torch.randn(1, k, generator=gen).to(device, dtype)
    bias = torch.randn(n, generator=gen).to(device, dtype) if with_bias else None
    out = fp8_gemv(x, weight, scale, bias, block_k=64 if device == "cpu" else 512)
    assert rel_error(out, ref.fp8_gemv_ref(x, weight, scale, bias)) <= tolerance(dtype)
