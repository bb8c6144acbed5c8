"""int_gemv version 3: the small-batch int4 GEMV on Hopper tensor cores (wgmma), with an integer-only
dequantization, the same cost for M = 1..16 rows.

Same operands as gemv_int.py (x [M, K] bf16 / fp16, qweight [K / 8, N] int32 with value j of a word
at bits [4j, 4j + 4) for input k = 8 * row + j, scales / zeros [K / G, N], w = (q - z) s); launched by
`int_gemv_v3`, which gemv_int.int_gemv calls for a configuration with version=3 (gemv_config's table,
or a measured table named by $PDSERVE_GEMV_TABLE).

Why: version 2 (gemv_int_v2.py) multiplies on the CUDA cores: at M = 1 its K loop is ~28 SASS
instructions per packed word (8 int4 values) counted as below (the docstring's ~20 is its
arithmetic core), and every further row adds 8 FFMA + 2 loads per word (M = 4: ~69 per word),
so at 2-16 rows (decode batches, speculative verify steps) it falls far behind the weight read.
Here the products run on the tensor cores, which cost the same for 1..16 rows, and the CUDA
cores only turn words into 16-bit operands:

    p_j = (w >> 4j) & 0x000F000F | MAGIC       j = 0..3: 3 shifts + 4 LOP3 per word
        MAGIC 0x43004300 (bf16 x): two bf16 numbers 128 + q (bf16's ulp is 1 in [128, 256): exact),
              0x64006400 (fp16 x): 1024 + q; the low half is value j, the high half value j + 4

    a 32-bit register holding two 16-bit operands is exactly what a tensor-core fragment holds,
    so p_j is used as is (the halves are split for Triton by a register-only `mov.b32 {lo, hi}`).
    The offset is never subtracted per value: per K tile (one group, BLOCK_K | G) and row m,
        sum_k (q - z) s x = s * (dot(128 + q, x) - (128 + z) * sum_k x)
    products 8 x 8 significant bits, exact in the fp32 accumulation; the cancellation of the
    offset costs ~(128 + 8) / |q - z| ~ 30x on fp32's 6e-8 (fp16: 1024, ~1e-5 relative).

Layout: acc [BLOCK_N, 16] = dot(W'[BLOCK_N, BLOCK_K], x'^T [BLOCK_K, 16]): the weight is the
first operand, so Triton picks Hopper's wgmma (m64 n16 k16) with A in registers and x^T in shared
memory (x is tiny: stored once per tile by all threads, read by the tensor cores; rows >= M pad
the 16 with copies of row M - 1, never stored). The order of k and n inside a tile is free as
long as x and the output use the same, so both are chosen to make the loaded words land in the
wgmma A fragment with no data movement (the words' layout conversion is register-only; what goes
through shared memory per tile is x, and the [BLOCK_N] s, z and [16] row sums of x, which are
converted to the accumulator's layout):

    fragment: thread (lane 4g + t) holds rows n' = g, g + 8 (+16 per warp, +16 NW per m tile)
              and k' pairs (2t, 2t + 1), (2t + 8, 2t + 9) of each 16-wide k slice
    k' = 32c + 16s + 8h + 2t + pr  <-  word 4c + t, value 2s + h + 4pr: thread t's word fills
              its four pairs of two k slices (pr = the low / high half of p_j, j = 2s + h)
    n'        the thread's fragment rows are made physically adjacent columns (one 16-byte load
              of 4 words per word row; `_phys_cols` / `_logical`); the x tile is loaded in
              physical order and permuted to k' in registers (4 PRMT per 8 values, shared by
              all warps through shared memory); the output is stored at the physical columns

    for tile in split:                          BLOCK_K inputs, one group
        w = qweight[tile's words, cols]         [C, 4, BN] int32 (16-byte loads)
        s, z = group row [BN]                   (converted to the accumulator's layout: small)
        x = x[rows, tile] -> k' order -> smem   [16, BK]; xs = sum_k x per row
        d = wgmma(join of p_0..p_3, x^T)        [BN, 16] fp32
        acc += s * (d - (z + OFF) * xs)         2 FFMA per element (BLOCK_M 8: half the elements)
    out = acc (+ bias), or split-K partial sums -> split_k.store_rows

SASS (sm_90, Triton 3.9's ptxas, compiled on CPU; loop instructions / words per thread per
iteration; tests/kernels/test_gemv_int_v3.py checks the bound): BLOCK_N 128 / 4 warps 18.7
(BLOCK_M 8) - 19.6 (16), BLOCK_N 256 / 4 warps 14.5 - 15.6, BLOCK_N 512 / 8 warps 13.3 - 14.4
(BLOCK_K 128, G 128) against version 2's 28.3 (M = 1) and 69.4 (M = 4) by the same count. Per
word: 4 LOP3 + 3 SHF + 1 HGMMA (+ 2 FFMA at G = 128 for the group correction, 256 / G in
general); the rest (x to shared memory and its row sums, s / z) is per tile and shrinks with
BLOCK_N. No spills; the wide tiles use up to 254 registers (one CTA of 4-8 warps per ~SM
quarter: the speed on an H200 is for the benchmark to tell, .dev/gemv3_bench.py).

Measured on one H200 (torch 2.11, Triton 3.6; .dev/gemv3_bench.py, docs/benchmarks.md nineteenth
session): correct at every shape and M = 1..16, but 1.2-4x SLOWER than version 2 (0.3-0.8 TB/s of
weight bytes against v2's 0.8-2.7), so no table entry uses it; it is reachable through a measured
table only. Triton 3.6 puts the dequantized tile through shared memory (st.shared + ldmatrix per
tile) instead of feeding wgmma from registers as 3.9 does; and the loop above (3.9's SASS) waits for its tile's loads with nothing
in flight behind them (no prefetch: num_stages does not pipeline register loads), then runs the
32 HGMMA as 4 dependent chains of 8 and six CTA barriers (x, s / z and the row sums through
shared memory), and 254 registers leave 1-2 CTAs per SM to hide that: the instruction count was
not the bound. Next steps, untried: the next tile's words loaded before this tile's HGMMA (BLOCK_N
128 has the registers), s / z and the sums of x kept out of shared memory.

Limits: 4-bit codes only; BLOCK_K divides the group (fit_block_k) and K; BLOCK_N = 16 NW * 2^i
(NW = num_warps, a multiple of 4 for wgmma); M <= 16. Under TRITON_INTERPRET=1 the inline
assembly is replaced by the same bit operations on 16-bit integers (ASM=False).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl
from pdserve.kernels.split_k import launch_buffers, store_rows

X_KINDS = {torch.bfloat16: 1, torch.float16: 2}
MAGIC = {torch.bfloat16: 0x43004300, torch.float16: 0x64006400}


@triton.jit
def _halves(p, X_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """The two 16-bit halves of the int32 tensor p as X_DTYPE tensors (low, high)."""
    if ASM:
        if X_DTYPE == tl.bfloat16:
            lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p],
                                               dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [p],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:  # the interpreter: the same bits through 16-bit integers
        lo = (p & 0xFFFF).to(tl.int16).to(X_DTYPE, bitcast=True)
        hi = (p >> 16).to(tl.int16).to(X_DTYPE, bitcast=True)
    return lo, hi


@triton.jit
def _codes(w, J: tl.constexpr, magic, X_DTYPE: tl.constexpr, ASM: tl.constexpr):
    """Values J and J + 4 of the words w as OFF + q in X_DTYPE: one shift and one LOP3 per word."""
    if J == 0:
        p = (w & 0x000F000F) | magic
    else:
        p = ((w >> (4 * J)) & 0x000F000F) | magic
    lo, hi = _halves(p, X_DTYPE, ASM)
    return tl.join(lo, hi)                                                # [..., 2]: values J, J + 4


@triton.jit
def _phys_cols(MTH: tl.constexpr, NW: tl.constexpr, RLO: tl.constexpr):
    """[MTH, NW, 8, RLO] physical column offsets: a thread's RLO columns are adjacent (one vector
    load), a warp's 8 * RLO too."""
    mth = tl.arange(0, MTH)[:, None, None, None]
    wp = tl.arange(0, NW)[None, :, None, None]
    g = tl.arange(0, 8)[None, None, :, None]
    r = tl.arange(0, RLO)[None, None, None, :]
    return ((mth * NW + wp) * 8 + g) * RLO + r


