"""The OpenAI front end end to end: a real uvicorn server over the real engine, the official
`openai` client (and httpx for raw checks). The tiny random Llama, served from a thread of this
process, answers most tests; `pdserve serve` runs as a subprocess twice: on the tiny model (with an
API key), and with no model (the packaged SmolLM2, which answers one chat question). Both start
with the module so that their start-up overlaps the other tests."""

from __future__ import annotations

import asyncio
import http.client as http_client
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import ServeProcess, ThreadedServer

from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine.llm import LLM
from pdserve.common.engine_client import EngineDeadError
from pdserve.common.outputs import CompletionOutput, RequestOutput
from pdserve.common.sampling_params import SamplingParams
from pdserve.common.tokenizer import Tokenizer
from pdserve.services.router import openai_schema as oa
from pdserve.common.metrics import StatsCollector
from pdserve.services.router.app import build_app
from pdserve.services.router.limits import Limits

NAME = "tiny"
MAX_LEN = 1024
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module", autouse=True)
def commands(tiny_models):
    procs = {"tiny": ServeProcess("--model", tiny_models["llama"], "--api-key", "sekret",
                                  "--num-gpu-blocks-override", "128", "--log-stats-interval", "0.3",
                                  "--enable-log-requests", "--max-log-len", "4", "--max-logprobs", "30"),
             "default": ServeProcess("--max-model-len", "512", "--num-gpu-blocks-override", "64")}
    for proc in procs.values():
        proc.start()
    yield procs
    for proc in procs.values():
        proc.close()


