"""Prefill and decode workers at different tensor-parallel sizes, as real processes (each TP=2 worker
is two: its rank 1 in a worker process with a KV agent thread), a real Redis, gRPC, the KV over
tcp (and, prefill TP=2 -> decode TP=2, nccl over gloo). One stack holds prefill TP=2 and TP=1 and decode TP=1 and TP=2, so
every pairing (2->1, 1->2, 2->2, 1->1) is driven directly over gRPC, Prefill then Decode with its
handle: the greedy tokens equal aggregated serving (an in-process LLM at TP=1), decode computed
no prompt token, and the bytes received show which shards moved. A pull that fails on one rank
(a dead shard address, a guessed lease) makes decode recompute, with the same tokens."""

from __future__ import annotations

import asyncio
import time

import grpc
import openai
import pytest

from pdserve.common.engine.llm import LLM
from pdserve.common.kv_transfer.tp_agent import SERVED_INTERVAL_S
from pdserve.common.sampling_params import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import sampling_params_to_proto
from kv_backends import HAVE_UCXX, UCX_MISSING
from redis_server import free_port
from stack import Stack

TP2 = ["--tensor-parallel-size", "2"]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
HEAD_BLOCK_BYTES = 2 * 2 * 16 * 16 * 4  # one KV head of one block: layers * (K, V) * block_size * head_dim * fp32


@pytest.fixture(scope="module")
def offline(tiny_models):
    return LLM(tiny_models["llama"], num_gpu_blocks_override=512, dtype="float32")  # as the stack's workers


@pytest.fixture(scope="module")
def tp_stack(tiny_models):
    """prefill-0 TP=2, prefill-1 TP=1, decode-0 TP=1, decode-1 TP=2 (4 heads / 2 KV heads: one per rank)."""
    s = Stack(tiny_models["llama"], prefill=[TP2, []], decode=[[], TP2])
    yield s
    s.close()


async def handoff(stack: Stack, prefill: str, decode: str, ids: list[int], rid: str, edit=None):
    """Prefill on one worker, Decode with its handle (changed by `edit`) on another: (tokens,
    the first DecodeChunk, the handle the prefill answered)."""
    params = sampling_params_to_proto(GREEDY)
    async with grpc.aio.insecure_channel(stack.ready_addresses(prefill)[0]) as pch, \
            grpc.aio.insecure_channel(stack.ready_addresses(decode)[0]) as dch:
        resp = await pb_grpc.PrefillStub(pch).Prefill(pb.PrefillRequest(request_id=rid, prompt_token_ids=ids,
                                                                         params=params))
        handle = pb.KVHandle()
        handle.CopyFrom(resp.handle)
        if edit is not None:
            edit(handle)
        first = list(resp.sequences[0].new_token_ids)
        req = pb.DecodeRequest(request_id=rid, prompt_token_ids=ids, params=params, handle=handle,
                               sequences=[pb.SequenceState(index=0, output_token_ids=first)])
        tokens, chunks = first, []
        async for chunk in pb_grpc.DecodeStub(dch).Decode(req):
            chunks.append(chunk)
            tokens += [t for d in chunk.sequences for t in d.new_token_ids]
    return tokens, chunks[0], resp.handle


def reference(offline: LLM, ids: list[int]) -> list[int]:
    return list(offline.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0].outputs[0].token_ids)


# (prefill, decode, KV heads moved per block: whole blocks of each shard a decode rank reads)
PAIRS = [("prefill-0", "decode-0", 2),  # TP=2 -> TP=1: rank 0 reads both shards
         ("prefill-1", "decode-1", 4),  # TP=1 -> TP=2: each rank reads the whole (2-head) shard
         ("prefill-0", "decode-1", 2),  # TP=2 -> TP=2: rank r <- rank r
         ("prefill-1", "decode-0", 2)]  # TP=1 -> TP=1