@triton.jit
def _logical(t, BLOCK_N: tl.constexpr):
    """Columns [..., MTH, NW, 8 (g), RLO] -> [..., BN] in the order of the wgmma rows n' =
    g + 8 hm + 16 wp + 64 mt (rlo = 2 mt_lo + hm, mt = MTLO mth + mt_lo): each thread then holds in
    registers exactly the columns it loaded."""
    R: tl.constexpr = len(t.shape)
    RLO: tl.constexpr = t.shape[R - 1]
    MTLO: tl.constexpr = RLO // 2
    if R == 4:
        t = tl.reshape(t, [t.shape[0], t.shape[1], 8, MTLO, 2])
        return tl.reshape(tl.permute(t, 0, 3, 1, 4, 2), [BLOCK_N])
    else:  # [C, MTH, NW, 8, 4 (t), RLO] -> [C, 4, BN]
        t = tl.reshape(t, [t.shape[0], t.shape[1], t.shape[2], 8, 4, MTLO, 2])
        return tl.reshape(tl.permute(t, 0, 4, 1, 5, 2, 6, 3), [t.shape[0], 4, BLOCK_N])


@triton.jit
def _first_half(t):
    """[R, 16] -> [R, 8]: columns 0..7."""
    t = tl.permute(tl.reshape(t, [t.shape[0], 2, 8]), 0, 2, 1)
    lo, hi = tl.split(t)
    return lo


