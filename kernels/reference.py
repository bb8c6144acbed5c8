"""Pure-torch references of every kernel in this package.

Each function here defines the semantics that the Triton kernel of the same name must match, and
the tests compare the two on random inputs. They favour being obviously right over being fast:
everything is computed in fp32 (probabilities of the sampler too) and cast back to the input dtype
at the end. They run on any device and dtype, so CPU CI can test the model code with them.

Paged KV cache layout (per layer), shared by all attention functions:

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    token at position p of sequence b lives at
        k_cache[block_tables[b, p // block_size], p % block_size]

Returned tensors are new; `store_kv_ref` alone writes in place, like its kernel.

fp8 (e4m3) KV caches: k_scale / v_scale [KVH] fp32 per head; a cache entry is
saturate(x / scale[head]) in fp8, read back as entry * scale[head] (`quantize_kv_ref`).
"""

from __future__ import annotations

import torch


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first `num_tokens` positions of one sequence: [num_tokens, num_kv_heads, head_dim]
    (an fp8 cache dequantized to fp32 with its per-head `scale`)."""
    block_size = cache.shape[1]
    positions = torch.arange(num_tokens, device=cache.device)
    block_ids = block_table[positions // block_size].long()
    out = cache[block_ids, positions % block_size]
    return out if scale is None else out.float() * scale.float()[:, None]


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[..., KVH, D] -> float8_e4m3fn entries saturate(x / scale[head])."""
    return (x.float() / scale.float()[:, None]).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def store_kv_ref(
    k: torch.Tensor,             # [T, KVH, D]
    v: torch.Tensor,             # [T, KVH, D]
    k_cache: torch.Tensor,       # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,       # [num_blocks, block_size, KVH, D]
    slot_mapping: torch.Tensor,  # [T], slot = block_id * block_size + offset; < 0: skip
    k_scale: torch.Tensor | None = None,  # [KVH] fp32: fp8 caches
    v_scale: torch.Tensor | None = None,
) -> None:
    block_size = k_cache.shape[1]
    if k_scale is not None:
        k, v = quantize_kv_ref(k, k_scale), quantize_kv_ref(v, v_scale)
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        k_cache[slot // block_size, slot % block_size] = k[t]
        v_cache[slot // block_size, slot % block_size] = v[t]


def _attend(
    q: torch.Tensor,             # [Q, H, D] fp32
    k: torch.Tensor,             # [L, KVH, D] fp32
    v: torch.Tensor,             # [L, KVH, D] fp32
    visible: torch.Tensor,       # [Q, L] bool
    scale: float,
) -> torch.Tensor:               # [Q, H, D] fp32; rows that see no key are zero
    group_size = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group_size, dim=1)                # [L, H, D]
    v = v.repeat_interleave(group_size, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q, k) * scale       # [H, Q, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)     # all-masked rows: NaN -> 0
    return torch.einsum("hql,lhd->qhd", probs, v)


def _visible(query_positions: torch.Tensor, num_keys: int, sliding_window: int | None) -> torch.Tensor:
    """[Q, L] bool: key j is visible to the query at position i iff j <= i (and i - j < window)."""
    key_positions = torch.arange(num_keys, device=query_positions.device)
    distance = query_positions[:, None] - key_positions[None, :]
    visible = distance >= 0
    if sliding_window is not None:
        visible &= distance < sliding_window
    return visible


def paged_decode_attention_ref(
    q: torch.Tensor,             # [B, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, M] int32
    context_lens: torch.Tensor,  # [B] int32, the query sits at position context_lens[b] - 1
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,  # [KVH] fp32: fp8 caches
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:               # [B, H, D]
    out = torch.zeros_like(q)
    for b, context_len in enumerate(context_lens.tolist()):
        if context_len == 0:     # padded batch row: zeros, as in the kernel
            continue
        k = gather_kv(k_cache, block_tables[b], context_len, k_scale).float()
        v = gather_kv(v_cache, block_tables[b], context_len, v_scale).float()
        positions = torch.tensor([context_len - 1], device=q.device)
        visible = _visible(positions, context_len, sliding_window)
        out[b] = _attend(q[b : b + 1].float(), k, v, visible, scale)[0].to(q.dtype)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,                # [T, H, D], sequences packed back to back
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,     # [B, M] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32, cumulative query lengths
    context_lens: torch.Tensor,     # [B] int32, cached prefix + this chunk
    scale: float,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,  # [KVH] fp32: fp8 caches
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:                  # [T, H, D]
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for b, context_len in enumerate(context_lens.tolist()):
        start, end = starts[b], starts[b + 1]
        query_len = end - start
        if query_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], context_len, k_scale).float()
        v = gather_kv(v_cache, block_tables[b], context_len, v_scale).float()
        positions = torch.arange(context_len - query_len, context_len, device=q.device)
        visible = _visible(positions, context_len, sliding_window)
        out[start:end] = _attend(q[start:end].float(), k, v, visible, scale).to(q.dtype)
    return out


