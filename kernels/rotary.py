"""apply_rotary: NeoX / HF-Llama rotary embedding of q and k, in place.

    q              [T, H, D]     may be a strided view of a fused qkv output; last dim contiguous
    k              [T, KVH, D]   likewise
    positions      [T] int32/int64
    cos_sin_cache  [P, D]        cos(p * inv_freq) ++ sin(p * inv_freq), inv_freq has D/2 entries

Each head vector is rotated in pairs (i, i + D/2):
    out[i]       = x[i] * cos[i] - x[i + D/2] * sin[i]
    out[i + D/2] = x[i + D/2] * cos[i] + x[i] * sin[i]
in fp32, rounded once to the input dtype. One program per token handles all its q and k heads.

rotary_store_kv: the same rotation fused with the KV-cache store of the step (one kernel per
layer instead of two): q is rotated in place, the rotated k and the v of each token are written
to its slot (slot < 0: padding, nothing stored); k itself is left as it was. With an fp8 (e4m3)
cache, k_scale / v_scale [KVH] fp32 give each head's scale: stored = saturate(x / scale) in fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl
from pdserve.kernels.store_kv import check_fp8_cache


@triton.jit
def _rotate_heads(ptr, stride_head, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    first = ptr + heads[:, None] * stride_head + dims[None, :]   # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(first, mask=mask).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cos_sin, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The token's (cos, sin) rows, each [1, BLOCK_HALF] fp32."""
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    row = cos_sin_ptr + position * stride_cos_sin
    cos = tl.load(row + dims, mask=dims < HALF).to(tl.float32)[None, :]
    sin = tl.load(row + HALF + dims, mask=dims < HALF).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_cos_sin,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cos_sin, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + token * stride_q_token, stride_q_head, num_heads, cos, sin,
                  HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_k_token, stride_k_head, num_kv_heads, cos, sin,
                  HALF, BLOCK_KVH, BLOCK_HALF)


@triton.jit
def _scaled(x, scale_ptr, heads, head_mask, FP8: tl.constexpr):
    """x [BLOCK_KVH, ...] fp32 as the cache stores it: fp8 caches hold x / scale[head], saturated."""
    if FP8:
        scale = tl.load(scale_ptr + heads, mask=head_mask, other=1.0)
        x = tl.minimum(tl.maximum(x / scale[:, None], -448.0), 448.0)
    return x


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    k_scale_ptr, v_scale_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token, stride_v_head, stride_cos_sin,
    stride_kc_block, stride_kc_slot, stride_kc_head, stride_vc_block, stride_vc_slot, stride_vc_head,
    num_heads,
    NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cos_sin, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + token * stride_q_token, stride_q_head, num_heads, cos, sin,
                  HALF, BLOCK_H, BLOCK_HALF)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_KVH)
        dims = tl.arange(0, BLOCK_HALF)
        mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HALF)
        k_src = k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :]
        x1 = tl.load(k_src, mask=mask).to(tl.float32)
        x2 = tl.load(k_src + HALF, mask=mask).to(tl.float32)
        block_id = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        k_dst = (k_cache_ptr + block_id * stride_kc_block + offset * stride_kc_slot
                 + heads[:, None] * stride_kc_head + dims[None, :])
        head_mask = heads < NUM_KV_HEADS
        k1 = _scaled(x1 * cos - x2 * sin, k_scale_ptr, heads, head_mask, FP8)
        k2 = _scaled(x2 * cos + x1 * sin, k_scale_ptr, heads, head_mask, FP8)
        tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_src = v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :]
        v_dst = (v_cache_ptr + block_id * stride_vc_block + offset * stride_vc_slot
                 + heads[:, None] * stride_vc_head + dims[None, :])
        if FP8:
            v1 = _scaled(tl.load(v_src, mask=mask).to(tl.float32), v_scale_ptr, heads, head_mask, FP8)
            v2 = _scaled(tl.load(v_src + HALF, mask=mask).to(tl.float32), v_scale_ptr, heads, head_mask, FP8)
            tl.store(v_dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
            tl.store(v_dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(v_dst, tl.load(v_src, mask=mask), mask=mask)
            tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=mask), mask=mask)


def rotary_store_kv(
    q: torch.Tensor,              # [T, H, D]     rotated in place
    k: torch.Tensor,              # [T, KVH, D]   read only
    v: torch.Tensor,              # [T, KVH, D]   read only
    positions: torch.Tensor,      # [T]
    cos_sin_cache: torch.Tensor,  # [P, D]
    k_cache: torch.Tensor,        # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,        # [num_blocks, block_size, KVH, D]
    slot_mapping: torch.Tensor,   # [T] int32/int64; < 0 skips the store
    k_scale: torch.Tensor | None = None,  # [KVH] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,  # [KVH] fp32
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    _check_rotary(q, k, positions, cos_sin_cache)
    fp8 = check_fp8_cache(k_cache, k_scale, v_scale, num_kv_heads)
    assert v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim), \
        f"caches {tuple(k_cache.shape)} vs k {tuple(k.shape)}"
    block_size = k_cache.shape[1]
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    assert q.dtype == v.dtype and k_cache.dtype == v_cache.dtype and (fp8 or k_cache.dtype == q.dtype), \
        "q, k, v and the caches must share a dtype (or the caches are fp8 with scales)"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    assert v.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_store_kv_kernel[(num_tokens,)](
        q, k, v, positions.contiguous(), cos_sin_cache, k_cache, v_cache, slot_mapping.contiguous(),
        k_scale if fp8 else slot_mapping, v_scale if fp8 else slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), num_heads,
        NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_H=triton.next_power_of_2(num_heads),
        BLOCK_KVH=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_SIZE=block_size, FP8=fp8, num_warps=4, **pdl.launch_args(q),
    )


def _check_rotary(q, k, positions, cos_sin_cache) -> None:
    num_tokens, num_heads, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, f"k {tuple(k.shape)} vs q {tuple(q.shape)}"
    assert head_dim % 2 == 0, f"head_dim {head_dim} must be even"
    assert q.stride(2) == 1 and k.stride(2) == 1, "q and k must be contiguous in head_dim"
    assert q.dtype == k.dtype, f"q dtype {q.dtype} != k dtype {k.dtype}"
    assert positions.shape == (num_tokens,) and positions.dtype in (torch.int32, torch.int64)
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim, \
        f"cos_sin_cache must be [P, {head_dim}] (rotary_dim == head_dim), got {tuple(cos_sin_cache.shape)}"
    assert cos_sin_cache.stride(1) == 1 and cos_sin_cache.is_floating_point()


def apply_rotary(
    q: torch.Tensor,              # [T, H, D]
    k: torch.Tensor,              # [T, KVH, D]
    positions: torch.Tensor,      # [T]
    cos_sin_cache: torch.Tensor,  # [P, D]
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    _check_rotary(q, k, positions, cos_sin_cache)
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions.contiguous(), cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        num_heads, k.shape[1],
        HALF=half, BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KVH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4, **pdl.launch_args(q),
    )
