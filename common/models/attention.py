"""Paged attention: the step's attention metadata and the pure-torch backend (CPU, the reference).

KV cache of one layer (K and V share a tensor, index 0 / 1):

    kv[2, num_blocks, block_size, num_kv_heads, head_dim]
         block 12: | pos 0 | pos 1 | ... | pos 15 |      <- a request's tokens 0..15
         block  4: | pos 16| ...                          <- tokens 16..31 (block table [12, 4, ...])

Tokens of one step are flattened: decode tokens (one query per sequence) first, then the prefill
chunks. Each layer first *stores* every token's K/V at its slot (`slot_mapping`), then attends
by gathering through block tables, so chunks and prefix hits read their earlier tokens from blocks.
A GPU backend replaces `TorchPagedAttention` behind the same `forward` signature.

fp8 KV cache (--kv-cache-dtype fp8): the tensors are float8_e4m3fn and `kv_scale` [2, KVH] fp32
(K, V per head; set by the runner) scales them: stored = saturate(x / scale), read = entry * scale.
The torch path stores quantized bytes and dequantizes what it gathers; a fresh prompt's chunk
attends to its own K/V as stored (quantized), as the Triton kernels do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    q_start: int  # index of its first query token in the step's flattened tokens
    q_len: int
    context_len: int  # tokens of the sequence whose KV is in cache after this step's store
    block_table: torch.Tensor  # [num_blocks_of_seq] long


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset
    num_decode_tokens: int  # the first num_decode_tokens tokens are single-query sequences
    decode_block_tables: torch.Tensor | None  # [Bd, max_blocks] long
    decode_context_lens: torch.Tensor | None  # [Bd] long
    decode_max_context: int
    prefills: list[PrefillSeq] = field(default_factory=list)
    # For GPU kernels (built by the runner when a GPU backend is active):
    extra: dict = field(default_factory=dict)


@dataclass
class StepInputs:
    """One step's flattened batch on the host, as the runner builds it for every backend.

    B requests (the first num_decodes have one token each), T tokens, M = blocks of the longest
    context. All arrays are numpy int32."""
    num_decodes: int
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T] block_id * block_size + offset
    query_start_loc: np.ndarray  # [B + 1] cumulative query lengths
    context_lens: np.ndarray  # [B] tokens in cache after this step's store (start_pos + num_tokens)
    block_table: np.ndarray  # [B, M] zero-padded past each request's last needed block
    sample_rows: np.ndarray  # [S] token row of each sampling request's last token, in request order
    # decode rows only: [B] row groups of one-token rows that share a sequence (a verify step's
    # [t, d1 .. dn] as rows): n on a group's first row, 0 on the others (kernels/decode_attention.py)
    row_groups: np.ndarray | None = None

    @property
    def num_reqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


class PagedAttentionBase:
    """What every backend is built from; each adds `forward(q, k, v, kv_cache, meta, rotary, positions)`:
    rotate q and k (`rotary(positions, q, k)`, the model's Rotary), store K/V at the slots, attend."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 sliding_window: int | None = None):
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.scale = head_dim ** -0.5
        self.kv_scale: torch.Tensor | None = None  # [2, KVH] fp32 for an fp8 cache (set by the runner)


class TorchPagedAttention(PagedAttentionBase):
    """Reference backend: gathers K/V through block tables and calls SDPA."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, rotary, positions: torch.Tensor) -> torch.Tensor:
        # q [T, H, D], k/v [T, KVH, D], kv_cache [2, NB, BS, KVH, D] -> out [T, H, D]
        q, k = rotary(positions, q, k)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        k, v = self._store(k_cache, v_cache, meta.slot_mapping, k, v)

        out = torch.empty_like(q)
        nd = meta.num_decode_tokens
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        for seq in meta.prefills:
            sl = slice(seq.q_start, seq.q_start + seq.q_len)
            out[sl] = self._prefill(q[sl], k[sl], v[sl], k_cache, v_cache, seq)
        return out

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        # q [Bd, H, D]; gather [Bd, max_blocks, BS, KVH, D] -> [Bd, KVH, L, D]
        num_blocks = -(-meta.decode_max_context // self.block_size)
        table = meta.decode_block_tables[:, :num_blocks]
        bd = q.shape[0]
        keys = self._read(k_cache[table], 0, q.dtype).view(bd, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        values = self._read(v_cache[table], 1, q.dtype).view(bd, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        pos = torch.arange(keys.shape[2], device=q.device)
        lens = meta.decode_context_lens[:, None]
        visible = pos[None, :] < lens  # [Bd, L]
        if self.sliding_window is not None:
            visible &= pos[None, :] > lens - 1 - self.sliding_window
        mask = visible[:, None, None, :]  # [Bd, 1, 1, L]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask,
                                             scale=self.scale, enable_gqa=True)
        return out.squeeze(2)  # [Bd, H, D]

    def _prefill(self, q, k, v, k_cache, v_cache, seq: PrefillSeq) -> torch.Tensor:
        # q [Lq, H, D]; keys: this chunk alone (no cached prefix) or gathered [Lk, KVH, D]
        lq, lk = seq.q_len, seq.context_len
        if lk != lq:
            k = self._read(k_cache[seq.block_table], 0, q.dtype).view(-1, self.num_kv_heads, self.head_dim)[:lk]
            v = self._read(v_cache[seq.block_table], 1, q.dtype).view(-1, self.num_kv_heads, self.head_dim)[:lk]
        # [1, heads, L, D]: with a batch dim torch runs its flash CPU kernel (GQA included); 3-D
        # inputs fall back to the math path, ~3x slower on a 200-token prompt
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if lk == lq and self.sliding_window is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            q_pos = torch.arange(lk - lq, lk, device=q.device)[:, None]
            k_pos = torch.arange(lk, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if self.sliding_window is not None:
                mask &= k_pos > q_pos - self.sliding_window
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)

    def _store(self, k_cache, v_cache, slots, k, v):
        """Writes this step's K/V [T, KVH, D] at their slots; returns them as attention reads them."""
        flat_k = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        flat_v = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        if self.kv_scale is None:
            flat_k.index_copy_(0, slots, k)
            flat_v.index_copy_(0, slots, v)
            return k, v
        from pdserve.kernels.reference import quantize_kv_ref
        kq, vq = quantize_kv_ref(k, self.kv_scale[0]), quantize_kv_ref(v, self.kv_scale[1])
        # index_copy_ has no float8 kernel on CPU: copy the bytes
        flat_k.view(torch.uint8).index_copy_(0, slots, kq.view(torch.uint8))
        flat_v.view(torch.uint8).index_copy_(0, slots, vq.view(torch.uint8))
        return self._read(kq, 0, k.dtype), self._read(vq, 1, v.dtype)

    def _read(self, entries: torch.Tensor, which: int, dtype: torch.dtype) -> torch.Tensor:
        """Cache entries [..., KVH, D] as values (fp8: times the K (0) or V (1) scale of their head)."""
        if self.kv_scale is None:
            return entries
        return (entries.float() * self.kv_scale[which][:, None]).to(dtype)
