"""Decode's `--stream-interval-ms` and `--stream-messages-per-s` (issue 11,
docs/decisions/load-1p1d.md): a decode worker that waits between messages sends a request's steps
coalesced, fewer DecodeChunks than tokens, the same tokens; through the router the OpenAI client still gets every token. Real processes: redis,
prefill and decode workers, router, gRPC on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import grpc
import openai

from pdserve.common.sampling_params import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import sampling_params_to_proto
from stack import Stack

NUM_TOKENS = 24
INTERVAL_MS = 300


def _decode(address: str, ids: list[int]) -> list[pb.DecodeChunk]:
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)

    async def go():
        async with grpc.aio.insecure_channel(address) as ch:
            req = pb.DecodeRequest(request_id="interval", prompt_token_ids=ids, params=sampling_params_to_proto(params))
            return [c async for c in pb_grpc.DecodeStub(ch).Decode(req)]
    return asyncio.run(go())


def test_stream_interval_coalesces_decode_messages(tiny_models):
    stack = Stack(tiny_models["llama"], prefill=[[]],
                  decode=[["--stream-interval-ms", str(INTERVAL_MS)],
                          ["--stream-interval-ms", "0", "--stream-messages-per-s", "0"],
                          ["--stream-interval-ms", "0", "--stream-messages-per-s", str(1000 / INTERVAL_MS)]])
    try:
        inst = {i["instance_id"]: i for i in stack.stats()["instances"]}
        ids = [1, 17, 230, 31, 9, 402, 77, 5]
        start = time.monotonic()
        paced = _decode(inst["decode-0"]["grpc_address"], ids)
        paced_s = time.monotonic() - start
        plain = _decode(inst["decode-1"]["grpc_address"], ids)

        def tokens(chunks):
            return [t for c in chunks for d in c.sequences for t in d.new_token_ids]
        assert tokens(paced) == tokens(plain) and len(tokens(plain)) == NUM_TOKENS
        assert len(plain) > len(paced)  # one message per step (unless its event loop lagged)
        # at most one message per interval, whatever the machine's step time: the first token, then
        # one per elapsed interval, and the final one
        assert len(paced) <= paced_s * 1000 / INTERVAL_MS + 2, ([len(tokens([c])) for c in paced], paced_s)
        assert paced[-1].finished and not any(c.finished for c in paced[:-1])
        # a cap on messages a second over all open streams paces a lone stream the same way
        start = time.monotonic()
        capped = _decode(inst["decode-2"]["grpc_address"], ids)
        capped_s = time.monotonic() - start
        assert tokens(capped) == tokens(plain)
        assert len(capped) < len(plain) and len(capped) <= capped_s * 1000 / INTERVAL_MS + 2

        c = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        for _ in range(3):  # the router places them by load: every decode is used
            usage = None
            for chunk in c.completions.create(model=c.models.list().data[0].id, prompt=ids, max_tokens=NUM_TOKENS,
                                              temperature=0, stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}):
                usage = chunk.usage or usage
            assert usage.completion_tokens == NUM_TOKENS
    finally:
        stack.close()


def test_a_stop_string_inside_a_coalesced_message_ends_the_tokens_there(tiny_models):
    """A decode message carries several steps' tokens; when a stop string is completed by one of
    them, the tokens after it are not part of the answer: the completion's token count (usage)
    and its logprobs end at that token, as offline (they used to run on to the message's end)."""
    from pdserve.common.engine.llm import LLM
    prompts = ["The stop string of the river", "A second story about the mill"]
    llm = LLM(tiny_models["llama"], num_gpu_blocks_override=64, dtype="float32")
    full = [o.outputs[0].text for o in llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True), use_tqdm=False)]
    stops = [f[len(f) // 2:len(f) // 2 + 3] for f in full]
    want = [o.outputs[0] for o in llm.generate(prompts, [SamplingParams(
        temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, stop=[s], logprobs=1) for s in stops], use_tqdm=False)]
    del llm
    stack = Stack(tiny_models["llama"], prefill=[], decode=[["--stream-interval-ms", str(INTERVAL_MS)]])
    try:
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
        for prompt, stop, w in zip(prompts, stops, want):
            kw = dict(model="tiny", prompt=prompt, max_tokens=NUM_TOKENS, temperature=0, stop=[stop], logprobs=1,
                      extra_body={"ignore_eos": True})
            r = client.completions.create(**kw)
            c = r.choices[0]
            assert (c.text, c.finish_reason) == (w.text, "stop")
            assert r.usage.completion_tokens == len(w.token_ids) < NUM_TOKENS
            assert len(c.logprobs.tokens) == len(w.token_ids)
            tokens, text = [], ""
            for chunk in client.completions.create(**kw, stream=True):
                for c in chunk.choices:
                    text += c.text
                    tokens += c.logprobs.tokens if c.logprobs and c.logprobs.tokens else []
            assert text == w.text and len(tokens) == len(w.token_ids)
    finally:
        stack.close()
