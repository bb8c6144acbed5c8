"""Prefix-aware routing end to end on one 2 prefill + 2 decode stack of real processes: a
shared-prefix workload follows the instances that hold each prefix (hit counters), a cold prompt
goes to the least-loaded instance, a new router is warm at once (the index lives in Redis),
Redis going away loses no request and routing recovers when it returns, the operators' drain and
role switch, and conditional disaggregation.

The tests share the stack and run in file order; each leaves the fleet as it found it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import signal
import threading
import time
from collections import Counter

import httpx
import pytest

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from pdserve.services.cli import main as pdserve_main
from stack import Stack

PREFIX_TOKENS = 192  # 12 full blocks of 16: a "200-token system prompt"
NUM_PREFIXES = 4
_rng = random.Random(7)
PREFIXES = [[_rng.randrange(1000, 40000) for _ in range(PREFIX_TOKENS)] for _ in range(NUM_PREFIXES)]


def question(k: int, n: int) -> list[int]:
    """Prompt n of prefix k: the shared prefix, then 12 tokens of its own."""
    return PREFIXES[k] + [(k * 1000 + n * 37 + j) % 40000 + 100 for j in range(12)]


def cold(n: int) -> list[int]:
    return [(n * 7919 + j * 31) % 40000 + 100 for j in range(PREFIX_TOKENS + 12)]


@pytest.fixture(scope="module")
def stack(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[[], []], decode=[[], []])
    yield s
    s.close()


@pytest.fixture(scope="module")
def offline(tiny_models):
    return LLM(tiny_models["llama"], num_gpu_blocks_override=512, dtype="float32")


def complete(stack, prompt: list[int], max_tokens: int = 4, timeout: float = 60) -> dict:
    r = httpx.post(stack.base_url + "/v1/completions", timeout=timeout, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def complete_all(stack, prompts: list[list[int]], max_tokens: int = 4) -> list[dict]:
    async def go():
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=120) as client:
            replies = await asyncio.gather(*(client.post("/v1/completions", json={
                "model": "tiny", "prompt": p, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
                for p in prompts))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        return [r.json() for r in replies]
    return asyncio.run(go())


def decisions(stack) -> dict[str, dict]:
    return {d["request_id"]: d for d in stack.stats()["recent"]}


def admin(*args) -> str:
    """Run `pdserve admin ...` in this process; its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pdserve_main(["admin", *args]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def holders(stack) -> dict[int, str]:
    """Warm-up: one request per prefix, one after the other. Returns the prefill holding each."""
    ids = [complete(stack, question(k, 0))["id"] for k in range(NUM_PREFIXES)]
    seen = decisions(stack)
    assert all(seen[i]["cached_tokens"] == 0 for i in ids)  # cold
    return {k: seen[i]["computed_on"] for k, i in enumerate(ids)}


def test_shared_prefix_follows_its_holder(stack, holders):
    # cold prefixes on an idle fleet spread evenly (equal cost: the instance sent fewer requests wins)
    assert sorted(Counter(holders.values()).values()) == [2, 2]
    assert set(holders.values()) == {"prefill-0", "prefill-1"}
    before = stack.stats()
    for n in range(1, 4):  # rounds of one question per prefix, concurrently
        replies = complete_all(stack, [question(k, n) for k in range(NUM_PREFIXES)])
        seen = decisions(stack)
        for k, reply in enumerate(replies):
            d = seen[reply["id"]]
            assert d["prefill"] == holders[k] and d["hit_blocks"][holders[k]] == 12, d
            assert d["cached_tokens"] == PREFIX_TOKENS, d
    after = stack.stats()
    for iid in ("prefill-0", "prefill-1"):  # the instances' hit counters agree
        routed = after["requests_by_instance"][iid] - before["requests_by_instance"].get(iid, 0)
        hits = after["cached_tokens_by_instance"][iid] - before["cached_tokens_by_instance"].get(iid, 0)
        assert routed == 6 and hits == 6 * PREFIX_TOKENS


def test_cold_prompt_goes_to_the_least_loaded(stack, holders):
    # Freeze the holder of prefix 0 (SIGSTOP, a real process) while a request for prefix 0 is on it:
    # it stays in flight, so that instance is the loaded one when a cold prompt arrives.
    busy = holders[0]
    idle = ({"prefill-0", "prefill-1"} - {busy}).pop()
    stack.procs[busy].send_signal(signal.SIGSTOP)
    result = {}
    stuck = threading.Thread(target=lambda: result.update(complete(stack, question(0, 10))))
    try:
        stuck.start()
        deadline = time.time() + 10
        while not any(d["prefill"] == busy and d["cached_tokens"] is None for d in stack.stats()["recent"]):
            assert time.time() < deadline
            time.sleep(0.05)
        reply = complete(stack, cold(1))
        assert decisions(stack)[reply["id"]]["computed_on"] == idle
    finally:
        stack.procs[busy].send_signal(signal.SIGCONT)
        stuck.join(60)
    assert decisions(stack)[result["id"]]["cached_tokens"] == PREFIX_TOKENS  # it finished, on the holder

    # decode: a long stream keeps one decode busy; a cold prompt's decode goes to the other
    with httpx.stream("POST", stack.base_url + "/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": cold(2), "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}) as streaming:
        lines = streaming.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        long_decode = decisions(stack)[first["id"]]["decode"]
        reply = complete(stack, cold(3))
        assert decisions(stack)[reply["id"]]["decode"] != long_decode


def _wait_idle(stack, timeout_s: float = 30) -> None:
    """Until the router counts no request on any instance (its own in flight and what the workers'
    heartbeats report): a request the previous test left running would weigh against its holder."""
    deadline = time.time() + timeout_s
    while any(i["requests_estimate"] for i in httpx.get(stack.base_url + "/admin/instances", timeout=5).json()
              ["instances"]):
        assert time.time() < deadline, "the fleet never went idle"
        time.sleep(0.1)


def test_a_new_router_is_warm_at_once(stack, holders):
    _wait_idle(stack)
    stack.kill("router")
    stack.start_router()
    assert stack.stats()["requests_by_instance"] == {}  # a fresh process
    _wait_idle(stack)
    replies = complete_all(stack, [question(k, 20) for k in range(NUM_PREFIXES)])
    seen = decisions(stack)
    for k, reply in enumerate(replies):
        assert seen[reply["id"]]["prefill"] == holders[k] and seen[reply["id"]]["cached_tokens"] == PREFIX_TOKENS
    assert stack.stats()["cached_prompt_tokens"] == NUM_PREFIXES * PREFIX_TOKENS


def test_redis_outage_loses_nothing_and_routing_recovers(stack, holders, offline):
    prompts = [question(k, n) for n in range(30, 33) for k in range(NUM_PREFIXES)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                            use_tqdm=False)]
    result = {}
    running = threading.Thread(target=lambda: result.update(replies=complete_all(stack, prompts, max_tokens=24)))
    running.start()
    time.sleep(0.3)
    stack.redis.stop()  # mid-run
    running.join(120)
    assert [r["choices"][0]["text"] for r in result["replies"]] == expected

    replies = complete_all(stack, [question(k, 40) for k in range(NUM_PREFIXES)])  # while Redis is down
    stats = stack.stats()
    assert stats["redis_up"] == 0 and stats["redis_outages"] == 1
    metrics = httpx.get(stack.base_url + "/metrics", timeout=10).text
    assert [line.split()[-1] for line in metrics.splitlines() if line.startswith("pdserve:redis_up{")] == ["0.0"]
    exported = {line.split('reason="')[1].split('"')[0]: float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("pdserve:routing_decisions_total{")}
    assert exported == {reason: float(n) for reason, n in stats["routes"].items()} and exported
    assert all(set(stats_d["hit_blocks"].values()) <= {0} for stats_d in
               (decisions(stack)[r["id"]] for r in replies))  # load-only routing
    assert len(replies) == NUM_PREFIXES

    stack.redis.start()  # empty: workers re-register and resync their blocks
    deadline = time.time() + 20
    while True:
        listing = json.loads(admin("list", "--router", stack.base_url, "--json"))
        indexed = {i["instance_id"]: i["indexed_blocks"] for i in listing["instances"]}
        if listing["redis_up"] and len(indexed) == 4 and all(indexed[h] for h in holders.values()):
            break
        assert time.time() < deadline, listing
        time.sleep(0.2)
    replies = complete_all(stack, [question(k, 50) for k in range(NUM_PREFIXES)])
    seen = decisions(stack)
    for reply in replies:  # prefix-aware again (during the outage some prefixes got a second holder)
        d = seen[reply["id"]]
        assert d["hit_blocks"][d["prefill"]] == 12 and d["cached_tokens"] == PREFIX_TOKENS, d


def test_admin_list_drain_and_role_switch(stack, holders, capsys):
    listing = admin("list", "--router", stack.base_url)
    for iid in ("prefill-0", "prefill-1", "decode-0", "decode-1"):
        assert iid in listing
    assert "redis: up" in listing

    assert pdserve_main(["admin", "drain", "--router", stack.base_url, "nobody"]) == 2
    assert "router answered 404: no live instance 'nobody'" in capsys.readouterr().err

    drained = holders[0]
    admin("drain", "--router", stack.base_url, drained)
    time.sleep(1.0)  # the router's refresh
    reply = complete(stack, question(0, 60))
    assert decisions(stack)[reply["id"]]["prefill"] != drained  # its prefix goes elsewhere
    admin("resume", "--router", stack.base_url, drained)

    out = admin("set-role", "--router", stack.base_url, "decode-1", "prefill", "--timeout", "30")
    assert "role=prefill status=serving" in out and "worker reports prefill" in out
    listing = json.loads(admin("list", "--router", stack.base_url, "--json"))
    d1 = next(i for i in listing["instances"] if i["instance_id"] == "decode-1")
    assert (d1["role"], d1["reported_role"], d1["reported_status"]) == ("prefill", "prefill", "serving")
    time.sleep(1.0)
    ids = [r["id"] for r in complete_all(stack, [cold(n) for n in range(10, 16)])]
    seen = decisions(stack)
    assert {seen[i]["decode"] for i in ids} == {"decode-0"}  # the only decode left
    assert "decode-1" in {seen[i]["prefill"] for i in ids}  # now a prefill instance
    admin("set-role", "--router", stack.base_url, "decode-1", "decode", "--timeout", "30")


def test_conditional_disaggregation(stack, offline):
    stack.kill("router")
    stack.start_router(flags=())  # the default: --disagg-min-prompt-tokens 64
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    short = [5, 17, 300, 4000]
    reply = complete(stack, short, max_tokens=8)
    d = decisions(stack)[reply["id"]]
    assert (d["reason"], d["prefill"], d["computed_on"]) == ("short_prompt", None, d["decode"])
    ref = offline.generate([{"prompt_token_ids": short}], params, use_tqdm=False)[0].outputs[0].text
    assert reply["choices"][0]["text"] == ref
    # the decode instances hold the prefixes too (pulled blocks are cached): 12 of 13 blocks there
    prompt = question(1, 70)
    reply = complete(stack, prompt, max_tokens=8)
    d = decisions(stack)[reply["id"]]
    assert d["reason"] == "cached_on_decode" and d["computed_on"].startswith("decode"), d
    assert d["cached_tokens"] == PREFIX_TOKENS
    ref = offline.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].text
    assert reply["choices"][0]["text"] == ref
