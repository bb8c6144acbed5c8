"""Speculative decoding in the decode service of a 1P1D stack (real processes): only decode has
`--speculative-config` (the prefill is unchanged); greedy completions equal the aggregated
engine's without speculation, seeded ones equal the aggregated engine's with the same
speculation, through prefill -> decode and straight to decode alike; the decode worker's
/metrics count the drafts, and its KV pool is whole again afterwards."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from stack import Stack

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams

PROMPT = [random.Random(5).randrange(3, 49152) for _ in range(70)]  # several KV blocks: prefilled remotely


@pytest.fixture(scope="module")
def spec(tiny_models):
    return {"model": tiny_models["llama"], "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def stack(tiny_models, spec):
    s = Stack(tiny_models["llama"], prefill=[[]], decode=[["--speculative-config", json.dumps(spec)]])
    yield s
    s.close()


def completions(stack: Stack, **kw) -> list[str]:
    c = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    out = c.completions.create(model="tiny", prompt=PROMPT, **kw)
    return [ch.text for ch in sorted(out.choices, key=lambda ch: ch.index)]


def aggregated(folder: str, params: SamplingParams, **options) -> list[str]:
    llm = LLM(folder, num_gpu_blocks_override=512, dtype="float32", **options)  # as the stack's workers
    return [c.text for c in llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs]


def scrape(stack: Stack, name: str) -> dict[str, float]:
    text = httpx.get(stack.ready_addresses(name)[2], timeout=5).text
    return {s.name + json.dumps(s.labels.get("position", "")): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_decode_speculates_and_equals_the_aggregated_engine(stack, spec, tiny_models):
    folder = tiny_models["llama"]
    greedy = completions(stack, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    assert stack.stats()["recent"][-1]["prefill"] == "prefill-0"  # prompt computed on prefill, KV pulled
    assert greedy == aggregated(folder, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))

    kw = dict(max_tokens=12, temperature=0.8, n=2, seed=7, extra_body={"ignore_eos": True})
    seeded = completions(stack, **kw)
    assert seeded == aggregated(folder, SamplingParams(temperature=0.8, n=2, seed=7, max_tokens=12, ignore_eos=True),
                                speculative_config=spec)
    stack.stop("router")
    stack.start_router(flags=("--disagg-min-prompt-tokens", "100000"))  # straight to decode
    try:
        assert completions(stack, **kw) == seeded
        assert stack.stats()["recent"][-1]["prefill"] is None
    finally:
        stack.stop("router")
        stack.start_router()

    m = scrape(stack, "decode-0")
    drafts, accepted = m['vllm:spec_decode_num_draft_tokens_total""'], m['vllm:spec_decode_num_accepted_tokens_total""']
    assert m['vllm:spec_decode_num_drafts_total""'] > 0 and drafts > 0
    assert accepted >= 0.95 * drafts  # the target is its own draft
    assert m['vllm:spec_decode_num_accepted_tokens_per_pos_total"0"'] > 0
    assert m['pdserve:spec_decode_acceptance_rate""'] == pytest.approx(accepted / drafts)
    assert m['pdserve:kv_blocks_free""'] == m['pdserve:kv_blocks_total""']
    assert 'vllm:spec_decode_num_drafts_total""' not in scrape(stack, "prefill-0")
