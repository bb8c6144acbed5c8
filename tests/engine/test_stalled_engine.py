"""A prefill engine whose every free block is held by leases that decode has not pulled yet
cannot schedule its waiting requests; its engine thread must then wait for an event that frees
blocks, not spin (issue 11: under sustained 1P1D load the prefill process climbed to every core
and stopped serving: the engine thread stepped an empty schedule in a loop, starving the event
loop that serves the very pulls and lease releases that would free the blocks)."""

from __future__ import annotations

import asyncio
import time

from pdserve.common.config import EngineConfig
from pdserve.common.engine.async_llm import STALL_WAIT_S, AsyncLLM
from pdserve.common.kv_transfer.connector import LEASE, LeaseConnector
from pdserve.common.sampling_params import SamplingParams

BLOCK = 16
NUM_BLOCKS = 8
WATCH_S = 1.0


def test_engine_waits_while_leases_hold_every_block(tiny_models):
    connector = LeaseConnector(lease_ttl_s=60.0)
    engine = AsyncLLM(EngineConfig.from_options(model=tiny_models["llama"], dtype="float32",
                                                block_size=BLOCK, num_gpu_blocks_override=NUM_BLOCKS,
                                                enable_prefix_caching=False, max_model_len=BLOCK * NUM_BLOCKS),
                      connector=connector)
    params = SamplingParams(temperature=0, max_tokens=1)
    calls = {"n": 0}
    schedule = engine.core.scheduler.schedule

    def counted():
        calls["n"] += 1
        return schedule()
    engine.core.scheduler.schedule = counted

    def prompt(i: int) -> list[int]:  # 3 blocks each: two fill the pool's 8 blocks but 2
        return [(7 * i + j) % 500 + 3 for j in range(3 * BLOCK - 1)]

    async def prefill(i: int) -> str:
        async for _ in engine.stream(f"r{i}", prompt(i), params, kv_transfer=LEASE):
            pass
        lease = connector.take_lease(f"r{i}")
        assert lease is not None
        return lease[0]

    async def run():
        leases = [await prefill(0), await prefill(1)]  # 6 of 8 blocks leased
        third = asyncio.ensure_future(prefill(2))  # needs 3: waits
        await asyncio.sleep(0.2)
        assert not third.done()
        before = calls["n"]
        await asyncio.sleep(WATCH_S)
        steps_while_stalled = calls["n"] - before
        assert not third.done()
        t0 = time.perf_counter()
        assert await engine.call_in_engine(lambda core: connector.release(leases[0]))
        leases[0] = await asyncio.wait_for(third, 10)
        unblocked_after = time.perf_counter() - t0
        for lease in leases:  # no block leaked by the wait
            assert await engine.call_in_engine(lambda core, lease=lease: connector.release(lease))
        return steps_while_stalled, unblocked_after

    try:
        steps_while_stalled, unblocked_after = asyncio.run(run())
    finally:
        engine.shutdown()
    # spinning schedules thousands of times a second; waiting, once per STALL_WAIT_S at most
    assert steps_while_stalled <= 2 * WATCH_S / STALL_WAIT_S, steps_while_stalled
    # the release woke the engine: the waiting request ran without sitting out a timer
    assert unblocked_after < 5.0
    assert engine.core.kv.num_free_blocks == NUM_BLOCKS
