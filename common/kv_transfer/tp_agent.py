"""The KV transport of tensor-parallel ranks > 0 (a KV agent per rank), and rank 0's handle on them.

A rank's cache holds only its KV heads, so every rank serves and fills its own shard:

    rank 0: engine + worker process                  rank r: tp_workers' worker process
    RankAgents.start(transport, host, heads) ------> KVAgent, a thread with its own event loop:
      <-- the address of rank r's KV server ------     a KV server over rank r's cache (the
                                                       prefill handle lists it) and a KV client
                                                       of the same backend (decode)
    LeaseConnector.resolve  <-- "resolve"(lease) ---   a decode rank pulls from rank r's server:
      -> the lease's block ids, or None ----------->     it serves what rank 0 resolves, or refuses
    RankAgents.pull(r, RankPull) -- "pull" --------> run_rank_pull into rank r's cache
      <-- bytes moved | the error ------------------   (tp_pull.py)
    RankAgents.served  <-- "served"(counters) ------   its server's counters, when they change
                                                       (at most every SERVED_INTERVAL_S; /metrics)
    RankAgents.close() ------------ "close" -------> server and client closed

The one lease table stays on rank 0: rank r's server asks it at the moment a client presents a
lease id, so the unguessable lease id remains what it takes to read blocks, and a released or
expired lease is refused on every rank at once. Block ids are the same on every rank (one block
manager schedules them all). Messages travel over the rank's link (tp_link.py); an agent that
is gone fails its requests (LinkClosed), so a pull that needed it fails and decode recomputes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import torch

from pdserve.common.kv_transfer.base import KVHeads, KVTransferError, LeaseResolver, make_client, make_server
from pdserve.common.kv_transfer.tp_link import Link
from pdserve.common.kv_transfer.tp_pull import RankPull, run_rank_pull

log = logging.getLogger("pdserve.kv_agent")

SERVED_INTERVAL_S = 1.0  # how often an agent reports its server's counters (if they changed)
AGENT_START_TIMEOUT_S = 120.0  # a rank's KV server and client start within this (UCX set-up on a busy GPU)


class KVAgent:
    """Rank r's KV server and client, driven by rank 0 over the link."""

    def __init__(self, kv_cache: torch.Tensor):
        self.kv_cache = kv_cache  # [L, 2, N, bs, this rank's KV heads, D]
        self.server = None
        self.client = None
        self.link: Link | None = None
        self._reporter: asyncio.Task | None = None

    async def main(self, sock: socket.socket) -> None:
        self.link = Link(sock, {"start": self.start, "pull": self.pull, "close": self.close},
                         "tensor-parallel rank 0")
        await self.link.start()
        await self.link.wait_closed()  # the engine process is gone, or shut the workers down
        await self.close()
        await self.link.close()

    async def start(self, transport: str, host: str, kv_heads: KVHeads) -> str:
        await self.close()
        self.client = make_client(transport, self.kv_cache, kv_heads=kv_heads)
        self.server = make_server(transport, self.kv_cache, self._resolve, host=host, kv_heads=kv_heads)
        address = await self.server.start()
        self._reporter = asyncio.ensure_future(self._report_served(self.server))
        return address

    async def _report_served(self, server) -> None:
        last = None
        while True:
            counters = (server.bytes_sent, server.num_transfers, server.num_failures)
            if counters != last:
                self.link.notify("served", counters)
                last = counters
            await asyncio.sleep(SERVED_INTERVAL_S)

    def _resolve(self, lease_id: str):
        return self.link.request("resolve", lease_id)  # awaited by the server (base.src_block_ids_for)

    async def pull(self, pull: RankPull, deadline_s: float) -> int:
        if self.client is None:
            raise KVTransferError("this rank's KV client was not started")
        return await run_rank_pull(self.client, pull, deadline_s)

    async def close(self) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            self._reporter = None
        server, client, self.server, self.client = self.server, self.client, None, None
        if client is not None:
            await client.close()
        if server is not None:
            await server.close()


def start_agent(link_fd: int, kv_cache: torch.Tensor) -> threading.Thread:
    """Rank r's agent in a daemon thread of its worker process (idle until rank 0 starts it)."""
    sock = socket.socket(fileno=link_fd)

    def run():
        if kv_cache.is_cuda:
            torch.cuda.set_device(kv_cache.device)
        try:
            asyncio.run(KVAgent(kv_cache).main(sock))
        except Exception:
            log.exception("the KV agent failed")
    thread = threading.Thread(target=run, name="pdserve-kv-agent", daemon=True)
    thread.start()
    return thread


class RankAgents:
    """Rank 0's side: one link per rank 1..N-1, on the worker's event loop."""

    def __init__(self, links: list[socket.socket]):
        self._socks = links
        self.links: list[Link] = []
        self._resolve: LeaseResolver | None = None
        # each rank's server counters as last reported: (bytes_sent, num_transfers, num_failures)
        self.served: list[tuple[int, int, int]] = [(0, 0, 0)] * len(links)

    async def start(self, transport: str, host: str, kv_heads: list[KVHeads], resolve: LeaseResolver) -> list[str]:
        """Start the KV server and client of ranks 1..N-1 (kv_heads: theirs, in rank order);
        returns their servers' addresses. `resolve` answers their lease resolutions."""
        self._resolve = resolve
        for rank, sock in enumerate(self._socks, start=1):
            link = Link(sock, {"resolve": self._resolve_lease, "served": self._served_by(rank)},
                        f"tensor-parallel rank {rank}")
            await link.start()
            self.links.append(link)
        try:
            return list(await asyncio.wait_for(asyncio.gather(*(link.request("start", transport, host, heads)
                                                                 for link, heads in zip(self.links, kv_heads))),
                                               AGENT_START_TIMEOUT_S))
        except TimeoutError:
            raise KVTransferError(f"the KV agents of tensor-parallel ranks 1..{len(self.links)} did not start "
                                  f"their {transport} servers within {AGENT_START_TIMEOUT_S:.0f} s") from None

    def _resolve_lease(self, lease_id: str) -> list[int] | None:
        return self._resolve(lease_id)

    def _served_by(self, rank: int):
        def served(counters: tuple[int, int, int]) -> None:
            self.served[rank - 1] = counters
        return served

    async def pull(self, rank: int, pull: RankPull, deadline_s: float) -> int:
        """Rank `rank` (>= 1) runs `pull` into its cache; its bytes, or KVTransferError."""
        return await self.links[rank - 1].request("pull", pull, deadline_s)

    async def close(self) -> None:
        for link in self.links:
            try:
                await asyncio.wait_for(link.request("close"), 5.0)
            except (KVTransferError, TimeoutError) as e:
                log.warning("closing the KV agent of %s: %s", link.peer, e)
            await link.close()
        self.links = []