@pytest.mark.parametrize("prefill,decode,heads_moved", PAIRS)
def test_every_tp_pairing_hands_off_and_matches_aggregated(tp_stack, offline, prefill, decode, heads_moved):
    ids = offline.get_tokenizer().encode(f"Tensor parallel {prefill} hands its KV to {decode}, block by block")
    tokens, first, handle = asyncio.run(handoff(tp_stack, prefill, decode, ids, f"{prefill}-{decode}"))
    assert tokens == reference(offline, ids)
    assert first.kv_transfer_error == "" and first.num_prompt_tokens_computed == 0
    assert first.kv_bytes_received == -(-len(ids) // 16) * heads_moved * HEAD_BLOCK_BYTES
    tp = 2 if prefill == "prefill-0" else 1
    assert len(handle.shards) == tp and handle.num_kv_heads == 2
    assert [(s.first_kv_head, s.num_kv_heads) for s in handle.shards] == ([(0, 1), (1, 1)] if tp == 2 else [(0, 2)])
    assert len({s.transfer_address for s in handle.shards}) == tp and handle.transfer_address == handle.shards[0].transfer_address


def test_prefill_metrics_count_the_pulls_every_rank_served(tp_stack, offline):
    """Rank 1's KV server reports its counters to rank 0 (at most a second late): /metrics of the
    TP=2 prefill counts both shards' pulls and bytes."""
    sent, served = "pdserve:kv_transfer_sent_bytes_total", "pdserve:kv_pulls_served_total"
    before = tp_stack.metrics("prefill-0")
    while True:  # earlier tests' pulls: wait until rank 1's last report is in
        time.sleep(SERVED_INTERVAL_S + 0.2)
        now = tp_stack.metrics("prefill-0")
        if now[served] == before[served]:
            break
        before = now
    ids = offline.get_tokenizer().encode("Both ranks of the prefill serve a shard and both are counted")
    _, first, _ = asyncio.run(handoff(tp_stack, "prefill-0", "decode-0", ids, "metrics"))
    deadline = time.monotonic() + 10
    while True:
        after = tp_stack.metrics("prefill-0")
        if after[served] - before[served] == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after[served] - before[served] == 2  # one pull per shard (decode TP=1 reads both)
    assert after[sent] - before[sent] == first.kv_bytes_received > 0


def test_router_serves_through_tp_workers(tp_stack, offline):
    c = openai.OpenAI(base_url=tp_stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    before = tp_stack.stats()
    prompts = [f"Request {i} goes wherever the router sends it" for i in range(4)]
    ref = offline.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, r in zip(prompts, ref):
        out = c.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                   extra_body={"ignore_eos": True})
        assert out.choices[0].text == r.outputs[0].text
    after = tp_stack.stats()
    assert after["handoffs"] - before["handoffs"] == len(prompts)
    assert after["recomputed_prompt_tokens"] == before["recomputed_prompt_tokens"]


@pytest.mark.parametrize("fault", ["dead shard", "guessed lease"])
def test_a_pull_that_fails_on_one_rank_recomputes(tp_stack, offline, fault):
    """prefill TP=2 -> decode TP=2: decode rank 1 reads prefill rank 1's shard, which is at a dead
    address, or refuses a lease id nobody granted (rank 1 asks rank 0's lease table). Rank 0's
    pull succeeds; the load fails as a whole and decode computes the prompt itself."""
    dead = f"tcp://127.0.0.1:{free_port()}"

    def edit(handle: pb.KVHandle) -> None:
        if fault == "dead shard":
            handle.shards[1].transfer_address = dead
        else:
            handle.lease_id = handle.lease_id.split("@")[0] + "@" + "0" * 32

    ids = offline.get_tokenizer().encode(f"When one rank cannot pull ({fault}) the prompt is recomputed")
    tokens, first, _ = asyncio.run(handoff(tp_stack, "prefill-0", "decode-1", ids, f"fail-{fault}", edit))
    assert tokens == reference(offline, ids)
    assert first.num_prompt_tokens_computed == len(ids)
    assert (dead if fault == "dead shard" else "expired or unknown") in first.kv_transfer_error


def test_nccl_tp2_to_tp2_with_replicated_kv_heads(tiny_model_factory, tmp_path_factory):
    """nccl (gloo on CPU) from and to KV agents; 4 heads / 1 KV head, so at TP=2 each rank holds a
    replica of the one KV head (shards (0, 1) twice) and decode rank r reads prefill rank r's."""
    folder = tiny_model_factory(str(tmp_path_factory.mktemp("kv1") / "llama"), "llama", num_key_value_heads=1)
    offline = LLM(folder, num_gpu_blocks_override=512, dtype="float32")  # as the stack's workers
    stack = Stack(folder, prefill=[TP2], decode=[TP2], kv_transport="nccl")
    try:
        ids = offline.get_tokenizer().encode("One KV head, replicated on every rank, handed over by nccl")
        tokens, first, handle = asyncio.run(handoff(stack, "prefill-0", "decode-0", ids, "nccl"))
        assert tokens == reference(offline, ids)
        assert first.kv_transfer_error == "" and first.num_prompt_tokens_computed == 0
        assert [(s.first_kv_head, s.num_kv_heads) for s in handle.shards] == [(0, 1), (0, 1)]
        assert first.kv_bytes_received == -(-len(ids) // 16) * 2 * HEAD_BLOCK_BYTES  # one head, two ranks
    finally:
        stack.close()
        offline.shutdown()


@pytest.mark.skipif(not HAVE_UCXX, reason=UCX_MISSING)
def test_every_tp_pairing_over_ucx_as_on_shared_gpus(tiny_models, offline):
    """The transport of the GPU bench's shared layouts (decode's ranks beside prefill's: NCCL takes
    no two ranks of a pair on one GPU): ucx from and to the KV agents of ranks 1, every pairing,
    equal to aggregated serving with no prompt token recomputed."""
    stack = Stack(tiny_models["llama"], prefill=[TP2, []], decode=[[], TP2], kv_transport="ucx")  # as tp_stack
    try:
        for prefill, decode, heads_moved in PAIRS:
            ids = offline.get_tokenizer().encode(f"Over ucx {prefill} hands its KV to {decode}")
            tokens, first, handle = asyncio.run(handoff(stack, prefill, decode, ids, f"ucx-{prefill}-{decode}"))
            assert tokens == reference(offline, ids), (prefill, decode)
            assert first.kv_transfer_error == "" and first.num_prompt_tokens_computed == 0, (prefill, decode)
            assert first.kv_bytes_received == -(-len(ids) // 16) * heads_moved * HEAD_BLOCK_BYTES
            assert all(s.transfer_address.startswith("ucx://") for s in handle.shards)
    finally:
        stack.close()
