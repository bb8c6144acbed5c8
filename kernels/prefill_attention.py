"""paged_prefill_attention: causal attention of a packed, variable-length batch of query chunks.

    q                [T, H, D]        tokens of all sequences back to back
    k/v_cache        [num_blocks, block_size, KVH, D]   this chunk's keys are already stored
    block_tables     [B, M] int32
    query_start_loc  [B + 1] int32    sequence b owns q rows query_start_loc[b] : query_start_loc[b+1]
    context_lens     [B] int32        cached prefix + this chunk
    out              [T, H, D]
    k/v_scale        [KVH] fp32, fp8 (e4m3) caches only: K's folded into the score scale, V's into
                     the output

The i-th query of sequence b sits at position context_lens[b] - q_len_b + i and sees keys at
positions <= its own (and > position - sliding_window). This covers plain prefill (no prefix), a
prefix-cache hit and chunked prefill alike: the prefix is simply read from the cache.

Grid: (cdiv(T, BLOCK_M) + B, H). Query tiles never straddle sequences; sequence b owns the tiles
starting at query_start_loc[b] // BLOCK_M + b (an upper bound that needs no host sync), found by
binary search over query_start_loc; surplus programs exit at once. Each program runs a
flash-attention loop over key tiles of BLOCK_N positions, gathered through the block table:
first the tiles every query row sees in full (no mask), then the causal diagonal (masked). With a
sliding window every tile is masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.store_kv import check_fp8_cache


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, block_table, kv_head, start, key_end, query_pos,
    qk_scale, sliding_window,
    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
):
    """One online-softmax step over key positions start : start + BLOCK_N."""
    dims = tl.arange(0, BLOCK_D)
    key_pos = start + tl.arange(0, BLOCK_N)
    key_mask = key_pos < key_end
    block_ids = tl.load(block_table + key_pos // BLOCK_SIZE, mask=key_mask, other=0).to(tl.int64)
    slots = key_pos % BLOCK_SIZE
    tile_mask = key_mask[:, None] & (dims[None, :] < HEAD_DIM)
    k_rows = block_ids * stride_k_block + slots * stride_k_slot + kv_head * stride_k_head
    k = tl.load(k_cache_ptr + k_rows[:, None] + dims[None, :], mask=tile_mask, other=0.0)   # [BLOCK_N, BLOCK_D]
    if FP8:
        k = k.to(tl.float32).to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale             # [BLOCK_M, BLOCK_N]
    if MASKED:
        distance = query_pos[:, None] - key_pos[None, :]
        visible = (distance >= 0) & key_mask[None, :]
        if HAS_WINDOW:
            visible &= distance < sliding_window
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_rows = block_ids * stride_v_block + slots * stride_v_slot + kv_head * stride_v_head
    v = tl.load(v_cache_ptr + v_rows[:, None] + dims[None, :], mask=tile_mask, other=0.0)   # [BLOCK_N, BLOCK_D]
    if FP8:
        v = v.to(tl.float32).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# Per-step values (block-table width, views into the packed metadata) must not pick a new
# specialization: each would compile the kernel again mid-serving.
@triton.jit(do_not_specialize=["sliding_window", "num_seqs", "stride_bt_seq"],
            do_not_specialize_on_alignment=["block_tables_ptr", "query_start_loc_ptr", "context_lens_ptr"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr, out_ptr,
    k_scale_ptr, v_scale_ptr, qk_scale, sliding_window, num_seqs,
    stride_q_token, stride_q_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_bt_seq, stride_out_token, stride_out_head,
    GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP_SIZE
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)

    # Last sequence whose first tile index (query_start_loc[b] // BLOCK_M + b) is <= tile.
    lo = tl.full([], 0, tl.int32)
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        ok = tl.load(query_start_loc_ptr + mid) // BLOCK_M + mid <= tile
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    seq = lo
    query_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - query_start
    first_row = (tile - (query_start // BLOCK_M + seq)) * BLOCK_M    # within the sequence
    if first_row < query_len:
        context_len = tl.load(context_lens_ptr + seq)
        prefix_len = context_len - query_len
        rows = first_row + tl.arange(0, BLOCK_M)
        row_mask = rows < query_len
        query_pos = prefix_len + rows                                 # [BLOCK_M]
        dims = tl.arange(0, BLOCK_D)
        io_mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)
        tokens = (query_start + rows).to(tl.int64)
        q = tl.load(q_ptr + tokens[:, None] * stride_q_token + head * stride_q_head + dims[None, :],
                    mask=io_mask, other=0.0)                           # [BLOCK_M, BLOCK_D]

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)           # finite: no NaN from -inf - -inf
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
        key_end = tl.minimum(prefix_len + first_row + BLOCK_M, context_len)  # last row's position + 1

        if HAS_WINDOW:
            key_start = tl.maximum(prefix_len + first_row - sliding_window + 1, 0) // BLOCK_N * BLOCK_N
            for start in range(key_start, key_end, BLOCK_N):
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, block_table, kv_head, start, key_end, query_pos,
                    qk_scale, sliding_window,
                    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
                    HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, True, DOT_PRECISION, FP8)
        else:
            # Tiles wholly at or before the first row's position are visible to every row.
            full_end = (prefix_len + first_row + 1) // BLOCK_N * BLOCK_N
            for start in range(0, full_end, BLOCK_N):
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, block_table, kv_head, start, key_end, query_pos,
                    qk_scale, sliding_window,
                    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
                    HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, False, False, DOT_PRECISION, FP8)
            for start in range(full_end, key_end, BLOCK_N):
                acc, l_i, m_i = _attend_tile(
                    acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, block_table, kv_head, start, key_end, query_pos,
                    qk_scale, sliding_window,
                    stride_k_block, stride_k_slot, stride_k_head, stride_v_block, stride_v_slot, stride_v_head,
                    HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, True, False, DOT_PRECISION, FP8)

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if FP8:
            out = out * tl.load(v_scale_ptr + kv_head)
        tl.store(out_ptr + tokens[:, None] * stride_out_token + head * stride_out_head + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)


def _config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an H100 (228 KiB shared memory per SM)."""
    if dtype == torch.float32:
        return 64, 32, 4, 2
    if head_dim <= 128:
        return 128, 64, 8, 3
    return 64, 32, 4, 2


