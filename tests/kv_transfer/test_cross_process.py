"""tcp, ucx, nccl (gloo on CPU) and ipc pulls from a KV server in another process: exact bytes,
deadlines, dead peers.

The server process builds its caches from a seed; the test rebuilds them to know what the
pulled blocks must hold.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from kv_backends import backends
from kv_cases import STALL_LEASE, ServerProcess, make_caches

from pdserve.common.kv_transfer.base import KVLayout, KVTransferError, make_client

pytestmark = pytest.mark.timeout(60)

BACKENDS = backends("tcp", "ucx", "nccl", "ipc")
# ipc has no payload to wait for: test_ipc.py kills its server during the client's copy instead
STREAMING_BACKENDS = backends("tcp", "ucx", "nccl")
CACHE = dict(num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
SERVER_CACHE = dict(CACHE, num_blocks=40, seed=21)
LEASES = {"lease": [3, 4, 5, 6, 30, 31, 1, 17]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_pull_across_processes_then_server_closes(backend):
    src = make_caches(**SERVER_CACHE)
    dst = make_caches(**CACHE, num_blocks=24, seed=22)
    dst_before = [t.clone() for t in dst]
    dst_block_ids = [23, 0, 7, 8, 9, 12, 2, 15]

    async def main(server: ServerProcess):
        client = make_client(backend, dst)
        try:
            nbytes = await client.pull(server.address, "lease", dst_block_ids, deadline_s=20.0)
            assert nbytes == 8 * KVLayout.from_caches(dst).bytes_per_block
            # A suffix pull reuses the pooled connection.
            await client.pull(server.address, "lease", [20, 21], deadline_s=5.0,
                              src_block_offset=6)
            server.close()  # the server closes cleanly and its process exits
            start = time.perf_counter()
            with pytest.raises(KVTransferError):
                await client.pull(server.address, "lease", dst_block_ids, deadline_s=10.0)
            assert time.perf_counter() - start < 2.0
            assert client.num_transfers == 2 and client.num_failures == 1
        finally:
            await client.close()

    with ServerProcess(backend, SERVER_CACHE, LEASES) as server:
        asyncio.run(main(server))

    for src_layer, dst_layer, before in zip(src, dst, dst_before):
        assert torch.equal(dst_layer[:, dst_block_ids], src_layer[:, LEASES["lease"]])
        assert torch.equal(dst_layer[:, [20, 21]], src_layer[:, [1, 17]])
        untouched = sorted(set(range(24)) - set(dst_block_ids) - {20, 21})
        assert torch.equal(dst_layer[:, untouched], before[:, untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hung_server_misses_deadline_and_killed_server_fails_pending_pull(backend):
    dst = make_caches(**CACHE, num_blocks=24, seed=23)

    async def main(server: ServerProcess):
        client = make_client(backend, dst)
        try:
            await client.pull(server.address, "lease", list(range(8)), deadline_s=20.0)
            # The stall lease blocks the server's event loop: only the deadline ends the pull.
            start = time.perf_counter()
            with pytest.raises(KVTransferError, match="missed its deadline of 0.500 s"):
                await client.pull(server.address, STALL_LEASE, [0], deadline_s=0.5)
            assert time.perf_counter() - start < 1.5
            # A pull waits on the still-hung server; killing the server must end it quickly.
            pending = asyncio.create_task(
                client.pull(server.address, "lease", list(range(8)), deadline_s=30.0))
            await asyncio.sleep(0.3)
            killed_at = time.perf_counter()
            server.kill()
            with pytest.raises(KVTransferError):
                await pending
            assert time.perf_counter() - killed_at < 2.0
            assert client.num_transfers == 1 and client.num_failures == 2
        finally:
            await client.close()

    with ServerProcess(backend, SERVER_CACHE, LEASES) as server:
        asyncio.run(main(server))


@pytest.mark.parametrize("backend", STREAMING_BACKENDS)
def test_server_killed_between_reply_and_payload_fails_the_pull_at_once(backend):
    dst = make_caches(**CACHE, num_blocks=24, seed=24)
    before = [t.clone() for t in dst]

    async def main(server: ServerProcess):
        client = make_client(backend, dst)
        try:
            pending = asyncio.create_task(
                client.pull(server.address, "lease", list(range(8)), deadline_s=30.0))
            # The reply arrives at once; the payload would follow the 3 s gather.
            while client.phases.request_s == 0:
                assert not pending.done(), pending
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            killed_at = time.perf_counter()
            server.kill()
            with pytest.raises(KVTransferError) as failure:
                await pending
            assert time.perf_counter() - killed_at < 2.0
            if backend == "nccl":  # gloo on CPU: the payload receive itself failed
                assert "gloo receive" in str(failure.value)
            assert client.num_failures == 1 and client.num_transfers == 0
        finally:
            await client.close()

    with ServerProcess(backend, SERVER_CACHE, LEASES, gather_delay_s=3.0) as server:
        asyncio.run(main(server))
    for layer, layer_before in zip(dst, before):  # no late write landed in the cache
        assert torch.equal(layer, layer_before)