@triton.jit(do_not_specialize=["M", "magic", "tiles_per_split", "split_k"])
def _int_gemv_v3_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, magic, tiles_per_split,
                        split_k, stride_xm, stride_qw, stride_s, stride_z, stride_om,
                        GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, X_KIND: tl.constexpr,
                        BLOCK_M: tl.constexpr, ASM: tl.constexpr, NW: tl.constexpr, PDL: tl.constexpr = False):
    if PDL:
        pdl.prologue()
    X_DTYPE: tl.constexpr = tl.bfloat16 if X_KIND == 1 else tl.float16
    OFF: tl.constexpr = 128.0 if X_KIND == 1 else 1024.0
    WORDS: tl.constexpr = BLOCK_K // 8
    C: tl.constexpr = WORDS // 4
    RL: tl.constexpr = BLOCK_N // (8 * NW)                               # columns per thread
    RLO: tl.constexpr = 4 if RL > 4 else RL                              # ... adjacent (<= 16 bytes)
    MTH: tl.constexpr = RL // RLO
    pid_n = tl.program_id(0)
    pc = pid_n * BLOCK_N + _phys_cols(MTH, NW, RLO)                      # [MTH, NW, 8, RLO]
    cols = _logical(pc, BLOCK_N)                                          # [BN] physical column of n'
    rows = tl.arange(0, 16)
    out_rows = tl.arange(0, BLOCK_M)
    xrow = tl.minimum(rows, M - 1)
    kk = tl.arange(0, BLOCK_K)
    # words [C, MTH, NW, 8, 4, RLO]: word 4c + t of column pc (t: lanes 0-1, the wgmma fragment's)
    w_offs = (4 * tl.arange(0, C)[:, None, None, None, None, None] + tl.arange(0, 4)[None, None, None, None, :, None]) \
        * stride_qw + pc[None, :, :, :, None, :]
    w_mask = (pc < N)[None, :, :, :, None, :]
    x_offs = xrow[:, None] * stride_xm + kk[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    t_lo = tl.program_id(1) * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, K // BLOCK_K)
    for tile in range(t_lo, t_hi):
        k0 = tile * BLOCK_K
        w_ptrs = qw_ptr + (k0 // 8).to(tl.int64) * stride_qw + w_offs
        if EVEN_N:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            w = tl.load(w_ptrs, mask=w_mask, other=0, eviction_policy="evict_first")
        w = _logical(w, BLOCK_N)                                          # [C, 4, BN]
        g = k0 // GROUP_SIZE
        s = _logical(tl.load(s_ptr + g * stride_s + pc, mask=pc < N, other=0.0).to(tl.float32), BLOCK_N)
        z = _logical(tl.load(z_ptr + g * stride_z + pc, mask=pc < N, other=0.0).to(tl.float32), BLOCK_N)
        x = tl.load(x_ptr + k0 + x_offs)                                  # [16, BK]
        xs = tl.sum(x.to(tl.float32), axis=1)                             # [16]
        x = tl.reshape(x, [16, C, 4, 2, 2, 2])                            # [m, c, t, pr, s, h]
        x = tl.reshape(tl.permute(x, 0, 1, 4, 5, 2, 3), [16, BLOCK_K])   # [m, k']
        a0 = _codes(w, 0, magic, X_DTYPE, ASM)
        a1 = _codes(w, 1, magic, X_DTYPE, ASM)
        a2 = _codes(w, 2, magic, X_DTYPE, ASM)
        a3 = _codes(w, 3, magic, X_DTYPE, ASM)
        b = tl.join(tl.join(a0, a1), tl.join(a2, a3))                    # [C, 4, BN, pr, h, s]: value 2s + h + 4pr
        wt = tl.reshape(tl.permute(b, 2, 0, 5, 4, 1, 3), [BLOCK_N, BLOCK_K])   # [n', k']
        d = tl.dot(wt, tl.trans(x))                                       # [BN, 16] fp32
        if BLOCK_M == 8:  # rows 8.. are padding: drop them (a thread's rows 8.. are registers of their own)
            d = _first_half(d)
            xs = _first_half(xs[None, :])
        else:
            xs = xs[None, :]
        acc += s[:, None] * (d - (z + OFF)[:, None] * xs)
    store_rows(tl.trans(acc), out_rows, cols, M, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, pid_n, split_k, HAS_BIAS)


def fit_block_k(block_k: int, k: int, group_size: int) -> int:
    """The largest BLOCK_K <= block_k that divides K and the group (one group per tile), >= 32
    (4 words per column: one per lane t of the fragment)."""
    while block_k > 32 and (k % block_k or group_size % block_k):
        block_k //= 2
    if k % block_k or group_size % block_k:
        raise ValueError(f"no BLOCK_K >= 32 divides K = {k} and the group {group_size}")
    return block_k


def check_block_n(block_n: int, num_warps: int) -> None:
    rows = block_n // (8 * num_warps)  # fragment rows per thread: hm x m tiles
    if block_n % (8 * num_warps) or rows < 2 or rows & (rows - 1):
        raise ValueError(f"BLOCK_N must be 16 * num_warps * 2^i, got {block_n} with {num_warps} warps")


def int_gemv_v3(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group_size: int, bias: torch.Tensor | None = None, *, block_n: int, block_k: int, split_k: int,
                num_warps: int, num_stages: int = 1) -> torch.Tensor:
    """x [M <= 16, K] bf16 / fp16 @ W [K, N] (+ b) -> [M, N] in x's dtype (4-bit codes)."""
    from pdserve.kernels.gemv_int import check_int_operands
    m, k = x.shape
    n = check_int_operands(x, qweight, scales, zeros, bits, group_size, bias)
    if bits != 4:
        raise ValueError(f"int_gemv_v3 takes 4-bit codes, got {bits}")
    if x.dtype not in X_KINDS or not 1 <= m <= 16:
        raise ValueError(f"int_gemv_v3 takes 1..16 rows of bf16 / fp16 x, got {tuple(x.shape)} {x.dtype}")
    check_block_n(block_n, num_warps)
    block_k = fit_block_k(block_k, k, group_size)
    tiles = k // block_k
    tiles_per_split = triton.cdiv(tiles, max(1, min(split_k, tiles)))
    split_k = triton.cdiv(tiles, tiles_per_split)  # no empty programs: the last-arrival count must be exact
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    ws, locks = launch_buffers(x, n, block_n)
    _int_gemv_v3_kernel[(triton.cdiv(n, block_n), split_k)](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, ws, locks, m, n, k, MAGIC[x.dtype],
        tiles_per_split, split_k, x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        GROUP_SIZE=group_size, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_N=n % block_n == 0, X_KIND=X_KINDS[x.dtype], BLOCK_M=8 if m <= 8 else 16, ASM=x.is_cuda,
        NW=num_warps, num_warps=num_warps, num_stages=num_stages, **pdl.launch_args(x))
    return out
