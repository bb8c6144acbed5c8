"""apply_rotary: NeoX / HF-Llama rotary embedding of q and k, in place.

    q              [T, H, D]     may be a strided view of a fused qkv output; last dim contiguous
    k              [T, KVH, D]   likewise
    positions      [T] int32/int64
    cos_sin_cache  [P, D]        cos(p * inv_freq) ++ sin(p * inv_freq), inv_freq has D/2 entries

Each head vector is rotated in pairs (i, i + D/2):
    out[i]       = x[i] * cos[i] - x[i + D/2] * sin[i]
    out[i + D/2] = x[i + D/2] * cos[i] + x[i] * sin[i]
in fp32, rounded once to the input dtype. One program per token handles all its q and k heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_cos_sin,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    row = cos_sin_ptr + position * stride_cos_sin
    cos = tl.load(row + dims, mask=dims < HALF).to(tl.float32)[None, :]          # [1, BLOCK_HALF]
    sin = tl.load(row + HALF + dims, mask=dims < HALF).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_q_token, stride_q_head, num_heads, cos, sin,
                  HALF, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_k_token, stride_k_head, num_kv_heads, cos, sin,
                  HALF, BLOCK_KVH, BLOCK_HALF)


def apply_rotary(
    q: torch.Tensor,              # [T, H, D]
    k: torch.Tensor,              # [T, KVH, D]
    positions: torch.Tensor,      # [T]
    cos_sin_cache: torch.Tensor,  # [P, D]
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    assert k.dim() == 3 and k.shape[0] == num_tokens and k.shape[2] == head_dim, f"k {tuple(k.shape)} vs q {tuple(q.shape)}"
    assert head_dim % 2 == 0, f"head_dim {head_dim} must be even"
    assert q.stride(2) == 1 and k.stride(2) == 1, "q and k must be contiguous in head_dim"
    assert q.dtype == k.dtype, f"q dtype {q.dtype} != k dtype {k.dtype}"
    assert positions.shape == (num_tokens,) and positions.dtype in (torch.int32, torch.int64)
    assert cos_sin_cache.dim() == 2 and cos_sin_cache.shape[1] == head_dim, \
        f"cos_sin_cache must be [P, {head_dim}] (rotary_dim == head_dim), got {tuple(cos_sin_cache.shape)}"
    assert cos_sin_cache.stride(1) == 1 and cos_sin_cache.is_floating_point()
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions.contiguous(), cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        num_heads, k.shape[1],
        HALF=half, BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KVH=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
