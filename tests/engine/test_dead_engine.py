"""A dead engine answers at once: when the engine thread dies (here: the runner raises
EngineDeadError, as when a tensor-parallel rank's process died), an open stream fails with
EngineDeadError, so does a `call_in_engine` that was queued when it died (it used to wait forever
on a future nobody would resolve: a prefill worker's ReleaseLease hung on it), and every later
`attach` / `stream` / `call_in_engine` raises at once; the owner's `on_death` callback runs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pdserve.common.config import EngineConfig
from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine_client import EngineDeadError
from pdserve.common.sampling_params import SamplingParams


@pytest.fixture
def engine(tiny_models):
    engine = AsyncLLM(EngineConfig.from_options(model=tiny_models["llama"], dtype="float32",
                                                num_gpu_blocks_override=64))
    yield engine
    engine.shutdown()


def test_a_dead_engine_fails_everything_at_once(engine):
    in_step, release = threading.Event(), threading.Event()
    deaths: list[BaseException] = []
    engine.on_death(deaths.append)
    real_launch = engine.core.runner.launch

    def launch(sched, *args, **kwargs):
        if any(s.params.seed == 13 for s in sched.scheduled):
            in_step.set()
            release.wait(10)
            raise EngineDeadError("injected: the executor process died")
        return real_launch(sched, *args, **kwargs)
    engine.core.runner.launch = launch
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, seed=13)

    async def run():
        async def consume():
            async for _ in engine.stream("victim", [5, 6, 7, 8], params):
                pass
        victim = asyncio.ensure_future(consume())
        assert await asyncio.to_thread(in_step.wait, 10)
        queued = engine.call_in_engine(lambda core: "never ran")  # in the inbox while the engine dies
        release.set()
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(victim, 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(queued, 5)  # before: waited forever
        with pytest.raises(EngineDeadError):
            engine.call_in_engine(lambda core: None)  # raises at the call, queues nothing
        with pytest.raises(EngineDeadError):
            async for _ in engine.stream("late", [5, 6], SamplingParams(max_tokens=2)):
                pass
        assert not await engine.is_healthy()
    asyncio.run(run())
    assert len(deaths) == 1 and isinstance(deaths[0], EngineDeadError)
    assert isinstance(engine.dead, EngineDeadError)
    later: list[BaseException] = []
    engine.on_death(later.append)  # registered after the death: told at once
    assert later == deaths


def test_calls_after_shutdown_fail_instead_of_hanging(tiny_models):
    engine = AsyncLLM(EngineConfig.from_options(model=tiny_models["llama"], dtype="float32",
                                                num_gpu_blocks_override=64))
    deaths: list[BaseException] = []
    engine.on_death(deaths.append)
    engine.shutdown()

    async def run():
        with pytest.raises(EngineDeadError):
            engine.call_in_engine(lambda core: None)
    asyncio.run(run())
    assert deaths == []  # a shutdown is no death: the owner is not told
