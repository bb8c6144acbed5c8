"""Re-sharding KV blocks by head between tensor-parallel sizes (prefill TP=a -> decode TP=b).

Each rank's paged cache holds its KV heads only (models/parallel.py's partition):

    prefill TP=2 (8 KV heads)       rank 0: kv 0-3          rank 1: kv 4-7
    decode  TP=1                    rank 0: kv 0-7  <- heads 0-3 from prefill rank 0, 4-7 from rank 1
    decode  TP=4                    rank r: kv 2r, 2r+1 <- from prefill rank r // 2, heads (2r % 4)..

`reshard_plan` says, for each destination rank, which head runs it copies from which source rank;
`apply_plan` performs it on block payloads laid out as the transport's staging buffer
[L, 2, n, block_size, heads, D] (tests; a transport applies the same plan to its own buffers).
A KV head replicated on several source ranks (fewer KV heads than ranks) is read from one of
them, spread over the destinations.

Not wired into the services yet: docs/tensor-parallel.md ("Disaggregation") describes how a
decode rank pulls its runs from the prefill ranks; today `pdserve prefill|decode` refuse
--tensor-parallel-size > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.common.config import ArchConfig
from pdserve.common.models.parallel import head_shard


@dataclass(frozen=True)
class HeadRun:
    src_rank: int
    src_head: int  # first KV head in the source rank's shard
    dst_head: int  # first KV head in the destination rank's shard
    num_heads: int


def reshard_plan(arch: ArchConfig, src_tp: int, dst_tp: int) -> list[list[HeadRun]]:
    """Per destination rank, the runs of KV heads to copy (in destination head order)."""
    src = [head_shard(arch, r, src_tp) for r in range(src_tp)]
    plan = []
    for d in range(dst_tp):
        dst = head_shard(arch, d, dst_tp)
        runs: list[HeadRun] = []
        for i in range(dst.num_kv):
            head = dst.kv_start + i
            holders = [r for r, s in enumerate(src) if s.kv_start <= head < s.kv_start + s.num_kv]
            r = holders[d % len(holders)]
            last = runs[-1] if runs else None
            if last is not None and last.src_rank == r and last.src_head + last.num_heads == head - src[r].kv_start:
                runs[-1] = HeadRun(r, last.src_head, last.dst_head, last.num_heads + 1)
            else:
                runs.append(HeadRun(r, head - src[r].kv_start, i, 1))
        plan.append(runs)
    return plan


def apply_plan(runs: list[HeadRun], src_payloads: list[torch.Tensor], dst_payload: torch.Tensor) -> None:
    """Copy one destination rank's heads from the source ranks' payloads [L, 2, n, bs, heads, D]."""
    for run in runs:
        dst_payload[..., run.dst_head:run.dst_head + run.num_heads, :].copy_(
            src_payloads[run.src_rank][..., run.src_head:run.src_head + run.num_heads, :])
