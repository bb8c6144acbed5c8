"""paged_decode_attention: one new query token per sequence against its paged KV cache.

    q             [B, H, D]            query of the token at position context_lens[b] - 1
    k/v_cache     [num_blocks, block_size, KVH, D]   (views of one [2, ...] tensor are fine)
    block_tables  [B, M] int32         physical block of each logical block; padding never read
    context_lens  [B] int32            keys 0 .. context_lens[b] - 1 are in the cache (0: zero output)
    out           [B, H, D]
    k/v_scale     [KVH] fp32, fp8 (e4m3) caches only: cache = x / scale; the K scale is folded into
                  the score scale, the V scale into the output (one multiply per program each)

Paged layout of one sequence (block_size 4 drawn; context_len 10):

    block_tables[b] = [ 7 | 2 | 9 | pad ... ]      k_cache[block_id, slot, kv_head, :]
                        |   |   '------------->  block 9: [ p8 | p9 | -- | -- ]
                        |   '----------------->  block 2: [ p4 | p5 | p6 | p7 ]
                        '--------------------->  block 7: [ p0 | p1 | p2 | p3 ]

Work of one program (b, kv_head, split); GQA group G = H // KVH query heads:

    logical positions of sequence b (sliding window: from max(0, L - window)):
      0                       L-1
      |====== split 0 ======|====== split 1 ======|==== split 2 ====|
          tile of BLOCK_N positions -> rows gathered through the block table:
          position p -> k_cache[block_tables[b, p // block_size], p % block_size, kv_head, :]

      q group [G, D] (all query heads of kv_head, loaded once)
      K tile  [BLOCK_N, D]  ->  scores [G, BLOCK_N] -> online softmax -> acc [G, D] += p @ V tile

Score and value products use tl.dot when the group has >= 16 rows, else a broadcast multiply and
sum (mma tiles need 16 rows; padding a group of 4 to 16 would waste most of it). The benchmark
times both paths for G = 4 (rows "dot" / "bcast"): if padding wins, lower _MIN_DOT_ROWS.

Row groups (`row_groups` [B] int32, optional): consecutive rows of one sequence whose contexts
grow by one (a speculative verify step's [t, d1 .. dn] run as one-token rows: the same block
table, context_lens c, c+1, ..): row b with row_groups[b] = n > 0 leads rows b .. b+n-1, 0 marks
a row led by an earlier one. A leader's program takes the query heads of all its rows as one
[n * G, D] tile, so each K/V tile is read once for the group instead of once per row, and each
query row masks the keys past its own context (window: before its own start); the others'
programs find no query rows and do nothing. One H200, SmolLM2 (G = 3), a 9-row verify graph against 1 row: 0.97
vs 0.68 ms per step at 600 tokens of context, 1.65 vs 0.71 at 2,000, before groups. The tile holds
the longest group's query rows rounded up to a power of two (9 x 3 -> 32, not 16 x 3 -> 64), and
since the idle rows' programs are launched too, a grouped CUDA graph's split count counts them
(DecodeGraphs.group_splits: four waves over all rows, 20 splits for 9 rows on an H200): its call
took 12.4 us at 600 tokens with 64 splits and the 64-row tile, 5.2-6.7 with 16-32 splits and 32
rows, and the grouped 9-row graph 0.95 -> 0.77 ms a replay (docs/benchmarks.md, nineteenth session).

Split-K ("flash-decoding"): with num_splits > 1 each split writes its normalised partial output
and log-sum-exp (base 2) to fp32 scratch, and `_merge_splits_kernel` combines them:
    out = sum_s 2^(lse_s - max) * out_s / sum_s 2^(lse_s - max)
num_splits=None picks it from the batch size and max_context_len (or, without it, the upper bound
block_tables.shape[1] * block_size) so that about two waves of programs fill the GPU. The choice
uses host ints only (no device sync), but a CUDA graph freezes it at capture: any num_splits is
correct for any context length, so captured graphs should pass a fixed num_splits.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl
from pdserve.kernels.store_kv import check_fp8_cache

_MIN_DOT_ROWS = 4              # query heads per kv head at which tl.dot is used (H100: G=4 dot 4.3x faster than bcast)
_MIN_TOKENS_PER_SPLIT = 128    # a split shorter than this costs more to merge than it saves
_MAX_SPLITS = 64
_BROADCAST_ELEMENTS = 8192     # cap on G * BLOCK_N * D of the broadcast product (registers)


# Per-step values (block-table width, views into the packed metadata) must not pick a new
# specialization: each would compile the kernel again mid-serving.
@triton.jit(do_not_specialize=["sliding_window", "num_splits", "stride_bt_seq"],
            do_not_specialize_on_alignment=["block_tables_ptr", "context_lens_ptr"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, row_groups_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, sliding_window, num_splits,
    stride_q_seq, stride_q_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_bt_seq,
    stride_out_seq, stride_out_head,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WRITE_FINAL: tl.constexpr, FP8: tl.constexpr,
    ROWS: tl.constexpr = 1,   # > 1: row groups (row_groups_ptr); BLOCK_G >= the longest group * GROUP_SIZE
    PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)

    # Query rows of the tile: q row i is query head kv_head * G + i % G of row seq + i // G
    # (without row groups every one of row seq).
    groups = tl.arange(0, BLOCK_G)
    num_rows = 1
    if ROWS > 1:  # 0: a row led by an earlier one, whose program computes it (this one does nothing)
        num_rows = tl.load(row_groups_ptr + seq)
    group_mask = groups < num_rows * GROUP_SIZE
    rows = seq + groups // GROUP_SIZE  # [BLOCK_G]
    row_lens = tl.load(context_lens_ptr + rows, mask=group_mask, other=0)  # each query row's context
    context_len = tl.max(row_lens, axis=0)
    first_pos = 0
    if HAS_WINDOW:
        row_firsts = tl.maximum(row_lens - sliding_window, 0)
        first_pos = tl.min(tl.where(group_mask, row_firsts, context_len), axis=0)
    # Contiguous share of this split, rounded up to whole tiles.
    split_len = tl.cdiv(tl.cdiv(context_len - first_pos, num_splits), BLOCK_N) * BLOCK_N
    lo = first_pos + split * split_len
    hi = tl.minimum(lo + split_len, context_len)

    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP_SIZE + groups % GROUP_SIZE
    q_ptrs = q_ptr + rows.to(tl.int64)[:, None] * stride_q_seq + heads[:, None] * stride_q_head + dims[None, :]
    q = tl.load(q_ptrs, mask=group_mask[:, None] & dim_mask[None, :], other=0.0)   # [BLOCK_G, BLOCK_D]
    if not USE_DOT:
        q = q.to(tl.float32)

    # A finite start keeps exp2(m_old - m_new) NaN-free; every tile has >= 1 visible key.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq

    for start in range(lo, hi, BLOCK_N):
        positions = start + offs_n
        key_mask = positions < hi
        block_ids = tl.load(block_table + positions // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
        slots = positions % BLOCK_SIZE
        tile_mask = key_mask[:, None] & dim_mask[None, :]
        k_rows = block_ids * stride_k_block + slots * stride_k_slot + kv_head * stride_k_head
        k = tl.load(k_cache_ptr + k_rows[:, None] + dims[None, :], mask=tile_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        if FP8:
            k = k.to(tl.float32).to(q.dtype)
        if USE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)                      # [BLOCK_G, BLOCK_N]
        else:
            scores = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        visible = key_mask[None, :]
        if ROWS > 1:  # each query row sees its own context (and window) only
            visible = visible & (positions[None, :] < row_lens[:, None])
            if HAS_WINDOW:
                visible = visible & (positions[None, :] >= row_firsts[:, None])
        scores = tl.where(visible, scores * qk_scale, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)

        v_rows = block_ids * stride_v_block + slots * stride_v_slot + kv_head * stride_v_head
        v = tl.load(v_cache_ptr + v_rows[:, None] + dims[None, :], mask=tile_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        if FP8:
            v = v.to(tl.float32).to(q.dtype)
        if USE_DOT:
            pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]          # empty split / context: zeros
    if FP8:
        out = out * tl.load(v_scale_ptr + kv_head)
    out_mask = group_mask[:, None] & dim_mask[None, :]
    if WRITE_FINAL:
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out_seq + heads[:, None] * stride_out_head + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partial_out [B, H, S, D], partial_lse [B, H, S], both contiguous
        row = (rows.to(tl.int64) * tl.num_programs(1) * GROUP_SIZE + heads) * num_splits + split   # [BLOCK_G]
        tl.store(partial_out_ptr + row[:, None] * HEAD_DIM + dims[None, :], out, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(partial_lse_ptr + row, lse, mask=group_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr,
    num_splits, stride_out_seq, stride_out_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row0 = (seq * tl.num_programs(1) + head) * num_splits
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    lse = tl.load(partial_lse_ptr + row0 + splits, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)   # all splits empty
    weights = tl.exp2(lse - lse_max)                                # [BLOCK_S], empty splits: 0
    parts = tl.load(partial_out_ptr + (row0 + splits)[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0)
    total = tl.sum(weights, axis=0)
    out = tl.sum(weights[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_out_seq + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch_size: int, num_kv_heads: int, max_context_len: int, device: torch.device,
                      waves: int = 2) -> int:
    """Enough splits for ~`waves` waves of programs, each split holding >= _MIN_TOKENS_PER_SPLIT keys."""
    num_sms = _num_sms(device.index or 0) if device.type == "cuda" else 8
    wanted = triton.cdiv(waves * num_sms, batch_size * num_kv_heads)
    by_length = triton.cdiv(max_context_len, _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, by_length, _MAX_SPLITS))


def paged_decode_attention(
    q: torch.Tensor,              # [B, H, D]
    k_cache: torch.Tensor,        # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,        # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor,   # [B, M] int32
    context_lens: torch.Tensor,   # [B] int32
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    max_context_len: int | None = None,   # host-side bound used only to choose num_splits
    k_scale: torch.Tensor | None = None,  # [KVH] fp32, fp8 caches only
    v_scale: torch.Tensor | None = None,
    row_groups: torch.Tensor | None = None,  # [B] int32 (module docstring): rows sharing a sequence
    max_group_rows: int = 1,              # with row_groups: no group is longer (a compiled bound)
) -> torch.Tensor:                # [B, H, D]
    batch_size, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    assert v_cache.shape == k_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}"
    assert cache_head_dim == head_dim, f"cache head_dim {cache_head_dim} != q head_dim {head_dim}"
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads not divisible by {num_kv_heads} kv heads"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    fp8 = check_fp8_cache(k_cache, k_scale, v_scale, num_kv_heads)
    assert k_cache.dtype == v_cache.dtype and (fp8 or q.dtype == k_cache.dtype), \
        "q and the caches must share a dtype (or the caches are fp8 with scales)"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch_size and block_tables.dtype == torch.int32
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    assert context_lens.shape == (batch_size,) and context_lens.dtype == torch.int32
    assert sliding_window is None or sliding_window > 0, f"sliding_window must be positive, got {sliding_window}"
    assert row_groups is None or (row_groups.shape == (batch_size,) and row_groups.dtype == torch.int32
                                  and max_group_rows >= 1), "row_groups: [B] int32, with max_group_rows"
    if num_splits is None:
        if max_context_len is None:
            max_context_len = block_tables.shape[1] * block_size
        if sliding_window is not None:
            max_context_len = min(max_context_len, sliding_window)
        num_splits = choose_num_splits(batch_size, num_kv_heads, max_context_len, q.device)
    assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch_size == 0:
        return out
    group_size = num_heads // num_kv_heads
    rows = 1 if row_groups is None else max_group_rows
    use_dot = group_size * rows >= _MIN_DOT_ROWS
    return _launch(q, k_cache, v_cache, block_tables, context_lens.contiguous(), scale, sliding_window,
                   num_splits, use_dot, out, k_scale, v_scale, row_groups, rows)


def _launch(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, num_splits, use_dot, out,
            k_scale=None, v_scale=None, row_groups=None, rows=1):
    """Runs the kernels; split from the wrapper so the benchmark can force either product path.
    rows > 1: row groups of up to `rows` rows in `row_groups` (the tile: the next power of two of
    rows x group size query rows, 32 for SmolLM2's 9-row verify groups of 3 heads, not 64)."""
    batch_size, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group_size = num_heads // num_kv_heads
    block_g = max(triton.next_power_of_2(group_size * rows), _MIN_DOT_ROWS if use_dot else 1)
    block_d = triton.next_power_of_2(head_dim)
    if use_dot:
        block_n = 32 if q.dtype == torch.float32 else 64
    else:
        block_n = max(1, min(64, _BROADCAST_ELEMENTS // (block_g * block_d)))
    if num_splits > 1:
        partial_out = torch.empty((batch_size, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((batch_size, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        partial_out = partial_lse = out    # unused
    log2e = 1.4426950408889634
    _decode_split_kernel[(batch_size, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, row_groups if row_groups is not None else context_lens,
        out, partial_out, partial_lse, k_scale if k_scale is not None else out,
        v_scale if v_scale is not None else out,
        scale * log2e, sliding_window or 0, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP_SIZE=group_size, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, USE_DOT=use_dot,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        WRITE_FINAL=num_splits == 1, FP8=k_scale is not None, ROWS=min(rows, 2),  # (BLOCK_G bounds a group)
        num_warps=4 if block_g * block_d <= 8192 else 8, num_stages=2, **pdl.launch_args(q),
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch_size, num_heads)](
            partial_out, partial_lse, out, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
            **pdl.launch_args(q),
        )
    return out
