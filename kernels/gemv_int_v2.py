"""int_gemv version 2: the FMA path for M = 1..4 rows rebuilt around the instruction count.

Same operands and numbers as gemv_int.py (x [M, K] @ grouped-int W [K, N] from qweight [K / P, N]
int32, scales / zeros [K / G, N]); this file holds only the kernel, launched by
gemv_int.int_gemv when the configuration says version=2.

Why: at M = 1 the v1 FMA path spent ~50 instructions per packed word (8 int4 values) on an H200:
8 gathered 2-byte loads of x per word row, a conversion and a multiply per x value, and per
value an AND/OR, an FADD (- 2^23) and an FFMA. It read HBM at 1.0-1.6 TB/s, bound by issue, not
by memory. Here a word costs ~20 (3 rotates, 8 LOP3, 8 FFMA):

    value p of a word (bits [b*p, b*(p+1))), rotated so that it lands at bit WIN (one funnel
    shift, shared by the two values that land together), then one LOP3:
        f = (rot(w) & (mask << WIN)) | exponent(2^(23 - WIN))  as fp32 = 2^(23 - WIN) + q   exact
    the offset 2^(23 - WIN) is never subtracted per value: t += f * x, and per K chunk
        sum_k (q - z) s x = s * (t - (off_even + z) * sum_even(x) - (off_odd + z) * sum_odd(x))
    (values at even p use window WIN_EVEN, odd p WIN_ODD; the sums of x are per thread scalars).

    int4, 16-bit x:  WIN 16 (offset 128) for even p, 12 (offset 2048) for odd p: rotations
                     0 (p 3, 4), 8 (p 1, 2), 24 (p 5, 6), 16 (p 7, 0); every product is exact
                     (2048 + q has 12 significant bits, x 11 at most), the accumulated rounding
                     relative to the signal is ~1e-4 (bf16 outputs round at 2e-3)
    int4, fp32 x:    WIN 16 for all (7 rotations): ~1e-5, within the fp32 tests' 1e-4
    int8:            WIN 15 (offset 256), 3 rotations

Layout: each program owns BLOCK_N columns and SLICES slices along K, as a [SLICES, BLOCK_N] tile
(the warps along K first where BLOCK_N = 128: a thread holds 4 columns as 16-byte loads), and
walks its split's chunks of SLICES * BLOCK_K inputs; slice j of a chunk takes its inputs
j * BLOCK_K .. (BLOCK_K divides the group: one scale / zero row per slice). Within a chunk the
BLOCK_K / P word rows are unrolled: their loads are independent, so the whole chunk is in flight
at once, and every x value (one load per slice: the same address in every lane of a warp) serves
the thread's columns:

    for chunk in split:                                  SLICES * BLOCK_K inputs
        s, z = scales / zeros [SLICES, BN] of the slices' groups
        t = 0 [SLICES, BN]; se = so = 0 [SLICES, 1] (per row m)
        for r in word rows of a slice (unrolled):
            w = qweight[slices' row r, cols]             [SLICES, BN] int32, 16 B per thread
            for p in 0..P-1 (unrolled):  f = lop3(rot(w)); x_p = x[m, k]; t += f * x_p; se|so += x_p
        acc += s * (t - (off_e + z) * se - (off_o + z) * so)
    out = sum of acc over the slices (+ bias), or split-K partial sums -> split_k.store_rows

With SLICES = 1 (the first tuned tables) K never spans threads and the kernel compiles to the same
instructions as before slices existed; with SLICES > 1 a program reduces its slices once, across
warps, so the same parallelism needs SLICES times fewer split-K programs and their atomic adds
into the workspace (a 14336 x 4096 GEMV at split 224: 0.9 M fp32 atomics per call). Measured on
an H200 (docs/benchmarks.md, fourteenth session): slices won the 4096 x 4096 weight (7.3 -> 6.4 us)
and lost slightly on the 8B model's other three, so the atomics are not what holds those at
1.6-2.8 TB/s; the sweep picks per weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl
from pdserve.kernels.split_k import stack_rows, store_rows

X_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # the kernel's X_KIND


def windows(bits: int, x_is_fp32: bool) -> tuple[int, int]:
    """(WIN_EVEN, WIN_ODD): the bit at which values at even / odd positions of a word are placed
    (see the module docstring for the precision of each)."""
    if bits == 8:
        return 15, 15
    return (16, 16) if x_is_fp32 else (16, 12)


def exponents(win_even: int, win_odd: int) -> tuple[int, int]:
    """The fp32 exponent bits of 2^(23 - WIN) per window. Passed as runtime arguments, not
    constants: LOP3 takes one immediate, and with both the mask and the exponent constant ptxas
    materializes one of them again before every use (a MOV per value, +30% instructions)."""
    return (150 - win_even) << 23, (150 - win_odd) << 23


@triton.jit
def _value(u, exp_even, exp_odd, P_IDX: tl.constexpr, BITS: tl.constexpr, WIN_EVEN: tl.constexpr, WIN_ODD: tl.constexpr):
    """2^(23 - WIN) + q as fp32 for value P_IDX of the uint32 words u: a rotation (none when the
    value already sits at WIN) and one AND-OR."""
    WIN: tl.constexpr = WIN_EVEN + (WIN_ODD - WIN_EVEN) * (P_IDX % 2)
    ROT: tl.constexpr = (WIN - BITS * P_IDX) % 32
    MASK: tl.constexpr = ((1 << BITS) - 1) << WIN
    if ROT != 0:
        u = (u << ROT) | (u >> (32 - ROT))  # a funnel shift (SHF.L.W)
    if P_IDX % 2 == 0:
        exponent = exp_even
    else:
        exponent = exp_odd
    return ((u & MASK) | exponent).to(tl.float32, bitcast=True)


@triton.jit
def _x_pair(x_ptr, m: tl.constexpr, M, stride_xm, ks, KP: tl.constexpr, X_KIND: tl.constexpr):
    """x[m, ks + KP] and x[m, ks + KP + 1] as fp32 [SLICES, 1] each (ks [SLICES, 1]: the slices'
    first inputs; KP even). 16-bit x comes as one 4-byte load of the pair (stride and ks even).
    Rows m >= M read row M - 1 instead (valid memory, no predication; never stored)."""
    row = tl.minimum(M - 1, m)
    if X_KIND == 0:
        xa = tl.load(x_ptr + row * stride_xm + ks + KP)
        xb = tl.load(x_ptr + row * stride_xm + ks + (KP + 1))
    else:
        pair = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + row * (stride_xm // 2) + (ks + KP) // 2)
        lo = pair << 16
        hi = pair & -65536  # 0xFFFF0000
        if X_KIND == 1:  # bf16: the upper half of an fp32
            xa = lo.to(tl.float32, bitcast=True)
            xb = hi.to(tl.float32, bitcast=True)
        else:  # fp16
            xa = (lo >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            xb = (hi >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return xa, xb


@triton.jit
def _rows(t, se, so, fa, fb, x_ptr, m: tl.constexpr, M, stride_xm, ks, KP: tl.constexpr, X_KIND: tl.constexpr):
    """Row m, values KP and KP + 1 (windows even / odd): t += fa * x_KP + fb * x_KP+1 as two FMAs."""
    xa, xb = _x_pair(x_ptr, m, M, stride_xm, ks, KP, X_KIND)
    t += fa * xa
    t += fb * xb
    return t, se + xa, so + xb


@triton.jit
def _apply(acc, t, se, so, s, z, OFF_EVEN: tl.constexpr, OFF_ODD: tl.constexpr):
    """acc += s * (sum_k (2^(23-WIN) + q) x - (off + z) * sum x): (q - z) s x summed."""
    return acc + s * (t - (z + OFF_EVEN) * se - (z + OFF_ODD) * so)


@triton.jit(do_not_specialize=["M", "chunks_per_split", "split_k", "exp_even", "exp_odd"])
def _int_gemv_v2_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, exp_even, exp_odd,
                        chunks_per_split, split_k, stride_xm, stride_qw, stride_s, stride_z, stride_om,
                        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_N: tl.constexpr, WIN_EVEN: tl.constexpr, WIN_ODD: tl.constexpr,
                        X_KIND: tl.constexpr, SLICES: tl.constexpr = 1,
                        PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    P: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // P                                     # word rows per slice
    OFF_EVEN: tl.constexpr = 1 << (23 - WIN_EVEN)
    OFF_ODD: tl.constexpr = 1 << (23 - WIN_ODD)
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # [BN]
    cols2 = cols[None, :]                                                 # [1, BN]
    ok2 = cols2 < N
    slices = tl.arange(0, SLICES)[:, None]                                # [S, 1]
    acc0 = tl.zeros([SLICES, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([SLICES, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([SLICES, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([SLICES, BLOCK_N], dtype=tl.float32)
    c_lo = tl.program_id(1) * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, K // (BLOCK_K * SLICES))
    for chunk in range(c_lo, c_hi):
        ks = chunk * (BLOCK_K * SLICES) + slices * BLOCK_K                # [S, 1] first input of each slice
        g = ks // GROUP_SIZE                                              # BLOCK_K divides G
        if EVEN_N:
            s = tl.load(s_ptr + g * stride_s + cols2).to(tl.float32)
            z = tl.load(z_ptr + g * stride_z + cols2).to(tl.float32)
        else:
            s = tl.load(s_ptr + g * stride_s + cols2, mask=ok2, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_z + cols2, mask=ok2, other=0.0).to(tl.float32)
        t0 = tl.zeros([SLICES, BLOCK_N], dtype=tl.float32)
        t1 = tl.zeros([SLICES, BLOCK_N], dtype=tl.float32)
        t2 = tl.zeros([SLICES, BLOCK_N], dtype=tl.float32)
        t3 = tl.zeros([SLICES, BLOCK_N], dtype=tl.float32)
        se0 = tl.zeros([SLICES, 1], dtype=tl.float32)
        so0, se1, so1, se2, so2, se3, so3 = se0, se0, se0, se0, se0, se0, se0
        for r in tl.static_range(ROWS):
            w_ptrs = qw_ptr + (ks // P + r).to(tl.int64) * stride_qw + cols2
            if EVEN_N:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=ok2, other=0, eviction_policy="evict_first")
            u = w.to(tl.uint32, bitcast=True)
            for q in tl.static_range(P // 2):  # values 2q (even window) and 2q + 1 (odd)
                fa = _value(u, exp_even, exp_odd, 2 * q, BITS, WIN_EVEN, WIN_ODD)
                fb = _value(u, exp_even, exp_odd, 2 * q + 1, BITS, WIN_EVEN, WIN_ODD)
                kp = r * P + 2 * q
                t0, se0, so0 = _rows(t0, se0, so0, fa, fb, x_ptr, 0, M, stride_xm, ks, kp, X_KIND)
                if BLOCK_M > 1:
                    t1, se1, so1 = _rows(t1, se1, so1, fa, fb, x_ptr, 1, M, stride_xm, ks, kp, X_KIND)
                if BLOCK_M > 2:
                    t2, se2, so2 = _rows(t2, se2, so2, fa, fb, x_ptr, 2, M, stride_xm, ks, kp, X_KIND)
                    t3, se3, so3 = _rows(t3, se3, so3, fa, fb, x_ptr, 3, M, stride_xm, ks, kp, X_KIND)
        acc0 = _apply(acc0, t0, se0, so0, s, z, OFF_EVEN, OFF_ODD)
        if BLOCK_M > 1:
            acc1 = _apply(acc1, t1, se1, so1, s, z, OFF_EVEN, OFF_ODD)
        if BLOCK_M > 2:
            acc2 = _apply(acc2, t2, se2, so2, s, z, OFF_EVEN, OFF_ODD)
            acc3 = _apply(acc3, t3, se3, so3, s, z, OFF_EVEN, OFF_ODD)
    rows = tl.arange(0, BLOCK_M)
    y = stack_rows(tl.sum(acc0, axis=0), tl.sum(acc1, axis=0), tl.sum(acc2, axis=0), tl.sum(acc3, axis=0),
                   rows, BLOCK_M, BLOCK_N)                                # [BM, BN]: the slices summed
    store_rows(y, rows, cols, M, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, pid_n, split_k, HAS_BIAS)
