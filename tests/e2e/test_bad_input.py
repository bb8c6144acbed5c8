"""Every bad input is a 4xx with an OpenAI error body naming the parameter, identically on
`pdserve serve` and on the router of a disaggregated stack (real processes), and a bad request
beside good ones fails alone."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from servers import ServeProcess
from stack import Stack

MAX_LEN = 256
BODY_LIMIT = 100_000
BIG = 2**40
FLAGS = ("--max-model-len", str(MAX_LEN))
LIMIT_FLAGS = ("--max-request-body-bytes", str(BODY_LIMIT))

C = "/v1/completions"
CH = "/v1/chat/completions"
BASE = {"model": "tiny", "prompt": "Hello there", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def c(**kw):
    return (C, {**BASE, **kw})


def ch(**kw):
    return (CH, {**CHAT, **kw})


def without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


# (path, body or raw bytes, status, param) -- param None: not checked (the body is not a request)
CASES = [
    (*c(temperature=-0.5), 400, "temperature"), (*c(temperature=3.5), 400, "temperature"),
    (C, b'{"model": "tiny", "prompt": "hi", "temperature": 1e999}', 400, "temperature"),
    (*c(top_p=0), 400, "top_p"), (*c(top_p=1.5), 400, "top_p"), (*c(top_k=-2), 400, "top_k"),
    (*c(top_k=BIG), 400, "top_k"), (*c(min_p=2), 400, "min_p"), (*c(n=0), 400, "n"), (*c(n=1000), 400, "n"),
    (*c(n=129), 400, "n"), (*c(n="two"), 400, "n"), (*c(max_tokens=0), 400, "max_tokens"),
    (*c(max_tokens=-1), 400, "max_tokens"), (*c(max_tokens=BIG), 400, "max_tokens"),
    (*c(max_tokens=100_000), 400, "max_tokens"), (*c(min_tokens=5, max_tokens=2), 400, "min_tokens"),
    (*c(min_tokens=BIG, max_tokens=None), 400, "min_tokens"), (*c(min_tokens=10_000, max_tokens=None), 400, "min_tokens"),
    (*c(min_tokens=-1), 400, "min_tokens"), (*c(seed=2**70), 400, "seed"), (*c(seed=-(2**70)), 400, "seed"),
    (*c(seed="x"), 400, "seed"), (*c(presence_penalty=3), 400, "presence_penalty"),
    (*c(frequency_penalty=-3), 400, "frequency_penalty"), (*c(repetition_penalty=0), 400, "repetition_penalty"),
    (C, b'{"model": "tiny", "prompt": "hi", "repetition_penalty": 1e999}', 400, "repetition_penalty"),
    (*c(logprobs=50), 400, "logprobs"), (*c(logprobs=-1), 400, "logprobs"), (*c(stop=[""]), 400, "stop"),
    (*c(stop=5), 400, "stop"), (*c(stop_token_ids=[BIG]), 400, "stop_token_ids"),
    (*c(stop_token_ids=[-1]), 400, "stop_token_ids"), (*c(prompt=""), 400, "prompt"), (*c(prompt=[]), 400, "prompt"),
    (*c(prompt=[BIG]), 400, "prompt"), (*c(prompt=[-5]), 400, "prompt"), (*c(prompt=[1.5]), 400, "prompt"),
    (C, without(BASE, "prompt"), 400, "prompt"), (*c(prompt="word " * 1000), 400, "prompt"),
    (*c(prompt="x" * 90_000), 400, "prompt"), (*c(suffix="tail"), 400, "suffix"), (*c(best_of=3), 400, "best_of"),
    (*c(echo=True, logprobs=30), 400, "logprobs"), (*c(model="other"), 404, "model"), (*c(stream=5), 400, "stream"),
    (*c(ignore_eos="maybe"), 400, "ignore_eos"), (C, b"{not json", 400, None), (C, b"[1, 2]", 400, None),
    (C, b'{"model": "tiny", "prompt": "' + b"a" * (BODY_LIMIT + 10) + b'"}', 413, None),
    (*ch(messages=[]), 400, "messages"), (CH, without(CHAT, "messages"), 400, "messages"),
    (*ch(messages=[{"role": "user"}]), 400, "messages[0].content"),
    (*ch(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    (*ch(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    (*ch(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400, "messages[0].content[0]"),
    (*ch(messages=[{"role": "system", "content": None}, {"role": "user", "content": "x"}]), 400, "messages[0].content"),
    (*ch(messages=[{"role": "tool", "content": "42"}]), 400, "messages[0].tool_call_id"),
    (*ch(messages=[{"role": "user", "content": "x"}, {"role": "assistant"}]), 400, "messages[1].content"),
    (*ch(top_logprobs=5), 400, "top_logprobs"), (*ch(logprobs=True, top_logprobs=30), 400, "top_logprobs"),
    (*ch(max_completion_tokens=0), 400, "max_completion_tokens"), (*ch(max_tokens=-5), 400, "max_tokens"),
    (*ch(max_completion_tokens=100_000), 400, "max_completion_tokens"), (*ch(max_tokens=100_000), 400, "max_tokens"),
    (*ch(temperature=9), 400, "temperature"), (*ch(n=129), 400, "n"), (*ch(seed=2**64), 400, "seed"),
    (*ch(response_format={"type": "bogus"}), 400, "response_format"),
    (*ch(messages=[{"role": "user", "content": "word " * 1000}]), 400, "messages"),
    (*ch(stop_token_ids=[BIG]), 400, "stop_token_ids"), (*ch(model="other"), 404, "model"),
    # a request's own chat template is refused, as vLLM refuses it by default (it was silently not used)
    (*ch(chat_template="{{ messages[0].content }}"), 400, "chat_template"),
    (*ch(chat_template_kwargs={"chat_template": "{{ messages[0].content }}"}), 400, "chat_template"),
    ("/tokenize", {"model": "tiny", "messages": CHAT["messages"], "chat_template": "x"}, 400, "chat_template"),
]


@pytest.fixture(scope="module")
def servers(tiny_models):
    serve = ServeProcess("--model", tiny_models["llama"], "--served-model-name", "tiny", "tiny-alias", "--num-gpu-blocks-override",
                         "256", *FLAGS, *LIMIT_FLAGS).start()
    stack = Stack(tiny_models["llama"], prefill=[list(FLAGS)], decode=[list(FLAGS)],
                  router_flags=("--disagg-min-prompt-tokens", "0", "--served-model-name", "tiny", "tiny-alias",
                                *LIMIT_FLAGS))
    serve.wait_ready()
    yield {"serve": serve.url, "router": stack.base_url}
    serve.close()
    stack.close()


@pytest.mark.parametrize("where", ["serve", "router"])
def test_bad_input_table(servers, where):
    assert len(CASES) >= 60
    failures = []
    with httpx.Client(base_url=servers[where], timeout=30) as http:
        for path, body, status, param in CASES:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(path, content=raw, headers={"content-type": "application/json"})
            label = f"{path} {raw[:90]!r}"
            if r.status_code != status:
                failures.append(f"{label}: {r.status_code} (want {status}) {r.text[:200]}")
                continue
            error = r.json().get("error", {})
            if not error.get("message") or not error.get("type"):
                failures.append(f"{label}: no OpenAI error body: {r.text[:200]}")
            elif param is not None and error.get("param") != param:
                failures.append(f"{label}: param {error.get('param')!r} (want {param!r})")
        for method, path, status in (("GET", "/v1/models/other", 404), ("GET", "/v1/nothing", 404),
                                     ("GET", C, 405)):
            r = http.request(method, path)
            if r.status_code != status or "error" not in r.json():
                failures.append(f"{method} {path}: {r.status_code} (want {status}) {r.text[:200]}")
            if status == 405 and r.headers.get("allow") != "POST":  # HTTP's rule: a 405 says what is allowed
                failures.append(f"{method} {path}: 405 without Allow: POST ({dict(r.headers)})")
    assert not failures, "\n".join(failures)


def test_admin_role_rejects_malformed_bodies(servers):
    with httpx.Client(base_url=servers["router"], timeout=30) as http:
        for raw, status in ((b"{not json", 400), (b"[1]", 400), (b'{"role": "chef"}', 400),
                            (b'{"role": "decode", "timeout_s": "soon"}', 400),
                            (b'{"role": "decode", "timeout_s": -1}', 400)):
            r = http.post("/admin/instances/decode-0/role", content=raw)
            assert r.status_code == status, (raw, r.text)
        assert http.post("/admin/instances/nobody/drain").status_code == 404


@pytest.mark.parametrize("where", ["serve", "router"])
def test_a_bad_request_fails_alone(servers, where):
    """A poison request (a seed no generator takes) beside 4 good streams: 400 for it alone."""
    async def run():
        c = openai.AsyncOpenAI(base_url=servers[where] + "/v1", api_key="none", max_retries=0, timeout=60)

        async def good(i):
            text = ""
            async for chunk in await c.completions.create(model="tiny", prompt=f"Story {i}:", max_tokens=12,
                                                          temperature=0.7, seed=i, stream=True,
                                                          extra_body={"ignore_eos": True}):
                text += chunk.choices[0].text if chunk.choices else ""
            return text

        async def poison():
            with pytest.raises(openai.BadRequestError) as e:
                await c.completions.create(model="tiny", prompt="Story:", max_tokens=12, seed=2**70)
            return e.value.body["param"] if isinstance(e.value.body, dict) else None
        return await asyncio.gather(*(good(i) for i in range(4)), poison())
    *texts, param = asyncio.run(run())
    assert all(texts) and param == "seed"


def test_serve_and_router_answer_alike(servers):
    """Answers the router builds from its workers' messages are the ones `pdserve serve` gives: a
    one-token prompt's prompt_logprobs are [null] (the router answered []), a parameter a worker
    refuses is worded as serve words it (the router repeated the param: "logit_bias: token id
    ..."), with continuous_usage_stats the role chunk carries the prompt's usage too (vLLM's; it
    had none, on both), and a request the context cannot hold is refused in OpenAI's words."""
    answers = {}
    for where, url in servers.items():
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        one = c.completions.create(model="tiny", prompt=[1], max_tokens=2, extra_body={"prompt_logprobs": 1})
        assert one.choices[0].model_extra["prompt_logprobs"] == [None], where
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="hi", max_tokens=2, logit_bias={"999999": 1})
        answers[where] = (e.value.body["param"], e.value.body["message"])
        with pytest.raises(openai.BadRequestError) as e:  # OpenAI's (and vLLM's) words
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=MAX_LEN)
        prompt_tokens = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=1).usage.prompt_tokens
        assert e.value.body["message"] == (
            f"This model's maximum context length is {MAX_LEN} tokens. However, you requested "
            f"{prompt_tokens + MAX_LEN} tokens ({prompt_tokens} in the messages, {MAX_LEN} in the completion). "
            "Please reduce the length of the messages or completion."), where
        assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "max_tokens"
        chunks = list(c.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=2, stream=True,
                                                stream_options={"include_usage": True,
                                                                "continuous_usage_stats": True}))
        assert chunks[0].choices[0].delta.role == "assistant", where
        assert all(ch.usage is not None for ch in chunks), (where, chunks)
        prompt_tokens = chunks[-1].usage.prompt_tokens
        assert (chunks[0].usage.prompt_tokens, chunks[0].usage.completion_tokens) == (prompt_tokens, 0), where
    assert answers["serve"] == answers["router"] and answers["serve"][0] == "logit_bias"
    assert not answers["serve"][1].startswith("logit_bias:"), answers


