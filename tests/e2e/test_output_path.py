"""One output path through every deployment: `pdserve serve` and a 1P1D stack (real processes)
give the same echo + prompt logprobs and the same seeded samples whatever the route; an engine
failure inside decode reaches the client as an OpenAI error without a resubmission; the router
process imports no torch; the workers' /metrics count the KV bytes they moved."""

from __future__ import annotations

import os
import sys

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import ServeProcess
from stack import Stack

from faulty_worker import FAULT_SEED

HERE = os.path.dirname(__file__)
# Long enough to span several KV blocks, so the prompt is computed on the prefill and handed over.
PROMPT = ("The river runs past the old mill, under three stone bridges and through the market square "
          "where traders sell apples, bread and cloth every morning before the bells ring noon.")


@pytest.fixture(scope="module")
def serve(tiny_models):
    proc = ServeProcess("--model", tiny_models["llama"], "--served-model-name", "tiny",
                        "--num-gpu-blocks-override", "512").start()
    proc.wait_ready()
    yield openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0, timeout=60)
    proc.close()


@pytest.fixture(scope="module")
def stack(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[[]], decode=[[]])
    yield s
    s.close()


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_echo_with_logprobs_equal_between_serve_and_the_stack(serve, stack):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2)
    want = serve.completions.create(**kw).choices[0]
    got = client(stack).completions.create(**kw).choices[0]
    assert stack.stats()["recent"][-1]["prefill"] == "prefill-0"  # the prompt was prefilled remotely
    assert got.text == want.text and got.text.startswith(PROMPT)
    assert got.logprobs.tokens == want.logprobs.tokens
    assert got.logprobs.token_logprobs[0] is None and want.logprobs.token_logprobs[0] is None
    assert got.logprobs.token_logprobs[1:] == pytest.approx(want.logprobs.token_logprobs[1:], abs=1e-4)
    assert len(got.logprobs.tokens) > 20  # the prompt's tokens lead the choice
    for g, w in zip(got.logprobs.top_logprobs[1:], want.logprobs.top_logprobs[1:]):
        assert g.keys() == w.keys()


def test_seeded_sampling_does_not_depend_on_the_route(serve, stack):
    """One rule (a generator draw per output position, seeded by seed and position) makes the
    samples equal on serve, through prefill -> decode, and straight on decode."""
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0.8, n=2, seed=7,
              extra_body={"ignore_eos": True})

    def texts(c):
        return [ch.text for ch in sorted(c.completions.create(**kw).choices, key=lambda ch: ch.index)]
    on_serve = texts(serve)
    assert on_serve[0] != on_serve[1]  # n=2 sequences differ (seed + index)
    disaggregated = texts(client(stack))
    assert stack.stats()["recent"][-1]["reason"] == "disagg"
    stack.stop("router")
    stack.start_router(flags=("--disagg-min-prompt-tokens", "100000"))
    try:
        decode_only = texts(client(stack))
        assert stack.stats()["recent"][-1]["prefill"] is None
    finally:
        stack.stop("router")
        stack.start_router()
    assert disaggregated == on_serve
    assert decode_only == on_serve


def test_router_process_imports_no_torch(stack):
    stack.stop("router")
    stack.start_router(command=(sys.executable, os.path.join(HERE, "import_probe.py"), "pdserve.services.router"))
    out = client(stack).chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                max_tokens=3, temperature=0)
    assert out.choices[0].message.content is not None
    stack.stop("router")
    assert "IMPORTED: []" in stack.log("router")
    stack.start_router()


def test_worker_metrics_count_the_kv_bytes_moved(stack):
    def scrape(name: str) -> dict[str, float]:
        text = httpx.get(stack.ready_addresses(name)[2], timeout=5).text
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    before = {n: scrape(n) for n in ("prefill-0", "decode-0")}
    routed = stack.stats()["kv_bytes"]
    for i in range(3):
        client(stack).completions.create(model="tiny", prompt=f"{i} {PROMPT}", max_tokens=2, temperature=0)
    after = {n: scrape(n) for n in ("prefill-0", "decode-0")}
    moved = stack.stats()["kv_bytes"] - routed
    assert moved > 0
    sent = after["prefill-0"]["pdserve:kv_transfer_sent_bytes_total"] - before["prefill-0"]["pdserve:kv_transfer_sent_bytes_total"]
    got = after["decode-0"]["pdserve:kv_transfer_received_bytes_total"] - before["decode-0"]["pdserve:kv_transfer_received_bytes_total"]
    assert sent == got == moved
    assert after["prefill-0"]["pdserve:kv_leases_granted_total"] - before["prefill-0"]["pdserve:kv_leases_granted_total"] == 3
    assert after["decode-0"]["pdserve:kv_pulls_total"] - before["decode-0"]["pdserve:kv_pulls_total"] == 3
    assert after["decode-0"]["pdserve:kv_pull_seconds_count"] - before["decode-0"]["pdserve:kv_pull_seconds_count"] == 3
    assert after["decode-0"]["vllm:num_requests_running"] == 0 and "vllm:kv_cache_usage_perc" in after["decode-0"]


def test_an_engine_error_in_decode_reaches_the_client_once(tiny_models):
    """FINISH_REASON_ERROR crosses the proto; the router reports it (500) and does not resubmit;
    the other requests are untouched."""
    faulty = Stack(tiny_models["llama"], prefill=[[]], decode=[[]],
                   commands={"decode-0": [sys.executable, os.path.join(HERE, "faulty_worker.py"), "decode"]})
    try:
        c = client(faulty)
        with pytest.raises(openai.InternalServerError, match="injected fault"):
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.5, seed=FAULT_SEED)
        with pytest.raises(openai.APIError, match="injected fault"):
            for _ in c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.5,
                                          seed=FAULT_SEED, stream=True):
                pass
        ok = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.5, seed=1)
        assert ok.choices[0].finish_reason == "length"
        stats = faulty.stats()
        assert stats["decode_resubmits"] == 0 and stats["prefill_retries"] == 0
    finally:
        faulty.close()
