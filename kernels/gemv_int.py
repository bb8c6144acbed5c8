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
        s, z = the tile's group row               [BLOCK_N] (G >= BLOCK_K: one group per tile)
        for p in 0..P-1 (unrolled):               value p of every word: inputs k = word*P + p
            c = (w & mask << sh | 0x4B000000) as fp32 - 2^23       = q * 2^sh, exact, no I2F
            x_p = x[rows, tile words * P + p]     strided gather, L1-resident
            FMA path  t[WORDS, BLOCK_N] += c * (x_p * 2^-sh) per row (BLOCK_M <= 4, registers only)
            dot path  t[BLOCK_N, 16] += tl.dot(c as x's dtype, x_p^T) * 2^-sh     (c exact in 16 bits)
            xs += x_p                             the tile's sums of x per word (dot: per row)
        acc += s * (t - z * xs)                   sum (q - z) s x = s (sum q x - z sum x)
    out = reduce(acc) (+ bias), or split-K partial sums -> split_k.store_rows

Unpacking stays off the slow pipes: a code OR'ed into the mantissa of 2^23 is an fp32 number
without an I2F (a quarter of the FMA rate), and the first IN_PLACE values of a word (4-bit: 5)
are masked where they lie, scaled by 2^sh (powers of two: exact), so a word of 8 values costs
8 LOP3 + 1 shift, and a value one FADD and one FFMA, with the zero point applied once per word.
Groups shorter than the tile (GGUF's 32, G = 64 with 256-input tiles) dequantize every value
((q - z) * s, s and z per word) before the sum instead.
Configuration: gemv_config.choose (table + heuristic); a configuration with version=2 runs
gemv_int_v2.py's kernel instead (M <= 4, fewer instructions per word, `slices` along K per program),
version=3 gemv_int_v3.py's (int4 with bf16 / fp16 x on Hopper's tensor cores, M <= 16; other x or
codes take the heuristic's configuration). Reference: reference.int_matmul_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import gemv_config, gemv_int_v2, gemv_int_v3, pdl
from pdserve.kernels.gemv_config import GemvConfig
from pdserve.kernels.split_k import launch_buffers, rows_of, store_rows

@triton.jit
def _codes(part, SH: tl.constexpr, BITS: tl.constexpr):
    """q * 2^SH as fp32, exactly, for the BITS-bit codes q at bit SH of the int32 words `part`:
    OR'ed into the mantissa of 2^23 (one LOP3 with the mask), then 2^23 subtracted (no I2F)."""
    c = ((part & (((1 << BITS) - 1) << SH)) | 0x4B000000).to(tl.float32, bitcast=True)
    return c - 8388608.0


@triton.jit
def _row_fma(t, xs, c, x_ptr, row, M, stride_xm, kp, SH: tl.constexpr):
    """One row of the FMA path: t [W, BN] += c * x[row, kp] * 2^-SH; xs [W] += x[row, kp]
    (a padded row past M reads zeros)."""
    xp = tl.load(x_ptr + row * stride_xm + kp, mask=tl.full(kp.shape, row, tl.int32) < M, other=0.0).to(tl.float32)
    return t + c * (xp * (1.0 / (1 << SH)))[:, None], xs + xp


@triton.jit(do_not_specialize=["M", "tiles_per_split", "split_k"])
def _int_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, tiles_per_split, split_k,
                     stride_xm, stride_qw, stride_s, stride_z, stride_om,
                     BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                     EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr, IN_PLACE: tl.constexpr,
                     PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    # dot path: tiles [BN, W] (the weight is tl.dot's A operand, x^T its B); FMA path: [W, BN],
    # one accumulator per row (BLOCK_M <= 4), so every tensor keeps the words' coalesced layout
    P: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // P
    TILE_IN_GROUP: tl.constexpr = GROUP_SIZE >= BLOCK_K
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # [BN]
    rows = tl.arange(0, BLOCK_M)                                          # [BM]
    words = tl.arange(0, WORDS)                                           # [W]
    col_ok = cols < N
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        cols2, words2, col_ok2 = cols[:, None], words[None, :], col_ok[:, None]          # tiles [BN, W]
    else:
        acc0 = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
        acc1 = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
        acc2 = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
        acc3 = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
        cols2, words2, col_ok2 = cols[None, :], words[:, None], col_ok[None, :]          # tiles [W, BN]
    k_lo = tl.program_id(1) * tiles_per_split * BLOCK_K                  # a multiple of BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    for k_start in range(k_lo, k_hi, BLOCK_K):
        k0 = tl.multiple_of(k_start, BLOCK_K)
        w_ptrs = qw_ptr + (k0 // P + words2).to(tl.int64) * stride_qw + cols2
        if EVEN_N:
            w = tl.load(w_ptrs)                                           # int32 words
        else:
            w = tl.load(w_ptrs, mask=col_ok2, other=0)
        if TILE_IN_GROUP:  # one group row [BN], loaded 1-D (a 2-D load would impose its own layout)
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_s + cols, mask=col_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_z + cols, mask=col_ok, other=0.0).to(tl.float32)
            if USE_DOT:
                s, z = s[:, None], z[:, None]                             # [BN, 1]
            else:
                s, z = s[None, :], z[None, :]                             # [1, BN]
        else:                                                             # a group row per word
            g = (k0 + words2 * P) // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_s + cols2, mask=col_ok2, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_z + cols2, mask=col_ok2, other=0.0).to(tl.float32)
        if USE_DOT:
            t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            xs = tl.zeros([WORDS, BLOCK_M], dtype=tl.float32)
        else:
            t0 = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
            t1 = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
            t2 = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
            t3 = tl.zeros([WORDS, BLOCK_N], dtype=tl.float32)
            xs0 = tl.zeros([WORDS], dtype=tl.float32)
            xs1 = tl.zeros([WORDS], dtype=tl.float32)
            xs2 = tl.zeros([WORDS], dtype=tl.float32)
            xs3 = tl.zeros([WORDS], dtype=tl.float32)
        w_hi = w >> (IN_PLACE * BITS)                                     # values IN_PLACE.. moved down
        for p in tl.static_range(P):
            if p < IN_PLACE:
                c = _codes(w, p * BITS, BITS)                             # q * 2^sh
                sh = p * BITS
            else:
                c = _codes(w_hi, (p - IN_PLACE) * BITS, BITS)
                sh = (p - IN_PLACE) * BITS
            if not TILE_IN_GROUP:
                c = (c - z * (1 << sh)) * s                               # w * 2^sh
            kp = k0 + words * P + p                                       # [W] inputs of value p
            if USE_DOT:
                xp = tl.load(x_ptr + rows[None, :] * stride_xm + kp[:, None], mask=(rows < M)[None, :], other=0.0)
                # [BN, W] @ [W, BM]; c * 2^-sh would cost a multiply per weight, the product one per output
                t += tl.dot(c.to(x_ptr.dtype.element_ty), xp, input_precision=DOT_PRECISION) * (1.0 / (1 << sh))
                xs += xp.to(tl.float32)
            else:
                t0, xs0 = _row_fma(t0, xs0, c, x_ptr, 0, M, stride_xm, kp, sh)
                if BLOCK_M > 1:
                    t1, xs1 = _row_fma(t1, xs1, c, x_ptr, 1, M, stride_xm, kp, sh)
                if BLOCK_M > 2:
                    t2, xs2 = _row_fma(t2, xs2, c, x_ptr, 2, M, stride_xm, kp, sh)
                    t3, xs3 = _row_fma(t3, xs3, c, x_ptr, 3, M, stride_xm, kp, sh)
        # sum_k (q - z) s x = s (sum_k q x - z sum_k x): the zero point once per word, not per value
        if not TILE_IN_GROUP:
            if USE_DOT:
                acc += t
            else:
                acc0 += t0
                acc1 += t1
                acc2 += t2
                acc3 += t3
        elif USE_DOT:
            acc += s * (t - z * tl.sum(xs, axis=0)[None, :])
        else:
            acc0 += s * (t0 - z * xs0[:, None])
            acc1 += s * (t1 - z * xs1[:, None])
            acc2 += s * (t2 - z * xs2[:, None])
            acc3 += s * (t3 - z * xs3[:, None])
    if USE_DOT:
        y = tl.trans(acc)                                                 # [BM, BN]
    else:
        y = rows_of(acc0, acc1, acc2, acc3, rows, BLOCK_M, BLOCK_N, 0)
    store_rows(y, rows, cols, M, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, pid_n, split_k, HAS_BIAS)


def check_int_operands(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                       bits: int, group_size: int, bias: torch.Tensor | None) -> int:
    """Asserts the shapes, dtypes and strides of an int matmul's operands; returns N."""
    k, n = x.shape[1], qweight.shape[1]
    assert bits in (4, 8), f"bits must be 4 or 8, got {bits}"
    assert qweight.dtype == torch.int32 and qweight.shape[0] * (32 // bits) == k, \
        f"qweight {tuple(qweight.shape)} {qweight.dtype} vs x {tuple(x.shape)} at {bits} bits"
    assert k % group_size == 0 and scales.shape == zeros.shape == (k // group_size, n), \
        f"scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} vs K {k}, N {n}, group {group_size}"
    assert x.stride(1) == 1 and qweight.stride(1) == 1 and scales.stride(1) == 1 and zeros.stride(1) == 1
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    return n


def in_place_values(bits: int, fp16_dot: bool) -> int:
    """How many values of a word are converted where they lie (the rest after one shift): their
    bits must stay under the 23 mantissa bits, and on the fp16 tl.dot path q * 2^sh within fp16's
    range (q <= 2^bits - 1, so 2^sh <= 2^(16 - bits))."""
    return (16 if fp16_dot else 23) // bits


def int_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
             group_size: int, bias: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """x [M <= 16, K] @ W [K, N] (+ b) -> [M, N]; `config` overrides gemv_config.choose (it is
    still fitted to the shape)."""
    m, k = x.shape
    n = check_int_operands(x, qweight, scales, zeros, bits, group_size, bias)
    assert 1 <= m <= gemv_config.GEMV_MAX_M, f"int_gemv takes 1..{gemv_config.GEMV_MAX_M} rows, got {m}"
    kind = f"int{bits}"
    if config is None:
        config = gemv_config.choose(kind, m, k, n, group_size, x.device)
    else:
        config = gemv_config.fit(config, kind, k, group_size)
    if config.version == 3:  # gemv_int_v3.py: int4 on tensor cores, bf16 / fp16 x, BLOCK_K >= 32 within a group
        if bits == 4 and x.dtype in gemv_int_v3.X_KINDS and config.block_k >= 32:
            return gemv_int_v3.int_gemv_v3(x, qweight, scales, zeros, bits, group_size, bias, block_n=config.block_n,
                                           block_k=config.block_k, split_k=config.split_k,
                                           num_warps=config.num_warps, num_stages=config.num_stages)
        config = gemv_config.untuned(kind, m, k, n, group_size, x.device)  # (fp32 x, 8-bit codes, short groups)
    if not config.dot and m > gemv_config.FMA_MAX_M:  # K too short for tl.dot's 16 words (tiny models)
        rows = gemv_config.FMA_MAX_M
        return torch.cat([int_gemv(x[i:i + rows], qweight, scales, zeros, bits, group_size, bias, config)
                          for i in range(0, m, rows)])
    tiles = k // (config.block_k * config.slices)  # version 2: chunks of slices x BLOCK_K inputs
    tiles_per_split = triton.cdiv(tiles, config.split_k)
    split_k = triton.cdiv(tiles, tiles_per_split)  # no empty programs: the last-arrival count must be exact
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, locks = launch_buffers(x, n, config.block_n)
    if config.version == 2:  # gemv_int_v2.py: the FMA path rebuilt (fit: BLOCK_K divides the group)
        win_even, win_odd = gemv_int_v2.windows(bits, x.dtype == torch.float32)
        x_kind = gemv_int_v2.X_KINDS[x.dtype]
        if x_kind and (x.stride(0) % 2 or x.data_ptr() % 4):  # 16-bit x is read in aligned pairs
            x = x.contiguous() if x.data_ptr() % 4 == 0 else x.clone()
        gemv_int_v2._int_gemv_v2_kernel[(triton.cdiv(n, config.block_n), split_k)](
            x, qweight, scales, zeros, bias if bias is not None else scales, out, ws, locks, m, n, k,
            *gemv_int_v2.exponents(win_even, win_odd), tiles_per_split, split_k, x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0),
            out.stride(0), BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
            BLOCK_M=gemv_config.block_m(config, m), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            EVEN_N=n % config.block_n == 0, WIN_EVEN=win_even, WIN_ODD=win_odd, X_KIND=x_kind, SLICES=config.slices,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_args(x))
        return out
    _int_gemv_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, ws, locks, m, n, k, tiles_per_split,
        split_k, x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        BITS=bits, GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
        BLOCK_M=gemv_config.block_m(config, m), BLOCK_N=config.block_n, BLOCK_K=config.block_k, USE_DOT=config.dot,
        EVEN_N=n % config.block_n == 0, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        IN_PLACE=in_place_values(bits, config.dot and x.dtype == torch.float16),
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_args(x))
    return out