def paged_prefill_attention(
    q: torch.Tensor,                # [T, H, D]
    k_cache: torch.Tensor,          # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,          # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor,     # [B, M] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    context_lens: torch.Tensor,     # [B] int32
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,  # [KVH] fp32, fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:                  # [T, H, D]
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    num_seqs = context_lens.shape[0]
    assert v_cache.shape == k_cache.shape, f"k_cache {tuple(k_cache.shape)} != v_cache {tuple(v_cache.shape)}"
    assert cache_head_dim == head_dim, f"cache head_dim {cache_head_dim} != q head_dim {head_dim}"
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads not divisible by {num_kv_heads} kv heads"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    fp8 = check_fp8_cache(k_cache, k_scale, v_scale, num_kv_heads)
    assert k_cache.dtype == v_cache.dtype and (fp8 or q.dtype == k_cache.dtype), \
        "q and the caches must share a dtype (or the caches are fp8 with scales)"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.dtype == torch.int32
    assert block_tables.stride(1) == 1, "block_tables rows must be contiguous"
    assert query_start_loc.shape == (num_seqs + 1,) and query_start_loc.dtype == torch.int32
    assert context_lens.dtype == torch.int32 and context_lens.dim() == 1
    assert sliding_window is None or sliding_window > 0, f"sliding_window must be positive, got {sliding_window}"

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_m, block_n, num_warps, num_stages = _config(head_dim, q.dtype)
    grid = (num_tokens // block_m + num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc.contiguous(), context_lens.contiguous(), out,
        k_scale if fp8 else out, v_scale if fp8 else out, scale * 1.4426950408889634, sliding_window or 0, num_seqs,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP_SIZE=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=fp8,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
