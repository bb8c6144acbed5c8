"""Structured outputs, tools, logit_bias and /tokenize through `pdserve serve` (the packaged
SmolLM2, one process for the module, started with --enable-auto-tool-choice --tool-call-parser
hermes) with the official openai client. Requests that can run together are sent together, so
the engine batches them."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import servers
from servers import ServeProcess

from pdserve.services.router import openai_schema as oa
from pdserve.services.router.tool_calls import parse_hermes, parse_llama3_json, plan_tools

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"]}
NESTED = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "location": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                  "north": {"type": "boolean"}}, "required": ["lat", "north"]},
    "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]}, "minItems": 1, "maxItems": 3}},
    "required": ["city", "location", "sizes"]}
ENUMS = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                          "count": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["color", "count"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    proc = ServeProcess("--max-model-len", "1024", "--num-gpu-blocks-override", "256", "--enable-auto-tool-choice",
                        "--tool-call-parser", "hermes").start()
    default, servers.START_DEADLINE_S = servers.START_DEADLINE_S, 600  # parsing the GGUF takes minutes on a busy box
    try:
        proc.wait_ready()
    finally:
        servers.START_DEADLINE_S = default
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def together(*calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(c) for c in calls]]


def chat(client, **kw):
    return lambda: client.chat.completions.create(model="SmolLM2-135M-Instruct", **kw)


def stream_tool_calls(stream) -> tuple[dict[int, dict], str | None, str]:
    """Accumulate delta.tool_calls the way OpenAI's clients do."""
    calls, finish, content = {}, None, ""
    for chunk in stream:
        for ch in chunk.choices:
            content += ch.delta.content or ""
            for d in ch.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or d.id
                if d.function is not None:
                    call["name"] = call["name"] or d.function.name
                    call["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    return calls, finish, content


def test_json_object_and_schemas_validate(client):
    prompt = [{"role": "user", "content": "Describe a person, a place and a color as JSON."}]
    asks = [chat(client, messages=prompt, max_tokens=200, temperature=0, response_format={"type": "json_object"})]
    schemas = [PERSON, NESTED, ENUMS]
    for schema in schemas:
        for temperature in (0.0, 1.0):
            asks.append(chat(client, messages=prompt, max_tokens=200, temperature=temperature, seed=1,
                             response_format={"type": "json_schema",
                                              "json_schema": {"name": "x", "schema": schema, "strict": True}}))
    outs = together(*asks)
    assert isinstance(json.loads(outs[0].choices[0].message.content), dict)
    for i, out in enumerate(outs[1:]):
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), schemas[i // 2])


def test_vllm_guided_extras_and_completions(client):
    outs = together(
        chat(client, messages=ASK, max_tokens=20, temperature=1.0, extra_body={"guided_choice": ["yes", "no"]}),
        chat(client, messages=ASK, max_tokens=20, temperature=1.0, extra_body={"guided_regex": r"[0-9]{2}C"}),
        chat(client, messages=ASK, max_tokens=60, temperature=0, extra_body={"structured_outputs": {"json": ENUMS}}),
        lambda: client.completions.create(model="SmolLM2-135M-Instruct", prompt="Pick:", max_tokens=20,
                                          extra_body={"guided_grammar": 'root ::= "A" | "B"'}))
    assert outs[0].choices[0].message.content in ("yes", "no")
    assert len(outs[1].choices[0].message.content) == 3 and outs[1].choices[0].message.content.endswith("C")
    jsonschema.validate(json.loads(outs[2].choices[0].message.content), ENUMS)
    assert outs[3].choices[0].text in ("A", "B")


def test_named_and_required_tool_choice(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(messages=ASK, tools=[WEATHER, TIME], max_tokens=120, temperature=0)
    full_named, full_required = together(chat(client, tool_choice=named, **kw), chat(client, tool_choice="required", **kw))
    msg = full_named.choices[0].message
    assert full_named.choices[0].finish_reason == "stop" and len(msg.tool_calls) == 1
    assert msg.tool_calls[0].function.name == "get_weather" and msg.tool_calls[0].id.startswith("call_")
    jsonschema.validate(json.loads(msg.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
    msg = full_required.choices[0].message
    assert full_required.choices[0].finish_reason == "tool_calls" and msg.tool_calls
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in msg.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name])

    s_named, s_required = together(
        lambda: stream_tool_calls(chat(client, tool_choice=named, stream=True, **kw)()),
        lambda: stream_tool_calls(chat(client, tool_choice="required", stream=True, **kw)()))
    calls, finish, _ = s_named
    assert finish == "stop" and list(calls) == [0] and calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"] == full_named.choices[0].message.tool_calls[0].function.arguments  # greedy: same
    calls, finish, _ = s_required
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in full_required.choices[0].message.tool_calls]



def test_forced_tool_calls_cut_by_max_tokens_answer_as_the_stream(client):
    """tool_choice required or named, the call cut short by max_tokens: the whole answer is what
    the stream sends (one scanner for both): finish_reason "length", content null, a call once its
    name is complete, its arguments as far as they were generated. It was the raw JSON as content
    and no tool_calls (required)."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    names = {"get_weather", "get_time"}
    seen_cut_arguments = False
    for tool_choice in ("required", named):
        for max_tokens in (3, 9, 14):
            kw = dict(messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, max_tokens=max_tokens,
                      temperature=0)
            whole, (calls, finish, content) = together(
                chat(client, **kw), lambda: stream_tool_calls(chat(client, stream=True, **kw)()))
            choice = whole.choices[0]
            assert choice.finish_reason == finish == "length", (tool_choice, max_tokens, choice)
            assert choice.message.content is None and content == "", choice.message
            got = [(c.id.startswith("call_"), c.type, c.function.name, c.function.arguments)
                   for c in choice.message.tool_calls or []]
            assert got == [(True, "function", c["name"], c["arguments"]) for c in calls.values()], (got, calls)
            assert all(name in names for _, _, name, _ in got)
            for *_, arguments in got:
                try:
                    json.loads(arguments)
                except ValueError:
                    seen_cut_arguments = True
    assert seen_cut_arguments  # some max_tokens cut inside the arguments

def test_auto_tool_choice_parses_hermes_calls(client):
    """The model's text is forced (a regex) to hold a Hermes call after some content; the
    hermes parser turns it into tool_calls, whole and streamed."""
    forced = (r'Let me check\. <tool_call>\n\{"name": "get_weather", "arguments": '
              r'\{"city": "Paris", "unit": "celsius"\}\}\n</tool_call>')
    kw = dict(messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=80, temperature=0,
              extra_body={"guided_regex": forced})
    full, streamed = together(chat(client, **kw), lambda: stream_tool_calls(chat(client, stream=True, **kw)()))
    msg = full.choices[0].message
    assert full.choices[0].finish_reason == "tool_calls" and msg.content == "Let me check. "  # (vLLM's: not stripped)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == \
        [("get_weather", {"city": "Paris", "unit": "celsius"})]
    calls, finish, content = streamed
    assert finish == "tool_calls" and content == msg.content  # whole and streamed alike
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"])["city"] == "Paris"
    # a conversation holding the call and its result goes through the template
    follow = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=5, temperature=0, tools=[WEATHER],
                                            tool_choice="none", messages=ASK + [
                                                {"role": "assistant", "content": None,
                                                 "tool_calls": [msg.tool_calls[0].model_dump()]},
                                                {"role": "tool", "tool_call_id": msg.tool_calls[0].id,
                                                 "content": '{"temp": 21}'}])
    assert follow.choices[0].message.content and not follow.choices[0].message.tool_calls


def test_tool_call_parsers_on_model_text():
    content, calls = parse_hermes('I will look.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}'
                                  '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
                                  '{"city": "Oslo"}}\n</tool_call>')
    assert content == "I will look.\n" and [c.function.name for c in calls] == ["get_time", "get_weather"]
    assert json.loads(calls[1].function.arguments) == {"city": "Oslo"}
    content, calls = parse_llama3_json('<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}; '
                                       '{"name": "get_weather", "parameters": {"city": "Rome"}}')
    assert content is None and [json.loads(c.function.arguments) for c in calls] == [{"zone": "CET"}, {"city": "Rome"}]
    assert parse_hermes("no call here") == ("no call here", [])
    tools = [oa.ChatTool.model_validate(WEATHER)]
    # what the model writes is never an error of the request: a block that is not a call (broken
    # JSON, not an object, no name, cut short by max_tokens) stays content, whole and streamed
    good = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    for bad in ("<tool_call>{not json</tool_call>", "<tool_call>[1, 2]</tool_call>", '<tool_call>"x"</tool_call>',
                '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"name": 5}</tool_call>',
                '<tool_call>{"name": "get_weather", "arguments": {"ci'):
        for text, names in ((bad, []), ("Sure. " + good + bad, ["get_weather"])):
            content, calls = parse_hermes(text)
            assert content == text.replace(good, "") and [c.function.name for c in calls] == names
            stream = plan_tools(tools, "auto", "hermes", True).stream()
            pieces = [stream.feed(text[i:i + 4], i + 4 >= len(text)) for i in range(0, len(text), 4)]
            assert "".join(p[0] for p in pieces) == content
            assert [d.function.name for p in pieces for d in p[1]] == names
    assert parse_llama3_json("{not json") == ("{not json", [])
    assert parse_llama3_json('{"foo": 1}') == ('{"foo": 1}', [])
    content, calls = parse_llama3_json('{"name": "get_weather", "parameters": {}} and more')
    assert content == "and more" and [c.function.name for c in calls] == ["get_weather"]
    with pytest.raises(Exception, match="enable-auto-tool-choice"):
        plan_tools(tools, "auto", None, False)
    stream = plan_tools(tools, "auto", "hermes", True).stream()
    text = 'Sure <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    pieces = [stream.feed(text[i:i + 5], i + 5 >= len(text)) for i in range(0, len(text), 5)]
    assert "".join(p[0] for p in pieces) == "Sure "
    deltas = [d for p in pieces for d in p[1]]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather"


def test_logit_bias_forces_a_token(client, server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"]
    assert len(ids) == 1
    comp, ch = together(
        lambda: client.completions.create(model="SmolLM2-135M-Instruct", prompt="I like", max_tokens=4, temperature=0,
                                          logit_bias={str(ids[0]): 100}),
        chat(client, messages=ASK, max_tokens=3, temperature=1.0, logit_bias={str(ids[0]): 100}))
    assert comp.choices[0].text == " banana" * 4
    assert ch.choices[0].message.content == " banana" * 3
    out = client.completions.create(model="SmolLM2-135M-Instruct", prompt="I like", max_tokens=4, temperature=0,
                                    extra_body={"allowed_token_ids": ids})
    assert out.choices[0].text == " banana" * 4


def test_tokenize_detokenize_round_trip(server):
    text = "Hello world, structured outputs!"
    r = httpx.post(server.url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == 1024
    assert httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    r = httpx.post(server.url + "/tokenize", json={"messages": ASK}).json()
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json()["prompt"]
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert "Paris" in prompt
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 7]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"extra": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"logit_bias": {"42": 500}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}, "extra": {"guided_choice": ["a"]}}, "guided_choice"),
])
def test_bad_constraints_are_400(client, body, param):
    body = dict(body)
    extra = body.pop("extra", None)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=ASK, max_tokens=5, extra_body=extra,
                                       **body)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == param
    assert err["message"]


def test_greedy_unconstrained_output_unchanged_next_to_constrained(client):
    kw = dict(messages=ASK, max_tokens=24, temperature=0)
    alone = chat(client, **kw)().choices[0].message.content
    outs = together(chat(client, **kw), *[chat(client, messages=ASK, max_tokens=40, temperature=1.0,
                                               response_format={"type": "json_schema",
                                                                "json_schema": {"name": "e", "schema": ENUMS}})
                                          for _ in range(3)])
    assert outs[0].choices[0].message.content == alone
    assert not outs[0].choices[0].message.tool_calls


def test_tool_conversation_rendered_for_a_template_without_tools(server):
    """SmolLM2's template ignores `tools`: the tools and earlier calls are written in Hermes form."""
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    ids = httpx.post(server.url + "/tokenize", json={"messages": msgs, "tools": [WEATHER]}).json()["tokens"]
    prompt = httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert prompt.startswith("<|im_start|>system\n") and "<tools>" in prompt and '"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in prompt
    assert '<|im_start|>tool\n{"temp": 21}<|im_end|>' in prompt


def test_streamed_tool_call_deltas_are_one_entry_per_call(client):
    """A forced call's chunk holds one delta per call index, as OpenAI and vLLM send them: clients
    read `delta.tool_calls[0]` (the header and the first arguments of a call came as three
    entries of index 0 in one chunk)."""
    kw = dict(messages=ASK, tools=[WEATHER, TIME], max_tokens=60, temperature=0)
    for tool_choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        pieces = []
        for chunk in chat(client, tool_choice=tool_choice, stream=True, **kw)():
            for ch in chunk.choices:
                indexes = [d.index for d in ch.delta.tool_calls or []]
                assert len(indexes) == len(set(indexes)), (tool_choice, ch.delta.tool_calls)
                pieces += ch.delta.tool_calls or []
        assert pieces and pieces[0].id and pieces[0].function.name in ("get_weather", "get_time")


def test_parallel_tool_calls_false_gives_one_call(client):
    """parallel_tool_calls false: one call at most (OpenAI; vLLM keeps the first). required: the
    grammar's array holds one call; auto: the calls after the first parsed call are dropped,
    whole and streamed. It was ignored: the same request answered two calls."""
    two = (r'<tool_call>\n\{"name": "get_time", "arguments": \{"zone": "UTC"\}\}\n</tool_call>\n'
           r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "Oslo", "unit": "celsius"\}\}\n</tool_call>')
    auto = dict(messages=ASK, tools=[WEATHER, TIME], tool_choice="auto", max_tokens=80, temperature=0,
                extra_body={"guided_regex": two})
    both, one, one_streamed = together(chat(client, **auto), chat(client, parallel_tool_calls=False, **auto),
                                       lambda: stream_tool_calls(chat(client, parallel_tool_calls=False, stream=True,
                                                                      **auto)()))
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_time", "get_weather"]
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_time"]
    assert one.choices[0].finish_reason == "tool_calls"
    calls, finish, _ = one_streamed
    assert [c["name"] for c in calls.values()] == ["get_time"] and finish == "tool_calls"
    # required, sampled: without the flag some answers hold several calls, with it each holds one
    required = dict(messages=[{"role": "user", "content": "Weather and time in Paris, Rome and Oslo?"}],
                    tools=[WEATHER, TIME], tool_choice="required", max_tokens=150, temperature=1.0)
    seeds = range(6)
    free = together(*[chat(client, seed=s, **required) for s in seeds])
    single = together(*[chat(client, seed=s, parallel_tool_calls=False, **required) for s in seeds])
    assert any(len(r.choices[0].message.tool_calls) > 1 for r in free)
    for r in single:
        assert len(r.choices[0].message.tool_calls) == 1 and r.choices[0].finish_reason == "tool_calls", r.choices[0]
    # the Responses API takes the same flag
    resp = client.responses.create(model="SmolLM2-135M-Instruct", input="Weather and time in Paris, Rome and Oslo?",
                                   tools=[{"type": "function", **WEATHER["function"]}, {"type": "function",
                                                                                       **TIME["function"]}],
                                   tool_choice="required", parallel_tool_calls=False, max_output_tokens=150,
                                   temperature=1.0, extra_body={"seed": 0})
    assert [item.type for item in resp.output] == ["function_call"] and resp.parallel_tool_calls is False


def test_min_tokens_beside_a_grammar_that_completes_early(client):
    """A grammar complete before min_tokens ends the answer (finish_reason stop, valid output),
    whole and streamed: it was finish_reason "error" (min_tokens banned the EOS that was all the
    grammar allowed)."""
    kw = dict(messages=ASK, max_tokens=60, temperature=0)
    choice, schema = together(chat(client, extra_body={"guided_choice": ["yes", "no"], "min_tokens": 5}, **kw),
                              chat(client, response_format={"type": "json_schema", "json_schema": {
                                  "name": "x", "schema": ENUMS}}, extra_body={"min_tokens": 50}, **kw))
    assert choice.choices[0].message.content in ("yes", "no") and choice.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(schema.choices[0].message.content), ENUMS)
    assert schema.choices[0].finish_reason == "stop" and schema.usage.completion_tokens < 50
    finish = [c.choices[0].finish_reason for c in chat(client, stream=True, extra_body={
        "guided_choice": ["yes", "no"], "min_tokens": 5}, **kw)() if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
