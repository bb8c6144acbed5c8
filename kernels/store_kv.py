"""store_kv: write this step's keys and values into the paged KV cache.

    k, v           [T, KVH, D]                        (any token/head strides, last dim contiguous)
    k/v_cache      [num_blocks, block_size, KVH, D]   (any strides, last dim contiguous)
    slot_mapping   [T] int32/int64: slot = block_id * block_size + offset; slot < 0 is skipped,
                   so padded CUDA-graph batches can pass -1.

One program per token copies its [KVH, D] key and value tile to the slot. fp8 (e4m3) caches take
k_scale / v_scale [KVH] fp32: stored = saturate(x / scale[head]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels import pdl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:  # kernels/pdl.py: wait for the previous kernel first
        pdl.prologue()
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        block_id = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)

        k = tl.load(k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask)
        v = tl.load(v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask)
        if FP8:
            head_mask = heads < NUM_KV_HEADS
            k_scale = tl.load(k_scale_ptr + heads, mask=head_mask, other=1.0)[:, None]
            v_scale = tl.load(v_scale_ptr + heads, mask=head_mask, other=1.0)[:, None]
            k = tl.minimum(tl.maximum(k.to(tl.float32) / k_scale, -448.0), 448.0)
            v = tl.minimum(tl.maximum(v.to(tl.float32) / v_scale, -448.0), 448.0)
        k_dst = k_cache_ptr + block_id * stride_kc_block + offset * stride_kc_slot
        tl.store(k_dst + heads[:, None] * stride_kc_head + dims[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_dst = v_cache_ptr + block_id * stride_vc_block + offset * stride_vc_slot
        tl.store(v_dst + heads[:, None] * stride_vc_head + dims[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def check_fp8_cache(k_cache: torch.Tensor, k_scale, v_scale, num_kv_heads: int) -> bool:
    """True for an fp8 cache (whose [KVH] fp32 scales must be given), False for a plain one."""
    if k_cache.dtype != torch.float8_e4m3fn:
        assert k_scale is None and v_scale is None, "KV scales apply to fp8 caches only"
        return False
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        assert s is not None and s.shape == (num_kv_heads,) and s.dtype == torch.float32 and s.is_contiguous(), \
            f"an fp8 cache needs {name} [{num_kv_heads}] fp32, got {None if s is None else (tuple(s.shape), s.dtype)}"
    return True


def store_kv(
    k: torch.Tensor,             # [T, KVH, D]
    v: torch.Tensor,             # [T, KVH, D]
    k_cache: torch.Tensor,       # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,       # [num_blocks, block_size, KVH, D]
    slot_mapping: torch.Tensor,  # [T] int32/int64
    k_scale: torch.Tensor | None = None,  # [KVH] fp32: fp8 caches only
    v_scale: torch.Tensor | None = None,  # [KVH] fp32
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    block_size = k_cache.shape[1]
    assert v.shape == k.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ"
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "caches must be [num_blocks, block_size, KVH, D]"
    assert k_cache.shape[2:] == (num_kv_heads, head_dim), f"cache {tuple(k_cache.shape)} vs k {tuple(k.shape)}"
    assert block_size & (block_size - 1) == 0, f"block_size {block_size} must be a power of two"
    fp8 = check_fp8_cache(k_cache, k_scale, v_scale, num_kv_heads)
    assert k.dtype == v.dtype and k_cache.dtype == v_cache.dtype and (fp8 or k.dtype == k_cache.dtype), \
        "k, v and the caches must share a dtype (or the caches are fp8 with scales)"
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64)
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(-1) == 1, f"{name} must be contiguous in head_dim"
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(), k_scale if fp8 else k, v_scale if fp8 else v,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, FP8=fp8, num_warps=4, **pdl.launch_args(k),
    )
