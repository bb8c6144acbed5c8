"""A worker whose engine dies (faulty_worker.py: EngineDeadError at a step of a FATAL_SEED
request, as when a tensor-parallel rank's process died) does not stay behind as a zombie that is
registered and accepts requests it can only fail: the request in flight on it fails at once with
UNAVAILABLE "engine dead" (so the router retries it elsewhere), the worker leaves the registry
and its process exits with status 1. Real processes, real redis-server, loopback gRPC."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import grpc
import openai

from faulty_worker import FATAL_SEED
from stack import Stack

from pdserve.common.registry import Registry
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import sampling_params_to_proto
from pdserve.common.sampling_params import SamplingParams

FAULTY = [sys.executable, os.path.join(os.path.dirname(__file__), "faulty_worker.py")]


def registered(stack: Stack, instance_id: str) -> bool:
    async def get():
        registry = Registry(stack.redis.url)
        try:
            return await registry.get(instance_id) is not None
        finally:
            await registry.close()
    return asyncio.run(get())


def exits_and_leaves_the_registry(stack: Stack, name: str, timeout_s: float = 20) -> None:
    proc = stack.procs[name]
    try:
        code = proc.wait(timeout=timeout_s)
    except Exception:
        raise AssertionError(f"{name} still runs {timeout_s} s after its engine died:\n{stack.log(name)[-3000:]}")
    assert code == 1, (code, stack.log(name)[-3000:])
    assert "the engine died" in stack.log(name), stack.log(name)[-3000:]
    assert not registered(stack, name)  # deregistered, not left to its TTL


def test_a_prefill_whose_engine_died_exits_and_the_router_retries(tiny_models):
    stack = Stack(tiny_models["llama"], prefill=[[]], decode=[[]],
                  commands={"prefill-0": [*FAULTY, "prefill"]})
    try:
        assert registered(stack, "prefill-0")
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        t0 = time.monotonic()
        r = client.completions.create(model="tiny", prompt="The prefill of this one kills its engine",
                                      max_tokens=6, temperature=0, seed=FATAL_SEED, extra_body={"ignore_eos": True})
        # the prefill failed fast (UNAVAILABLE) and the router sent the prompt to decode instead
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
        assert time.monotonic() - t0 < 20
        assert stack.stats()["prefill_retries"] >= 1
        assert "engine dead" in stack.log("router")
        exits_and_leaves_the_registry(stack, "prefill-0")
        # the fleet goes on without it
        r = client.completions.create(model="tiny", prompt="And after it", max_tokens=3, temperature=0)
        assert r.usage.completion_tokens == 3
    finally:
        stack.close()


def test_a_decode_whose_engine_died_fails_its_stream_fast_and_exits(tiny_models):
    stack = Stack(tiny_models["llama"], prefill=[], decode=[[]], commands={"decode-0": [*FAULTY, "decode"]})
    try:
        grpc_address = stack.ready_addresses("decode-0")[0]
        params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, seed=FATAL_SEED)
        request = pb.DecodeRequest(request_id="fatal", prompt_token_ids=list(range(100, 140)),
                                   params=sampling_params_to_proto(params))

        async def open_one():
            async with grpc.aio.insecure_channel(grpc_address) as channel:
                call = pb_grpc.DecodeStub(channel).DecodeStream(
                    iter([pb.DecodeStreamRequest(open=request)]), timeout=30)
                async for message in call:
                    for chunk in message.chunks:
                        if chunk.request_id == "fatal" and chunk.finished:
                            return chunk
        t0 = time.monotonic()
        chunk = asyncio.run(open_one())
        assert time.monotonic() - t0 < 10
        assert chunk.status_code == grpc.StatusCode.UNAVAILABLE.value[0], chunk
        assert chunk.error.startswith("engine dead"), chunk.error
        exits_and_leaves_the_registry(stack, "decode-0")
    finally:
        stack.close()


def test_a_decode_whose_tensor_parallel_rank_died_exits_and_a_prefill_decodes(tiny_models):
    """A real rank death: decode-0 runs at --tensor-parallel-size 2 and its rank 1 process is
    killed. The worker notices it while idle, leaves the registry and exits 1; the next request
    is prefilled and, no decode serving any more, decoded on the prefill."""
    import signal

    import psutil
    stack = Stack(tiny_models["llama"], prefill=[[]], decode=[["--tensor-parallel-size", "2"]])
    try:
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        ask = dict(model="tiny", prompt="Tensor parallel ranks", max_tokens=6, temperature=0,
                   extra_body={"ignore_eos": True})
        want = client.completions.create(**ask).choices[0].text  # through decode-0 at TP=2
        ranks = psutil.Process(stack.procs["decode-0"].pid).children()
        assert len(ranks) == 1  # rank 1; rank 0 is the worker process itself
        os.kill(ranks[0].pid, signal.SIGKILL)
        exits_and_leaves_the_registry(stack, "decode-0")
        before = stack.stats()["decodes_on_prefill"]
        assert client.completions.create(**ask).choices[0].text == want
        assert stack.stats()["decodes_on_prefill"] == before + 1
    finally:
        stack.close()


def test_a_decode_whose_tensor_parallel_rank_froze_exits_and_its_stream_goes_on(tiny_models, monkeypatch):
    """A frozen rank (SIGSTOP: alive, computing nothing): rank 0 waits in the step's collective,
    its gRPC still answers (so keepalive pings see nothing wrong). The TP watchdog gives a step
    PDSERVE_TP_STEP_TIMEOUT_S (here 3 s), then kills the ranks: the worker exits 1 as for a dead
    rank and the open stream is resubmitted and finishes with the same text (before: it waited
    for the collective's 600 s timeout)."""
    import signal

    import psutil
    monkeypatch.setenv("PDSERVE_TP_STEP_TIMEOUT_S", "3")
    stack = Stack(tiny_models["llama"], prefill=[[]], decode=[["--tensor-parallel-size", "2", "--pull-deadline", "2"]])
    try:
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        ask = dict(model="tiny", prompt="A frozen rank", max_tokens=300, temperature=0,
                   extra_body={"ignore_eos": True})
        want = client.completions.create(**ask).choices[0].text
        rank = psutil.Process(stack.procs["decode-0"].pid).children()[0]
        text, t0 = "", time.monotonic()  # frozen at the first token: during the KV pull or a step
        for chunk in client.completions.create(**ask, stream=True):
            text += chunk.choices[0].text if chunk.choices else ""
            if text and rank.is_running() and rank.status() != psutil.STATUS_STOPPED:
                os.kill(rank.pid, signal.SIGSTOP)
        assert text == want
        assert time.monotonic() - t0 < 30
        exits_and_leaves_the_registry(stack, "decode-0")
        assert "did not finish within 3 s" in stack.log("decode-0")
        assert stack.stats()["decode_resubmits"] == 1
    finally:
        stack.close()
