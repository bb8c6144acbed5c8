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

Layout: each program owns BLOCK_N columns with no warp along K (all warps side by side along N,
a thread holds BLOCK_N / (32 * num_warps) columns as 16-byte loads), and walks its split's K
chunks of BLOCK_K inputs (BLOCK_K divides the group). Within a chunk the BLOCK_K / P word rows
are unrolled: their loads are independent, so the whole chunk is in flight at once, and every
x value (one uniform scalar load, the same address in every lane) serves the thread's columns:

    for chunk in split:                                  BLOCK_K inputs, inside one group
        s, z = scales / zeros [BN] of the chunk's group
        t = 0 [BN]; se = so = 0 (per row m)
        for r in word rows of the chunk (unrolled):
            w = qweight[row r, cols]                     [BN] int32, 16 B per thread
            for p in 0..P-1 (unrolled):  f = lop3(rot(w)); x_p = x[m, k]; t += f * x_p; se|so += x_p
        acc += s * (t - (off_e + z) * se - (off_o + z) * so)
    out = acc (+ bias), or split-K partial sums -> split_k.store_rows

No cross-thread reduction is needed before the split-K sum: K never spans threads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl
from pdserve.kernels.split_k import stack_rows, store_rows

V2_MAX_M = 4  # one accumulator set per row (registers)
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
def _x_row(x_ptr, m: tl.constexpr, M, stride_xm, k0, X_KIND: tl.constexpr):
    """Where row m's inputs k0.. start: 32-bit pairs for 16-bit x (stride and k0 even), values for
    fp32. Rows m >= M read row M - 1 instead (valid memory, no predication; never stored)."""
    row = tl.minimum(M - 1, m)
    if X_KIND == 0:  # (one return: Triton compiles the code after a return in a static branch too)
        start = x_ptr + row * stride_xm + k0
    else:
        start = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + row * (stride_xm // 2) + k0 // 2
    return start


@triton.jit
def _row(t, se, so, held, f, x_row, KP: tl.constexpr, X_KIND: tl.constexpr):
    """Row m: t [BN] += f * x[m, k0 + KP]; the x value into the sum of its window (even / odd KP).
    16-bit x comes a pair at a time (one uniform 4-byte load at even KP, `held` at odd)."""
    if X_KIND == 0:
        xv = tl.load(x_row + KP)
    else:
        if KP % 2 == 0:
            held = tl.load(x_row + KP // 2)
            half = held << 16
        else:
            half = held & -65536  # 0xFFFF0000
        if X_KIND == 1:  # bf16: the upper half of an fp32
            xv = half.to(tl.float32, bitcast=True)
        else:  # fp16
            xv = (half >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    if KP % 2 == 0:
        se += xv
    else:
        so += xv
    return t + f * xv, se, so, held


@triton.jit
def _apply(acc, t, se, so, s, z, OFF_EVEN: tl.constexpr, OFF_ODD: tl.constexpr):
    """acc [BN] += s * (sum_k (2^(23-WIN) + q) x - (off + z) * sum x): (q - z) s x summed."""
    return acc + s * (t - (z + OFF_EVEN) * se - (z + OFF_ODD) * so)


@triton.jit(do_not_specialize=["M", "chunks_per_split", "split_k", "exp_even", "exp_odd"])
def _int_gemv_v2_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, exp_even, exp_odd,
                        chunks_per_split, split_k, stride_xm, stride_qw, stride_s, stride_z, stride_om,
                        BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_N: tl.constexpr, WIN_EVEN: tl.constexpr, WIN_ODD: tl.constexpr,
                        X_KIND: tl.constexpr,
                        PDL: tl.constexpr = False):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    P: tl.constexpr = 32 // BITS
    ROWS: tl.constexpr = BLOCK_K // P                                     # word rows per chunk
    OFF_EVEN: tl.constexpr = 1 << (23 - WIN_EVEN)
    OFF_ODD: tl.constexpr = 1 << (23 - WIN_ODD)
    pid_n = tl.program_id(0)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                        # [BN]
    col_ok = cols < N
    acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N], dtype=tl.float32)
    c_lo = tl.program_id(1) * chunks_per_split
    c_hi = tl.minimum(c_lo + chunks_per_split, K // BLOCK_K)
    for chunk in range(c_lo, c_hi):
        k0 = chunk * BLOCK_K
        g = k0 // GROUP_SIZE                                              # BLOCK_K divides G
        if EVEN_N:
            s = tl.load(s_ptr + g * stride_s + cols).to(tl.float32)
            z = tl.load(z_ptr + g * stride_z + cols).to(tl.float32)
        else:
            s = tl.load(s_ptr + g * stride_s + cols, mask=col_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g * stride_z + cols, mask=col_ok, other=0.0).to(tl.float32)
        t0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        t1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        t2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        t3 = tl.zeros([BLOCK_N], dtype=tl.float32)
        se0, so0, se1, so1, se2, so2, se3, so3 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        h0, h1, h2, h3 = 0, 0, 0, 0  # x pairs (16-bit x)
        xr0 = _x_row(x_ptr, 0, M, stride_xm, k0, X_KIND)
        xr1 = _x_row(x_ptr, 1, M, stride_xm, k0, X_KIND)
        xr2 = _x_row(x_ptr, 2, M, stride_xm, k0, X_KIND)
        xr3 = _x_row(x_ptr, 3, M, stride_xm, k0, X_KIND)
        for r in tl.static_range(ROWS):
            w_ptrs = qw_ptr + (k0 // P + r).to(tl.int64) * stride_qw + cols
            if EVEN_N:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=col_ok, other=0, eviction_policy="evict_first")
            u = w.to(tl.uint32, bitcast=True)
            for p in tl.static_range(P):
                f = _value(u, exp_even, exp_odd, p, BITS, WIN_EVEN, WIN_ODD)
                t0, se0, so0, h0 = _row(t0, se0, so0, h0, f, xr0, r * P + p, X_KIND)
                if BLOCK_M > 1:
                    t1, se1, so1, h1 = _row(t1, se1, so1, h1, f, xr1, r * P + p, X_KIND)
                if BLOCK_M > 2:
                    t2, se2, so2, h2 = _row(t2, se2, so2, h2, f, xr2, r * P + p, X_KIND)
                    t3, se3, so3, h3 = _row(t3, se3, so3, h3, f, xr3, r * P + p, X_KIND)
        acc0 = _apply(acc0, t0, se0, so0, s, z, OFF_EVEN, OFF_ODD)
        if BLOCK_M > 1:
            acc1 = _apply(acc1, t1, se1, so1, s, z, OFF_EVEN, OFF_ODD)
        if BLOCK_M > 2:
            acc2 = _apply(acc2, t2, se2, so2, s, z, OFF_EVEN, OFF_ODD)
            acc3 = _apply(acc3, t3, se3, so3, s, z, OFF_EVEN, OFF_ODD)
    rows = tl.arange(0, BLOCK_M)
    y = stack_rows(acc0, acc1, acc2, acc3, rows, BLOCK_M, BLOCK_N)        # [BM, BN]
    store_rows(y, rows, cols, M, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, pid_n, split_k, HAS_BIAS)
