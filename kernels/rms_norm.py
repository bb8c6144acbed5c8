"""rms_norm: HF LlamaRMSNorm, optionally fused with the residual add before it.

    x, residual  [T, N]   (any row stride, last dim contiguous)
    weight       [N]      same dtype as x
    out          [T, N]   weight * (r.float() * rsqrt(mean(r^2) + eps)).to(dtype)
    r            [T, N]   x + residual (rounded to dtype, as the eager add would), returned with out

One program per row; the whole row (N <= 65536) sits in registers, so it is read once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_residual, stride_out, stride_residual_out,
    hidden_size, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    weight = tl.load(weight_ptr + cols, mask=mask).to(tl.float32)
    out = rms_normalize(x, weight, hidden_size, eps)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_normalize(h, weight, hidden_size, eps):
    """weight * rms_norm(h) in fp32, rounded as HF rounds: h [BLOCK] in the model's dtype (lanes
    past hidden_size 0), weight [BLOCK] fp32. Shared with kernels/allreduce_norm.py."""
    hf = h.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / hidden_size + eps)
    # HF rounds the normalised value to the input dtype before multiplying by the weight.
    normed = (hf * inv_rms).to(h.dtype).to(tl.float32)
    return normed * weight


def rms_norm(
    x: torch.Tensor,                       # [T, N]
    weight: torch.Tensor,                  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be [T, N] contiguous in N, got {tuple(x.shape)}"
    num_tokens, hidden_size = x.shape
    assert weight.shape == (hidden_size,) and weight.is_contiguous(), f"weight must be [{hidden_size}]"
    assert weight.dtype == x.dtype, f"weight dtype {weight.dtype} != x dtype {x.dtype}"
    assert hidden_size <= 65536, f"hidden size {hidden_size} too large for one program per row"
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    residual_out = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1
        residual_out = torch.empty_like(out)
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden_size)
        num_warps = min(16, max(4, block // 512))
        has_residual = residual is not None
        _rms_norm_kernel[(num_tokens,)](
            x, residual if has_residual else x, weight, out, residual_out if has_residual else out,
            x.stride(0), residual.stride(0) if has_residual else 0, out.stride(0), out.stride(0),
            hidden_size, eps,
            HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=num_warps, **pdl.launch_args(x),
        )
    return out if residual is None else (out, residual_out)
