"""gemv: one row times a weight matrix, y = x @ W^T (+ b), for batch-1 decode; gemv_rows: the
same for 2..ROWS_MAX rows (small decode batches, speculative verify rows).

    x  [1, K]   bf16/fp16 (any row stride, contiguous K)
    W  [N, K]   nn.Linear layout, contiguous; x's dtype, or float8_e4m3fn with `scale`
    s  [N]      fp32, optional: y[n] *= s[n] (fp8 weights' per-output scales)
    y  [1, N]   x's dtype; fp32 accumulation, rounded once

At M = 1 a GEMM only streams W, so it should run at memory bandwidth; cuBLAS reaches ~2.8 TB/s
on the large MLP weights of an 8B model but only ~1.3 TB/s on a 4096 x 4096 projection on an
H100 (split-K plus a reduce kernel). Here each program owns BLOCK_N output rows and walks K in
BLOCK_K tiles, keeping a [BLOCK_N, BLOCK_K] fp32 partial sum in registers and reducing it once
at the end, so the loop is pure loads (pipelined by num_stages):

    program p:  rows p*BLOCK_N .. +BLOCK_N
                for k in 0..K step BLOCK_K:  acc += W[rows, k:k+BK] * x[k:k+BK]
                y[rows] = sum(acc, axis=1) (+ b[rows])

gemv_rows: x [M, K] with M <= ROWS_MAX. Each program owns BLOCK_N output columns for all rows
(padded to ROWS_MAX, the smallest tensor-core tile) and walks K in BLOCK_K tiles with one
[ROWS_MAX, BLOCK_K] x [BLOCK_K, BLOCK_N] tl.dot each, so W is read once whatever M is. On a
small model cuBLAS's kernels for 2-16 rows cost more than the whole GEMV's weight read (one
H200, SmolLM2's 576-wide projections: a decode graph of 2 rows 0.998 ms against 0.703 ms for
1 row, the difference in its 120 GEMMs) and, launched without PDL, they break the chain of
programmatic dependent launches of the Triton kernels around them.

Which weights use them, and up to how many rows, is measured at start-up
(`pdserve.common.models.triton_attention.choose_gemv`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl

BLOCK_N = 16
BLOCK_K = 512


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, s_ptr, out_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_SCALE:
        y *= tl.load(s_ptr + rows, mask=row_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         scale: torch.Tensor | None = None, block_k: int = BLOCK_K) -> torch.Tensor:
    assert x.dim() == 2 and x.shape[0] == 1, f"gemv takes one row, got x {tuple(x.shape)}"
    num_out, k = weight.shape
    assert x.shape[1] == k, f"x {tuple(x.shape)} vs weight {tuple(weight.shape)}"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "contiguous K"
    assert x.dtype == weight.dtype or (weight.dtype == torch.float8_e4m3fn and scale is not None), \
        "one dtype, or fp8 weights with their scales"
    assert scale is None or (scale.shape == (num_out,) and scale.dtype == torch.float32 and scale.is_contiguous())
    assert bias is None or (bias.shape == (num_out,) and bias.is_contiguous())
    out = torch.empty((1, num_out), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(num_out, BLOCK_N),)](
        x, weight, bias if bias is not None else weight, scale if scale is not None else weight, out, num_out, k,
        weight.stride(0), HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        num_warps=4, num_stages=4, **pdl.launch_args(x),
    )
    return out


ROWS_MAX = 16  # gemv_rows: rows per call (one tensor-core tile of rows)
# gemv_rows launch configurations (BLOCK_N, BLOCK_K): the first is the default; choose_gemv times
# them all per weight (a long K wants fewer, longer tiles: its loop is latency-bound at small sizes)
ROWS_CONFIGS = ((16, 128), (16, 256), (16, 512), (32, 256))


@triton.jit
def _gemv_rows_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        w = tl.load(w_rows + ks[None, :], mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # [BN, BK]
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def gemv_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              config: tuple[int, int] = ROWS_CONFIGS[0]) -> torch.Tensor:
    """x [M, K] (1 <= M <= ROWS_MAX, bf16/fp16, contiguous K) @ weight [N, K]^T (+ bias) -> [M, N];
    config: (BLOCK_N, BLOCK_K), one of ROWS_CONFIGS."""
    assert x.dim() == 2 and 1 <= x.shape[0] <= ROWS_MAX, f"gemv_rows takes 1..{ROWS_MAX} rows, got x {tuple(x.shape)}"
    num_out, k = weight.shape
    assert x.shape[1] == k, f"x {tuple(x.shape)} vs weight {tuple(weight.shape)}"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "contiguous K"
    assert x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16), "one 16-bit dtype"
    assert bias is None or (bias.shape == (num_out,) and bias.is_contiguous())
    block_n, block_k = config
    out = torch.empty((x.shape[0], num_out), dtype=x.dtype, device=x.device)
    _gemv_rows_kernel[(triton.cdiv(num_out, block_n),)](
        x, weight, bias if bias is not None else weight, out, x.shape[0], num_out, k,
        x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        BLOCK_M=ROWS_MAX, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3,
        **pdl.launch_args(x),
    )
    return out
