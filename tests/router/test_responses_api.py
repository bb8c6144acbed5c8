"""OpenAI's Responses API (/v1/responses) end to end: a real uvicorn server over the real engine
(the tiny random Llama with SmolLM2's tokenizer and ChatML template, served from a thread of this
process, tools parsed as Hermes) and the official `openai` client. Greedy answers are compared
with the chat endpoint's for the same conversation: a response is a chat completion under another
schema, so the token streams must be identical."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from servers import ThreadedServer

from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine.llm import LLM
from pdserve.services.router.app import build_app

NAME = "tiny"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"]}}
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def engine(tiny_models):
    eng = AsyncLLM(core=LLM(tiny_models["llama"], max_model_len=1024, num_gpu_blocks_override=256,
                            dtype="float32").engine)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ThreadedServer(build_app(engine, NAME, tool_call_parser="hermes", enable_auto_tool_choice=True)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def all_blocks_free(engine) -> bool:
    """Every KV block back in the pool (the engine thread frees a finished request's blocks in the
    step that finishes it; allow it that step)."""
    deadline = time.monotonic() + 10
    while engine.core.kv.num_free_blocks != engine.core.runner.num_blocks and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.core.kv.num_free_blocks == engine.core.runner.num_blocks


def chat_text(client, messages, max_tokens, **kw) -> str:
    return client.chat.completions.create(model=NAME, messages=messages, max_tokens=max_tokens, **GREEDY,
                                          **kw).choices[0].message.content


def test_a_response_is_the_chat_answer_and_continues_by_id(client, engine):
    r = client.responses.create(model=NAME, input="Say hi", instructions="Be brief.", max_output_tokens=12, **GREEDY)
    assert r.object == "response" and r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [o.type for o in r.output] == ["message"] and r.output[0].content[0].type == "output_text"
    expected = chat_text(client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}], 12)
    assert r.output_text == expected
    assert r.usage.output_tokens == 12 and r.usage.total_tokens == r.usage.input_tokens + 12
    assert r.id.startswith("resp_")  # OpenAI's form of a response id
    assert client.responses.retrieve(r.id).output_text == r.output_text

    # previous_response_id: the stored turn (input + output) continues; instructions are not carried
    r2 = client.responses.create(model=NAME, input=[{"role": "user", "content": [{"type": "input_text", "text": "More"}]}],
                                 previous_response_id=r.id, max_output_tokens=6, **GREEDY)
    assert r2.previous_response_id == r.id
    assert r2.output_text == chat_text(client, [{"role": "user", "content": "Say hi"},
                                                {"role": "assistant", "content": r.output_text},
                                                {"role": "user", "content": "More"}], 6)

    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    assert all_blocks_free(engine)


def test_streamed_events_build_the_same_response(client):
    whole = client.responses.create(model=NAME, input="Tell a story", max_output_tokens=16, **GREEDY)
    events = list(client.responses.create(model=NAME, input="Tell a story", max_output_tokens=16, stream=True,
                                          **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    # the SDK's accumulating helper agrees (it hands the final object over on response.incomplete
    # as on response.completed: as an event, get_final_response() being for completed ones)
    with client.responses.stream(model=NAME, input="Tell a story", max_output_tokens=16, **GREEDY) as stream:
        last = [e for e in stream][-1]
    assert last.type == "response.incomplete" and last.response.output_text == whole.output_text


def test_a_response_the_server_aborts_is_cancelled(client, engine):
    """A request the server aborts (`serve`'s shutdown aborts what outlasts its grace period,
    AsyncLLM.abort_all) ends as status "cancelled", as vLLM reports an aborted response (before:
    "failed", which OpenAI keeps for errors): whole, and streamed (its last event response.completed
    carrying that status, as vLLM ends it: OpenAI has no stream event of its own for it, and the
    SDK types only the events it knows). Its text so far is kept."""
    import threading

    long = dict(model=NAME, input="Tell a long story", max_output_tokens=900, **GREEDY)
    aborted = []

    def abort_once_open():
        while not engine.abort_all():
            time.sleep(0.002)
        aborted.append(True)
    aborter = threading.Thread(target=abort_once_open)
    aborter.start()
    r = client.responses.create(**long)
    aborter.join()
    assert aborted and r.status == "cancelled" and r.error is None and r.incomplete_details is None
    assert [o.status for o in r.output] == ["incomplete"] and r.usage.output_tokens < 900

    events = []
    for e in client.responses.create(stream=True, **long):
        events.append(e)
        if e.type == "response.output_text.delta" and sum(x.type == e.type for x in events) == 1:
            assert engine.abort_all() == 1
    kinds = [e.type for e in events]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    final = events[-1].response
    assert final.status == "cancelled" and final.error is None and final.output[0].status == "incomplete"
    assert final.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert client.responses.retrieve(final.id).status == "cancelled"
    assert all_blocks_free(engine)


def test_function_tools_call_and_take_their_output(client):
    tools = [WEATHER]
    forced = client.responses.create(model=NAME, input="Weather in Paris?", tools=tools, max_output_tokens=40,
                                     tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    calls = [o for o in forced.output if o.type == "function_call"]
    assert forced.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    assert calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])

    with client.responses.stream(model=NAME, input="Weather in Paris?", tools=tools, max_output_tokens=200,
                                 tool_choice="required", temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    streamed = [o for o in final.output if o.type == "function_call"]
    assert streamed and all(o.name == "get_weather" for o in streamed)
    jsonschema.validate(json.loads(streamed[0].arguments), WEATHER["parameters"])

    # the call's output goes back in; the model answers in text (tool_choice none)
    follow = client.responses.create(model=NAME, previous_response_id=forced.id, tools=tools, tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": '{"temp": 21}'}], max_output_tokens=5, **GREEDY)
    assert [o.type for o in follow.output] == ["message"] and follow.usage.output_tokens == 5
    call = {"id": calls[0].call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": calls[0].arguments}}
    assert follow.output_text == chat_text(
        client, [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None,
                                                                  "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": calls[0].call_id, "content": '{"temp": 21}'}], 5,
        tools=[{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}],
        tool_choice="none")


def test_text_format_json_schema(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}, "required": ["name"]}
    r = client.responses.create(model=NAME, input="A name as JSON", max_output_tokens=60, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                 "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)


@pytest.mark.parametrize("body, status, param", [
    ({"input": ""}, 400, "input"),
    ({"input": [{"type": "web_search_call"}]}, 400, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input[0].content[0]"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 100_000}, 400, "max_output_tokens"),  # more than the context holds
    ({"input": "x", "previous_response_id": "resp_unknown"}, 404, "previous_response_id"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, 400, "text.format"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, 400,
     "text.format.name"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, 400, "text.format.schema"),
    ({"input": "x", "background": True}, 400, "background"),
    ({"input": "x", "tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, 400, "tool_choice"),
    ({"input": "x", "model": "other"}, 404, "model"),
    ({"input": "x", "prompt_logprobs": 1}, 400, "prompt_logprobs"),
])
def test_bad_requests_get_openai_errors(server, engine, body, status, param):
    r = httpx.post(server.url + "/v1/responses", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]
    assert all_blocks_free(engine)


def test_version_route(server):
    r = httpx.get(server.url + "/version", timeout=10)
    assert r.status_code == 200 and r.json()["version"]


def test_redis_store_is_shared_by_router_processes_and_fails_clearly(engine, redis_server):
    """The router's store: two apps (two router processes) on one Redis see each other's
    responses; stored ones expire after the TTL; Redis down is 503 for what needs the store and
    "store": false on a new response (still answered)."""
    from pdserve.services.router.responses import RedisResponseStore
    stores = [RedisResponseStore(redis_server.url, ttl_s=30) for _ in range(2)]
    apps = [build_app(engine, NAME, response_store=s) for s in stores]
    with ThreadedServer(apps[0]) as a, ThreadedServer(apps[1]) as b:
        ca, cb = (openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60) for srv in (a, b))
        first = ca.responses.create(model=NAME, input="Say hi", max_output_tokens=6, **GREEDY)
        assert cb.responses.retrieve(first.id).output_text == first.output_text
        second = cb.responses.create(model=NAME, input="More", previous_response_id=first.id, max_output_tokens=4,
                                     **GREEDY)
        assert second.output_text == chat_text(cb, [{"role": "user", "content": "Say hi"},
                                                    {"role": "assistant", "content": first.output_text},
                                                    {"role": "user", "content": "More"}], 4)
        ca.responses.delete(second.id)
        with pytest.raises(openai.NotFoundError):
            cb.responses.retrieve(second.id)

        redis_server.stop()
        try:
            r = httpx.get(a.url + f"/v1/responses/{first.id}", timeout=30)
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            r = httpx.post(a.url + "/v1/responses", json={"model": NAME, "input": "x", "previous_response_id": first.id},
                           timeout=30)
            assert r.status_code == 503
            unstored = ca.responses.create(model=NAME, input="Say hi", max_output_tokens=3, **GREEDY)
            assert unstored.store is False and unstored.output_text
        finally:
            redis_server.start()
        with pytest.raises(openai.NotFoundError):  # a restarted Redis holds nothing
            ca.responses.retrieve(first.id)
    short = RedisResponseStore(redis_server.url, ttl_s=0.3)
    with ThreadedServer(build_app(engine, NAME, response_store=short)) as c:
        client = openai.OpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.responses.create(model=NAME, input="Say hi", max_output_tokens=2, **GREEDY)
        assert client.responses.retrieve(r.id).id == r.id
        time.sleep(0.5)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(r.id)
    assert all_blocks_free(engine)
