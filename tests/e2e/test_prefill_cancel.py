"""A Prefill call that goes away (the router's client disconnected, the router cancelled it)
leaves nothing behind on the prefill worker: cancelled while its prompt is computed (chunked over
several steps) its blocks are freed at once; cancelled during the step that finishes its prompt,
the lease that step makes (the answer it would have carried never leaves) is released at once,
not after the lease's ttl. The real Prefill servicer on a real engine behind a real gRPC server
on 127.0.0.1; the test's client cancels the call; each forward pass is slowed down (or held) so
that the cancel lands where the test wants it."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from pdserve.common.config import EngineConfig
from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.kv_transfer.connector import LeaseConnector
from pdserve.common.kv_transfer.tp_pull import KVShardAddress
from pdserve.common.sampling_params import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import sampling_params_to_proto
from pdserve.services.prefill.server import PrefillServicer
from pdserve.services.worker.state import WorkerState

BLOCK, NUM_BLOCKS = 16, 64


@pytest.fixture
def prefill(tiny_models):
    """(engine, lease connector): an engine with a 32-token step budget and 60 s leases."""
    lease = LeaseConnector(lease_ttl_s=60.0)
    engine = AsyncLLM(EngineConfig.from_options(model=tiny_models["llama"], dtype="float32", block_size=BLOCK,
                                                num_gpu_blocks_override=NUM_BLOCKS, max_num_batched_tokens=32),
                      connector=lease)
    yield engine, lease
    engine.shutdown()


async def serve(engine, lease) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    servicer = PrefillServicer(WorkerState(engine, "prefill-test", "prefill"), lease, "127.0.0.1:0",
                               [KVShardAddress("127.0.0.1:1", 0, engine.core.arch.num_kv_heads)], "tcp")
    pb_grpc.add_PrefillServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def request(rid: str, num_tokens: int) -> pb.PrefillRequest:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return pb.PrefillRequest(request_id=rid, prompt_token_ids=[(7 * j) % 500 + 3 for j in range(num_tokens)],
                             params=sampling_params_to_proto(params))


async def back_to_full(engine, lease, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        free, leases = engine.core.kv.num_free_blocks, lease.num_active
        if free == NUM_BLOCKS and leases == 0 and not engine.core.has_unfinished():
            return
        assert time.monotonic() < deadline, f"not back to full: {free} of {NUM_BLOCKS} blocks free, {leases} leases"
        await asyncio.sleep(0.05)


def before_each_launch(engine, hook) -> None:
    """hook() on the engine thread before each forward pass is launched (to slow or hold steps)."""
    launch = engine.core.runner.launch

    def hooked(sched, *args, **kwargs):
        hook()
        return launch(sched, *args, **kwargs)
    engine.core.runner.launch = hooked


def test_cancelled_mid_prefill_frees_its_blocks(prefill):
    engine, lease = prefill
    before_each_launch(engine, lambda: time.sleep(0.1))

    async def run():
        server, address = await serve(engine, lease)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                call = pb_grpc.PrefillStub(channel).Prefill(request("mid", 200))  # 7 steps of 32 tokens
                deadline = time.monotonic() + 10
                while engine.core.kv.num_free_blocks == NUM_BLOCKS:  # its first chunk is scheduled
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.15)
                assert not call.done()
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                await back_to_full(engine, lease)
                assert lease.num_leases == 0  # it never finished
        finally:
            await server.stop(grace=None)
    asyncio.run(run())


def test_cancelled_during_its_last_step_releases_the_lease_at_once(prefill):
    """The step that computes the prompt is under way when the call goes away: the request
    finishes in that step and leases its blocks, after the servicer looked for a lease."""
    engine, lease = prefill
    in_step, go_on = threading.Event(), threading.Event()

    def hold() -> None:
        in_step.set()
        go_on.wait(10)
    before_each_launch(engine, hold)

    async def run():
        server, address = await serve(engine, lease)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                call = pb_grpc.PrefillStub(channel).Prefill(request("last", 20))  # one step
                assert await asyncio.to_thread(in_step.wait, 10)
                call.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await call
                await asyncio.sleep(0.3)  # the server saw the cancel, its handler is gone
                go_on.set()
                await back_to_full(engine, lease)  # before: the lease held 2 blocks for 60 s
                assert lease.num_leases == 1 and lease.num_released == 1
        finally:
            go_on.set()
            await server.stop(grace=None)
    asyncio.run(run())
