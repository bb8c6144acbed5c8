"""The references in pdserve.kernels.reference against independent, straightforward torch math.

These run everywhere (no triton, no GPU): the kernel tests are only as good as the references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels import reference as ref
from pdserve.kernels.testing import make_paged_kv, query_start_loc


def contiguous_kv(cache: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[num_tokens, KVH, D] by walking the block table block by block (not position by position)."""
    blocks = [cache[int(block_id)] for block_id in block_table[: -(-num_tokens // cache.shape[1])]]
    return torch.cat(blocks)[:num_tokens]


def sdpa(q, k, v, mask, scale):  # q [Q, H, D], k/v [L, KVH, D], mask [Q, L] -> [Q, H, D]
    group_size = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group_size, 1), v.repeat_interleave(group_size, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def test_store_kv_ref_writes_slots_and_skips_negative():
    k = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    k_cache, v_cache = torch.zeros(2, 4, 8, 2, 4).unbind(0)
    ref.store_kv_ref(k, -k, k_cache, v_cache, torch.tensor([9, -1, 31]))
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[1, 1], -k[0])
    assert torch.equal(k_cache[3, 7], k[2])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2    # only the two valid slots were written


def test_decode_ref_matches_sdpa():
    context_lens, scale = [1, 17, 64, 100], 0.125
    kv = make_paged_kv(context_lens, num_kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device="cpu")
    q = torch.randn(len(context_lens), 8, 16)
    for window in (None, 10):
        out = ref.paged_decode_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale, window)
        for b, n in enumerate(context_lens):
            k = contiguous_kv(kv.k_cache, kv.block_tables[b], n)
            v = contiguous_kv(kv.v_cache, kv.block_tables[b], n)
            mask = torch.ones(1, n, dtype=torch.bool)
            if window is not None:
                mask[:, : max(0, n - window)] = False
            torch.testing.assert_close(out[b : b + 1], sdpa(q[b : b + 1], k, v, mask, scale))


def test_decode_ref_empty_context_is_zero():
    kv = make_paged_kv([5, 1], num_kv_heads=1, head_dim=8, block_size=8, dtype=torch.float32, device="cpu")
    kv.context_lens[1] = 0
    out = ref.paged_decode_attention_ref(torch.randn(2, 2, 8), kv.k_cache, kv.v_cache, kv.block_tables,
                                         kv.context_lens, 1.0)
    assert torch.equal(out[1], torch.zeros(2, 8)) and not out.isnan().any()


def test_prefill_ref_matches_sdpa_with_prefix():
    query_lens, prefix_lens, scale = [5, 1, 20], [0, 7, 13], 0.25
    context_lens = [q + p for q, p in zip(query_lens, prefix_lens)]
    kv = make_paged_kv(context_lens, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32, device="cpu")
    q = torch.randn(sum(query_lens), 4, 16)
    starts = query_start_loc(query_lens, "cpu")
    for window in (None, 6):
        out = ref.paged_prefill_attention_ref(q, kv.k_cache, kv.v_cache, kv.block_tables, starts, kv.context_lens,
                                              scale, window)
        for b, (n_q, n_ctx) in enumerate(zip(query_lens, context_lens)):
            k = contiguous_kv(kv.k_cache, kv.block_tables[b], n_ctx)
            v = contiguous_kv(kv.v_cache, kv.block_tables[b], n_ctx)
            # causal mask shifted by the prefix: row i sees keys 0 .. prefix + i
            mask = torch.ones(n_q, n_ctx, dtype=torch.bool).tril(diagonal=n_ctx - n_q)
            if window is not None:
                mask &= ~torch.ones(n_q, n_ctx, dtype=torch.bool).tril(diagonal=n_ctx - n_q - window)
            rows = slice(int(starts[b]), int(starts[b + 1]))
            torch.testing.assert_close(out[rows], sdpa(q[rows], k, v, mask, scale))


def test_rms_norm_ref():
    x, residual, weight = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    torch.testing.assert_close(ref.rms_norm_ref(x, weight, 1e-5), F.rms_norm(x, (32,), weight, 1e-5))
    out, summed = ref.rms_norm_ref(x, weight, 1e-5, residual)
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(out, F.rms_norm(x + residual, (32,), weight, 1e-5))
    xb, wb = x.bfloat16(), weight.bfloat16()   # HF: round the normalised value before the weight
    expected = wb * (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(ref.rms_norm_ref(xb, wb, 1e-5), expected)


def test_rotary_ref_matches_complex_rotation():
    head_dim, positions = 16, torch.tensor([0, 3, 1000])
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(1024).float()[:, None] * inv_freq
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    q, k = torch.randn(3, 4, head_dim), torch.randn(3, 2, head_dim)
    q_out, k_out = ref.apply_rotary_ref(q, k, positions, cos_sin)
    for x, x_out in ((q, q_out), (k, k_out)):
        # pair (i, i + D/2) as the complex number x[i] + j x[i + D/2], rotated by e^(j * angle)
        z = torch.complex(x[..., : head_dim // 2], x[..., head_dim // 2 :])
        z = z * torch.polar(torch.ones_like(angles[positions]), angles[positions])[:, None, :]
        torch.testing.assert_close(x_out, torch.cat([z.real, z.imag], dim=-1))
    assert torch.equal(q_out[0], q[0])  # position 0: identity


def test_silu_and_mul_ref():
    x = torch.randn(4, 10)
    torch.testing.assert_close(ref.silu_and_mul_ref(x), F.silu(x[:, :5]) * x[:, 5:])


def test_copy_blocks_ref_moves_whole_blocks_of_every_row():
    src = torch.arange(2 * 5 * 3).view(2, 5, 3)
    dst = torch.zeros(2, 4, 3, dtype=src.dtype)
    ref.copy_blocks_ref(src, dst, torch.tensor([4, 0]), torch.tensor([3, 1]))
    assert dst[:, 3].tolist() == src[:, 4].tolist() and dst[:, 1].tolist() == src[:, 0].tolist()
    assert dst[:, [0, 2]].eq(0).all()
    staging = torch.zeros(2, 2, 3, dtype=src.dtype)
    ref.copy_blocks_ref(src, staging, torch.tensor([2, 1]), None)
    assert staging.tolist() == src[:, [2, 1]].tolist()
