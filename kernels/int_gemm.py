"""int_matmul: x @ W for 4-/8-bit grouped-int weights, dequantized inside the GEMM.

    x        [M, K]        bf16 / fp16 / fp32, contiguous K
    qweight  [K / P, N]    int32; P = 32 / bits values of consecutive inputs per word, value j of
                           a word at bits [bits*j, bits*(j+1)) (GPTQ's qweight layout)
    scales   [K / G, N]    per group of G inputs and output     } w[k, n] = (q[k, n] - z[k // G, n])
    zeros    [K / G, N]    zero points (float)                  }           * s[k // G, n]
    out      [M, N]        x's dtype, fp32 accumulation

Chosen by M on the host (static per CUDA-graph bucket):

  M <= 16 "gemv": gemv_int.int_gemv, every packed word read once for all M rows (decode
          batches; split-K to fill the GPU, configurations from gemv_config's table).
  M  > 16 "dequant" (default): _int_dequant_kernel writes W [K, N] in x's dtype (reads 4 bits,
          writes 16 per weight), then cuBLAS multiplies: a prefill chunk or a large decode batch
          runs at the library's GEMM speed plus one pass over the weight. "fused":
          _int_gemm_kernel, tiles [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] with the weight tile
          dequantized in registers and fed to tl.dot (no [K, N] buffer; slower at every M
          measured, kept for the comparison in `pdserve.services.bench_quant`).

The reference is `reference.int_matmul_ref` (dequantize, then matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.gemv_config import GEMV_MAX_M
from pdserve.kernels.gemv_int import check_int_operands, int_gemv


@triton.jit
def _int_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K,
                     stride_xm, stride_qw, stride_s, stride_z, stride_om,
                     BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_mask, col_mask = rows < M, cols < N
    shifts = ((ks % PER_WORD) * BITS)[:, None]                             # [BLOCK_K, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k0 + ks)[None, :],
                    mask=row_mask[:, None], other=0.0)                    # [BLOCK_M, BLOCK_K]
        w = tl.load(qw_ptr + ((k0 + ks) // PER_WORD)[:, None].to(tl.int64) * stride_qw + cols[None, :],
                    mask=col_mask[None, :], other=0)                      # [BLOCK_K, BLOCK_N], words repeat
        q = ((w >> shifts) & ((1 << BITS) - 1)).to(tl.float32)
        group = k0 // GROUP_SIZE
        s = tl.load(s_ptr + group * stride_s + cols, mask=col_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + group * stride_z + cols, mask=col_mask, other=0.0).to(tl.float32)
        wd = ((q - z[None, :]) * s[None, :]).to(a.dtype)
        acc += tl.dot(a, wd, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _int_dequant_kernel(qw_ptr, s_ptr, z_ptr, out_ptr, N, stride_qw, stride_s, stride_z, stride_o,
                        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n] for a [BLOCK_K, BLOCK_N] tile (BLOCK_K <= G)."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    k0 = tl.program_id(0) * BLOCK_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    words = tl.arange(0, WORDS)
    pos = tl.arange(0, PER_WORD)
    w = tl.load(qw_ptr + (k0 // PER_WORD + words)[:, None].to(tl.int64) * stride_qw + cols[None, :],
                mask=col_mask[None, :], other=0)                          # [WORDS, BLOCK_N]
    q = ((w[:, None, :] >> (pos * BITS)[None, :, None]) & ((1 << BITS) - 1)).to(tl.float32)
    group = k0 // GROUP_SIZE
    s = tl.load(s_ptr + group * stride_s + cols, mask=col_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + group * stride_z + cols, mask=col_mask, other=0.0).to(tl.float32)
    wd = (q - z[None, None, :]) * s[None, None, :]                        # [WORDS, P, BLOCK_N]
    rows = k0 + words[:, None] * PER_WORD + pos[None, :]                  # [WORDS, P]: k of each value
    tl.store(out_ptr + rows[:, :, None].to(tl.int64) * stride_o + cols[None, None, :],
             wd.to(out_ptr.dtype.element_ty), mask=col_mask[None, None, :])


def int_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The weight W [K, N] in `dtype` (the reference is `reference.dequantize_int_ref`)."""
    per_word = 32 // bits
    k, n = qweight.shape[0] * per_word, qweight.shape[1]
    block_k, block_n = min(64, group_size), 64
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    _int_dequant_kernel[(k // block_k, triton.cdiv(n, block_n))](
        qweight, scales, zeros, out, n, qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return out


def int_matmul_method(m: int) -> str:
    """The path of an M-row call: "gemv" (gemv_int.py) for decode-sized M, else "dequant"."""
    return "gemv" if m <= GEMV_MAX_M else "dequant"


def int_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bits: int, group_size: int, bias: torch.Tensor | None = None, method: str | None = None) -> torch.Tensor:
    """x [M, K] @ W [K, N] (+ b) -> [M, N]; `method` ("gemv" | "dequant" | "fused") overrides
    int_matmul_method(M)."""
    m, k = x.shape
    method = method or int_matmul_method(m)
    if method == "gemv":
        return int_gemv(x, qweight, scales, zeros, bits, group_size, bias)
    per_word = 32 // bits
    n = check_int_operands(x, qweight, scales, zeros, bits, group_size, bias)
    block_k = min(64, group_size)
    assert k % block_k == 0 and block_k % per_word == 0, f"K {k} must be a multiple of {block_k}"
    if method == "dequant":
        w = int_dequantize(qweight, scales, zeros, bits, group_size, x.dtype)
        return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)
    assert method == "fused", f"method must be gemv, dequant or fused, got {method!r}"
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if m <= 64 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int_gemm_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, m, n, k,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=4 if block_n == 64 else 8, num_stages=3)
    return out
