"""FP8 (e4m3) linear layers on Hopper: per-token activation quantization and a batch-1 GEMV.

    weight        [N, K] float8_e4m3fn (nn.Linear layout)      weight_scale [N] fp32 (per output)

quantize_fp8_per_token: x [M, K] bf16/fp16/fp32 -> (xq [M, K] fp8, scale [M, 1] fp32), one
    program per row: amax, scale = amax / 448, xq = x / scale (saturated). Feeds
    torch._scaled_mm(xq, weight.T, scale_a=scale, scale_b=weight_scale[None, :]) (W8A8; the
    reference is reference.fp8_linear_ref). One kernel instead of torch's abs/amax/div/cast chain,
    which at batch 1 would add ~4 launches per linear.

fp8_linear_method(M): "gemv" (gemv_fp8.fp8_gemv: W8A16, weights widened in registers, activations
    kept in their dtype; a decode step is bound by reading the weights) for M <= 16, else
    "scaled_mm" (W8A8 through torch._scaled_mm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.gemv_config import GEMV_MAX_M
from pdserve.kernels.gemv_fp8 import fp8_gemv

__all__ = ["quantize_fp8_per_token", "fp8_gemv", "fp8_linear_method"]

FP8_MAX = 448.0


@triton.jit
def _quantize_per_token_kernel(x_ptr, out_ptr, scale_ptr, K, stride_x, stride_out, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / 448.0
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(out_ptr + row * stride_out + cols, q.to(out_ptr.dtype.element_ty), mask=cols < K)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be [M, K] with contiguous K, got {tuple(x.shape)}"
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quantize_per_token_kernel[(m,)](x, out, scale, k, x.stride(0), out.stride(0),
                                         BLOCK_K=min(4096, triton.next_power_of_2(k)), num_warps=4)
    return out, scale


def fp8_linear_method(m: int) -> str:
    """The path of an M-row fp8 linear on CUDA: "gemv" (weight-only) or "scaled_mm" (W8A8)."""
    return "gemv" if m <= GEMV_MAX_M else "scaled_mm"