@pytest.fixture(scope="module")
def engine(tiny_models):
    eng = AsyncLLM(core=LLM(tiny_models["llama"], max_model_len=MAX_LEN, num_gpu_blocks_override=512,
                            dtype="float32").engine)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ThreadedServer(build_app(engine, NAME, collector=StatsCollector(NAME, engine=engine.core.stats))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


def metrics(url: str) -> dict[tuple, float]:
    """{(sample name, sorted label items without model_name): value} from /metrics."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def stream_completion(client, **kw) -> tuple[dict[int, str], list]:
    texts, chunks = {}, []
    for chunk in client.completions.create(model=NAME, stream=True, **kw):
        chunks.append(chunk)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    return texts, chunks


# ---- completions ------------------------------------------------------------------------------
def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [NAME] and models[0].max_model_len == MAX_LEN
    assert client.models.retrieve(NAME).id == NAME
    assert httpx.get(server.url + "/health").status_code == 200


def test_stream_equals_non_stream_and_offline(client, tiny_models, tok):
    prompts = ["Hello world", "The quick brown fox", "Once upon a time"]
    full = client.completions.create(model=NAME, prompt=prompts, **GREEDY)
    assert [c.index for c in full.choices] == [0, 1, 2]
    texts, chunks = stream_completion(client, prompt=prompts, **GREEDY)
    assert texts == {c.index: c.text for c in full.choices}
    assert {c.index: c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason} == \
        {0: "length", 1: "length", 2: "length"}
    # greedy outputs and token counts are the offline engine's
    offline = LLM(tiny_models["llama"], max_model_len=MAX_LEN, num_gpu_blocks_override=128, dtype="float32").generate(
        prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].text for o in offline] == [c.text for c in full.choices]
    assert full.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in offline)
    assert full.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in offline) == 36
    assert full.usage.total_tokens == full.usage.prompt_tokens + 36
    assert full.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)


def test_prompt_list_with_n(client):
    kw = dict(prompt=["Hello world", "Good morning"], n=2, **GREEDY)
    full = client.completions.create(model=NAME, **kw)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in full.choices}
    assert by_index[0] == by_index[1] != by_index[2] == by_index[3]  # greedy: both choices of a prompt agree
    assert by_index[2] == client.completions.create(model=NAME, prompt="Good morning", **GREEDY).choices[0].text
    assert full.usage.completion_tokens == 4 * 12
    texts, _ = stream_completion(client, **kw)
    assert texts == by_index


def test_token_id_prompts(client, tok):
    ids = tok.encode("Hello world")
    by_text = client.completions.create(model=NAME, prompt="Hello world", **GREEDY).choices[0].text
    assert client.completions.create(model=NAME, prompt=ids, **GREEDY).choices[0].text == by_text
    both = client.completions.create(model=NAME, prompt=[ids, tok.encode("Good morning")], **GREEDY)
    assert [c.index for c in both.choices] == [0, 1] and both.choices[0].text == by_text
    assert both.usage.prompt_tokens == len(ids) + len(tok.encode("Good morning"))


def test_echo_and_logprobs(client, tok):
    plain = client.completions.create(model=NAME, prompt="Hello world", logprobs=3, **GREEDY).choices[0]
    lp = plain.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    for token, logprob, top, offset, nxt in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset,
                                                lp.text_offset[1:] + [None]):
        assert logprob <= 0 and token in top and len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the most likely
        assert nxt is None or nxt == offset + len(token)
    echo = client.completions.create(model=NAME, prompt="Hello world", echo=True, logprobs=1, **GREEDY).choices[0]
    n_prompt = len(tok.encode("Hello world"))
    assert echo.text == "Hello world" + plain.text
    assert len(echo.logprobs.tokens) == n_prompt + 12
    assert echo.logprobs.token_logprobs[0] is None and echo.logprobs.top_logprobs[0] is None
    assert all(x <= 0 for x in echo.logprobs.token_logprobs[1:])
    assert echo.logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs)
    # echo with max_tokens 0 scores the prompt without generating (lm-eval's loglikelihood)
    score = client.completions.create(model=NAME, prompt="Hello world", echo=True, logprobs=0, max_tokens=0)
    assert score.choices[0].text == "Hello world" and score.usage.completion_tokens == 0
    scored = score.choices[0].logprobs.token_logprobs
    assert scored[0] is None and scored[1:] == pytest.approx(echo.logprobs.token_logprobs[1:n_prompt])
    texts, chunks = stream_completion(client, prompt="Hello world", echo=True, **GREEDY)
    assert texts[0] == echo.text and chunks[0].choices[0].text.startswith("Hello world")


def test_vllm_prompt_extras(client, tok, server):
    """vLLM's prompt_logprobs (per choice / per chat response), truncate_prompt_tokens,
    return_tokens_as_token_ids and continue_final_message."""
    ids = tok.encode("Hello world, how are you", add_special_tokens=False)
    echo = client.completions.create(model=NAME, prompt=ids, echo=True, logprobs=2, max_tokens=0).choices[0]
    got = client.completions.create(model=NAME, prompt=ids, max_tokens=1, extra_body={"prompt_logprobs": 2}).choices[0]
    plps = got.model_extra["prompt_logprobs"]
    assert len(plps) == len(ids) and plps[0] is None
    for token, entry, logprob, top in zip(ids[1:], plps[1:], echo.logprobs.token_logprobs[1:],
                                          echo.logprobs.top_logprobs[1:]):
        assert entry[str(token)]["logprob"] == pytest.approx(logprob)  # the same numbers as echo's
        ranked = sorted((e for e in entry.values() if e["rank"] <= 2), key=lambda e: e["rank"])
        assert [e["logprob"] for e in ranked] == pytest.approx(sorted(top.values(), reverse=True)[:2])
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                          extra_body={"prompt_logprobs": 0})
    assert len(chat.model_extra["prompt_logprobs"]) == chat.usage.prompt_tokens
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "x", "stream": True,
                                                          "prompt_logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"

    # truncate_prompt_tokens keeps the prompt's last k tokens: the same answer as sending them
    cut = client.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=12,
                                    extra_body={"truncate_prompt_tokens": 3, "ignore_eos": True})
    assert cut.usage.prompt_tokens == 3
    assert cut.choices[0].text == client.completions.create(model=NAME, prompt=ids[-3:], **GREEDY).choices[0].text
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "x", "truncate_prompt_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate_prompt_tokens"

    as_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=3, logprobs=1, temperature=0,
                                       extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    plain = client.completions.create(model=NAME, prompt=ids, max_tokens=3, logprobs=1, temperature=0).choices[0]
    assert all(t.startswith("token_id:") for t in as_ids.tokens)
    assert tok.decode([int(t.split(":")[1]) for t in as_ids.tokens]) == plain.text

    # continue_final_message: the answer continues the given assistant text, end-of-turn cut
    start = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Well, I think"}]
    cont = client.chat.completions.create(model=NAME, messages=start, temperature=0, max_tokens=12,
                                          extra_body={"continue_final_message": True, "add_generation_prompt": False,
                                                      "ignore_eos": True})
    rendered = tok.apply_chat_template(start, add_generation_prompt=False)
    prefix = rendered[:rendered.rindex("Well, I think") + len("Well, I think")]
    same = client.completions.create(model=NAME, prompt=tok.encode(prefix, add_special_tokens=False), **GREEDY)
    assert cont.choices[0].message.content == same.choices[0].text
    assert cont.usage.prompt_tokens == same.usage.prompt_tokens
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": start,
                                                               "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_stop_and_length(client):
    base = client.completions.create(model=NAME, prompt="Hello world", temperature=0, max_tokens=20,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert base.finish_reason == "length"
    stop = base.text[6:9]
    cut = client.completions.create(model=NAME, prompt="Hello world", temperature=0, max_tokens=20, stop=[stop])
    assert cut.choices[0].text == base.text[:base.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].stop_reason == stop
    texts, _ = stream_completion(client, prompt="Hello world", temperature=0, max_tokens=20, stop=stop)
    assert texts[0] == cut.choices[0].text
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_concurrent_streams(server, client):
    prompts = [f"Story number {i}:" for i in range(8)]
    expected = [client.completions.create(model=NAME, prompt=p, **GREEDY).choices[0].text for p in prompts]

    async def stream(http: httpx.AsyncClient, prompt: str) -> str:
        body = {"model": NAME, "prompt": prompt, "stream": True, "temperature": 0, "max_tokens": 12,
                "ignore_eos": True}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            events = [json.loads(line[6:]) async for line in r.aiter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        return "".join(e["choices"][0]["text"] for e in events)

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            return await asyncio.gather(*(stream(http, p) for p in prompts))
    assert asyncio.run(main()) == expected  # batched together, each stream gets its own text


def test_seed_reproducible(client):
    kw = dict(model=NAME, prompt="Hello", max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, n=2, **kw)
    b = client.completions.create(seed=7, n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text  # each choice has its own stream
    assert client.completions.create(seed=8, **kw).choices[0].text != a.choices[0].text


# ---- chat ------------------------------------------------------------------------------------------
def test_chat(client, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    full = client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert full.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    assert full.usage.completion_tokens == 12
    # content as a list of text parts is the same conversation
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]
    assert client.chat.completions.create(model=NAME, messages=parts, **GREEDY).choices[0].message.content \
        == full.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="stream_options"):  # vLLM's check: only with stream
        client.chat.completions.create(model=NAME, messages=messages, stream_options={"include_usage": True}, **GREEDY)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    # vLLM's continuous_usage_stats: every delta chunk carries the usage so far too
    steady = list(client.chat.completions.create(
        model=NAME, messages=messages, stream=True, **GREEDY,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in steady[:-1] if c.choices and c.choices[0].delta.content]
    assert counts and counts == sorted(counts) and counts[-1] <= 12 and steady[-1].usage.completion_tokens == 12
    assert all(c.usage.prompt_tokens == steady[-1].usage.prompt_tokens for c in steady[:-1] if c.usage)
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_logprobs(client):
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=NAME, messages=messages, logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 12 and "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and bytes(t.bytes).decode() == t.token
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].token == t.token  # greedy
    streamed = [t for c in client.chat.completions.create(model=NAME, messages=messages, logprobs=True,
                                                          top_logprobs=3, stream=True, **GREEDY)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    # top_logprobs 0 asks for nothing, so it needs no logprobs flag (vLLM's rule; some clients send
    # it by default): no logprobs, not a 400
    r = client.chat.completions.create(model=NAME, messages=messages, top_logprobs=0, **GREEDY)
    assert r.choices[0].logprobs is None and r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=messages, top_logprobs=2, **GREEDY)
    assert e.value.body["param"] == "top_logprobs"



def test_null_is_the_default(client, server, tok):
    """JSON null for an optional field means its default, as OpenAI and vLLM take it (clients send
    nulls for what they leave unset): the answer is the one without those fields. `n`, `stream`,
    `echo`, `logprobs` (chat) and vLLM's boolean extras were a 400 ("should be a valid ...")."""
    vllm_nulls = {k: None for k in ("top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids",
                                    "include_stop_str_in_output", "skip_special_tokens", "allowed_token_ids",
                                    "bad_words", "prompt_logprobs", "truncate_prompt_tokens",
                                    "return_tokens_as_token_ids", "response_format", "guided_json",
                                    "structured_outputs")}
    common = dict(n=None, stop=None, seed=None, presence_penalty=None, frequency_penalty=None, logit_bias=None,
                  top_p=None, user=None, stream=None, stream_options=None)
    base = client.completions.create(model=NAME, prompt="Hello world", **GREEDY)
    nulls = client.completions.create(model=NAME, prompt="Hello world", temperature=0, max_tokens=12,
                                      logprobs=None, echo=None, best_of=None, suffix=None, **common,
                                      extra_body={"ignore_eos": True, **vllm_nulls})
    assert nulls.choices[0].text == base.choices[0].text and nulls.usage == base.usage
    messages = [{"role": "user", "content": "Hi there", "name": None}]
    base = client.chat.completions.create(model=NAME, messages=messages, **GREEDY)
    nulls = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=None, max_completion_tokens=12, logprobs=None,
        top_logprobs=None, tools=None, tool_choice=None, **common,
        extra_body={"ignore_eos": True, "add_generation_prompt": None, "continue_final_message": None,
                    "chat_template_kwargs": None, **vllm_nulls})
    assert nulls.choices[0].message.content == base.choices[0].message.content and nulls.usage == base.usage
    # a null temperature is the default (1.0, sampled); one inside stream_options is its default too
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, temperature=None, max_tokens=4,
                                                 stream=True, stream_options={"include_usage": None}))
    assert chunks[-1].choices and chunks[-1].usage is None
    # completions' max_tokens: null keeps its meaning, up to the context length
    ids = tok.encode("Hello world " * 600, add_special_tokens=False)[:MAX_LEN - 5]
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=None, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    # a required field stays required
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": None}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_an_empty_stop_string_is_a_400(client):
    """An empty stop string would end every output at once: 400 naming `stop`, as a string (it was
    taken for no stop at all) and inside a list, on both endpoints and streamed."""
    messages = [{"role": "user", "content": "Hi"}]
    for stop in ("", ["fine", ""]):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model=NAME, prompt="Hello", max_tokens=3, stop=stop, stream=stream)
            assert e.value.body["param"] == "stop" and "non-empty" in e.value.body["message"], e.value.body
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model=NAME, messages=messages, max_tokens=3, stop=stop, stream=stream)
            assert e.value.body["param"] == "stop" and e.value.body["type"] == "invalid_request_error"
    r = client.completions.create(model=NAME, prompt="Hello", max_tokens=3, stop=[])  # no stop strings: fine
    assert r.choices[0].finish_reason in ("stop", "length")


