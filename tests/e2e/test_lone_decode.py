"""A stack's only decode worker dies mid-stream and comes back under the same instance id (what
`pdserve up` does after a crash): the router resubmits its requests to the restarted worker once
it serves (services/router/instances.py, InstancePool.live with retry_failed), and the clients'
streams finish with the offline engine's text, instead of failing with "no decode instance"
because that id had failed them once. While no decode serves at all (the only one frozen), a
live prefill decodes the request instead of failing it. Real processes: redis, one prefill, one
decode, the router."""

from __future__ import annotations

import asyncio
import signal
import threading

import openai
import pytest
from stack import Stack, greedy_stream

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams

PROMPTS = ["The history of the city", "A list of fruits: apple,"]
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def stack(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[[]], decode=[[]])
    yield s
    s.close()


def test_requests_wait_for_their_lone_decode_to_come_back(stack, tiny_models):
    client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    before = stack.stats()["decode_resubmits"]

    async def go():
        progressed = asyncio.Event()

        tasks = [asyncio.ensure_future(greedy_stream(client, "tiny", p, MAX_TOKENS, progressed)) for p in PROMPTS]
        await asyncio.wait_for(progressed.wait(), 60)
        stack.kill("decode-0")
        restart = threading.Thread(target=stack.restart, args=("decode-0",))
        restart.start()
        try:
            return await asyncio.gather(*tasks)
        finally:
            await asyncio.to_thread(restart.join)

    texts = asyncio.run(go())
    offline = LLM(tiny_models["llama"], num_gpu_blocks_override=256, dtype="float32")
    for prompt, text in zip(PROMPTS, texts):
        ref = offline.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True),
                               use_tqdm=False)[0]
        assert text == ref.outputs[0].text
    assert stack.stats()["decode_resubmits"] > before  # the requests were on the killed worker


def test_a_prefill_decodes_while_no_decode_serves(stack, tiny_models):
    """The only decode frozen (SIGSTOP: its calls fail after the gRPC keepalive, it never answers):
    the request, its first token from the prefill, is decoded on that prefill (every worker carries
    both services) and streams the offline text, where it failed with "no decode instance" before."""
    client = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    before = stack.stats()["decodes_on_prefill"]
    stack.procs["decode-0"].send_signal(signal.SIGSTOP)
    try:
        text = asyncio.run(greedy_stream(client, "tiny", PROMPTS[0], 24, asyncio.Event()))
    finally:
        stack.procs["decode-0"].send_signal(signal.SIGCONT)
    offline = LLM(tiny_models["llama"], num_gpu_blocks_override=256, dtype="float32")
    ref = offline.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert text == ref.outputs[0].text
    assert stack.stats()["decodes_on_prefill"] == before + 1
