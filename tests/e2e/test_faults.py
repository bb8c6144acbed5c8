"""Fault matrix on a 2P2D stack (real processes, loopback): under load, kill -9 of a prefill or a
decode worker, a frozen one (SIGSTOP: alive, answering nothing), a Redis restart (empty), a graceful router restart, and clients that disconnect
mid-stream. Each run: 24 requests, 6 at a time, streamed and not; lost = 0 (every request
answered, with exactly the offline engine's tokens: nothing lost or duplicated), hung = 0
(each finishes within its timeout), and afterwards every live worker's KV pool is full again and
holds no lease. Lease expiry before the pull is in test_disagg.py (2P2D with an expiring prefill)."""

from __future__ import annotations

import asyncio
import signal
import time

import openai
import pytest
from stack import Stack

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams

NUM_REQUESTS, CONCURRENCY, MAX_TOKENS = 24, 6, 24
PROMPTS = [f"Request {i}: the story of the {w} began when" for i, w in
           enumerate(["river", "mill", "bridge", "market", "bell", "road"] * 4)]
WORKERS = ("prefill-0", "prefill-1", "decode-0", "decode-1")


@pytest.fixture(scope="module")
def reference(tiny_models):
    llm = LLM(tiny_models["llama"], num_gpu_blocks_override=256, dtype="float32")
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    return [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module")
def stack(tiny_models):
    # leases of 10 s: a frozen prefill's leases granted before its freeze go within the test (below)
    s = Stack(tiny_models["llama"], prefill=[["--lease-ttl", "10"]] * 2, decode=[[], []])
    yield s
    s.close()


async def load(base_url: str, fault=None, fault_after: int = 6, disconnect: set[int] = frozenset()):
    """Run the workload; `fault()` (blocking, in a thread) once `fault_after` requests finished.
    Returns {index: text or an exception}."""
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=4, timeout=90)
    sem = asyncio.Semaphore(CONCURRENCY)
    results: dict[int, object] = {}
    finished = asyncio.Event()

    async def one(i: int):
        async with sem:
            kw = dict(model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0,
                      extra_body={"ignore_eos": True})
            try:
                if i % 2:
                    results[i] = (await client.completions.create(**kw)).choices[0].text
                else:
                    text = ""
                    async for chunk in await client.completions.create(**kw, stream=True):
                        text += chunk.choices[0].text if chunk.choices else ""
                        if i in disconnect and len(text) > 3:
                            break  # the client goes away mid-stream
                    results[i] = text
            except Exception as e:  # noqa: BLE001 (counted as lost)
                results[i] = e
            if len(results) >= fault_after:
                finished.set()

    async def inject():
        await finished.wait()
        if fault is not None:
            await asyncio.to_thread(fault)
    await asyncio.wait_for(asyncio.gather(inject(), *(one(i) for i in range(NUM_REQUESTS))), timeout=240)
    return results


def check(results, reference, disconnected=()):
    lost = {i: r for i, r in results.items() if isinstance(r, Exception)}
    assert not lost, f"lost {len(lost)}: {list(lost.items())[:3]}"
    wrong = [i for i, r in results.items() if i not in disconnected and r != reference[i]]
    assert not wrong, f"wrong or duplicated text for {wrong[:5]}"
    assert len(results) == NUM_REQUESTS  # hung = 0: every one came back


def pools_full(stack: Stack, workers, timeout_s: float = 20) -> None:
    deadline = time.time() + timeout_s
    while True:
        views = {w: stack.metrics(w) for w in workers}
        bad = {w: (m["pdserve:kv_blocks_free"], m["pdserve:kv_blocks_total"], m["pdserve:kv_leases_active"],
                   m["vllm:num_requests_running"]) for w, m in views.items()
               if m["pdserve:kv_blocks_free"] != m["pdserve:kv_blocks_total"] or m["pdserve:kv_leases_active"]}
        if not bad:
            return
        assert time.time() < deadline, f"KV pools not back to full (free, total, leases, running): {bad}"
        time.sleep(0.5)


@pytest.mark.parametrize("victim", ["prefill-1", "decode-1"])
def test_kill_9_of_a_worker_loses_nothing(stack, reference, victim):
    results = asyncio.run(load(stack.base_url, fault=lambda: stack.kill(victim)))
    check(results, reference)
    survivors = [w for w in WORKERS if w != victim]
    pools_full(stack, survivors)
    stack.restart(victim)


@pytest.mark.parametrize("victim", ["prefill-1", "decode-1"])
def test_a_frozen_worker_loses_nothing(stack, reference, victim):
    # its calls fail once a keepalive ping goes unanswered (services/grpc_auth.py: ~10 s), not at
    # their deadlines (prefill 60 s, decode 600 s), and are retried / resubmitted elsewhere
    counter = "prefill_retries" if victim.startswith("prefill") else "decode_resubmits"
    before = stack.stats()[counter]
    started = time.monotonic()
    try:
        results = asyncio.run(load(stack.base_url, fault=lambda: stack.procs[victim].send_signal(signal.SIGSTOP)))
    finally:
        stack.procs[victim].send_signal(signal.SIGCONT)
    check(results, reference)
    assert stack.stats()[counter] > before, counter  # requests were caught on the frozen worker
    assert time.monotonic() - started < 55  # nothing waited for a deadline
    # the thawed worker too: the requests it held were cancelled there; a lease it granted before
    # the freeze, whose pull failed while it was frozen, is gone by its ttl (here 10 s; 30 by default)
    pools_full(stack, WORKERS)


def test_redis_restart_loses_nothing(stack, reference):
    def restart_redis():
        stack.redis.stop()
        time.sleep(0.5)
        stack.redis.start()  # empty: every registration and the prefix index are gone
    results = asyncio.run(load(stack.base_url, fault=restart_redis))
    check(results, reference)
    pools_full(stack, WORKERS)
    deadline = time.time() + 10  # the workers registered again
    while len(stack.stats()["instances"]) < 4:
        assert time.time() < deadline, stack.stats()["instances"]
        time.sleep(0.2)


def test_graceful_router_restart_loses_nothing(stack, reference):
    def restart_router():
        stack.stop("router")  # SIGTERM: open streams finish first
        stack.start_router()
    results = asyncio.run(load(stack.base_url, fault=restart_router))
    check(results, reference)
    pools_full(stack, WORKERS)


def test_clients_that_disconnect_free_everything(stack, reference):
    gone = {0, 4, 8, 12}
    results = asyncio.run(load(stack.base_url, disconnect=gone))
    check(results, reference, disconnected=gone)
    assert all(reference[i].startswith(results[i]) for i in gone)
    pools_full(stack, WORKERS)
