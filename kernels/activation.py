"""silu_and_mul: the gated activation of a Llama MLP.

    x    [T, 2 * I]   gate (first half) ++ up (second half), last dim contiguous
    out  [T, I]       silu(gate) * up, computed in fp32, stored in x.dtype

Grid: (T, cdiv(I, BLOCK)); each program handles BLOCK columns of one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, stride_x_row, stride_out_row, intermediate_size,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate_size
    gate = tl.load(x_ptr + row * stride_x_row + cols, mask=mask).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_row + intermediate_size + cols, mask=mask).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out_row + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2 and x.shape[1] % 2 == 0, f"x must be [T, 2 * I], got {tuple(x.shape)}"
    assert x.stride(1) == 1, "x must be contiguous in its last dim"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {x.dtype}"
    num_tokens, intermediate_size = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, intermediate_size), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    block = min(1024, triton.next_power_of_2(intermediate_size))
    grid = (num_tokens, triton.cdiv(intermediate_size, block))
    _silu_and_mul_kernel[grid](x, out, x.stride(0), out.stride(0), intermediate_size, BLOCK=block, num_warps=4,
                               **pdl.launch_args(x))
    return out
