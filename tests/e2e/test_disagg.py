"""Disaggregated serving end to end: router + prefill + decode as separate processes, a real
redis-server, gRPC, the KV over the TCP / UCX / NCCL (gloo on CPU) / IPC (shared memory on CPU)
transports, and the official OpenAI client."""

from __future__ import annotations

import asyncio
import socket

import openai
import pytest

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from kv_backends import backends
from stack import Stack

PROMPTS = ["The history of the city", "A list of fruits: apple,", "In 1969 the first", "def add(a, b):"]


@pytest.fixture(scope="module")
def offline(tiny_models):
    return LLM(tiny_models["llama"], num_gpu_blocks_override=512, dtype="float32")


@pytest.fixture(scope="module", params=backends("tcp", "ucx", "nccl", "ipc"))
def stack_1p1d(tiny_models, request):
    s = Stack(tiny_models["llama"], prefill=[[]], decode=[[]], kv_transport=request.param)
    yield s
    s.close()


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_1p1d_matches_offline_and_kv_crossed(stack_1p1d, offline):
    c = client(stack_1p1d)
    before = stack_1p1d.stats()
    ref = offline.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for prompt, r in zip(PROMPTS, ref):
        out = c.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                   extra_body={"ignore_eos": True})
        assert out.choices[0].text == r.outputs[0].text
        assert out.usage.completion_tokens == 16 and out.usage.prompt_tokens == len(r.prompt_token_ids)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True, extra_body={"ignore_eos": True})
            if ch.choices)
        assert streamed == r.outputs[0].text
    after = stack_1p1d.stats()
    # every request handed its prompt KV over; decode computed no prompt token itself
    assert after["handoffs"] - before["handoffs"] == 2 * len(PROMPTS)
    assert after["recomputed_prompt_tokens"] == before["recomputed_prompt_tokens"]
    layout_bytes = 2 * 2 * 16 * 2 * 16 * 4  # layers * (K,V) * block_size * kv_heads * head_dim * fp32
    first_round_blocks = sum(-(-len(r.prompt_token_ids) // 16) for r in ref)
    # the second (streamed) round finds the full prompt blocks in decode's own prefix cache
    second_round_blocks = sum(-(-len(r.prompt_token_ids) // 16) - len(r.prompt_token_ids) // 16 for r in ref)
    assert after["kv_bytes"] - before["kv_bytes"] == (first_round_blocks + second_round_blocks) * layout_bytes


def test_1p1d_chat_n_stop_logprobs(stack_1p1d, offline):
    c = client(stack_1p1d)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    chat = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    ref = offline.chat(msgs, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert chat.choices[0].message.content == ref.outputs[0].text
    # the Responses API through the router: the same prefill -> decode path, the same tokens
    resp = c.responses.create(model="tiny", instructions="Be brief.", input="Name a colour.", max_output_tokens=12,
                              temperature=0)
    assert resp.output_text == ref.outputs[0].text and resp.usage.output_tokens == len(ref.outputs[0].token_ids)
    many = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=8, n=3, temperature=1.0, seed=5)
    assert sorted(ch.index for ch in many.choices) == [0, 1, 2]
    base = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0).choices[0].text
    stop = base[6:9]
    cut = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[:base.index(stop)] and cut.choices[0].finish_reason == "stop"
    lp = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=5, temperature=0, logprobs=2)
    ref_lp = offline.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=5, logprobs=2), use_tqdm=False)
    ref_c = ref_lp[0].outputs[0]
    got = lp.choices[0].logprobs.token_logprobs
    assert got == pytest.approx([e[t].logprob for t, e in zip(ref_c.token_ids, ref_c.logprobs)], abs=1e-4)


