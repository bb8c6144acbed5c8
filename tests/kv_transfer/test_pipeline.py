"""pipeline.py over an in-memory connection: the server follows the client's chunk plan.

    client: pull_on()  <-- _Pipe (asyncio queues) -->  server: serve_pull()

The pipe keeps message boundaries and fails a receive whose buffer does not have the size of
the message that arrives (an empty message, a refusal's, excepted), so a disagreement between
the two ends about the chunks shows up as an error, not as shifted bytes.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from kv_cases import make_caches

from pdserve.common.kv_transfer import wire
from pdserve.common.kv_transfer.base import KVLayout, KVTransferError, PullPhases, make_server
from pdserve.common.kv_transfer.blocks import BlockCopier
from pdserve.common.kv_transfer.pipeline import StagingPool, pull_on, serve_pull

pytestmark = pytest.mark.timeout(60)

# 8 layers of 64 KiB blocks: a pull of at most 8 blocks (4 MiB) is one chunk on a host payload.
CACHE = dict(num_layers=8, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
LEASE = [11, 3, 4, 5, 30, 0, 17, 8]


class _Pipe:
    """One end of an in-memory connection: headers and payload messages on separate channels,
    as UCX's active and tagged messages are, so that receives may be posted early."""

    def __init__(self, inbox: tuple[asyncio.Queue, asyncio.Queue],
                 outbox: tuple[asyncio.Queue, asyncio.Queue], early_receives: bool):
        self.inbox, self.outbox = inbox, outbox  # (headers, payloads)
        self.early_receives = early_receives
        self.payload_sizes: list[int] = []  # of the payload messages this end received

    @classmethod
    def pair(cls, early_receives: bool = False) -> tuple[_Pipe, _Pipe]:
        a, b = (asyncio.Queue(), asyncio.Queue()), (asyncio.Queue(), asyncio.Queue())
        return cls(a, b, early_receives), cls(b, a, early_receives)

    async def send_header(self, message: wire.Message) -> None:
        await self.outbox[0].put(wire.encode(message))

    async def recv_header(self) -> wire.Message:
        return wire.decode(await self.inbox[0].get())

    async def send_payload(self, payload: torch.Tensor) -> None:
        await self.outbox[1].put(payload.clone())

    async def recv_payload(self, buffer: torch.Tensor) -> None:
        message = await self.inbox[1].get()
        if message.numel() not in (0, buffer.numel()):  # an empty one completes a refused pull
            raise ConnectionError(f"a {message.numel()}-byte message for a {buffer.numel()}-byte "
                                  f"receive")
        buffer[:message.numel()].copy_(message)
        self.payload_sizes.append(message.numel())


def _pull(src, dst, dst_block_ids, src_block_offset=0, num_chunks=None, early_receives=False,
          leases=None):
    """Pulls through serve_pull / pull_on; returns (bytes, server phases, client phases,
    sizes of the payload messages). num_chunks overrides the client's chunk plan. With
    several leases (name -> dst ids), pulls each in turn on the same pipe; bytes is then a
    list with a KVTransferError in place of each refused pull."""
    leases = leases or {"lease": dst_block_ids}

    async def main():
        server = make_server("local", src, {"lease": LEASE}.get)  # a KVServer, never started
        server_copier = BlockCopier(src, server.layout, server.phases)
        client_phases = PullPhases()
        client_copier = BlockCopier(dst, KVLayout.from_caches(dst), client_phases)
        if num_chunks is not None:
            client_copier.num_chunks = lambda num_blocks, payload_on_device: num_chunks
        client_end, server_end = _Pipe.pair(early_receives)

        async def serve():
            for _ in leases:
                request = wire.expect(await server_end.recv_header(), wire.PullRequest, "client")
                await serve_pull(server, server_copier, StagingPool(torch.device("cpu"), False, 1),
                                 server_end, request)

        serving = asyncio.ensure_future(serve())
        results = []
        for lease_id, ids in leases.items():
            try:
                results.append(await pull_on(
                    client_end, client_copier, StagingPool(torch.device("cpu"), False, 1),
                    "test server", lease_id, ids, src_block_offset,
                    deadline=time.perf_counter() + 10.0))
            except KVTransferError as e:
                results.append(e)
        await serving
        nbytes = results[0] if len(leases) == 1 else results
        return nbytes, server.phases, client_phases, client_end.payload_sizes

    return asyncio.run(main())


