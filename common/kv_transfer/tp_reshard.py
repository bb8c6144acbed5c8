"""Re-sharding KV blocks by head between tensor-parallel sizes (prefill TP=a -> decode TP=b).

Each rank's paged cache holds its KV heads only (models/parallel.py's partition):

    prefill TP=2 (8 KV heads)       rank 0: kv 0-3          rank 1: kv 4-7
    decode  TP=1                    rank 0: kv 0-7  <- heads 0-3 from prefill rank 0, 4-7 from rank 1
    decode  TP=4                    rank r: kv 2r, 2r+1 <- from prefill rank r // 2, heads (2r % 4)..

`plan_heads` says, for each destination rank, which head runs it copies from which source rank
(`reshard_plan` is the same from a model and two TP sizes). A KV head replicated on several
source ranks (fewer KV heads than ranks) is read from one of them, spread over the destinations.

How a decode rank applies its runs (tp_pull.py drives it): it pulls WHOLE blocks of each source
rank's shard into its staging buffer, as the server holds them, and copies only its runs out:

    staging [L, 2, n, bs, H_src, D] --HeadRunCopier.scatter--> cache[L, 2, dst blocks, bs, H_dst, D]
            heads src_head..+k                                          heads dst_head..+k

`SourceShard` is what a KVClient is told for such a pull (base.KVClient.pull(source=...)): the
layout the source rank's server has (checked in the Hello) and the runs; `apply_plan` does the
same copy on whole payloads (tests).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pdserve.common.config import ArchConfig
from pdserve.common.kv_transfer.base import KVLayout, PullPhases
from pdserve.common.kv_transfer.blocks import BlockCopier, block_runs
from pdserve.common.models.parallel import head_shard

HeadRange = tuple[int, int]  # (first KV head, number of KV heads) of one rank's shard


@dataclass(frozen=True)
class HeadRun:
    src_rank: int
    src_head: int  # first KV head in the source rank's shard
    dst_head: int  # first KV head in the destination rank's shard
    num_heads: int


def plan_heads(src: list[HeadRange], dst: list[HeadRange]) -> list[list[HeadRun]]:
    """Per destination rank, the runs of KV heads to copy (in destination head order).
    ValueError if a destination head is on no source rank."""
    plan = []
    for d, (dst_start, dst_num) in enumerate(dst):
        runs: list[HeadRun] = []
        for i in range(dst_num):
            head = dst_start + i
            holders = [r for r, (start, num) in enumerate(src) if start <= head < start + num]
            if not holders:
                raise ValueError(f"KV head {head} is on none of the source shards {src}")
            r = holders[d % len(holders)]
            last = runs[-1] if runs else None
            if last is not None and last.src_rank == r and last.src_head + last.num_heads == head - src[r][0]:
                runs[-1] = HeadRun(r, last.src_head, last.dst_head, last.num_heads + 1)
            else:
                runs.append(HeadRun(r, head - src[r][0], i, 1))
        plan.append(runs)
    return plan


def model_shards(arch: ArchConfig, tp: int) -> list[HeadRange]:
    """The KV heads of each rank of a model at tensor-parallel size `tp`."""
    return [(s.kv_start, s.num_kv) for s in (head_shard(arch, r, tp) for r in range(tp))]


def reshard_plan(arch: ArchConfig, src_tp: int, dst_tp: int) -> list[list[HeadRun]]:
    """Per destination rank, the runs of KV heads to copy (in destination head order)."""
    return plan_heads(model_shards(arch, src_tp), model_shards(arch, dst_tp))


def apply_plan(runs: list[HeadRun], src_payloads: list[torch.Tensor], dst_payload: torch.Tensor) -> None:
    """Copy one destination rank's heads from the source ranks' payloads [L, 2, n, bs, heads, D]."""
    for run in runs:
        dst_payload[..., run.dst_head:run.dst_head + run.num_heads, :].copy_(
            src_payloads[run.src_rank][..., run.src_head:run.src_head + run.num_heads, :])


def shard_layout(own: KVLayout, heads: HeadRange) -> KVLayout:
    """The layout of another shard of the same model and cache shape (num_blocks: ours, unused)."""
    return dataclasses.replace(own, num_kv_heads=heads[1], first_kv_head=heads[0])


@dataclass(frozen=True)
class SourceShard:
    """A source rank's shard as one destination rank pulls it: the layout its server holds (the
    client announces it in the Hello, so a server with other heads refuses) and the head runs
    this rank copies out of it (HeadRun.src_rank is that source's)."""

    layout: KVLayout
    runs: tuple[HeadRun, ...]

    def is_identity(self, own: KVLayout) -> bool:
        """Same shard as `own`, copied whole: a plain pull (equal TP sizes: rank r <- rank r)."""
        return (self.layout == own and len(self.runs) == 1
                and (self.runs[0].src_head, self.runs[0].dst_head, self.runs[0].num_heads) == (0, 0, own.num_kv_heads))

    def copier(self, kv_caches: list[torch.Tensor], phases: PullPhases) -> HeadRunCopier:
        return HeadRunCopier(kv_caches, self.layout, phases, self.runs)


class HeadRunCopier(BlockCopier):
    """Receives whole blocks of a source shard (its layout sizes the staging and the chunks) and
    scatters only the head runs into this rank's cache, whose head count differs."""

    def __init__(self, kv_caches: list[torch.Tensor], source: KVLayout, phases: PullPhases,
                 runs: tuple[HeadRun, ...]):
        super().__init__(kv_caches, source, phases, kernel="torch")
        self.runs = runs

    def gather(self, *args, **kwargs):
        raise TypeError("a HeadRunCopier only receives (the server gathers whole blocks)")

    def _copy_in(self, block_ids: list[int], src: torch.Tensor, layers: range) -> None:
        # src [L, 2, n, bs, H_src, D]; cache [l, 2, N, bs, H_dst, D]: one slice copy per run of
        # consecutive block ids and head run (on CUDA an index copy when the ids are scattered)
        id_runs = block_runs(block_ids)
        index = None
        if self.device.type == "cuda" and len(id_runs) > 1:
            index = self._index(block_ids)
        for cache, staged in self._layer_groups(src, layers):
            for run in self.runs:
                heads_in = staged[..., run.src_head:run.src_head + run.num_heads, :]
                heads_out = cache[..., run.dst_head:run.dst_head + run.num_heads, :]
                if index is not None:
                    heads_out.index_copy_(2, index, heads_in)
                    continue
                for pos, first_id, length in id_runs:
                    heads_out[:, :, first_id:first_id + length].copy_(heads_in[:, :, pos:pos + length])