def rms_norm_ref(
    x: torch.Tensor,                       # [T, N]
    weight: torch.Tensor,                  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, N]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF LlamaRMSNorm; with `residual`, first r = x + residual and return (norm(r), r)."""
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    out = weight * normed
    return out if residual is None else (out, x)


def apply_rotary_ref(
    q: torch.Tensor,              # [T, H, D]
    k: torch.Tensor,              # [T, KVH, D]
    positions: torch.Tensor,      # [T]
    cos_sin_cache: torch.Tensor,  # [P, D]: cos(p * inv_freq) ++ sin(p * inv_freq)
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotation of pairs (i, i + D/2); returns new (q, k)."""
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def rotary_store_kv_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                        k_scale=None, v_scale=None) -> torch.Tensor:
    """apply_rotary_ref then store_kv_ref of the rotated k; returns the rotated q (k is unchanged).
    With fp8 caches the rotated k is quantized from fp32 (not from k's dtype), as the kernel does."""
    q_rot, _ = apply_rotary_ref(q, k, positions, cos_sin_cache)
    k_rot = apply_rotary_ref(k.float(), k.float(), positions, cos_sin_cache)[1]
    store_kv_ref(k_rot if k_scale is not None else k_rot.to(k.dtype), v, k_cache, v_cache, slot_mapping,
                 k_scale, v_scale)
    return q_rot


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[1, K] @ [N, K]^T (+ b) in fp32, rounded to x's dtype."""
    y = x.float() @ weight.float().T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def copy_blocks_ref(src: torch.Tensor, dst: torch.Tensor, src_ids: torch.Tensor | None,
                    dst_ids: torch.Tensor | None) -> None:
    """dst[:, dst_ids[j]] = src[:, src_ids[j]] for src [R, Ns, E], dst [R, Nd, E]; None ids: 0..n-1."""
    num = (src_ids if src_ids is not None else dst_ids).numel()
    rows = src[:, src_ids.long()] if src_ids is not None else src[:, :num]  # [R, n, E]
    if dst_ids is not None:
        dst[:, dst_ids.long()] = rows
    else:
        dst[:, :num] = rows


def dequantize_int_ref(
    qweight: torch.Tensor,  # [K / (32 / bits), N] int32, K values packed per column (GPTQ qweight order)
    scales: torch.Tensor,   # [K / group_size, N]
    zeros: torch.Tensor,    # [K / group_size, N] zero points (float, integer-valued for AWQ/GPTQ)
    bits: int,
    group_size: int,
) -> torch.Tensor:          # [K, N] fp32: w[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=qweight.device).view(1, per_word, 1) * bits
    q = ((qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, qweight.shape[1])
    s = scales.float().repeat_interleave(group_size, dim=0)
    z = zeros.float().repeat_interleave(group_size, dim=0)
    return (q.float() - z) * s


def int_matmul_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """[M, K] @ dequantized [K, N] (+ b): the weight rounded to x's dtype, products summed in fp32,
    the result rounded to x's dtype (what the Triton kernels do)."""
    w = dequantize_int_ref(qweight, scales, zeros, bits, group_size).to(x.dtype)
    y = x.float() @ w.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def fp8_quantize_per_row_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] -> (float8_e4m3fn [M, K], fp32 scales [M, 1]) with x ~= q * scale, amax -> 448."""
    amax = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
    scale = amax / 448.0
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 fp8: x quantized per token (dynamic), weight [N, K] fp8 with per-output scales [N];
    y = (q(x) s_x) @ (W s_w)^T in fp32, rounded to x's dtype (torch._scaled_mm's semantics)."""
    xq, x_scale = fp8_quantize_per_row_ref(x)
    y = (xq.float() @ weight.float().T) * x_scale * weight_scale.float()[None, :]
    return (y if bias is None else y + bias.float()).to(x.dtype)


def fp8_gemv_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only fp8 at batch 1: [1, K] @ (W [N, K] fp8 * s [N])^T in fp32, rounded to x's dtype."""
    y = (x.float() @ weight.float().T) * weight_scale.float()[None, :]
    return (y if bias is None else y + bias.float()).to(x.dtype)