def test_json_schema_response_format_needs_its_name_and_schema(client):
    """response_format {"type": "json_schema"} without json_schema, or json_schema without its
    name (OpenAI requires it) or its schema (the grammar is built from it): 400 with `param` the
    path of what is missing, on both endpoints. (A missing name was accepted.)"""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    cases = [({"type": "json_schema"}, "response_format.json_schema"),
             ({"type": "json_schema", "json_schema": None}, "response_format.json_schema"),
             ({"type": "json_schema", "json_schema": "x"}, "response_format.json_schema"),
             ({"type": "json_schema", "json_schema": {"schema": schema}}, "response_format.json_schema.name"),
             ({"type": "json_schema", "json_schema": {"name": "", "schema": schema}},
              "response_format.json_schema.name"),
             ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format.json_schema.schema"),
             ({"type": "json_schema", "json_schema": {"name": "a", "schema": None}},
              "response_format.json_schema.schema")]
    for response_format, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                           response_format=response_format)
        err = e.value.body
        assert err["param"] == param and err["type"] == "invalid_request_error", (response_format, err)
        assert err["message"].startswith(param + " is required"), err
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=NAME, prompt="Hi", max_tokens=3,
                                      extra_body={"response_format": response_format})
        assert e.value.body["param"] == param
    ok = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "a", "schema": schema}})
    assert ok.choices[0].message.content.startswith("{")