@pytest.mark.parametrize("early_receives", [False, True], ids=["after-reply", "early"])
@pytest.mark.parametrize("num_chunks", [None, 1, 3, 8])
@pytest.mark.parametrize("src_block_offset", [0, 5])
def test_server_sends_in_the_chunks_the_client_asks_for(num_chunks, src_block_offset,
                                                        early_receives):
    src = make_caches(num_blocks=32, seed=41, **CACHE)
    dst = make_caches(num_blocks=12, seed=42, **CACHE)
    before = [t.clone() for t in dst]
    dst_block_ids = [9, 2, 7, 0, 11, 4, 5, 6][src_block_offset:]
    n = len(dst_block_ids)

    nbytes, server, client, sizes = _pull(src, dst, dst_block_ids, src_block_offset, num_chunks,
                                          early_receives)

    layer_bytes = n * 64 * 1024
    expected_chunks = 1 if num_chunks is None else num_chunks  # None: 3 MiB is one host chunk
    bounds = [8 * i // expected_chunks for i in range(expected_chunks + 1)]
    assert nbytes == 8 * layer_bytes == sum(sizes)
    assert sizes == [(b - a) * layer_bytes for a, b in zip(bounds, bounds[1:])]
    assert server.payload_messages == client.payload_messages == expected_chunks
    assert client.request_s > 0 and client.wire_s > 0 and client.copy_s > 0
    assert server.copy_s > 0 and server.wire_s >= 0 and server.request_s == 0
    assert server.copy_gpu_s == client.copy_gpu_s == 0  # CPU: no CUDA events
    untouched = sorted(set(range(12)) - set(dst_block_ids))
    for layer in range(8):
        assert torch.equal(dst[layer][:, dst_block_ids], src[layer][:, LEASE[src_block_offset:]])
        assert torch.equal(dst[layer][:, untouched], before[layer][:, untouched])


@pytest.mark.parametrize("early_receives", [False, True], ids=["after-reply", "early"])
def test_refused_pull_leaves_the_connection_in_step(early_receives):
    src = make_caches(num_blocks=32, seed=45, **CACHE)
    dst = make_caches(num_blocks=12, seed=46, **CACHE)
    leases = {"gone": [0, 1, 2], "lease": list(range(8))}
    results, _, client, sizes = _pull(src, dst, None, num_chunks=2,
                                      early_receives=early_receives, leases=leases)
    assert isinstance(results[0], KVTransferError) and "'gone' expired or unknown" in str(results[0])
    assert results[1] == 8 * 8 * 64 * 1024
    # Early receives of the refused pull were completed by two empty messages.
    assert sizes == ([0, 0] if early_receives else []) + [4 * 8 * 64 * 1024] * 2
    assert client.payload_messages == 2
    for layer in range(8):
        assert torch.equal(dst[layer][:, list(range(8))], src[layer][:, LEASE])


def test_server_refuses_a_chunk_count_it_cannot_split_the_layers_into():
    src = make_caches(num_blocks=32, seed=47, **CACHE)

    async def main():
        server = make_server("local", src, {"lease": LEASE}.get)
        copier = BlockCopier(src, server.layout, server.phases)
        client_end, server_end = _Pipe.pair(early_receives=True)
        request = wire.PullRequest("lease", 0, 8, num_chunks=9, timeout_s=5.0)
        await serve_pull(server, copier, StagingPool(torch.device("cpu"), False, 1), server_end,
                         request)
        reply = await client_end.recv_header()
        assert isinstance(reply, wire.Error) and "num_chunks must be in [1, 8], got 9" in reply.message
        assert [client_end.inbox[1].get_nowait().numel() for _ in range(9)] == [0] * 9
        assert server.num_failures == 1

    asyncio.run(main())


def test_client_rejects_a_reply_in_other_chunks_than_it_asked_for():
    dst = make_caches(num_blocks=12, seed=44, **CACHE)
    before = [t.clone() for t in dst]
    copier = BlockCopier(dst, KVLayout.from_caches(dst), PullPhases())

    async def main():
        client_end, server_end = _Pipe.pair()
        for num_chunks, error in [(3, "announced 3 chunks, the client asked for 1"),
                                  (0, "malformed KV wire header")]:
            pulling = asyncio.ensure_future(pull_on(
                client_end, copier, StagingPool(torch.device("cpu"), False, 1), "test server",
                "lease", list(range(8)), 0, deadline=time.perf_counter() + 10.0))
            request = await server_end.recv_header()
            assert request.num_chunks == 1
            nbytes = copier.nbytes(request.num_blocks)
            # Encoded by hand: PullReply itself refuses 0 chunks for a non-empty payload.
            await server_end.outbox[0].put(
                f'{{"type": "reply", "nbytes": {nbytes}, "num_chunks": {num_chunks}}}'.encode())
            with pytest.raises(KVTransferError, match=error):
                await pulling

    asyncio.run(main())
    for layer in range(8):
        assert torch.equal(dst[layer], before[layer])
