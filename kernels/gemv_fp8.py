"""fp8_gemv: weight-only fp8 (W8A16) for M = 1..16 rows: y = x @ (W * s)^T (+ b).

    x       [M, K]   bf16 / fp16 / fp32, contiguous K (kept in its dtype: no activation quantization)
    weight  [N, K]   float8_e4m3fn, nn.Linear layout, contiguous K
    scale   [N]      fp32 per output channel
    out     [M, N]   x's dtype, fp32 accumulation

A decode step is bound by reading the weights, so at small M the fp8 bytes are read once and
widened in registers; torch._scaled_mm (W8A8, per-token activation scales) stays for larger M.
Grid (N / BLOCK_N, split_k); program (pn, ps) owns outputs pn*BLOCK_N.. and the K range of split
ps for ALL rows:

    for each K tile:
        w = weight[cols, tile]                [BLOCK_N, BLOCK_K] fp8 (16 B per thread along K)
        FMA path  acc_m[BLOCK_N, BLOCK_K] += w * x[m, tile] per row m < BLOCK_M <= 4, reduced once at the end
        dot path  acc[BLOCK_N, 16] += tl.dot(w as x's dtype, x[rows, tile]^T)   (e4m3 -> bf16/fp16 exact)
    y = acc * scale (+ bias), or split-K partial sums -> split_k.store_rows

Configuration: gemv_config.choose("fp8", ...); version=2 runs gemv_fp8_v2.py's kernel (M <= 4,
in-thread partial sums: fewer registers, no shared memory). Reference: reference.fp8_gemv_ref.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import gemv_config, gemv_fp8_v2, pdl
from pdserve.kernels.gemv_config import GemvConfig
from pdserve.kernels.split_k import launch_buffers, rows_of, store_rows


@triton.jit
def _row_fma(acc, w, x_ptr, row, M, K, stride_xm, kk):
    """One row of the FMA path: acc [BN, BK] += w * x[row, kk] (rows past M read zeros)."""
    ok = (kk < K) & (tl.full(kk.shape, row, tl.int32) < M)
    return acc + w * tl.load(x_ptr + row * stride_xm + kk, mask=ok, other=0.0).to(tl.float32)[None, :]


@triton.jit(do_not_specialize=["M", "tiles_per_split", "split_k"])
def _fp8_gemv_kernel(x_ptr, w_ptr, scale_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, tiles_per_split, split_k,
                     stride_xm, stride_wn, stride_om,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     USE_DOT: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
                     DOT_PRECISION: tl.constexpr,
                     PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    # FMA path: one [BN, BK] accumulator per row (BLOCK_M <= 4) in the weight tile's own layout
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # [BN] outputs
    rows = tl.arange(0, BLOCK_M)                                          # [BM]
    ks = tl.arange(0, BLOCK_K)                                            # [BK]
    col_ok = cols < N
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn               # [BN, 1]
    if USE_DOT:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    k_lo = tl.program_id(1) * tiles_per_split * BLOCK_K                  # a multiple of BLOCK_K: 16 B loads
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    for k_start in range(k_lo, k_hi, BLOCK_K):
        kk = tl.multiple_of(k_start, BLOCK_K) + ks
        if EVEN_N and EVEN_K:
            w = tl.load(w_rows + kk[None, :])                             # [BN, BK] fp8
        else:
            w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & (kk < K)[None, :], other=0.0)
        if USE_DOT:
            xt = tl.load(x_ptr + rows[None, :] * stride_xm + kk[:, None],
                         mask=(rows < M)[None, :] & (kk < K)[:, None], other=0.0)                # [BK, BM]
            acc += tl.dot(w.to(x_ptr.dtype.element_ty), xt, input_precision=DOT_PRECISION)     # [BN, BM]
        else:
            wf = w.to(tl.float32)
            acc0 = _row_fma(acc0, wf, x_ptr, 0, M, K, stride_xm, kk)
            if BLOCK_M > 1:
                acc1 = _row_fma(acc1, wf, x_ptr, 1, M, K, stride_xm, kk)
            if BLOCK_M > 2:
                acc2 = _row_fma(acc2, wf, x_ptr, 2, M, K, stride_xm, kk)
                acc3 = _row_fma(acc3, wf, x_ptr, 3, M, K, stride_xm, kk)
    if USE_DOT:
        y = tl.trans(acc)                                                 # [BM, BN]
    else:
        y = rows_of(acc0, acc1, acc2, acc3, rows, BLOCK_M, BLOCK_N, 1)
    y = y * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    store_rows(y, rows, cols, M, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, pid_n, split_k, HAS_BIAS)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
             config: GemvConfig | None = None, gated: bool = False) -> torch.Tensor:
    """x [M <= 16, K] @ (weight [N, K] fp8 * scale [N])^T (+ b) -> [M, N] in x's dtype. `config`
    overrides gemv_config.choose (it is still fitted to the shape). `gated`: x is [M, 2K] (gate ++
    up) and the input is silu(gate) * up (activation.silu_and_mul's numbers, fused where the
    version-2 kernel runs)."""
    m, k = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    n = weight.shape[0]
    assert 1 <= m <= gemv_config.GEMV_MAX_M, f"fp8_gemv takes 1..{gemv_config.GEMV_MAX_M} rows, got {m}"
    assert weight.dtype == torch.float8_e4m3fn and weight.shape[1] == k and x.shape[1] == (2 * k if gated else k), \
        f"weight {tuple(weight.shape)} {weight.dtype} vs x {tuple(x.shape)}{' (gate ++ up)' if gated else ''}"
    assert x.stride(1) == 1 and weight.stride(1) == 1, "contiguous K"
    assert scale.shape == (n,) and scale.dtype == torch.float32 and scale.is_contiguous(), \
        f"scale must be fp32 [{n}], got {scale.dtype} {tuple(scale.shape)}"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    if config is None:
        config = gemv_config.choose("fp8", m, k, n, None, x.device)
    else:
        config = gemv_config.fit(config, "fp8", k, None)
    if gated and (config.version != 2 or m > gemv_config.FMA_MAX_M):  # only version 2 fuses the activation
        from pdserve.kernels.activation import silu_and_mul
        return fp8_gemv(silu_and_mul(x), weight, scale, bias, config)
    if config.version == 2 and m > gemv_config.FMA_MAX_M:
        rows = gemv_config.FMA_MAX_M
        return torch.cat([fp8_gemv(x[i:i + rows], weight, scale, bias, config) for i in range(0, m, rows)])
    tiles = triton.cdiv(k, config.block_k)
    tiles_per_split = triton.cdiv(tiles, config.split_k)
    split_k = triton.cdiv(tiles, tiles_per_split)  # no empty programs: the last-arrival count must be exact
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, locks = launch_buffers(x, n, config.block_n)
    if config.version == 2:  # gemv_fp8_v2.py: the FMA path with in-thread partial sums
        gemv_fp8_v2._fp8_gemv_v2_kernel[(triton.cdiv(n, config.block_n), split_k)](
            x, weight, scale, bias if bias is not None else scale, out, ws, locks, m, n, k, tiles_per_split, split_k,
            x.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=gemv_config.block_m(config, m), BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, EVEN_N=n % config.block_n == 0, EVEN_K=k % config.block_k == 0,
            VEC=min(gemv_fp8_v2.VEC, config.block_k), GATED=gated, num_warps=config.num_warps,
            num_stages=config.num_stages, **pdl.launch_args(x))
        return out
    _fp8_gemv_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, weight, scale, bias if bias is not None else scale, out, ws, locks, m, n, k, tiles_per_split, split_k,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=gemv_config.block_m(config, m), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, USE_DOT=config.dot, EVEN_N=n % config.block_n == 0, EVEN_K=k % config.block_k == 0,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl.launch_args(x))
    return out