def test_chat_echo_leads_with_the_assistant_message(client):
    """vLLM's chat `echo`: when the last message is the assistant's (the reply the caller started,
    continue_final_message), its content leads every choice's content, whole and streamed (after
    the role chunk); after a user message there is nothing to echo."""
    start = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Well, I think"}]
    cont = dict(continue_final_message=True, add_generation_prompt=False, ignore_eos=True)
    kw = dict(model=NAME, messages=start, temperature=0, max_tokens=12)
    plain = client.chat.completions.create(**kw, extra_body=cont).choices[0].message.content
    echoed = client.chat.completions.create(**kw, n=2, extra_body={**cont, "echo": True})
    assert [c.message.content for c in echoed.choices] == ["Well, I think" + plain] * 2
    assert echoed.usage.completion_tokens == 2 * 12  # the echoed text is not generated
    chunks = list(client.chat.completions.create(**kw, stream=True, extra_body={**cont, "echo": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[1].choices[0].delta.content == "Well, I think"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Well, I think" + plain
    parts = [start[0], {"role": "assistant", "content": [{"type": "text", "text": "Well, I think"}]}]
    r = client.chat.completions.create(model=NAME, messages=parts, temperature=0, max_tokens=12,
                                       extra_body={**cont, "echo": True})
    assert r.choices[0].message.content == "Well, I think" + plain
    ask = [{"role": "user", "content": "Hi there"}]
    assert client.chat.completions.create(model=NAME, messages=ask, **GREEDY).choices[0].message.content == \
        client.chat.completions.create(model=NAME, messages=ask, temperature=0, max_tokens=12,
                                       extra_body={"ignore_eos": True, "echo": True}).choices[0].message.content

# ---- errors ------------------------------------------------------------------------------------------
BAD = [  # (path, body, status, param)
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": "hello " * MAX_LEN}, 400, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("completions", {"prompt": "hi", "top_p": 2}, 400, "top_p"),
    ("completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("completions", {"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "use_beam_search": True}, 400,
     "use_beam_search"),
    ("completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("completions", {"prompt": [10 ** 9]}, 400, "prompt"),
    ("completions", {"prompt": "hi", "model": "nope"}, 404, "model"),
    ("completions", {}, 400, "prompt"),
    ("chat/completions", {}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
     400, "max_completion_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
     400, "top_logprobs"),  # over --max-logprobs (20 by default)
    ("completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("completions", {"prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages[0].content[0].text"),
]


def test_errors(server, client):
    with httpx.Client(base_url=server.url + "/v1", timeout=30) as http:
        for path, body, status, param in BAD:
            r = http.post(path, json={"model": NAME, **body} if "model" not in body else body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error", (body, err)
        r = http.post("completions", content=b'{"prompt": "hi",', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        assert http.post("completions", json={"model": "nope", "prompt": "x"}).json()["error"]["code"] \
            == "model_not_found"
        assert http.get("nothing").status_code == 404
        # a stream's errors come before the stream starts
        r = http.post("completions", json={"model": NAME, "prompt": "hi", "stream": True, "temperature": -1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    # the server is fine afterwards
    assert client.completions.create(model=NAME, prompt="Hello", max_tokens=3).choices[0].text is not None


class BrokenEngine:
    """An EngineClient that fails on cue (the prompt text): engine error, dead engine, a bug, else a
    mid-stream error; "fine" finishes."""
    model_name = "broken"
    max_model_len = 64

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.healthy = True

    async def generate(self, prompt_token_ids, params, request_id, prompt=None):
        if prompt == "dead":
            raise EngineDeadError("the engine died")
        if prompt == "bug":  # an exception nothing expects
            raise RuntimeError("a bug below the API")
        out = RequestOutput(request_id, prompt, prompt_token_ids, [CompletionOutput(0, "ok", [5])], finished=False)
        if prompt == "error":
            out.error = "forward pass failed"
        yield out
        yield RequestOutput(request_id, prompt, prompt_token_ids, [CompletionOutput(0, "ok", [5, 6])],
                            finished=True, error=None if prompt == "fine" else "decode worker lost")

    async def abort(self, request_id):
        pass

    async def is_healthy(self):
        return self.healthy


def test_engine_failures(tiny_models):
    engine = BrokenEngine(Tokenizer(tiny_models["llama"]))
    with ThreadedServer(build_app(engine, "broken")) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        for prompt, status in (("error", 500), ("dead", 503), ("later", 500)):
            r = http.post("/v1/completions", json={"model": "broken", "prompt": prompt})
            assert r.status_code == status and r.json()["error"]["type"] == "server_error", r.text
        r = http.post("/v1/completions", json={"model": "broken", "prompt": "later", "stream": True})
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert r.status_code == 200 and json.loads(events[0])["choices"][0]["text"] == "ok"
        assert "decode worker lost" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
        engine.healthy = False
        assert http.get("/health").status_code == 503
        # an unexpected exception: OpenAI's 500 body, and the keep-alive connection still serves
        conn = http_client.HTTPConnection(srv.url.removeprefix("http://"), timeout=30)
        for prompt, status in (("bug", 500), ("error", 500), ("bug", 500), ("dead", 503)):
            conn.request("POST", "/v1/completions", json.dumps({"model": "broken", "prompt": prompt}),
                         {"content-type": "application/json"})
            r = conn.getresponse()
            body = json.loads(r.read())
            assert r.status == status and body["error"]["type"] == "server_error", body
            assert ("a bug below the API" in body["error"]["message"]) == (prompt == "bug")
            time.sleep(0.2)  # (a server that closes the connection after the response has done so by now)
        conn.close()


def test_a_batch_larger_than_the_pending_limit_is_a_400_not_an_overload(tiny_models):
    """--max-pending-requests: a server with room for 2 takes a batch of 2 prompts; a batch of 3
    could never be admitted, so it is the client's error (400), not a 503 to retry."""
    engine = BrokenEngine(Tokenizer(tiny_models["llama"]))
    with ThreadedServer(build_app(engine, "broken", limits=Limits(max_pending_requests=2))) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post("/v1/completions", json={"model": "broken", "prompt": ["fine", "fine"]})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
        r = http.post("/v1/completions", json={"model": "broken", "prompt": ["fine", "fine", "fine"]})
        assert r.status_code == 400 and "--max-pending-requests" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "prompt" and "retry-after" not in r.headers


def test_chat_template_kwargs_override_the_request_arguments(server):
    """vLLM merges chat_template_kwargs over its own template arguments: add_generation_prompt
    given there wins (it was a 400 "got multiple values")."""
    with httpx.Client(base_url=server.url, timeout=60) as http:
        msgs = [{"role": "user", "content": "Hi"}]
        texts = {}
        for kw in ({}, {"chat_template_kwargs": {"add_generation_prompt": False}}):
            r = http.post("/tokenize", json={"model": NAME, "messages": msgs, **kw})
            assert r.status_code == 200, r.text
            texts[bool(kw)] = r.json()["tokens"]
        assert texts[True] != texts[False] and texts[True] == texts[False][:len(texts[True])]
        r = http.post("/v1/chat/completions", json={"model": NAME, "messages": msgs, "max_tokens": 2,
                                                    "chat_template_kwargs": {"add_generation_prompt": False}})
        assert r.status_code == 200, r.text


# ---- cancellation and metrics ----------------------------------------------------------------------
def wait_idle(url: str, deadline_s: float = 5.0) -> dict:
    deadline = time.monotonic() + deadline_s
    while True:
        m = metrics(url)
        if m[("vllm:num_requests_running", ())] == 0 and m[("vllm:kv_cache_usage_perc", ())] == 0:
            return m
        assert time.monotonic() < deadline, "the engine still holds the abandoned request"
        time.sleep(0.05)


def test_client_disconnect_aborts(server):
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 900, "ignore_eos": True}
    before = metrics(server.url)
    aborted = before[("vllm:request_success_total", (("finished_reason", "abort"),))]
    with httpx.Client(base_url=server.url + "/v1", timeout=30) as http:
        with http.stream("POST", "completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert metrics(server.url)[("vllm:num_requests_running", ())] == 1
        wait_idle(server.url)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming request the client gives up on
            http.post("chat/completions", timeout=2.0,
                      json={**body, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 900})
    m = wait_idle(server.url)
    assert m[("vllm:request_success_total", (("finished_reason", "abort"),))] == aborted + 2
    generated = m[("vllm:generation_tokens_total", ())] - before[("vllm:generation_tokens_total", ())]
    assert generated < 900  # both stopped long before their 900 tokens each


def test_client_gone_mid_body_is_no_error(server, caplog):
    """A client that closes its connection while still sending the body is no server error: before,
    Starlette's ClientDisconnect from the body read went to the catch-all and every such client
    logged an ERROR "internal error" with a traceback (a 500 nobody received)."""
    import socket
    host, port = server.url.split("//")[1].split(":")
    with caplog.at_level("WARNING", logger="pdserve"):
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/tokenize"):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: 1000\r\n\r\n{{\"prompt\": ".encode())
                time.sleep(0.05)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not caplog.records:
            time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics(server, client):
    for _ in range(2):  # the second finds the first's full blocks in the prefix cache
        client.completions.create(model=NAME, prompt="Hello metrics " * 20, max_tokens=4,
                                  extra_body={"ignore_eos": True})
    m = metrics(server.url)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert (name, ()) in m, name
    assert m[("vllm:prompt_tokens_total", ())] > 0 and m[("vllm:generation_tokens_total", ())] >= 4
    assert m[("vllm:request_success_total", (("finished_reason", "length"),))] >= 1
    assert 0 <= m[("vllm:kv_cache_usage_perc", ())] <= 1
    assert 0 < m[("vllm:prefix_cache_hits_total", ())] <= m[("vllm:prefix_cache_queries_total", ())]
    for hist in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert m[(f"vllm:{hist}_count", ())] >= 1, hist
        assert m[(f"vllm:{hist}_sum", ())] > 0, hist
    finished = sum(v for (name, _), v in m.items() if name == "vllm:request_success_total")
    assert m[("vllm:request_generation_tokens_count", ())] == finished


# ---- the command -----------------------------------------------------------------------------------
def test_pdserve_serve_command(commands):
    proc = commands["tiny"].wait_ready()
    assert proc.ready_line == f"pdserve serving llama on {proc.url}"  # served name: the folder's
    assert httpx.get(proc.url + "/health").status_code == 200  # open without the key
    r = httpx.post(proc.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    c = openai.OpenAI(base_url=proc.url + "/v1", api_key="sekret", max_retries=0)
    r = c.completions.create(model="llama", prompt="Hello there, world", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3
    # --enable-log-requests (prompt and ids cut to --max-log-len 4) and a statistics line
    deadline = time.monotonic() + 30
    while "Avg generation throughput" not in proc.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = proc.stderr_text()
    received = [line for line in log.splitlines() if "Received request cmpl-" in line]
    assert len(received) == 1 and "prompt: 'Hell'," in received[0] and "max_tokens=3" in received[0], log
    ids = received[0].split("prompt_token_ids: ")[1]
    assert len(json.loads(ids)) == 4
    assert any("Finished request cmpl-" in line and "length after 3 tokens" in line for line in log.splitlines()), log
    stats = next(line for line in log.splitlines() if "Avg generation throughput" in line)
    assert "Running: " in stats and "KV cache usage: " in stats and "Prefix cache hit rate: " in stats
    # --max-logprobs 30 (vLLM's; the default 20 is checked in test_errors)
    r = c.completions.create(model="llama", prompt="Hello", max_tokens=2, logprobs=30, temperature=0)
    assert [len(top) for top in r.choices[0].logprobs.top_logprobs] == [30, 30]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                  logprobs=True, top_logprobs=31)
    assert e.value.body["param"] == "top_logprobs" and "max allowed: 30" in e.value.body["message"]
    assert proc.stop() == 0, proc.stderr_text()  # SIGTERM: a clean exit
    assert "nanobind" not in proc.stderr_text()  # no teardown noise from Triton's bindings (entry.exit_process)


def test_sigterm_aborts_what_outlasts_the_grace_period(tiny_models):
    """SIGTERM with requests that cannot finish in the 5 s grace period (one running at a time, six
    of 1,000 tokens): 1 s before uvicorn would cancel their handlers the engine aborts them, so each
    gets an answer: finish_reason "abort", whole or as a stream that ends with [DONE]. Before, uvicorn
    cancelled them: plain-text 500s, streams cut without an error event, a traceback each. Two
    /v1/responses requests queued behind them end as status "cancelled" (not "failed"), whole and
    streamed (a response.completed event carrying that status)."""
    import signal

    async def run(proc):
        c = openai.AsyncOpenAI(base_url=proc.url + "/v1", api_key="x", max_retries=0, timeout=60)
        body = dict(model="llama", prompt="Hello", max_tokens=1000, extra_body={"ignore_eos": True})

        async def one(i):
            if i % 2:
                return (await c.completions.create(**body)).choices[0].finish_reason
            reasons = [ch.choices[0].finish_reason async for ch in await c.completions.create(stream=True, **body)
                       if ch.choices and ch.choices[0].finish_reason]
            return reasons[0]

        async def response(stream: bool):
            kw = dict(model="llama", input="Hello", max_output_tokens=900, extra_body={"ignore_eos": True})
            if not stream:
                return (await c.responses.create(**kw)).status
            events = [e async for e in await c.responses.create(stream=True, **kw)]
            return events[-1].type, events[-1].response.status
        tasks = [asyncio.create_task(one(i)) for i in range(6)]
        await asyncio.sleep(0.2)  # queued behind the six
        tasks += [asyncio.create_task(response(False)), asyncio.create_task(response(True))]
        await asyncio.sleep(0.3)
        proc.proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*tasks)

    with ServeProcess("--model", tiny_models["llama"], "--max-num-seqs", "1", "--num-gpu-blocks-override", "128") as proc:
        *reasons, whole, streamed = asyncio.run(run(proc))
        assert proc.proc.wait(timeout=30) == 0
        assert set(reasons) <= {"abort", "length"} and "abort" in reasons, reasons
        assert whole == "cancelled" and streamed == ("response.completed", "cancelled"), (whole, streamed)
        assert "Traceback" not in proc.stderr_text(), proc.stderr_text()


def test_default_model_knows_paris(commands):
    proc = commands["default"].wait_ready()
    c = openai.OpenAI(base_url=proc.url + "/v1", api_key="x", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["SmolLM2-135M-Instruct"]
    r = c.chat.completions.create(model="SmolLM2-135M-Instruct", temperature=0, max_tokens=20,
                                  messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in r.choices[0].message.content


def test_fast_text_chunks_match_pydantic():
    for model in ("m", str(918273645)):  # a name holding the sentinel falls back to pydantic
        def build(index, text):
            return oa.ChatCompletionChunk(id="chatcmpl-1", created=1, model=model, choices=[
                oa.ChatStreamChoice(index=index, delta=oa.DeltaMessage(content=text))])
        fast = oa.text_chunk_renderer(build, exclude={"usage"})
        for index, text in [(0, "plain"), (3, 'a "quote", a \\ and a\nnewline\t'), (12, "héllo 😀 \u2028"), (1, "")]:
            assert json.loads(fast(index, text)) == json.loads(build(index, text).model_dump_json(exclude={"usage"}))


def test_router_is_torch_free():
    code = ("import sys; import pdserve.services.router.app, pdserve.common.metrics; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_process_metrics_and_gc_policy(commands):
    """`pdserve serve`'s /metrics carries the process's own families (as Prometheus users expect),
    and its garbage collector's first generation runs rarely (common/gc_policy.py: with CPython's
    default of 700 allocations it ran ~1,300 times while a server started and served a few
    requests, and full collections walked every object of the process: 42 % of a loaded decode
    worker's GIL)."""
    proc = commands["default"].wait_ready()
    c = openai.OpenAI(base_url=proc.url + "/v1", api_key="x", max_retries=0)
    for _ in range(5):
        c.completions.create(model="SmolLM2-135M-Instruct", prompt="Collect garbage " * 10, max_tokens=16,
                             extra_body={"ignore_eos": True})
    m = metrics(proc.url)
    assert m[("process_cpu_seconds_total", ())] > 0 and m[("process_resident_memory_bytes", ())] > 0
    gen0 = m[("python_gc_collections_total", (("generation", "0"),))]
    assert gen0 < 200, gen0
