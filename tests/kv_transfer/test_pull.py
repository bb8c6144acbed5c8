"""Pulls through real servers on 127.0.0.1 (tcp, ucx, nccl over gloo, ipc over shared memory) or the
in-process registry (local).

Each test runs its own event loop with asyncio.run and closes every server and client in a
finally block: the ucx backend resets ucxx when its last user closes, so the next test's loop
starts from a fresh UCX context.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest
import torch
from kv_backends import backends
from kv_cases import make_caches, shareable

from pdserve.common.kv_transfer.base import (KVLayout, KVTransferError, make_client,
                                             make_server)

pytestmark = pytest.mark.timeout(60)

BACKENDS = backends("tcp", "ucx", "nccl", "ipc", "local")
CACHE = dict(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8)


@contextlib.asynccontextmanager
async def serving(backend: str, src_caches, leases: dict[str, list[int]], dst_caches, resolve=None,
                  **client_options):
    """A started server over `leases` (or its own `resolve`) and a client; both closed after."""
    server = make_server(backend, shareable(src_caches) if backend == "ipc" else src_caches,
                         resolve or leases.get)
    client = make_client(backend, dst_caches, **client_options)
    try:
        address = await server.start()
        yield server, client, address
    finally:
        await client.close()
        await server.close()


async def counted_by(server, num_pulls: int, timeout_s: float = 2.0) -> None:
    """Waits (up to timeout_s) until the server has counted num_pulls answered pulls: it counts a
    pull once its send returned, which may be just after the client's receive completed (nccl
    sends from a thread; CI saw bytes_sent one pull short right after 24 pulls)."""
    deadline = time.monotonic() + timeout_s
    while server.num_transfers + server.num_failures < num_pulls and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def assert_pulled(src_caches, src_block_ids, dst_caches, dst_block_ids, dst_before):
    """Every pulled block equals its source exactly; every other block is unchanged."""
    untouched = sorted(set(range(dst_caches[0].shape[1])) - set(dst_block_ids))
    for layer, (src, dst, before) in enumerate(zip(src_caches, dst_caches, dst_before)):
        assert torch.equal(dst[:, dst_block_ids], src[:, src_block_ids]), f"layer {layer}"
        assert torch.equal(dst[:, untouched], before[:, untouched]), f"layer {layer}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pull_copies_exact_blocks_into_other_ids(backend, dtype):
    # A stacked cache (the engine's) on one end, separate per-layer tensors on the other.
    stacked = dtype == torch.float32
    src = make_caches(num_blocks=24, dtype=dtype, seed=1, stacked=stacked, **CACHE)
    dst = make_caches(num_blocks=32, dtype=dtype, seed=2, stacked=not stacked, **CACHE)
    dst_before = [t.clone() for t in dst]
    src_block_ids = [5, 6, 7, 2, 19, 0, 11]
    dst_block_ids = [30, 3, 17, 18, 1, 9, 25]

    async def main():
        async with serving(backend, src, {"lease-1": src_block_ids}, dst) as (server, client,
                                                                              address):
            nbytes = await client.pull(address, "lease-1", dst_block_ids, deadline_s=10.0)
            bytes_per_block = KVLayout.from_caches(src).bytes_per_block
            assert nbytes == len(src_block_ids) * bytes_per_block
            await counted_by(server, 1)
            assert client.bytes_received == nbytes and server.bytes_sent == nbytes
            assert client.num_transfers == 1 and server.num_transfers == 1
            assert client.num_failures == 0 and server.num_failures == 0
            assert client.seconds > 0
            assert (client.phases.request_s > 0) == (backend != "local")
            if backend == "ipc":  # one-sided: no payload message, the client copies, the server idles
                assert client.phases.payload_messages == server.phases.payload_messages == 0
                assert client.phases.copy_s > 0 and server.phases.copy_s == 0
                assert client.phases.wire_s > 0  # the PullDone round trip
                return
            # A small pull is one gather, one payload message (none in-process), one scatter.
            messages = 0 if backend == "local" else 1
            assert client.phases.payload_messages == server.phases.payload_messages == messages
            assert client.phases.copy_s > 0 and server.phases.copy_s > 0

    asyncio.run(main())
    assert_pulled(src, src_block_ids, dst, dst_block_ids, dst_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_suffix_pull_skips_blocks_the_decode_side_has(backend):
    src = make_caches(num_blocks=16, dtype=torch.float16, seed=3, **CACHE)
    dst = make_caches(num_blocks=16, dtype=torch.float16, seed=4, **CACHE)
    dst_before = [t.clone() for t in dst]
    src_block_ids = [8, 9, 10, 11, 3]

    async def main():
        async with serving(backend, src, {"lease": src_block_ids}, dst) as (_, client, address):
            nbytes = await client.pull(address, "lease", [14, 2], deadline_s=10.0,
                                       src_block_offset=3)
            assert nbytes == 2 * KVLayout.from_caches(src).bytes_per_block
            # The whole lease is an offset of 0; an offset equal to its length moves nothing.
            assert await client.pull(address, "lease", [], deadline_s=10.0,
                                     src_block_offset=5) == 0

    asyncio.run(main())
    assert_pulled(src, [11, 3], dst, [14, 2], dst_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_lease_and_length_mismatch_fail_then_connection_still_works(backend):
    src = make_caches(num_blocks=8, dtype=torch.float32, seed=5, **CACHE)
    dst = make_caches(num_blocks=8, dtype=torch.float32, seed=6, **CACHE)
    dst_before = [t.clone() for t in dst]

    async def main():
        async with serving(backend, src, {"lease": [1, 2, 3]}, dst) as (server, client,
                                                                        address):
            with pytest.raises(KVTransferError, match="lease 'gone' expired or unknown"):
                await client.pull(address, "gone", [0, 1, 2], deadline_s=5.0)
            with pytest.raises(KVTransferError, match="holds 3 blocks; src_block_offset=1 "
                                                      "leaves 2, but the client asked for 3"):
                await client.pull(address, "lease", [0, 1, 2], deadline_s=5.0,
                                  src_block_offset=1)
            with pytest.raises(KVTransferError, match="src_block_offset=4 leaves 0"):
                await client.pull(address, "lease", [0], deadline_s=5.0, src_block_offset=4)
            assert client.num_failures == 3 and server.num_failures == 3
            await client.pull(address, "lease", [5, 6, 7], deadline_s=5.0)
            assert client.num_transfers == 1

    asyncio.run(main())
    assert_pulled(src, [1, 2, 3], dst, [5, 6, 7], dst_before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("field, value", [("head_dim", 16), ("dtype", torch.bfloat16),
                                          ("num_layers", 2)])
def test_layout_mismatch_names_the_field(backend, field, value):
    src = make_caches(num_blocks=8, dtype=torch.float32, seed=7, **CACHE)
    dst_args = dict(CACHE, num_blocks=12, dtype=torch.float32, seed=8)
    dst_args[field] = value
    dst = make_caches(**dst_args)

    async def main():
        async with serving(backend, src, {"lease": [1, 2]}, dst) as (_, client, address):
            with pytest.raises(KVTransferError, match=f"KV layout mismatch .*{field} is"):
                await client.pull(address, "lease", [0, 1], deadline_s=5.0)
            assert client.num_failures == 1

    asyncio.run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_concurrent_pulls_to_one_server(backend):
    num_pulls, blocks_per_pull = 24, 3
    src = make_caches(num_blocks=num_pulls * blocks_per_pull, dtype=torch.bfloat16, seed=9,
                      **CACHE)
    dst = make_caches(num_blocks=num_pulls * blocks_per_pull + 5, dtype=torch.bfloat16,
                      seed=10, **CACHE)
    dst_before = [t.clone() for t in dst]
    generator = torch.Generator().manual_seed(0)
    src_order = torch.randperm(num_pulls * blocks_per_pull, generator=generator).tolist()
    dst_order = torch.randperm(num_pulls * blocks_per_pull + 5, generator=generator).tolist()
    leases = {f"lease-{i}": src_order[i * blocks_per_pull:(i + 1) * blocks_per_pull]
              for i in range(num_pulls)}
    dst_ids = {f"lease-{i}": dst_order[i * blocks_per_pull:(i + 1) * blocks_per_pull]
               for i in range(num_pulls)}

    async def main():
        async with serving(backend, src, leases, dst) as (server, client, address):
            results = await asyncio.gather(*(
                client.pull(address, lease_id, dst_ids[lease_id], deadline_s=20.0)
                for lease_id in leases))
            await counted_by(server, num_pulls)
            assert sum(results) == client.bytes_received == server.bytes_sent
            assert client.num_transfers == server.num_transfers == num_pulls

    asyncio.run(main())
    all_src = [b for lease_id in leases for b in leases[lease_id]]
    all_dst = [b for lease_id in leases for b in dst_ids[lease_id]]
    assert_pulled(src, all_src, dst, all_dst, dst_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pull_from_closed_server_fails_fast(backend):
    src = make_caches(num_blocks=8, dtype=torch.float32, seed=11, **CACHE)
    dst = make_caches(num_blocks=8, dtype=torch.float32, seed=12, **CACHE)

    async def main():
        server = make_server(backend, shareable(src) if backend == "ipc" else src, {"lease": [1, 2]}.get)
        client = make_client(backend, dst)
        try:
            address = await server.start()
            await client.pull(address, "lease", [3, 4], deadline_s=5.0)  # pools a connection
            await server.close()
            start = time.perf_counter()
            with pytest.raises(KVTransferError):
                await client.pull(address, "lease", [3, 4], deadline_s=10.0)
            assert time.perf_counter() - start < 2.0
            assert client.num_failures == 1
        finally:
            await client.close()
            await server.close()

    asyncio.run(main())


def test_bad_arguments_are_value_errors():
    caches = make_caches(num_blocks=8, dtype=torch.float32, seed=13, **CACHE)
    client = make_client("local", caches)
    cases = [
        (dict(dst_block_ids=[1, 1]), "duplicates"),
        (dict(dst_block_ids=[8]), r"not a block id in \[0, 8\)"),
        (dict(dst_block_ids=[-1]), r"not a block id in \[0, 8\)"),
        (dict(deadline_s=time.monotonic() + 1e4), "budget in seconds from now"),
        (dict(deadline_s=0), "budget in seconds from now"),
        (dict(src_block_offset=-1), "src_block_offset must be an int >= 0"),
    ]
    for overrides, message in cases:
        kwargs = dict(address="local://0", lease_id="x", dst_block_ids=[1], deadline_s=1.0)
        kwargs.update(overrides)
        with pytest.raises(ValueError, match=message):
            asyncio.run(client.pull(**kwargs))
    with pytest.raises(ValueError, match="unknown KV transfer backend 'mpi'"):
        make_client("mpi", caches)
    with pytest.raises(ValueError, match="is not a tcp KV address"):
        asyncio.run(make_client("tcp", caches).pull("ucx://1.2.3.4:5", "x", [1], 1.0))


def test_nccl_pull_late_for_its_turn_fails_alone_and_keeps_the_pair():
    """Pulls from one server take turns on its lanes (pairs): one whose deadline passes while every
    lane is busy fails by itself, and the pair (its NCCL communicator; gloo here) is kept, not
    rebuilt (a new communicator per late pull would churn them under load)."""
    src = make_caches(num_blocks=8, dtype=torch.float32, seed=7, **CACHE)
    dst = make_caches(num_blocks=8, dtype=torch.float32, seed=8, **CACHE)
    dst_before = [t.clone() for t in dst]

    async def main():
        async with serving("nccl", src, {"lease": [1, 2, 3]}, dst) as (server, client, address):
            await client.pull(address, "lease", [0, 1, 2], deadline_s=10.0)
            pair = next(iter(client._pairs.values()))
            busy = contextlib.AsyncExitStack()
            for _ in range(client.max_lanes):  # a pull in progress on every lane
                await busy.enter_async_context(client._lanes[address].lane())
            late = asyncio.ensure_future(client.pull(address, "lease", [3, 4, 5], deadline_s=0.2))
            await asyncio.sleep(0.4)
            await busy.aclose()
            with pytest.raises(KVTransferError, match="missed its deadline of 0.200 s"):
                await late
            assert list(client._pairs.values()) == [pair]  # the same pair, still connected
            await client.pull(address, "lease", [5, 6, 7], deadline_s=10.0)
            assert client._pairs and next(iter(client._pairs.values())) is pair

    asyncio.run(main())
    assert_pulled(src, [1, 2, 3, 1, 2, 3], dst, [0, 1, 2, 5, 6, 7], dst_before)  # blocks 3, 4 untouched


def test_nccl_pull_given_up_inside_the_exchange_keeps_the_pair():
    """A pull whose deadline passes (or whose load is cancelled) after its request reached the
    server fails at once and leaves its destination blocks untouched, while its exchange
    finishes in the background: the pair (its NCCL communicator; gloo here) stays in step and
    the next pull reuses it. Rebuilding one per such pull churned communicators under load
    until the prefill worker spun on every core (issue 11)."""
    src = make_caches(num_blocks=8, dtype=torch.float32, seed=7, **CACHE)
    dst = make_caches(num_blocks=10, dtype=torch.float32, seed=8, **CACHE)
    dst_before = [t.clone() for t in dst]
    leases = {"lease": [1, 2, 3], "slow": [4, 5, 6]}

    async def resolve(lease_id):
        if lease_id == "slow":
            await asyncio.sleep(0.4)  # the server answers after the client gave up
        return leases.get(lease_id)

    async def main():
        async with serving("nccl", src, leases, dst, resolve=resolve) as (server, client, address):
            await client.pull(address, "lease", [0, 1, 2], deadline_s=10.0)
            pair = next(iter(client._pairs.values()))
            start = time.perf_counter()
            with pytest.raises(KVTransferError, match="missed its deadline of 0.100 s"):
                await client.pull(address, "slow", [3, 4, 5], deadline_s=0.1)
            assert time.perf_counter() - start < 0.3  # not held until the server answers
            await asyncio.sleep(0.5)  # the exchange ends in the background
            assert list(client._pairs.values()) == [pair] and pair.control.is_alive()
            await client.pull(address, "lease", [7, 8, 9], deadline_s=10.0)
            assert list(client._pairs.values()) == [pair]
            cancelled = asyncio.ensure_future(client.pull(address, "slow", [3, 4, 5], deadline_s=10.0))
            await asyncio.sleep(0.1)
            cancelled.cancel()  # a decode request aborted while its KV loads
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            await asyncio.sleep(0.5)
            await client.pull(address, "lease", [7, 8, 9], deadline_s=10.0)
            assert list(client._pairs.values()) == [pair] and pair.control.is_alive()

    asyncio.run(main())
    # the given-up pulls wrote nothing into their blocks (3, 4, 5 keep their contents)
    assert_pulled(src, [1, 2, 3, 1, 2, 3], dst, [0, 1, 2, 7, 8, 9], dst_before)


def test_nccl_pulls_to_one_server_overlap_on_lanes():
    """Pulls that overlap take separate lanes (pairs) to the same server, up to the client's
    max_concurrent_transfers; sequential pulls keep reusing the first pair."""
    src = make_caches(num_blocks=16, dtype=torch.float32, seed=9, **CACHE)
    dst = make_caches(num_blocks=16, dtype=torch.float32, seed=10, **CACHE)
    dst_before = [t.clone() for t in dst]
    leases = {f"l{i}": [2 * i, 2 * i + 1] for i in range(6)}
    answered = {"now": 0, "most": 0}

    async def resolve(lease_id):
        answered["now"] += 1
        answered["most"] = max(answered["most"], answered["now"])
        await asyncio.sleep(0.2)  # long enough that the pulls overlap on the server
        answered["now"] -= 1
        return leases.get(lease_id)

    async def main():
        async with serving("nccl", src, leases, dst, resolve=resolve,
                           max_concurrent_transfers=3) as (server, client, address):
            for _ in range(2):
                await client.pull(address, "l0", [0, 1], deadline_s=10.0)
            assert len(client._pairs) == 1
            start = time.perf_counter()
            await asyncio.gather(*(client.pull(address, f"l{i}", [2 * i, 2 * i + 1], deadline_s=10.0)
                                   for i in range(1, 6)))
            elapsed = time.perf_counter() - start
            assert len(client._pairs) == 3 and answered["most"] == 3
            assert elapsed < 5 * 0.2  # two rounds of three lanes, not five pulls in a row

    asyncio.run(main())
    assert_pulled(src, list(range(12)), dst, list(range(12)), dst_before)


def test_nccl_pair_setup_failure_backs_off(monkeypatch):
    """After a pair's set-up to a server failed, pulls from it fail at once until a backoff
    passes (doubling per failure): each attempt would build an NCCL communicator, and one per
    pull exhausted a prefill GPU's memory under load (issue 11)."""
    from pdserve.common.kv_transfer import nccl
    from pdserve.services.local_stack import free_port

    monkeypatch.setattr(nccl, "SETUP_BACKOFF_S", 0.3)
    dst = make_caches(num_blocks=8, dtype=torch.float32, seed=11, **CACHE)
    address = f"nccl://127.0.0.1:{free_port()}"  # nothing listens there

    async def main():
        client = make_client("nccl", dst)
        try:
            with pytest.raises(KVTransferError, match="failed during pull"):
                await client.pull(address, "lease", [0], deadline_s=5.0)
            with pytest.raises(KVTransferError, match="the last pair set-up failed"):
                await client.pull(address, "lease", [0], deadline_s=5.0)
            await asyncio.sleep(0.35)  # the backoff passed: tried again (and refused again)
            with pytest.raises(KVTransferError, match="failed during pull"):
                await client.pull(address, "lease", [0], deadline_s=5.0)
            await asyncio.sleep(0.35)  # doubled to 0.6 s: still backing off
            with pytest.raises(KVTransferError, match="the last pair set-up failed"):
                await client.pull(address, "lease", [0], deadline_s=5.0)
        finally:
            await client.close()

    asyncio.run(main())


class _WorkDoneAt:
    """An operation handle (is_completed / wait, as torch.distributed's Work) that completes at a
    given time and counts how often it was asked."""

    def __init__(self, seconds: float):
        self.done_at = time.perf_counter() + seconds
        self.asks = 0

    def is_completed(self) -> bool:
        self.asks += 1
        return time.perf_counter() >= self.done_at

    def wait(self) -> None:
        pass


def test_nccl_wait_asks_less_often_the_longer_it_waits():
    """A waiting pull thread takes the GIL at every ask: a 50 ms operation must be asked a few
    dozen times (intervals doubling to 1 ms), not thousands (a fixed 20 us poll)."""
    import threading

    from pdserve.common.kv_transfer.nccl import _wait_work

    work = _WorkDoneAt(0.05)
    t0 = time.perf_counter()
    _wait_work(work, "nccl", time.perf_counter() + 5, threading.Event())
    waited = time.perf_counter() - t0
    assert 0.05 <= waited < 0.5
    assert work.asks <= 70, work.asks
    late = _WorkDoneAt(10)
    with pytest.raises(TimeoutError):
        _wait_work(late, "nccl", time.perf_counter() + 0.05, threading.Event())
