"""A tensor-parallel KV handoff: which prefill shards each decode rank reads, and one rank's pull.

    handle (prefill TP=a): shards [KVShardAddress(address, first_kv_head, num_kv_heads)] x a
    decode TP=b: each rank's own layout (its KV heads, models/parallel.py)

    plan_rank_pulls -> one RankPull per decode rank: the prefill shards its heads are on, each
                       as (address, SourceShard: that server's layout + the head runs to keep)
    run_rank_pull(client, pull) on that rank: every source at once into the same destination
                       blocks (disjoint heads), whole blocks of the source over the wire, the
                       runs copied into the cache (tp_reshard.HeadRunCopier); bytes summed

    prefill TP=2 -> decode TP=1   rank 0 <- shard 0 (heads 0..) + shard 1 (heads ..)
    prefill TP=1 -> decode TP=2   rank r <- shard 0, keeping its half of the heads
    prefill TP=2 -> decode TP=2   rank r <- shard r, whole (an identity SourceShard: a plain pull)

Rank 0 runs its RankPull on the decode worker's event loop (connector.PullConnector); ranks > 0
get theirs through their KV agents (tp_agent.py). A source that only part of is kept still moves
whole (prefill TP=1 -> decode TP=2 moves each block twice): a server that sends a head range
would halve that (docs/tensor-parallel.md).
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass

from pdserve.common.kv_transfer.base import KVClient, KVLayout
from pdserve.common.kv_transfer.tp_reshard import SourceShard, plan_heads, shard_layout


@dataclass(frozen=True)
class KVShardAddress:
    """One prefill rank's KV server and the model's KV heads its blocks hold (from the handle)."""
    address: str
    first_kv_head: int
    num_kv_heads: int


@dataclass(frozen=True)
class RankPull:
    """What one decode rank pulls into its cache (pickled to ranks > 0)."""
    lease_id: str
    dst_block_ids: tuple[int, ...]
    src_block_offset: int
    sources: tuple[tuple[str, SourceShard], ...]  # (KV server address, its shard and the runs kept)


def plan_rank_pulls(shards: list[KVShardAddress], dst_layouts: list[KVLayout], lease_id: str,
                    dst_block_ids: list[int], src_block_offset: int) -> list[RankPull]:
    """One RankPull per destination rank (dst_layouts: each rank's own layout, in rank order).
    ValueError when the shards do not cover a destination rank's heads."""
    return [RankPull(lease_id, tuple(dst_block_ids), src_block_offset, sources)
            for sources in _rank_sources(tuple(shards), tuple(dst_layouts))]


@functools.lru_cache(maxsize=256)
def _rank_sources(shards: tuple[KVShardAddress, ...], dst_layouts: tuple[KVLayout, ...]
                  ) -> tuple[tuple[tuple[str, SourceShard], ...], ...]:
    """Each destination rank's sources: the same for every pull between the same workers, so
    computed once (it was a few % of a decode worker's GIL under load)."""
    plan = plan_heads([(s.first_kv_head, s.num_kv_heads) for s in shards],
                      [(layout.first_kv_head, layout.num_kv_heads) for layout in dst_layouts])
    out = []
    for layout, runs in zip(dst_layouts, plan):
        by_source: dict[int, list] = {}
        for run in runs:
            by_source.setdefault(run.src_rank, []).append(run)
        out.append(tuple(
            (shards[r].address, SourceShard(shard_layout(layout, (shards[r].first_kv_head, shards[r].num_kv_heads)),
                                            tuple(source_runs)))
            for r, source_runs in sorted(by_source.items())))
    return tuple(out)


async def run_rank_pull(client: KVClient, pull: RankPull, deadline_s: float) -> int:
    """Pull every source of `pull` into `client`'s cache at once; the bytes moved. Returns (or
    raises the first failure) only once every source's pull has ended, so no copy into the
    destination blocks is still running."""
    results = await asyncio.gather(*(
        client.pull(address, pull.lease_id, list(pull.dst_block_ids), deadline_s, pull.src_block_offset,
                    source=source) for address, source in pull.sources), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return sum(results)