def test_2p2d_spreads_and_recomputes_when_the_pull_fails(tiny_models, offline):
    # prefill-1's leases expire at once: decode's pull of its KV fails and decode recomputes.
    # Every worker overlaps its steps (the CUDA default) to cover leases and pulls under it on CPU.
    # prefill-0 binds to the wildcard address, as in a container: it must register an address
    # the router and the decode workers can dial (this machine's IP), not 0.0.0.0.
    overlap = "--async-scheduling"
    stack = Stack(tiny_models["llama"], prefill=[["--host", "0.0.0.0", overlap], ["--lease-ttl", "0.000001", overlap]],
                  decode=[[overlap], [overlap]])
    try:
        async def run_all():
            ac = openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
            prompts = [f"{p} number {i}" for i in range(4) for p in PROMPTS]
            outs = await asyncio.gather(*[ac.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                                                               extra_body={"ignore_eos": True}) for p in prompts])
            return prompts, [o.choices[0].text for o in outs]
        prompts, texts = asyncio.run(run_all())
        ref = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        assert texts == [r.outputs[0].text for r in ref]
        stats = stack.stats()
        # prefill-1's expired leases give no handle: those prompts were recomputed on decode
        assert stats["handoffs"] > 0 and stats["recomputed_prompt_tokens"] > 0
        assert all(stats["requests_by_instance"].get(n, 0) > 0 for n in ("prefill-0", "prefill-1", "decode-0", "decode-1"))
        grpc_address, kv_address, _ = stack.ready_addresses("prefill-0")
        assert not grpc_address.startswith("0.0.0.0:") and "://0.0.0.0:" not in kv_address
    finally:
        stack.close()


def test_dead_decode_mid_run_is_replaced(tiny_models, offline):
    stack = Stack(tiny_models["llama"], prefill=[[]], decode=[[], []])
    try:
        c = client(stack)
        stack.kill("decode-0")
        for prompt in PROMPTS:
            out = c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
            ref = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                                   use_tqdm=False)[0]
            assert out.choices[0].text == ref.outputs[0].text
    finally:
        stack.close()


def test_decode_recomputes_when_its_pull_fails(stack_1p1d, offline):
    """A handle whose lease is gone by the time decode pulls: decode recomputes, tokens are right."""
    import grpc

    from pdserve.proto import pdserve_pb2 as pb
    from pdserve.proto import pdserve_pb2_grpc as pb_grpc
    from pdserve.proto.convert import sampling_params_to_proto

    inst = {i["instance_id"]: i for i in stack_1p1d.stats()["instances"]}
    ids = offline.get_tokenizer().encode("A pull that fails still answers")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = offline.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0].token_ids

    async def go():
        async with grpc.aio.insecure_channel(inst["prefill-0"]["grpc_address"]) as pch, \
                grpc.aio.insecure_channel(inst["decode-0"]["grpc_address"]) as dch:
            resp = await pb_grpc.PrefillStub(pch).Prefill(pb.PrefillRequest(
                request_id="pull-fail", prompt_token_ids=ids, params=sampling_params_to_proto(params)))
            assert resp.HasField("handle")
            released = await pb_grpc.PrefillStub(pch).ReleaseLease(pb.ReleaseLeaseRequest(lease_id=resp.handle.lease_id))
            assert released.released
            req = pb.DecodeRequest(request_id="pull-fail", prompt_token_ids=ids, params=sampling_params_to_proto(params),
                                   handle=resp.handle, sequences=[pb.SequenceState(
                                       index=0, output_token_ids=list(resp.sequences[0].new_token_ids))])
            tokens, chunks = list(resp.sequences[0].new_token_ids), []
            async for chunk in pb_grpc.DecodeStub(dch).Decode(req):
                chunks.append(chunk)
                for d in chunk.sequences:
                    tokens += list(d.new_token_ids)
            return tokens, chunks
    tokens, chunks = asyncio.run(go())
    assert tokens == ref
    assert "expired or unknown" in chunks[0].kv_transfer_error
    assert chunks[0].num_prompt_tokens_computed == len(ids)


def test_advertised_host():
    from pdserve.services.worker.process import advertised_host
    assert advertised_host("0.0.0.0", "prefill-3.internal") == "prefill-3.internal"
    assert advertised_host("10.1.2.3", None) == "10.1.2.3"
    host = advertised_host("0.0.0.0", None)
    assert host not in ("0.0.0.0", "::", "") and socket.gethostbyname(host) == host

