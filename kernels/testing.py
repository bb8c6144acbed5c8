"""Random inputs shared by tests/kernels and the benchmark's --check mode.

`make_paged_kv` lays sequences out the way the engine does, only more hostile:

    kv [2, num_blocks, block_size, KVH, D]     k_cache = kv[0], v_cache = kv[1] (views, not contiguous pair)
    block_tables [B, M]: each sequence's blocks are a random, non-sequential pick of the pool;
                         entries past a sequence's last block hold PAD_BLOCK_ID (far out of range)
    poison=True: every slot no sequence owns (spare blocks, tails of last blocks) is NaN, so a
                 kernel that reads or weights one shows NaN in its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_BLOCK_ID = 1 << 30


@dataclass
class PagedKV:
    k_cache: torch.Tensor        # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor        # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor   # [B, M] int32
    context_lens: torch.Tensor   # [B] int32


def make_paged_kv(
    context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, device: torch.device | str, seed: int = 0, poison: bool = True,
) -> PagedKV:
    gen = torch.Generator(device).manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3                                   # a few spare blocks
    order = torch.randperm(num_blocks, generator=gen, device=device).tolist()
    block_tables = torch.full((len(context_lens), max(blocks_per_seq) + 1), PAD_BLOCK_ID, dtype=torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, (num_tokens, num_seq_blocks) in enumerate(zip(context_lens, blocks_per_seq)):
        seq_blocks, order = order[:num_seq_blocks], order[num_seq_blocks:]
        block_tables[b, :num_seq_blocks] = torch.tensor(seq_blocks, dtype=torch.int32)
        for i, block_id in enumerate(seq_blocks):
            owned[block_id, : min(block_size, num_tokens - i * block_size)] = True
    kv = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen, device=device).to(dtype)
    if poison:
        kv[:, ~owned.to(device)] = float("nan")
    context = torch.tensor(context_lens, dtype=torch.int32, device=device)
    return PagedKV(kv[0], kv[1], block_tables.to(device), context)


def query_start_loc(query_lens: list[int], device: torch.device | str) -> torch.Tensor:
    """[B + 1] int32 cumulative query lengths."""
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (NaN if out has a NaN)."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2
