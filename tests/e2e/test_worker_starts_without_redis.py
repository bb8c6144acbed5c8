"""A worker (re)started while Redis is down (its process died during a Redis outage, and
`pdserve up` or Kubernetes starts it again) starts and serves unregistered, then registers as
soon as Redis answers, instead of dying at its first registration (which only made its
supervisor restart it, later each time, while Redis stayed down). Real processes: redis-server,
a decode worker, the router; the official openai client."""

from __future__ import annotations

import time

import openai
from stack import Stack


def test_a_worker_restarted_while_redis_is_down_registers_when_it_is_back(tiny_models):
    stack = Stack(tiny_models["llama"], prefill=[], decode=[[]])
    try:
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        ask = dict(model="tiny", prompt="A worker without Redis", max_tokens=5, temperature=0,
                   extra_body={"ignore_eos": True})
        want = client.completions.create(**ask).choices[0].text
        stack.redis.stop()
        stack.kill("decode-0")
        stack.restart("decode-0")  # ready (gRPC, KV and metrics up) although Redis is down
        assert "Redis unreachable at start" in stack.log("decode-0")
        assert stack.procs["decode-0"].poll() is None
        stack.redis.start()  # empty: the worker registers at its next retry (0.2 s)
        deadline = time.time() + 10
        while [i["instance_id"] for i in stack.stats()["instances"]] != ["decode-0"] or \
                stack.stats()["instances"][0]["grpc_address"] != stack.ready_addresses("decode-0")[0]:
            assert time.time() < deadline, stack.stats()["instances"]
            time.sleep(0.2)
        assert client.completions.create(**ask).choices[0].text == want
    finally:
        stack.close()
