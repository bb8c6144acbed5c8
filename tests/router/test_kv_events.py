"""KVEventPublisher (services/worker/events.py) with a real engine and a real redis-server: the index mirrors
the worker's prefix cache through stores and evictions, survives a Redis restart by resyncing, and
forgets the worker when it stops."""

import asyncio

from pdserve.common.block_hash import hash_blocks
from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.prefix_index import PrefixIndex
from pdserve.services.worker.events import KVEventPublisher

BS = 16


def test_index_mirrors_the_cache_through_evictions_and_a_redis_restart(redis_server, tiny_models):
    core = LLM(tiny_models["llama"], max_model_len=128, num_gpu_blocks_override=12).engine
    engine = AsyncLLM(core=core)
    registrations = [1]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def run(prompt: list[int]) -> None:
        async for _ in engine.generate(prompt, params, f"r{prompt[0]}"):
            pass
        await engine.call_in_engine(lambda core: None)  # a barrier: that request is off the engine

    async def held() -> set[bytes]:
        return set(await engine.call_in_engine(lambda core: list(core.kv.pool.cached)))

    async def body():
        index = PrefixIndex(redis_server.url)
        publisher = KVEventPublisher(engine, index, "w0", retry_s=0.0, registrations=lambda: registrations[0])
        a = list(range(1000, 1040))  # 2 full blocks
        await run(a)
        await publisher.flush()  # the first flush is a resync: replace with everything held
        assert publisher.num_resyncs == 1
        assert await index.longest_prefix(hash_blocks(a, BS), ["w0"]) == {"w0": 2}
        assert await index.num_blocks("w0") == len(await held())

        for start in range(2000, 2400, 100):  # 4 more prompts of 5 blocks: the pool (12) evicts a's blocks
            await run(list(range(start, start + 80)))
            await publisher.flush()  # incremental: stored and removed
        assert publisher.num_resyncs == 1 and publisher.num_publishes >= 5
        assert await index.longest_prefix(hash_blocks(a, BS), ["w0"]) == {"w0": 0}
        assert await index.num_blocks("w0") == len(await held())

        redis_server.stop()
        b = list(range(5000, 5064))
        await run(b)
        await publisher.flush()  # fails: remembered, no exception
        assert not publisher.redis_ok
        redis_server.start()  # empty, as after a crash
        await publisher.flush()  # resync: everything held, b included
        assert publisher.redis_ok and publisher.num_resyncs == 2
        assert await index.longest_prefix(hash_blocks(b, BS), ["w0"]) == {"w0": 4}
        assert await index.num_blocks("w0") == len(await held())

        await index.clear_instance("w0")  # Redis restarted between two publications, unnoticed ...
        registrations[0] += 1  # ... but the Heartbeater had to register again
        await publisher.flush()
        assert publisher.num_resyncs == 3 and await index.num_blocks("w0") == len(await held())

        async with PrefixIndex(redis_server.url) as router_view:
            await publisher.stop()  # clean shutdown: the router forgets this worker at once
            assert await router_view.num_blocks("w0") == 0
    try:
        asyncio.run(body())
    finally:
        engine.shutdown()
