"""fp8_gemv version 2: the FMA path (M = 1..4) with per-thread partial sums instead of tile-sized
accumulators. Same operands and numbers as gemv_fp8.py (x [M, K] @ (weight [N, K] e4m3 *
scale [N])^T); launched by gemv_fp8.fp8_gemv when the configuration says version=2.

Why: v1 kept one fp32 accumulator per weight of its [BLOCK_N, BLOCK_K] tile (64 registers per
thread at 32 x 512 / 256 threads, 133 in all: one CTA of 8 warps per SM, 16 KiB of loads in
flight per SM) and moved x into the tile's layout through shared memory (4 barriers per tile).
It read HBM at 2.1-3.4 TB/s. Here each thread reduces its 16 contiguous products of a row at
once (an in-thread sum: FFMAs into one register), so the accumulators shrink VEC-fold and more
programs fit on an SM:

    for each K tile of BLOCK_K inputs:
        w = weight[cols, tile]                      [BN, BK] fp8, 16 B per thread along K
        for each row m < BLOCK_M:
            p = w * x[m, tile]                      x read in the slice of w's layout (L1)
            acc_m += sum(reshape(p, [BN, BK / VEC, VEC]), axis=2)    [BN, BK / VEC], in-thread
    y_m = sum(acc_m, axis=1) * scale (+ bias), or split-K partial sums -> split_k.store_rows

GATED (a Llama MLP's down projection): x is the gate_up output [M, 2K] and the kernel multiplies
silu(gate) * up, computed per K tile as kernels/activation.py computes it (fp32, rounded to x's
dtype): the same numbers as silu_and_mul then the GEMV, one launch and one [M, K] round trip fewer.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pdserve.kernels import pdl
from pdserve.kernels.split_k import stack_rows, store_rows

VEC = 8  # inputs a thread reads at once: 8 fp8 (8 bytes) of each of its rows, 8 of x (16 bytes)


@triton.jit
def _x(x_row, kk, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(x_row + kk).to(tl.float32)
    return tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)


@triton.jit
def _row(acc, wf, x_ptr, m: tl.constexpr, M, stride_xm, kk, K, EVEN_K: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr, GATED: tl.constexpr):
    """acc [BN, BK / VEC] += in-thread sums of wf [BN, BK] * x[m, kk] (rows m >= M read row M - 1:
    valid memory, never stored). GATED: x's row is gate [K] ++ up [K] and the input is
    silu(gate) * up, computed and rounded to x's dtype as kernels/activation.py does."""
    x_row = x_ptr + tl.minimum(M - 1, m) * stride_xm
    xv = _x(x_row, kk, K, EVEN_K)
    if GATED:
        up = _x(x_row + K, kk, K, EVEN_K)
        xv = (xv * tl.sigmoid(xv) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    p = wf * xv[None, :]
    return acc + tl.sum(tl.reshape(p, [BLOCK_N, BLOCK_K // VEC, VEC]), axis=2)


@triton.jit(do_not_specialize=["M", "tiles_per_split", "split_k"])
def _fp8_gemv_v2_kernel(x_ptr, w_ptr, scale_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, tiles_per_split, split_k,
                        stride_xm, stride_wn, stride_om,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, VEC: tl.constexpr, GATED: tl.constexpr = False,
                        PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # [BN] outputs
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)                                            # [BK]
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn               # [BN, 1]
    acc0 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K // VEC], dtype=tl.float32)
    k_lo = tl.program_id(1) * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(k_lo + tiles_per_split * BLOCK_K, K)
    for k_start in range(k_lo, k_hi, BLOCK_K):
        # contiguity VEC (not BLOCK_K): the weight and x loads then take VEC elements per thread
        # each, one layout for both (x 16 bytes, w 8): no shared-memory round trip for x
        kk = tl.multiple_of(k_start, BLOCK_K) + tl.max_contiguous(tl.multiple_of(ks, VEC), VEC)
        if EVEN_N and EVEN_K:
            w = tl.load(w_rows + kk[None, :], eviction_policy="evict_first")  # [BN, BK] fp8
        else:
            w = tl.load(w_rows + kk[None, :], mask=col_ok[:, None] & (kk < K)[None, :], other=0.0,
                        eviction_policy="evict_first")
        wf = w.to(tl.float32)
        acc0 = _row(acc0, wf, x_ptr, 0, M, stride_xm, kk, K, EVEN_K, BLOCK_N, BLOCK_K, VEC, GATED)
        if BLOCK_M > 1:
            acc1 = _row(acc1, wf, x_ptr, 1, M, stride_xm, kk, K, EVEN_K, BLOCK_N, BLOCK_K, VEC, GATED)
        if BLOCK_M > 2:
            acc2 = _row(acc2, wf, x_ptr, 2, M, stride_xm, kk, K, EVEN_K, BLOCK_N, BLOCK_K, VEC, GATED)
            acc3 = _row(acc3, wf, x_ptr, 3, M, stride_xm, kk, K, EVEN_K, BLOCK_N, BLOCK_K, VEC, GATED)
    rows = tl.arange(0, BLOCK_M)
    y = stack_rows(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1), tl.sum(acc3, axis=1),
                   rows, BLOCK_M, BLOCK_N)                                # [BM, BN]
    y = y * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    store_rows(y, rows, cols, M, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, pid_n, split_k, HAS_BIAS)
