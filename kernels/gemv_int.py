"""int_gemv: x @ W for M = 1..16 rows and 4-/8-bit grouped-int weights, at the speed of reading W.

    x        [M, K]       bf16 / fp16 / fp32, contiguous K
    qweight  [K / P, N]   int32, P = 32 / bits consecutive inputs per word (value j at bits
                          [bits*j, bits*(j+1))); N contiguous: a row of words is one coalesced read
    scales   [K / G, N]   } w[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]
    zeros    [K / G, N]   }
    out      [M, N]       x's dtype, fp32 accumulation

Grid (N / BLOCK_N, split_k). Program (pn, ps) owns outputs pn*BLOCK_N.. and the K range of split
ps, and ALL M rows, so each packed word is read from HBM exactly once per call:

    for each K tile of BLOCK_K inputs (WORDS = BLOCK_K / P rows of words):
        w = qweight[tile words, cols]             [BLOCK_N, WORDS] int32, read along N (16 B/thread)
        s, z = group row(s) of the tile           [BLOCK_N, 1], or [BLOCK_N, WORDS] if G < BLOCK_K
        for p in 0..P-1 (unrolled):               value p of every word: inputs k = word*P + p
            c = (w & mask << sh | 0x4B000000) as fp32 - (2^23 + z * 2^sh)  = (q - z) * 2^sh, exact
            x_p = x[rows, tile words * P + p]     strided gather, L1-resident
            FMA path  t[BLOCK_M, BLOCK_N, WORDS] += c * (x_p * 2^-sh)      (registers only)
            dot path  t[BLOCK_N, 16] += tl.dot(c as x's dtype, x_p^T) * 2^-sh   (c exact in 16 bits)
        acc += s * t                              scale once per tile (G >= BLOCK_K: one group)
    out = reduce(acc) (+ bias), or split-K partial sums -> split_k.store_rows

Unpacking stays off the slow pipes: a code OR'ed into the mantissa of 2^23 is an fp32 number
without an I2F (a quarter of the FMA rate), and the first IN_PLACE values of a word (4-bit: 5)
are masked where they lie, scaled by 2^sh (powers of two: exact), so a word of 8 values costs
8 LOP3 + 1 shift instead of 8 shifts + 8 ANDs + 8 I2F. GGUF's fractional zero points
(integer_zeros=False) subtract 2^23 and z separately. Groups shorter than the tile (GGUF's 32,
G = 64 with 256-input tiles) scale every value before the sum instead.
Configuration: gemv_config.choose (table + heuristic). Reference: reference.int_matmul_ref.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from pdserve.kernels import gemv_config
from pdserve.kernels.gemv_config import GemvConfig
from pdserve.kernels.split_k import launch_buffers, store_rows

@triton.jit(do_not_specialize=["M", "k_per_split", "split_k"])
def _int_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, k_per_split, split_k,
                     stride_xm, stride_qw, stride_s, stride_z, stride_om,
                     BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, INT_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                     EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, IN_PLACE: tl.constexpr):
    P: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // P
    TILE_IN_GROUP: tl.constexpr = GROUP_SIZE >= BLOCK_K
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # [BN]
    rows = tl.arange(0, BLOCK_M)                                          # [BM]
    words = tl.arange(0, WORDS)                                           # [W]
    col_ok = cols < N
    row_ok = rows < M
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, WORDS], dtype=tl.float32)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        w_ptrs = qw_ptr + (k0 // P + words)[None, :].to(tl.int64) * stride_qw + cols[:, None]
        if EVEN_N:
            w = tl.load(w_ptrs)                                           # [BN, W] int32
        else:
            w = tl.load(w_ptrs, mask=col_ok[:, None], other=0)
        if TILE_IN_GROUP:
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_s + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]   # [BN, 1]
            z = tl.load(z_ptr + g * stride_z + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        else:
            g = ((k0 + words * P) // GROUP_SIZE)[None, :]
            s = tl.load(s_ptr + g * stride_s + cols[:, None], mask=col_ok[:, None], other=0.0).to(tl.float32)  # [BN, W]
            z = tl.load(z_ptr + g * stride_z + cols[:, None], mask=col_ok[:, None], other=0.0).to(tl.float32)
        if USE_DOT:
            t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            t = tl.zeros([BLOCK_M, BLOCK_N, WORDS], dtype=tl.float32)
        w_hi = w >> (IN_PLACE * BITS)                                     # values IN_PLACE.. moved down
        for p in tl.static_range(P):
            if p < IN_PLACE:
                part = w
                sh = p * BITS
            else:
                part = w_hi
                sh = (p - IN_PLACE) * BITS
            # 2^23 + q * 2^sh: value p masked where it lies, in the mantissa of 2^23 (one LOP3)
            c = ((part & (((1 << BITS) - 1) << sh)) | 0x4B000000).to(tl.float32, bitcast=True)
            if INT_ZEROS:
                c = c - (z * (1 << sh) + 8388608.0)                       # (q - z) * 2^sh, exact
            else:
                c = (c - 8388608.0) - z * (1 << sh)
            if not TILE_IN_GROUP:
                c = c * s
            kp = k0 + words * P + p                                       # [W] inputs of value p
            if USE_DOT:
                xp = tl.load(x_ptr + rows[None, :] * stride_xm + kp[:, None], mask=row_ok[None, :], other=0.0)
                # [BN, W] @ [W, BM]; c * 2^-sh would cost a multiply per weight, the product one per output
                t += tl.dot(c.to(x_ptr.dtype.element_ty), xp, input_precision=DOT_PRECISION) * (1.0 / (1 << sh))
            else:
                xp = tl.load(x_ptr + rows[:, None] * stride_xm + kp[None, :], mask=row_ok[:, None],
                             other=0.0).to(tl.float32) * (1.0 / (1 << sh))  # [BM, W], exact power of two
                t += c[None, :, :] * xp[:, None, :]
        if TILE_IN_GROUP:
            if USE_DOT:
                acc += s * t
            else:
                acc += s[None, :, :] * t
        else:
            acc += t
    if USE_DOT:
        y = tl.trans(acc)                                                 # [BM, BN]
    else:
        y = tl.sum(acc, axis=2)
    store_rows(y, rows, cols, M, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, pid_n, split_k, HAS_BIAS)


def in_place_values(bits: int, fp16_dot: bool) -> int:
    """How many values of a word are converted where they lie (the rest after one shift): their
    bits must stay under the 23 mantissa bits, and on the fp16 tl.dot path (q - z) * 2^sh within
    fp16's range (|q - z| <= 2^bits - 1, so 2^sh <= 2^(16 - bits))."""
    return (16 if fp16_dot else 23) // bits


