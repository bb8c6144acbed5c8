"""pipeline.py over an in-memory connection: the client follows the server's chunk plan.

    client: pull_on()  <-- _Pipe (asyncio queues) -->  server: serve_pull()

The pipe keeps message boundaries and, like a UCX tagged receive, fails a receive whose
buffer does not have the size of the message that arrives, so a disagreement between the two
ends about the chunks shows up as an error, not as shifted bytes.
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
    """One end of an in-memory connection carrying headers and payload messages."""

    def __init__(self, inbox: asyncio.Queue, outbox: asyncio.Queue):
        self.inbox, self.outbox = inbox, outbox
        self.payload_sizes: list[int] = []  # of the payload messages this end received

    @classmethod
    def pair(cls) -> tuple[_Pipe, _Pipe]:
        a, b = asyncio.Queue(), asyncio.Queue()
        return cls(a, b), cls(b, a)

    async def send_header(self, message: wire.Message) -> None:
        await self.outbox.put(wire.encode(message))

    async def recv_header(self) -> wire.Message:
        return wire.decode(await self.inbox.get())

    async def send_payload(self, payload: torch.Tensor) -> None:
        await self.outbox.put(payload.clone())

    async def recv_payload(self, buffer: torch.Tensor) -> None:
        message = await self.inbox.get()
        if message.numel() != buffer.numel():
            raise ConnectionError(f"a {message.numel()}-byte message for a {buffer.numel()}-byte "
                                  f"receive")
        buffer.copy_(message)
        self.payload_sizes.append(message.numel())


def _pull(src, dst, dst_block_ids, src_block_offset=0, num_chunks=None):
    """One pull through serve_pull / pull_on; returns (bytes, server phases, client phases,
    sizes of the payload messages). num_chunks overrides the server's chunk plan."""
    async def main():
        server = make_server("local", src, {"lease": LEASE}.get)  # a KVServer, never started
        server_copier = BlockCopier(src, server.layout, server.phases)
        if num_chunks is not None:
            server_copier.num_chunks = lambda num_blocks, payload_on_device: num_chunks
        client_phases = PullPhases()
        client_copier = BlockCopier(dst, KVLayout.from_caches(dst), client_phases)
        client_end, server_end = _Pipe.pair()

        async def serve():
            request = wire.expect(await server_end.recv_header(), wire.PullRequest, "client")
            await serve_pull(server, server_copier, StagingPool(torch.device("cpu"), False, 1),
                             server_end, request)

        serving = asyncio.ensure_future(serve())
        nbytes = await pull_on(client_end, client_copier,
                               StagingPool(torch.device("cpu"), False, 1), "test server",
                               "lease", dst_block_ids, src_block_offset,
                               deadline=time.perf_counter() + 10.0)
        await serving
        return nbytes, server.phases, client_phases, client_end.payload_sizes

    return asyncio.run(main())


@pytest.mark.parametrize("num_chunks", [None, 1, 3, 8])
@pytest.mark.parametrize("src_block_offset", [0, 5])
def test_client_receives_in_the_chunks_the_server_announces(num_chunks, src_block_offset):
    src = make_caches(num_blocks=32, seed=41, **CACHE)
    dst = make_caches(num_blocks=12, seed=42, **CACHE)
    before = [t.clone() for t in dst]
    dst_block_ids = [9, 2, 7, 0, 11, 4, 5, 6][src_block_offset:]
    n = len(dst_block_ids)

    nbytes, server, client, sizes = _pull(src, dst, dst_block_ids, src_block_offset, num_chunks)

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


def test_client_rejects_a_chunk_count_it_cannot_split_the_layers_into():
    dst = make_caches(num_blocks=12, seed=44, **CACHE)
    before = [t.clone() for t in dst]
    copier = BlockCopier(dst, KVLayout.from_caches(dst), PullPhases())

    async def main():
        client_end, server_end = _Pipe.pair()
        for num_chunks, error in [(9, "announced 9 chunks for 8 layers"),
                                  (0, "malformed KV wire header")]:
            pulling = asyncio.ensure_future(pull_on(
                client_end, copier, StagingPool(torch.device("cpu"), False, 1), "test server",
                "lease", list(range(8)), 0, deadline=time.perf_counter() + 10.0))
            request = await server_end.recv_header()
            nbytes = copier.nbytes(request.num_blocks)
            # Encoded by hand: PullReply itself refuses 0 chunks for a non-empty payload.
            await server_end.outbox.put(
                f'{{"type": "reply", "nbytes": {nbytes}, "num_chunks": {num_chunks}}}'.encode())
            with pytest.raises(KVTransferError, match=error):
                await pulling

    asyncio.run(main())
    for layer in range(8):
        assert torch.equal(dst[layer], before[layer])
