"""Pulls between CUDA caches: device staging, the pinned host mirror (tcp), cuda_ipc (ucx), and
ipc's one-sided read (one copy_blocks kernel through a CUDA IPC mapping of the server's cache).

Skipped without a GPU. The server runs in its own process on the same GPU.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from kv_cases import ServerProcess, make_caches

from pdserve.common.kv_transfer.base import make_client, make_server

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CACHE = dict(num_layers=8, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
SERVER_CACHE = dict(CACHE, num_blocks=96, seed=31, device="cuda")
# One lease of two runs (slice copies) and one of 40 scattered blocks (index_select /
# index_copy_); 40 blocks of 8 layers are 20 MiB: five layer chunks through tcp's pinned host
# staging, one message device to device over ucx.
LEASES = {"runs": [*range(10, 30), *range(60, 80)], "scattered": list(range(95, 15, -2))}
DST_BLOCK_IDS = {"runs": [*range(0, 20), *range(40, 60)], "scattered": list(range(99, 59, -1))}


def _check(dst, dst_before, leases: list[str]) -> None:
    src = make_caches(**SERVER_CACHE)
    written = sorted({b for lease in leases for b in DST_BLOCK_IDS[lease]})
    untouched = sorted(set(range(dst[0].shape[1])) - set(written))
    for layer in range(CACHE["num_layers"]):
        for lease in leases:
            assert torch.equal(dst[layer][:, DST_BLOCK_IDS[lease]], src[layer][:, LEASES[lease]])
        assert torch.equal(dst[layer][:, untouched], dst_before[layer][:, untouched])


@pytest.mark.parametrize("backend", ["tcp", "ucx", "ipc"])
def test_pull_between_gpu_processes(backend):
    dst = make_caches(**CACHE, num_blocks=100, seed=32, device="cuda")
    dst_before = [t.clone() for t in dst]

    async def main(server: ServerProcess):
        client = make_client(backend, dst)
        try:
            for lease in LEASES:
                await client.pull(server.address, lease, DST_BLOCK_IDS[lease], deadline_s=60.0)
            chunks_per_pull = {"tcp": 5, "ucx": 1, "ipc": 0}[backend]
            assert client.phases.payload_messages == len(LEASES) * chunks_per_pull
            assert 0 < client.phases.copy_gpu_s  # CUDA events timed the scatters
        finally:
            await client.close()

    with ServerProcess(backend, SERVER_CACHE, LEASES) as server:
        asyncio.run(main(server))
        server.close()
    _check(dst, dst_before, list(LEASES))


def test_local_pull_on_gpu():
    src = make_caches(**SERVER_CACHE)
    dst = make_caches(**CACHE, num_blocks=100, seed=33, device="cuda")
    dst_before = [t.clone() for t in dst]

    async def main():
        server = make_server("local", src, LEASES.get)
        client = make_client("local", dst)
        address = await server.start()
        for lease in LEASES:
            await client.pull(address, lease, DST_BLOCK_IDS[lease], deadline_s=60.0)
        assert server.phases.copy_gpu_s > 0 and client.phases.copy_gpu_s > 0
        await server.close()

    asyncio.run(main())
    _check(dst, dst_before, list(LEASES))