def int_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
             group_size: int, bias: torch.Tensor | None = None, integer_zeros: bool = False,
             config: GemvConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] @ W [K, N] (+ b) -> [M, N]. `integer_zeros`: the zero points are integers
    (AWQ, GPTQ; not GGUF's fractional ones), which saves a subtraction per weight. `config`
    overrides gemv_config.choose (it is still fitted to the shape)."""
    m, k = x.shape
    per_word = 32 // bits
    n = qweight.shape[1]
    assert 1 <= m <= gemv_config.GEMV_MAX_M, f"int_gemv takes 1..{gemv_config.GEMV_MAX_M} rows, got {m}"
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    assert qweight.dtype == torch.int32 and qweight.shape[0] * per_word == k, \
        f"qweight {tuple(qweight.shape)} {qweight.dtype} vs x {tuple(x.shape)} at {bits} bits"
    assert k % group_size == 0 and scales.shape == zeros.shape == (k // group_size, n), \
        f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} vs K {k}, N {n}, group {group_size}"
    assert x.stride(1) == 1 and qweight.stride(1) == 1 and scales.stride(1) == 1 and zeros.stride(1) == 1
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    kind = f"int{bits}"
    if config is None:
        config = gemv_config.choose(kind, m, k, n, group_size, x.device)
    else:
        config = gemv_config.fit(config, kind, k, group_size)
    if config.dot and x.dtype == torch.float16 and not integer_zeros and group_size >= config.block_k:
        config = replace(config, dot=False)  # (q - z) * 2^sh with an unknown fractional z might pass fp16's range
    tiles = k // config.block_k
    k_per_split = triton.cdiv(tiles, config.split_k) * config.block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty programs: the last-arrival count must be exact
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, locks = launch_buffers(x, n, config.block_n)
    _int_gemv_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, ws, locks, m, n, k, k_per_split,
        split_k, x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size, INT_ZEROS=integer_zeros, HAS_BIAS=bias is not None,
        BLOCK_M=gemv_config.block_m(config, m), BLOCK_N=config.block_n, BLOCK_K=config.block_k, USE_DOT=config.dot,
        EVEN_N=n % config.block_n == 0, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        IN_PLACE=in_place_values(bits, config.dot and x.dtype == torch.float16),
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out
