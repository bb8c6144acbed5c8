"""SIGTERM of the router with requests open that outlast its grace period (`--shutdown-grace 2`;
the decode runs one request at a time, so six long ones queue there): 1 s before uvicorn would
cancel their handlers the router aborts them (DisaggClient.abort_all), so each is answered:
finish_reason "abort" (or "length" for one that finished), a whole answer as a 200 with its
JSON, a stream with its finishing chunk and [DONE]; the router exits 0 without a traceback; the
decode frees their blocks and the prefill holds no lease; a new router serves the next request.
Before, uvicorn cancelled them at the deadline: plain-text 500s, streams cut without [DONE].
Real processes (1P1D, router, redis-server), raw HTTP to see exactly what reaches the client.
Also abort_all while a request waits on its Prefill call (an in-process DisaggClient over the
stack's Redis and workers): it ends at once with finish_reason "abort" and leaves no lease."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from stack import ROUTER_FLAGS, Stack, router_client, wait_for

from pdserve.common.sampling_params import SamplingParams

ROUTER = (*ROUTER_FLAGS, "--shutdown-grace", "2")


@pytest.fixture(scope="module")
def stack(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[[]], decode=[["--max-num-seqs", "1"]], router_flags=ROUTER)
    yield s
    s.close()


async def one(client: httpx.AsyncClient, i: int):
    """-> (HTTP status, finish reasons, whether a stream ended with [DONE])."""
    path, body = ("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Story {i}"}]}) if i % 3 == 0 \
        else ("/v1/completions", {"prompt": f"Request {i}: once upon a time"})
    body.update(model="tiny", max_tokens=900, temperature=0, ignore_eos=True, n=2 if i == 1 else 1)
    if i % 2:
        r = await client.post(path, json=body)
        return r.status_code, [c["finish_reason"] for c in r.json()["choices"]], None
    reasons, done = [], False
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                reasons += [c["finish_reason"] for c in json.loads(line[6:])["choices"] if c.get("finish_reason")]
        return r.status_code, reasons, done


def pool_full(stack, name: str) -> bool:
    m = stack.metrics(name)
    return m["pdserve:kv_blocks_free"] == m["pdserve:kv_blocks_total"] and m["pdserve:kv_leases_active"] == 0


def test_sigterm_answers_what_outlasts_the_grace_period(stack):
    async def run():
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as client:
            tasks = [asyncio.create_task(one(client, i)) for i in range(6)]
            await asyncio.sleep(0.5)
            stack.procs["router"].terminate()
            return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert stack.procs["router"].wait(timeout=10) == 0
    for i, (status, reasons, done) in enumerate(results):
        assert status == 200 and reasons and set(reasons) <= {"abort", "length"}, (i, status, reasons)
        assert done in (None, True), (i, "the stream was cut without [DONE]")
    assert "abort" in {r for _, reasons, _ in results for r in reasons}
    log = stack.log("router")
    assert "Traceback" not in log and "aborted the requests still open" in log, log[-3000:]

    wait_for("the decode's and the prefill's pools full again", lambda: pool_full(stack, "decode-0") and
             pool_full(stack, "prefill-0"), 10)

    stack.start_router(ROUTER)
    r = httpx.post(stack.base_url + "/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": "After the restart", "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_abort_all_during_the_prefill_call(stack, tiny_models):
    async def body():
        pool, client = await router_client(stack, tiny_models["llama"])
        stub_of = pool.prefill_stub
        aborted = []

        class AbortedOnItsWay:  # abort_all as the call is sent (before its answer can come)
            def __init__(self, call):
                self.call = call

            def cancel(self) -> bool:
                return self.call.cancel()

            def __await__(self):
                aborted.append(client.abort_all())
                return (yield from self.call.__await__())

        class Stub:
            def __init__(self, inst):
                self.stub = stub_of(inst)

            def Prefill(self, *args, **kwargs):
                return AbortedOnItsWay(self.stub.Prefill(*args, **kwargs))
        pool.prefill_stub = Stub
        ids = client.tokenizer.encode("Aborted while its prompt is computed. " * 4)
        outs = [out async for out in client.generate(ids, SamplingParams(max_tokens=8, n=2), "aborted-in-prefill")]
        await client.close()
        await pool.close()
        return aborted, outs
    aborted, outs = asyncio.run(body())
    assert aborted == [1] and len(outs) == 1 and outs[0].finished and outs[0].error is None
    assert [(c.finish_reason, c.token_ids) for c in outs[0].outputs] == [("abort", []), ("abort", [])]
    wait_for("the prefill's pool full, no lease", lambda: pool_full(stack, "prefill-0"), 5)