def test_models_root_is_the_model_path(servers, tiny_models):
    """/v1/models: `id` is the served name, `root` the model as --model gave it (vLLM's); root
    was the served name too. Requests may name the model by that path (a 404 before)."""
    for where, url in servers.items():
        card = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).models.retrieve("tiny")
        assert (card.id, card.model_extra["root"], card.model_extra["max_model_len"]) == \
            ("tiny", tiny_models["llama"], MAX_LEN), where
        # the model path names it too (vLLM serves a model under its path by default): not a 404
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        out = c.completions.create(model=tiny_models["llama"], prompt="Hi", max_tokens=2)
        assert out.model == "tiny" and out.choices[0].text is not None, where
        assert c.models.retrieve(tiny_models["llama"]).id == "tiny"
        # vLLM's card fields that clients written for it read: parent, permission
        listed = httpx.get(url + "/v1/models").json()["data"][0]
        assert listed["parent"] is None and listed["permission"][0]["object"] == "model_permission", where
        assert listed["permission"][0]["allow_sampling"] is True and listed["owned_by"] == "pdserve", where
        # --served-model-name tiny tiny-alias (vLLM's): a card each, either name answers as the first
        assert [m.id for m in c.models.list().data] == ["tiny", "tiny-alias"], where
        assert c.models.retrieve("tiny-alias").id == "tiny-alias", where
        out = c.chat.completions.create(model="tiny-alias", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert out.model == "tiny", where
        with pytest.raises(openai.NotFoundError, match="tiny-alias"):
            c.completions.create(model="tiny-other", prompt="Hi", max_tokens=2)
        # vLLM's /ping (GET or POST): the health check under SageMaker's name
        assert httpx.get(url + "/ping").status_code == 200 and httpx.post(url + "/ping").status_code == 200, where
