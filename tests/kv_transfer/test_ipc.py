"""The ipc backend's own cases (test_pull / test_cross_process / test_tp_pull run it beside the
others): a one-sided read of a server process's shared-memory cache, fp8 blocks with their
scales, the lease check after the copy (and when the lease's expiry makes it unneeded), a
server killed during it, and what refuses to map.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
import torch
from kv_cases import STALL_AFTER_COPY_LEASE, ServerProcess, make_caches, shareable

from pdserve.common.kv_transfer.base import KVLayout, KVTransferError, make_client, make_server

pytestmark = pytest.mark.timeout(60)

FP8 = dict(num_layers=3, block_size=4, num_kv_heads=2, head_dim=16, dtype=torch.float8_e4m3fn)
SERVER_FP8 = dict(FP8, num_blocks=30, seed=41)
LEASES = {"lease": [29, 3, 17, 4, 5, 11, 0]}


def test_fp8_blocks_and_scales_across_processes():
    src = make_caches(**SERVER_FP8)
    dst = make_caches(**FP8, num_blocks=20, seed=42, stacked=False)
    dst_before = [t.clone() for t in dst]
    dst_block_ids = [19, 2, 8, 7, 0, 13, 6]

    async def main(server: ServerProcess):
        client = make_client("ipc", dst)
        try:
            assert client.layout.kv_scales is not None  # the Hello compared them with the server's
            nbytes = await client.pull(server.address, "lease", dst_block_ids, deadline_s=20.0)
            assert nbytes == 7 * KVLayout.from_caches(dst).bytes_per_block
            await client.pull(server.address, "lease", [10, 11], deadline_s=5.0, src_block_offset=5)
            assert client.num_transfers == 2 and client.phases.payload_messages == 0
        finally:
            await client.close()

    with ServerProcess("ipc", SERVER_FP8, LEASES) as server:
        asyncio.run(main(server))
        server.close()
    for src_layer, dst_layer, before in zip(src, dst, dst_before):
        as_bytes = [t.view(torch.uint8) for t in (src_layer, dst_layer, before)]
        assert torch.equal(as_bytes[1][:, dst_block_ids], as_bytes[0][:, LEASES["lease"]])
        assert torch.equal(as_bytes[1][:, [10, 11]], as_bytes[0][:, [11, 0]])
        untouched = sorted(set(range(20)) - set(dst_block_ids) - {10, 11})
        assert torch.equal(as_bytes[1][:, untouched], as_bytes[2][:, untouched])


def test_other_fp8_scales_are_refused_at_hello():
    src = shareable(make_caches(**FP8, num_blocks=8, seed=43))
    dst = make_caches(**FP8, num_blocks=8, seed=44)
    dst[1].kv_scale = dst[1].kv_scale * 2

    async def main():
        server = make_server("ipc", src, LEASES.get)
        client = make_client("ipc", dst)
        try:
            address = await server.start()
            with pytest.raises(KVTransferError, match="fp8 KV scales differ"):
                await client.pull(address, "lease", [0], deadline_s=5.0)
        finally:
            await client.close()
            await server.close()
    asyncio.run(main())


def test_lease_released_during_the_copy_fails_the_pull_and_keeps_the_connection():
    src = shareable(make_caches(**FP8, num_blocks=8, seed=45))
    dst = make_caches(**FP8, num_blocks=8, seed=46)
    leases = {"short": [1, 2], "other": [3]}
    calls = []

    def resolve(lease_id: str):
        calls.append(lease_id)
        if lease_id == "short" and calls.count("short") > 1:
            return None  # released (or expired) after the first answer: the check must catch it
        return leases.get(lease_id)

    async def main():
        server = make_server("ipc", src, resolve)
        client = make_client("ipc", dst)
        try:
            address = await server.start()
            with pytest.raises(KVTransferError, match="released or expired while the client copied"):
                await client.pull(address, "short", [5, 6], deadline_s=5.0)
            await client.pull(address, "other", [7], deadline_s=5.0)  # the same connection, in step
            assert calls == ["short", "short", "other", "other"]
            assert client.num_failures == 1 and client.num_transfers == 1
            assert server.num_failures == 1 and server.num_transfers == 2  # both were answered
            assert len(client._peers) == 1
        finally:
            await client.close()
            await server.close()
    asyncio.run(main())
    assert torch.equal(dst[0][:, 7].view(torch.uint8), src[0][:, 3].view(torch.uint8))


@pytest.mark.parametrize("remaining_s, checked", [(30.0, False), (0.001, True), (None, True)])
def test_a_lease_known_to_outlive_the_copy_needs_no_check(remaining_s, checked):
    src = shareable(make_caches(**FP8, num_blocks=8, seed=51))
    dst = make_caches(**FP8, num_blocks=8, seed=52)
    resolved = []

    def resolve(lease_id: str):
        resolved.append(lease_id)
        return {"lease": [6, 7, 2, 5, 1, 3, 0]}.get(lease_id)

    async def main():
        # remaining_s: what the lease table says (30 s: the copy ends long before; 1 ms: within
        # the margin, so the client asks; None: unknown, so the client asks)
        server = make_server("ipc", src, resolve, lease_remaining=lambda lease_id: remaining_s)
        client = make_client("ipc", dst)
        try:
            address = await server.start()
            await client.pull(address, "lease", [1, 2], deadline_s=5.0, src_block_offset=5)
            await client.pull(address, "lease", [3, 4], deadline_s=5.0, src_block_offset=5)
            assert resolved == ["lease"] * (4 if checked else 2)
            assert (client.phases.wire_s > 0) == checked
            assert client.num_transfers == server.num_transfers == 2
        finally:
            await client.close()
            await server.close()
    asyncio.run(main())
    for layer in range(FP8["num_layers"]):
        assert torch.equal(dst[layer][:, [1, 2, 3, 4]].view(torch.uint8), src[layer][:, [3, 0, 3, 0]].view(torch.uint8))


def test_server_killed_while_the_client_copies_fails_at_once():
    dst = make_caches(**FP8, num_blocks=20, seed=47)

    async def main(server: ServerProcess):
        client = make_client("ipc", dst)
        try:
            # The source blocks arrive at once; the check after the copy stalls in the server.
            pending = asyncio.create_task(
                client.pull(server.address, STALL_AFTER_COPY_LEASE, list(range(7)), deadline_s=30.0))
            while client.phases.copy_s == 0:
                assert not pending.done(), pending
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            killed_at = time.perf_counter()
            server.kill()
            with pytest.raises(KVTransferError, match="failed during pull"):
                await pending
            assert time.perf_counter() - killed_at < 2.0
            assert client.num_failures == 1 and client.num_transfers == 0
        finally:
            await client.close()

    with ServerProcess("ipc", SERVER_FP8, LEASES) as server:
        asyncio.run(main(server))


def test_a_private_cpu_cache_cannot_be_served():
    with pytest.raises(ValueError, match="needs the CPU KV cache in shared memory"):
        make_server("ipc", make_caches(**FP8, num_blocks=4, seed=48), LEASES.get)


def test_a_server_on_another_host_is_refused_with_a_log_line(caplog):
    src = shareable(make_caches(**FP8, num_blocks=8, seed=49))
    dst = make_caches(**FP8, num_blocks=8, seed=50)

    async def main():
        server = make_server("ipc", src, LEASES.get)
        server._host_id = "boot-id-of-another-host"  # what a server elsewhere announces
        client = make_client("ipc", dst)
        try:
            address = await server.start()
            with pytest.raises(KVTransferError, match="runs on another host .* use tcp, ucx or nccl"):
                await client.pull(address, "lease", [0], deadline_s=5.0)
        finally:
            await client.close()
            await server.close()
    with caplog.at_level(logging.ERROR, logger="pdserve.common.kv_transfer.ipc"):
        asyncio.run(main())
    assert any("unusable" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="set TRITON_INTERPRET=1 "
                    "(with triton installed) to run ipc's direct copy_blocks path on CPU")
@pytest.mark.parametrize("src_stacked, dst_stacked", [(True, True), (False, True), (True, False)])
def test_direct_copy_kernel_path_reads_the_mapping(src_stacked, dst_stacked):
    """The GPU path (one copy_blocks launch with src and dst ids over the mapped cache, per layer
    when either side is not one tensor), run by Triton's interpreter over CPU memory."""
    pytest.importorskip("triton")
    cache = dict(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
    src = shareable(make_caches(**cache, num_blocks=12, seed=53, stacked=src_stacked))
    dst = make_caches(**cache, num_blocks=16, seed=54, stacked=dst_stacked)
    before = [t.clone() for t in dst]
    lease, dst_ids = [11, 0, 7, 3, 9], [15, 2, 8, 1, 6]

    async def main():
        server = make_server("ipc", src, {"lease": lease}.get)
        client = make_client("ipc", dst, kernel="triton")
        try:
            await client.pull(await server.start(), "lease", dst_ids, deadline_s=30.0)
            (peer,) = client._peers.values()
            assert peer.staging._device_buffer.numel() == 0  # no staging: the kernel read the mapping
        finally:
            await client.close()
            await server.close()
    asyncio.run(main())
    untouched = sorted(set(range(16)) - set(dst_ids))
    for layer in range(3):
        assert torch.equal(dst[layer][:, dst_ids], src[layer][:, lease])
        assert torch.equal(dst[layer][:, untouched], before[layer][:, untouched])


def test_a_freed_shared_pool_is_forgotten_and_its_memfd_closed():
    """A private tensor that later lands at a freed pool's address must not be exported as it."""
    import gc

    from pdserve.common.kv_transfer import host_shm
    pool = host_shm.shared_zeros((4, 1024), torch.float32)
    base, export = pool.untyped_storage().data_ptr(), host_shm.host_export(pool)
    del pool
    gc.collect()
    assert base not in host_shm._regions
    try:
        name = os.readlink(f"/proc/self/fd/{export['fd']}")
    except FileNotFoundError:
        name = ""
    assert export["token"] not in name  # the fd was closed (its number may have been reused since)
