"""A worker's KV transport on every tensor-parallel rank: the servers a prefill handle lists, the
clients a decode pulls with.

    rank 0 (this process)   a KV server and a KV client over its cache [L, 2, N, bs, its KV heads, D]
    ranks 1..N-1            the same in their worker processes, started through their KV agents
                            (common/kv_transfer/tp_agent.py); their lease resolutions come back
                            to this process's LeaseConnector (one lease table)
    shards                  each rank's advertised KV address and KV heads -> KVHandle.shards
    PullConnector.set_ranks every rank's layout and the agents -> each decode rank pulls its heads

Without tensor parallelism this is one server and one client over the whole cache, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.common.kv_transfer.base import KVServer, make_client, make_server, split_address
from pdserve.common.kv_transfer.connector import LeaseConnector, PullConnector
from pdserve.common.kv_transfer.tp_agent import RankAgents
from pdserve.common.kv_transfer.tp_pull import KVShardAddress
from pdserve.common.kv_transfer.tp_reshard import model_shards, shard_layout


@dataclass
class WorkerKV:
    server: KVServer  # rank 0's
    shards: list[KVShardAddress]  # every rank's, advertised (what decode workers dial)
    agents: RankAgents | None  # ranks 1..N-1 (None: no tensor parallelism)

    # the servers' counters over every rank, for /metrics (ranks > 0: as last reported, <= 1 s old)
    @property
    def bytes_sent(self) -> int:
        return self.server.bytes_sent + sum(s[0] for s in self._served())

    @property
    def num_transfers(self) -> int:
        return self.server.num_transfers + sum(s[1] for s in self._served())

    @property
    def num_failures(self) -> int:
        return self.server.num_failures + sum(s[2] for s in self._served())

    def _served(self) -> list[tuple[int, int, int]]:
        return self.agents.served if self.agents is not None else []

    async def close(self) -> None:
        if self.agents is not None:
            await self.agents.close()
        await self.server.close()


async def start_worker_kv(core, transport: str, host: str, advertise_host: str, lease: LeaseConnector,
                          pull: PullConnector) -> WorkerKV:
    """Start every rank's KV server and client of `transport` for the engine `core`; give the
    decode half (`pull`) its client and ranks."""
    arch, num_ranks = core.arch, core.tensor_parallel_size
    heads = model_shards(arch, num_ranks)  # (first KV head, number) of each rank
    kv_heads = [(first, arch.num_kv_heads) for first, _ in heads]
    kv_cache = core.runner.kv_cache  # [L, 2, N, bs, H, D]: a handoff's blocks move in one op
    if kv_cache.is_cuda:
        # This thread (the worker's event loop) creates the UCX context / NCCL pairs and waits on
        # the copies: on the cache's GPU, not cuda:0, when the worker runs on `--device cuda:1`
        # with every GPU visible (as the KV agents of ranks > 0 do, tp_agent.py).
        torch.cuda.set_device(kv_cache.device)
    client = pull.clients[transport] = make_client(transport, kv_cache, kv_heads=kv_heads[0])
    # ipc: clients read the blocks after the answer; knowing the lease's expiry spares a check after
    options = {"lease_remaining": lease.remaining_s} if transport == "ipc" else {}
    server = make_server(transport, kv_cache, lease.resolve, host=host, kv_heads=kv_heads[0], **options)
    addresses = [await server.start()]
    agents = None
    if num_ranks > 1:
        agents = RankAgents(core.runner.workers.kv_links)
        addresses += await agents.start(transport, host, kv_heads[1:], lease.resolve)
        pull.set_ranks([shard_layout(client.layout, h) for h in heads], agents)

    def advertised(address: str) -> str:
        _, port = split_address(address, transport)
        return f"{transport}://{advertise_host}:{port}"
    shards = [KVShardAddress(advertised(address), first, num) for address, (first, num) in zip(addresses, heads)]
    return WorkerKV(server, shards, agents)
