"""Tensor-parallel KV handoffs through real KV servers and clients on 127.0.0.1: prefill TP=a ranks
each serve their head shard of one full cache; every decode rank of TP=b pulls the shards its
heads are on (tp_pull.py) and must end with exactly its slice of the full cache in the
destination blocks, and nothing else touched. The KV agent of a rank > 0 (tp_agent.py) runs in
a thread on the other end of a real socketpair: it serves its shard only for leases that rank 0
resolves, and pulls what rank 0 tells it."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest
import torch
from kv_cases import shareable

from pdserve.common.config import ArchConfig
from pdserve.common.kv_transfer.base import KVLayout, KVTransferError, make_client, make_server
from pdserve.common.kv_transfer.tp_agent import RankAgents, start_agent
from pdserve.common.kv_transfer.tp_link import Link, LinkClosed
from pdserve.common.kv_transfer.tp_pull import KVShardAddress, plan_rank_pulls, run_rank_pull
from pdserve.common.kv_transfer.tp_reshard import model_shards

pytestmark = pytest.mark.timeout(60)

LAYERS, BLOCK, DIM = 2, 4, 8
SRC_BLOCKS = [5, 6, 7, 2, 11]
DST_BLOCKS = [30, 3, 17, 1]  # the lease's blocks after the offset go here
OFFSET = 1  # decode already holds the first block (a prefix hit): it pulls the rest


def arch_of(heads: int, kv: int) -> ArchConfig:
    return ArchConfig("llama", 100, 64, 128, LAYERS, heads, kv, DIM)


def shard(full: torch.Tensor, first: int, num: int) -> torch.Tensor:
    return full[..., first:first + num, :].contiguous()  # [L, 2, N, bs, num, D]


async def handoff(backend: str, arch: ArchConfig, src_tp: int, dst_tp: int):
    """Every prefill rank serves its shard of `full`; every decode rank pulls its heads."""
    kv = arch.num_kv_heads
    full = torch.randn(LAYERS, 2, 12, BLOCK, kv, DIM, generator=torch.Generator().manual_seed(3))
    src_heads, dst_heads = model_shards(arch, src_tp), model_shards(arch, dst_tp)
    leases = {"lease-1": SRC_BLOCKS}.get
    served = (lambda cache: shareable(cache)) if backend == "ipc" else (lambda cache: cache)
    servers = [make_server(backend, served(shard(full, f, n)), leases, kv_heads=(f, kv)) for f, n in src_heads]
    dst = [torch.full((LAYERS, 2, 32, BLOCK, n, DIM), float("nan")) for _, n in dst_heads]
    clients = [make_client(backend, cache, kv_heads=(f, kv)) for cache, (f, _) in zip(dst, dst_heads)]
    try:
        shards = [KVShardAddress(await s.start(), f, n) for s, (f, n) in zip(servers, src_heads)]
        pulls = plan_rank_pulls(shards, [c.layout for c in clients], "lease-1", DST_BLOCKS, OFFSET)
        nbytes = await asyncio.gather(*(run_rank_pull(c, p, 10.0) for c, p in zip(clients, pulls)))
    finally:
        for end in clients + servers:
            await end.close()
    return full, dst, dst_heads, pulls, nbytes, servers


@pytest.mark.parametrize("backend,heads,kv,src_tp,dst_tp", [
    ("tcp", 4, 2, 2, 1), ("tcp", 4, 2, 1, 2), ("tcp", 4, 2, 2, 2),
    ("tcp", 4, 2, 4, 2), ("tcp", 4, 2, 2, 4),  # KV heads replicated on the TP=4 side
    ("tcp", 9, 3, 2, 1), ("tcp", 9, 3, 1, 2),  # uneven shards (2 + 1 KV heads)
    ("nccl", 4, 2, 2, 1), ("ucx", 4, 2, 1, 2), ("local", 4, 2, 1, 2),
    ("ipc", 4, 2, 2, 1), ("ipc", 4, 2, 2, 2)])
def test_every_decode_rank_gets_exactly_its_heads(backend, heads, kv, src_tp, dst_tp):
    arch = arch_of(heads, kv)
    full, dst, dst_heads, pulls, nbytes, servers = asyncio.run(handoff(backend, arch, src_tp, dst_tp))
    untouched = sorted(set(range(32)) - set(DST_BLOCKS))
    for cache, (first, num) in zip(dst, dst_heads):
        assert torch.equal(cache[:, :, DST_BLOCKS], shard(full, first, num)[:, :, SRC_BLOCKS[OFFSET:]])
        assert cache[:, :, untouched].isnan().all()
    # whole blocks of every shard read: bytes = blocks x the source shard's block size, per source
    per_head_block = LAYERS * 2 * BLOCK * DIM * 4
    n = len(DST_BLOCKS)
    assert list(nbytes) == [sum(n * per_head_block * s.layout.num_kv_heads for _, s in p.sources) for p in pulls]
    if src_tp == dst_tp:  # rank r <- rank r, whole: a plain pull into the cache
        assert all(len(p.sources) == 1 and s.is_identity(KVLayout.from_caches(c, (f, kv)))
                   for p, c, (f, _) in zip(pulls, dst, dst_heads) for _, s in p.sources)
    if dst_tp == 1 and src_tp > 1:
        assert len(pulls[0].sources) == src_tp  # one decode rank reads every prefill rank
    assert sum(s.num_transfers for s in servers) == sum(len(p.sources) for p in pulls)


def test_a_shard_with_other_heads_is_refused_in_the_hello():
    """A client expecting prefill rank 1's heads reaches rank 0's server: the layouts differ."""
    async def main():
        full = torch.randn(LAYERS, 2, 12, BLOCK, 2, DIM)
        server = make_server("tcp", shard(full, 0, 1), {"lease-1": SRC_BLOCKS}.get, kv_heads=(0, 2))
        client = make_client("tcp", torch.zeros(LAYERS, 2, 32, BLOCK, 2, DIM))
        try:
            address = await server.start()
            wrong = [KVShardAddress(address, 0, 1), KVShardAddress(address, 1, 1)]  # rank 1's is not there
            pull = plan_rank_pulls(wrong, [client.layout], "lease-1", DST_BLOCKS, OFFSET)[0]
            # the server refuses (and the client would: each compares the other's Hello)
            with pytest.raises(KVTransferError, match="mismatch .* first_kv_head is 0 here but 1 there"):
                await run_rank_pull(client, pull, 5.0)
        finally:
            await client.close()
            await server.close()
    asyncio.run(main())


def test_rank_agent_serves_leases_rank0_resolves_and_pulls_what_rank0_sends():
    kv = 2
    rank1_cache = torch.randn(LAYERS, 2, 12, BLOCK, 1, DIM)  # rank 1 of TP=2: KV head 1
    rank1_before = rank1_cache.clone()
    rank1_layout = KVLayout.from_caches(rank1_cache, (1, kv))
    rank0_layout = dataclasses.replace(rank1_layout, first_kv_head=0)
    rank0_side, rank1_side = socket.socketpair()
    start_agent(rank1_side.detach(), rank1_cache)
    resolved: list[str] = []

    def resolve(lease_id: str):  # rank 0's lease table
        resolved.append(lease_id)
        return SRC_BLOCKS if lease_id == "lease-1" else None

    async def main():
        agents = RankAgents([rank0_side])
        tp1_cache = torch.randn(LAYERS, 2, 12, BLOCK, kv, DIM)
        tp1_server = make_server("tcp", tp1_cache, {"lease-9": [0, 1]}.get)
        client = make_client("tcp", torch.zeros(LAYERS, 2, 32, BLOCK, 1, DIM), kv_heads=(1, kv))
        try:
            [address] = await agents.start("tcp", "127.0.0.1", [(1, kv)], resolve)
            # a decode rank pulls rank 1's shard: served for the lease rank 0 resolves, only for it
            shards = [KVShardAddress(address, 1, 1)]
            pull = plan_rank_pulls(shards, [client.layout], "lease-1", DST_BLOCKS, OFFSET)[0]
            assert await run_rank_pull(client, pull, 5.0) == len(DST_BLOCKS) * LAYERS * 2 * BLOCK * DIM * 4
            assert torch.equal(client.kv_caches[0][:, DST_BLOCKS], rank1_cache[0][:, SRC_BLOCKS[OFFSET:]])
            forged = plan_rank_pulls(shards, [client.layout], "guessed", [4], 0)[0]
            with pytest.raises(KVTransferError, match="expired or unknown"):
                await run_rank_pull(client, forged, 5.0)
            assert resolved == ["lease-1", "guessed"]
            # rank 0 sends rank 1 its part of a pull from a TP=1 server: rank 1 keeps KV head 1
            tp1 = [KVShardAddress(await tp1_server.start(), 0, kv)]
            orders = plan_rank_pulls(tp1, [rank0_layout, rank1_layout], "lease-9", [7, 8], 0)
            assert await agents.pull(1, orders[1], 5.0) == 2 * LAYERS * 2 * BLOCK * kv * DIM * 4
            assert torch.equal(rank1_cache[:, :, [7, 8]], tp1_cache[:, :, [0, 1], :, 1:2])
            assert torch.equal(rank1_cache[:, :, :7], rank1_before[:, :, :7])
            bad = plan_rank_pulls(tp1, [rank0_layout, rank1_layout], "nope", [9], 0)[1]
            with pytest.raises(KVTransferError, match="tensor-parallel rank 1: .*expired or unknown"):
                await agents.pull(1, bad, 5.0)
            link = agents.links[0]
        finally:
            await client.close()
            await tp1_server.close()
            await agents.close()
        with pytest.raises(KVTransferError, match="rank 1 is gone"):  # a closed link fails at once
            await link.request("pull", orders[1], 5.0)
    asyncio.run(main())


def test_a_request_fails_when_the_other_rank_goes_away():
    async def main():
        mine, theirs = socket.socketpair()
        link = Link(mine, {}, "tensor-parallel rank 1")
        await link.start()
        pending = asyncio.ensure_future(link.request("pull"))
        await asyncio.sleep(0.01)
        theirs.close()  # the rank's process exited
        with pytest.raises(LinkClosed, match="rank 1 is gone"):
            await asyncio.wait_for(pending, 5)
        await link.close()
    asyncio.run(main())
