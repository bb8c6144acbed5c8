"""DecodeStream: one stream per router connection carrying many requests (issue 11 run 3;
services/decode/mux.py, services/router/decode_mux.py). Real processes: redis, a prefill and two
decode workers, the router; gRPC on 127.0.0.1; the router's own DecodeMuxes against a live worker.

- requests on one stream each get exactly the offline engine's tokens; one request refused at
  admission, one cancelled mid-stream (aborted on decode: its blocks come back at once) and a
  stop of one of n sequences leave the others running;
- kill -9 of the decode worker mid-stream: every open request on the stream fails at once with a
  gRPC status (no hang), and a new stream to the restarted worker works;
- through the router: kill -9 of a decode worker while its requests stream, the client's streams
  finish with the offline tokens (resubmitted to the other decode, which recomputes)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import openai
import pytest
from stack import Stack, greedy_stream

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import PackedDelta, delta_from_proto, sampling_params_to_proto
from pdserve.services.router.decode_mux import DecodeMuxes, DecodeStreamError

PROMPTS = [[1, 17, 230, 31, 9, 402, 77, 5], [1, 88, 12, 901, 44], [1, 3000, 2, 71, 650, 19, 8], [1, 5, 5, 5, 5]]
GREEDY = dict(temperature=0, ignore_eos=True)
INTERVAL_MS = 1500


@pytest.fixture(scope="module")
def offline(tiny_models):
    return LLM(tiny_models["llama"], num_gpu_blocks_override=512, dtype="float32")


@pytest.fixture(scope="module")
def stack(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[[]], decode=[["--stream-interval-ms", "0"], ["--stream-interval-ms", "0"],
                                                         ["--stream-interval-ms", str(INTERVAL_MS)]])
    yield s
    s.close()


def expected(offline, prompt: list[int], max_tokens: int, n: int = 1, seed: int | None = None) -> list[list[int]]:
    sampling = dict(temperature=0) if seed is None else dict(temperature=1.0, seed=seed)
    out = offline.generate([prompt], SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True, **sampling),
                           use_tqdm=False)[0]
    return [list(o.token_ids) for o in out.outputs]


def request(rid: str, prompt: list[int], max_tokens: int, **kw) -> pb.DecodeRequest:
    params = SamplingParams(max_tokens=max_tokens, **{**GREEDY, **kw})
    return pb.DecodeRequest(request_id=rid, prompt_token_ids=prompt, params=sampling_params_to_proto(params))


def outputs(chunk) -> list:
    """A DecodeChunk's or a packed row's (PackedDelta's) deltas, as EngineOutputs."""
    if isinstance(chunk, PackedDelta):
        return [chunk.output("")]
    return [delta_from_proto(chunk.request_id, d) for d in chunk.sequences]


async def read_all(stream, packed: list | None = None) -> dict[int, list[int]]:
    """Every token of a MuxedDecode by sequence; `packed` gets a bool per item (a packed row?)."""
    tokens: dict[int, list[int]] = {}
    async for batch in stream:
        for chunk in batch:
            if packed is not None:
                packed.append(isinstance(chunk, PackedDelta))
            for d in outputs(chunk):
                tokens.setdefault(d.index, []).extend(d.new_token_ids)
    stream.close()
    return tokens


@contextlib.asynccontextmanager
async def decode_streams(address: str):
    """(open, muxes): open(DecodeRequest) -> MuxedDecode, over the router's own DecodeMuxes to the
    worker at `address`."""
    muxes = DecodeMuxes()
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.DecodeStub(ch)
        try:
            yield (lambda req: muxes.open(stub, address, req, 60)), muxes
        finally:
            muxes.close()


async def health(address: str) -> pb.HealthResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        return await pb_grpc.DecodeStub(ch).Health(pb.HealthRequest(), timeout=5)


def test_requests_share_one_stream_and_end_alone(stack, offline):
    address = stack.ready_addresses("decode-0")[0]

    async def go():
        async with decode_streams(address) as (open_, muxes):
            long = open_(request("long", PROMPTS[0], 900))
            bad = open_(request("bad", [1, 10**6], 8))
            pair = open_(request("pair", PROMPTS[1], 40, n=2, seed=7, temperature=1.0))
            plain = [open_(request(f"r{i}", PROMPTS[i], 32)) for i in (2, 3)]
            with pytest.raises(DecodeStreamError) as refused:
                await read_all(bad)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in refused.value.details()
            first = await long.__anext__()  # "long" runs; the client goes away
            assert sum(len(d.new_token_ids) for c in first for d in outputs(c)) >= 1
            long.close()
            # a stop string of sequence 1 of the pair: it ends, sequence 0 runs to max_tokens (decode
            # reports nothing more of a stopped sequence: the router ends the request, as here)
            got, stopped, ended = {}, False, False
            async for batch in pair:
                for chunk in batch:
                    assert not isinstance(chunk, PackedDelta)  # n = 2: always a DecodeChunk
                    for d in outputs(chunk):
                        got.setdefault(d.index, []).extend(d.new_token_ids)
                        ended |= d.index == 0 and d.finished
                if ended:
                    break
                if len(got.get(1, [])) >= 3 and not stopped:
                    stopped = True
                    await pair.abort([1])
            pair.close()
            packed = [[], []]
            rest = [await read_all(s, p) for s, p in zip(plain, packed)]
            assert len(muxes._muxes) == 1  # one stream carried them all
            # n = 1 without logprobs: after the first news (a DecodeChunk: the prompt's numbers)
            # every message is a packed row, the last one carrying the finish
            for p in packed:
                assert len(p) >= 2 and not p[0] and all(p[1:]), p
            return got, rest

    pair, rest = asyncio.run(go())
    for i, tokens in zip((2, 3), rest):
        assert tokens[0] == expected(offline, PROMPTS[i], 32)[0]
    both = expected(offline, PROMPTS[1], 40, n=2, seed=7)
    assert pair[0] == both[0]
    assert 3 <= len(pair[1]) < 40 and pair[1] == both[1][:len(pair[1])]
    # "long" was aborted on decode when it was cancelled: had it run on, it would hold blocks for
    # ~850 more steps after the others ended; everything gives its blocks back at once
    deadline = time.time() + 1.0
    while True:
        load = asyncio.run(health(address)).load
        if load.num_running == 0 and load.num_free_blocks == load.num_total_blocks or time.time() > deadline:
            break
        time.sleep(0.2)
    assert load.num_running == 0 and load.num_free_blocks == load.num_total_blocks


def test_interval_coalesces_but_first_tokens_go_at_once(stack, offline):
    """A stream interval gathers a request's steps into few messages; a request opened while the
    stream waits out its interval still gets its first tokens at once."""
    address = stack.ready_addresses("decode-2")[0]

    async def go():
        async with decode_streams(address) as (open_, _):
            a = open_(request("a", PROMPTS[0], 60))
            batches_a = [await a.__anext__()]
            b = open_(request("b", PROMPTS[1], 60))  # the stream now waits 1.5 s after a's first message
            start = time.monotonic()
            batches_b = [await b.__anext__()]
            first_b_s = time.monotonic() - start
            batches_a += [x async for x in a]
            batches_b += [x async for x in b]
            return batches_a, batches_b, first_b_s

    batches_a, batches_b, first_b_s = asyncio.run(go())
    assert first_b_s < INTERVAL_MS / 1000 / 2, first_b_s
    for rid, prompt, batches in (("a", PROMPTS[0], batches_a), ("b", PROMPTS[1], batches_b)):
        tokens = [t for batch in batches for c in batch for d in outputs(c) for t in d.new_token_ids]
        assert tokens == expected(offline, prompt, 60)[0], rid
        # 60 steps in a few messages (one a step without the interval): the first, those that the
        # other request's first tokens cut short, the rest after each 1.5 s wait
        assert len(batches) <= 8, (rid, [sum(len(d.new_token_ids) for c in x for d in outputs(c)) for x in batches])


def test_decode_death_fails_every_open_request_at_once(stack, offline):
    address = stack.ready_addresses("decode-1")[0]

    async def go():
        async with decode_streams(address) as (open_, _):
            streams = [open_(request(f"k{i}", PROMPTS[i], 900)) for i in range(3)]
            for s in streams:
                await s.__anext__()  # each is running
            await asyncio.to_thread(stack.kill, "decode-1")
            start = time.monotonic()
            codes = []
            for s in streams:
                with pytest.raises(DecodeStreamError) as e:
                    await asyncio.wait_for(read_all(s), timeout=30)
                codes.append(e.value.code())
            waited = time.monotonic() - start
        return codes, waited

    codes, waited = asyncio.run(go())
    assert all(c in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                     grpc.StatusCode.INTERNAL) for c in codes), codes
    assert waited < 15
    stack.restart("decode-1")
    address = stack.ready_addresses("decode-1")[0]

    async def after_restart():
        async with decode_streams(address) as (open_, _):
            return await read_all(open_(request("new", PROMPTS[2], 10)))
    assert asyncio.run(after_restart())[0] == expected(offline, PROMPTS[2], 10)[0]


def test_router_resubmits_when_decode_dies_mid_stream(stack, offline):
    texts_in = ["The history of the city", "A list of fruits: apple,", "In 1969 the first", "def add(a, b):"]
    c = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    max_tokens = 200

    async def go():
        progressed = asyncio.Event()
        model = (await c.models.list()).data[0].id

        tasks = [asyncio.ensure_future(greedy_stream(c, model, p, max_tokens, progressed)) for p in texts_in]
        await asyncio.wait_for(progressed.wait(), 60)
        stats = await asyncio.to_thread(stack.stats)
        placed = [d["decode"] for d in stats["recent"][-len(texts_in):]]
        victim = max(set(placed), key=placed.count)  # the decode holding most of them
        await asyncio.to_thread(stack.kill, victim)
        return await asyncio.gather(*tasks), stats["decode_resubmits"], victim

    texts, before, victim = asyncio.run(go())
    for prompt, text in zip(texts_in, texts):
        ref = offline.generate([prompt], SamplingParams(max_tokens=max_tokens, **GREEDY), use_tqdm=False)[0]
        assert text == ref.outputs[0].text
    assert stack.stats()["decode_resubmits"] > before
    stack.restart(victim)
