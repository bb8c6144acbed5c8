"""A request whose client goes away while the prefill's answer (the KV lease handed to decode) is
in transit, answered by the prefill but not yet pulled by a decode, releases the lease on the
prefill at once, not after its ttl: the prefill's pool is full again within seconds (the
router's `_Flight` in services/router/disagg_client.py; this held already). Real
processes (1P1D, router, redis-server); the decode is frozen (SIGSTOP) so that nothing pulls.
Also the instant itself: a router request cancelled as the Prefill answer arrives (a hook on the
call cancels it there) releases the lease; before, the answer was lost with the cancellation and
the lease waited for its ttl."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
from stack import Stack, router_client, wait_for

from pdserve.common.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def stack(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[["--lease-ttl", "60"]], decode=[[]])
    yield s
    s.close()


def test_client_gone_before_the_pull_releases_the_lease(stack):
    before = stack.metrics("prefill-0")
    granted = before["pdserve:kv_leases_granted_total"]
    released = before["pdserve:kv_leases_released_total"]

    def answered() -> bool:
        return stack.metrics("prefill-0")["pdserve:kv_leases_granted_total"] > granted

    async def request_and_leave():
        body = {"model": "tiny", "prompt": "A lease in transit. " * 4, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
            task = asyncio.ensure_future(client.post("/v1/completions", json=body))
            deadline = time.time() + 20
            while not await asyncio.to_thread(answered):
                assert time.time() < deadline and not task.done()
                await asyncio.sleep(0.1)
            assert stack.metrics("prefill-0")["pdserve:kv_leases_active"] == 1
            task.cancel()  # the client gives up: its connection closes
            with pytest.raises(asyncio.CancelledError):
                await task

    stack.procs["decode-0"].send_signal(signal.SIGSTOP)  # the handle reaches no one who pulls
    try:
        asyncio.run(request_and_leave())
        wait_for("the lease released (not left to its 60 s ttl)",
                 lambda: stack.metrics("prefill-0")["pdserve:kv_leases_active"] == 0, 5)
        after = stack.metrics("prefill-0")
        assert after["pdserve:kv_leases_released_total"] == released + 1
        assert after["pdserve:kv_leases_expired_total"] == before["pdserve:kv_leases_expired_total"]
        assert after["pdserve:kv_blocks_free"] == after["pdserve:kv_blocks_total"]
    finally:
        stack.procs["decode-0"].send_signal(signal.SIGCONT)
    wait_for("the decode's pool is full again", lambda: (lambda m: m["pdserve:kv_blocks_free"] ==
                                                         m["pdserve:kv_blocks_total"])(stack.metrics("decode-0")), 20)


class _AnsweredThenCancelled:
    """A Prefill call whose answer arrives as `task` (the router's request) is cancelled: the
    cancellation reaches the request before the answer does, as when the client goes away at that
    instant (its watcher cancels the handler while the answer is on its way to it)."""

    def __init__(self, call, task_of):
        self.call, self.task_of = call, task_of

    def cancel(self) -> bool:
        return self.call.cancel()

    def __await__(self):
        resp = yield from self.call.__await__()
        self.task_of().cancel()
        yield from asyncio.sleep(0).__await__()  # the request's cancellation lands here
        return resp


def test_cancelled_as_the_prefill_answers_releases_the_lease(stack, tiny_models):
    before = stack.metrics("prefill-0")

    async def body():
        pool, client = await router_client(stack, tiny_models["llama"])
        stub_of = pool.prefill_stub

        class Stub:
            def __init__(self, inst):
                self.stub = stub_of(inst)

            def Prefill(self, *args, **kwargs):
                return _AnsweredThenCancelled(self.stub.Prefill(*args, **kwargs), lambda: task)
        pool.prefill_stub = Stub
        ids = client.tokenizer.encode("A lease in transit, cancelled as it arrives. " * 3)

        async def request():
            async for _ in client.generate(ids, SamplingParams(max_tokens=8, ignore_eos=True), "cancelled-at-answer"):
                pass
        task = asyncio.ensure_future(request())
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.close()  # the release, if one was sent
        await pool.close()
    asyncio.run(body())
    after = stack.metrics("prefill-0")
    assert after["pdserve:kv_leases_granted_total"] == before["pdserve:kv_leases_granted_total"] + 1
    wait_for("the lease released (not left to its 60 s ttl)",
             lambda: stack.metrics("prefill-0")["pdserve:kv_leases_active"] == 0, 5)
    after = stack.metrics("prefill-0")
    assert after["pdserve:kv_leases_released_total"] == before["pdserve:kv_leases_released_total"] + 1
    assert after["pdserve:kv_blocks_free"] == after["pdserve:kv_blocks_total"]
