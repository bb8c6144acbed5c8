"""int_matmul: x @ W for 4-/8-bit grouped-int weights, dequantized inside the GEMM.

    x        [M, K]        bf16 / fp16 / fp32, contiguous K
    qweight  [K / P, N]    int32; P = 32 / bits values of consecutive inputs per word, value j of
                           a word at bits [bits*j, bits*(j+1)) (GPTQ's qweight layout)
    scales   [K / G, N]    per group of G inputs and output     } w[k, n] = (q[k, n] - z[k // G, n])
    zeros    [K / G, N]    zero points (float)                  }           * s[k // G, n]
    out      [M, N]        x's dtype, fp32 accumulation

Two kernels, chosen by M on the host (static per CUDA-graph bucket):

  M == 1  _int_gemv_kernel: a program owns BLOCK_N outputs and walks K in tiles of BLOCK_K <= G
          inputs (so one scale/zero row per tile). A tile of words [BLOCK_K/P, BLOCK_N] is read
          once (N contiguous, coalesced), unpacked in registers to [BLOCK_K/P, P, BLOCK_N], and
          the group's scale is applied after the dot product:
              acc[n] += s[n] * (sum_k x[k] q[k, n] - z[n] * sum_k x[k])
          With too few programs for the GPU, the K range is split (SPLIT_K) and the partial
          sums added atomically into an fp32 buffer.
  M  > 1  _int_gemm_kernel: tiles [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]; the weight tile is
          dequantized to x's dtype in registers and fed to tl.dot.

The reference is `reference.int_matmul_ref` (dequantize, then matmul).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _int_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, N, K, stride_qw, stride_s, stride_z,
                     BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    words = tl.arange(0, WORDS)
    pos = tl.arange(0, PER_WORD)
    shifts = (pos * BITS)[None, :, None]                                   # [1, P, 1]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w = tl.load(qw_ptr + (k0 // PER_WORD + words)[:, None].to(tl.int64) * stride_qw + cols[None, :],
                    mask=col_mask[None, :], other=0)                      # [WORDS, BLOCK_N] int32
        q = ((w[:, None, :] >> shifts) & ((1 << BITS) - 1)).to(tl.float32)  # [WORDS, P, BLOCK_N]
        xk = tl.load(x_ptr + k0 + words[:, None] * PER_WORD + pos[None, :]).to(tl.float32)  # [WORDS, P]
        xq = tl.sum(tl.sum(q * xk[:, :, None], axis=1), axis=0)           # [BLOCK_N]
        group = k0 // GROUP_SIZE
        s = tl.load(s_ptr + group * stride_s + cols, mask=col_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + group * stride_z + cols, mask=col_mask, other=0.0).to(tl.float32)
        acc += s * (xq - z * tl.sum(tl.sum(xk, axis=1), axis=0))
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)
    else:
        tl.atomic_add(out_ptr + cols, acc, mask=col_mask)                 # fp32 buffer; bias added after


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


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemv_config(n: int, k: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, SPLIT_K): 32 outputs (128-byte rows of words) when that gives >= 2 programs per
    SM, else 16; split K only when even then fewer programs than SMs (small weights)."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 8
    block_n = 32 if triton.cdiv(n, 32) >= 2 * sms else 16
    programs = triton.cdiv(n, block_n)
    split = 1 if programs >= sms else min(triton.cdiv(2 * sms, programs), k // block_k)
    return block_n, max(split, 1)


def int_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               bits: int, group_size: int, bias: torch.Tensor | None = None,
               gemv: tuple[int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ W [K, N] (+ b) -> [M, N]; `gemv` = (BLOCK_N, SPLIT_K) overrides gemv_config."""
    m, k = x.shape
    per_word = 32 // bits
    n = qweight.shape[1]
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    assert qweight.dtype == torch.int32 and qweight.shape[0] * per_word == k, \
        f"qweight {tuple(qweight.shape)} {qweight.dtype} vs x {tuple(x.shape)} at {bits} bits"
    assert k % group_size == 0 and scales.shape == zeros.shape == (k // group_size, n), \
        f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} vs K {k}, N {n}, group {group_size}"
    assert x.stride(1) == 1 and qweight.stride(1) == 1 and scales.stride(1) == 1 and zeros.stride(1) == 1
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    block_k = min(128 if m == 1 else 64, group_size)
    assert k % block_k == 0 and block_k % per_word == 0, f"K {k} must be a multiple of {block_k}"
    if m == 1:
        block_n, split = gemv or gemv_config(n, k, block_k, x.device)
        out = (torch.empty if split == 1 else torch.zeros)((1, n), dtype=x.dtype if split == 1 else torch.float32,
                                                             device=x.device)
        _int_gemv_kernel[(triton.cdiv(n, block_n), split)](
            x, qweight, scales, zeros, bias if bias is not None else scales, out, n, k,
            qweight.stride(0), scales.stride(0), zeros.stride(0),
            BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
            SPLIT_K=split, num_warps=4, num_stages=4)
        if split == 1:
            return out
        return (out if bias is None else out + bias.float()).to(x.dtype)
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
