"""Structured outputs through a disaggregated stack (router + 1 prefill + 1 decode processes, Redis,
gRPC, KV over TCP; the tiny random Llama): the constraint crosses the gRPC boundary, prefill samples
the first token under the grammar and decode's matcher continues from it, so a random model's
output still validates, and greedy output equals the offline engine's under the same grammar."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams
from stack import ROUTER_FLAGS, Stack

SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
    "required": ["color", "ok", "n", "tags"]}
TOOL = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"size": {"enum": ["S", "M", "L"]}, "qty": {"type": "integer", "minimum": 1,
                                                                              "maximum": 5}},
    "required": ["size", "qty"]}}}
PROMPT = "The history of the city"


@pytest.fixture(scope="module")
def stack(tiny_models):
    s = Stack(tiny_models["llama"], prefill=[[]], decode=[[]],
              router_flags=ROUTER_FLAGS + ("--enable-auto-tool-choice", "--tool-call-parser", "hermes"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_json_schema_through_prefill_and_decode(stack, client, tiny_models):
    before = stack.stats()["handoffs"]
    assert before == 0
    offline = LLM(tiny_models["llama"], num_gpu_blocks_override=256, dtype="float32")  # as the stack's workers
    ref = offline.generate([PROMPT], SamplingParams(temperature=0, max_tokens=80, structured_outputs={"json": SCHEMA}),
                           use_tqdm=False)[0].outputs[0].text
    greedy = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=80, temperature=0,
                                       extra_body={"guided_json": SCHEMA})
    assert greedy.choices[0].text == ref and greedy.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(ref), SCHEMA)
    for stream in (False, True):
        kw = dict(model="tiny", messages=[{"role": "user", "content": "JSON please"}], max_tokens=80, temperature=1.0,
                  n=2, seed=3, response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
        if stream:
            texts = {}
            for chunk in client.chat.completions.create(stream=True, **kw):
                for ch in chunk.choices:
                    texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
        else:
            texts = {ch.index: ch.message.content for ch in client.chat.completions.create(**kw).choices}
        assert len(texts) == 2
        for text in texts.values():
            jsonschema.validate(json.loads(text), SCHEMA)
    stats = stack.stats()
    # every request's first token was sampled by prefill, under the grammar, and decode continued
    assert [d["prefill"] for d in stats["recent"][-3:]] == ["prefill-0"] * 3
    assert stats["handoffs"] >= 2  # KV pulled (a later identical prompt may be in decode's prefix cache)


def test_tools_logit_bias_and_tokenize_on_the_router(stack, client):
    msgs = [{"role": "user", "content": "Pick a size."}]
    named = client.chat.completions.create(model="tiny", messages=msgs, tools=[TOOL], max_tokens=40, temperature=1.0,
                                           seed=2, tool_choice={"type": "function", "function": {"name": "pick"}})
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "pick"
    jsonschema.validate(json.loads(call.function.arguments), TOOL["function"]["parameters"])
    # a random model may add calls forever: a bias towards "]" (where the grammar allows it) ends the array
    close = httpx.post(stack.base_url + "/tokenize", json={"prompt": "]", "add_special_tokens": False}).json()["tokens"]
    args, finish = {}, None
    for chunk in client.chat.completions.create(model="tiny", messages=msgs, tools=[TOOL], tool_choice="required",
                                                max_tokens=100, temperature=0, stream=True,
                                                logit_bias={str(close[0]): 60}):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                args[d.index] = args.get(d.index, "") + (d.function.arguments or "")
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" and args
    for text in args.values():
        jsonschema.validate(json.loads(text), TOOL["function"]["parameters"])

    tok = httpx.post(stack.base_url + "/tokenize", json={"prompt": " red", "add_special_tokens": False}).json()
    assert tok["count"] == 1
    forced = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=1.0,
                                       logit_bias={str(tok["tokens"][0]): 100})
    assert forced.choices[0].text == " red" * 5
    back = httpx.post(stack.base_url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert back == {"prompt": " red"}


def test_bad_constraints_are_400_through_the_router(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, extra_body={"guided_json": {"type": 7}})
    assert e.value.body["param"] == "guided_json"
    with pytest.raises(openai.BadRequestError) as e:  # compiled (and refused) by the prefill worker
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, extra_body={"guided_regex": "(a"})
    assert "cannot compile" in e.value.body["message"]
    # named by the field that asked for it, as `pdserve serve` names it (was structured_outputs, and
    # the message repeated it)
    assert e.value.body["param"] == "guided_regex" and e.value.body["message"].startswith("cannot compile")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], tools=[TOOL],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"
