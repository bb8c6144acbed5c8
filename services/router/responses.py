"""OpenAI's Responses API (POST /v1/responses, GET / DELETE /v1/responses/{id}; torch-free).

A response is a chat completion under another schema, so this module only translates:

    request:  instructions + the stored conversation of previous_response_id + input items
              -> chat messages (input_text parts joined; function_call -> an assistant tool call;
              function_call_output -> a tool message), flat function tools -> chat tools,
              text.format -> response_format, max_output_tokens -> max_tokens
              -> the chat endpoint's own preparation (template, grammar, length checks, the job)
    answer:   the choice's text -> output items: a `message` with one `output_text` part and/or
              `function_call` items (tool calls parsed as chat parses them); finish "length" ->
              status "incomplete" (reason max_output_tokens); finish "abort" (the server aborted it:
              a shutdown's grace period ran out) -> status "cancelled", as vLLM reports an aborted
              response (no error object: nothing failed; its items "incomplete")
    stream:   typed SSE events (`event: <type>` + JSON with a sequence_number): response.created,
              .in_progress, then per item output_item.added, content_part.added, output_text.delta
              ... .done (function calls: function_call_arguments.delta / .done), and
              response.completed or response.incomplete (a cancelled response: response.completed
              carrying status "cancelled": OpenAI defines no stream event for that status, and
              vLLM ends every stream so, as OpenAI's Realtime API ends a cancelled response with
              response.done; an unknown event type would reach the `openai` client untyped); an
              error after the stream started is an `error` event

Stored responses (store: true, OpenAI's default) keep their conversation, so previous_response_id
continues it and GET returns it: `pdserve serve` in memory (the newest STORE_CAPACITY), `pdserve
router` in the fleet's Redis for --response-store-ttl (every router process and replica sees them).
An id the store does not hold is a 404. Not supported (400 naming the field): n > 1 (no such
field here), non-function tools, background mode, input content other than text.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import OrderedDict
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from pdserve.common.outputs import CompletionOutput, RequestOutput
from pdserve.common.sampling_params import ParameterError
from pdserve.services.router import openai_schema as oa
from pdserve.services.router.tool_calls import ToolPlan, plan_tools

# `server` arguments are app.OpenAIServer instances (not imported: app imports this module)

log = logging.getLogger("pdserve.api")

STORE_CAPACITY = 1024  # stored responses of a `pdserve serve` process (oldest dropped first)
STORE_TTL_S = 3600.0  # a router's stored responses live this long in Redis (--response-store-ttl)
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(oa._SamplingRequest):
    """OpenAI's fields; the sampling extras of chat (seed, top_k, stop, ...) are accepted too."""
    input: str | list[dict]
    instructions: str | None = None
    max_output_tokens: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    text: dict | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    metadata: dict | None = None
    parallel_tool_calls: bool = True


class ResponseStore:
    """In memory (`pdserve serve`): response id -> (the response's JSON object, its conversation as
    chat messages), the newest `capacity` kept."""

    def __init__(self, capacity: int = STORE_CAPACITY):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    async def put(self, response: dict, conversation: list[dict]) -> None:
        self._items[response["id"]] = (response, conversation)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    async def get(self, response_id: str, param: str = "response_id") -> tuple[dict, list[dict]]:
        found = self._items.get(response_id)
        if found is None:
            raise _not_found(response_id, param, f"responses are kept in memory, the newest {self.capacity} of "
                                                 "this server")
        return found

    async def delete(self, response_id: str) -> None:
        await self.get(response_id)
        del self._items[response_id]

    async def close(self) -> None:
        pass


class RedisResponseStore:
    """In the fleet's Redis (`pdserve router`): every router process, and a restarted one, sees the
    same responses, so previous_response_id works whichever process (--workers) or replica a
    connection reaches. Key {ns}:response:{id} = JSON {"response", "conversation"}, expiring
    `ttl_s` after it was written. Redis down: a get or delete is 503; a put is logged and the
    response answers with "store": false (it was generated; it is only not kept)."""

    def __init__(self, redis_url: str, ttl_s: float, namespace: str = "pdserve"):
        from pdserve.common.registry import open_redis
        self._redis = open_redis(redis_url)
        self._prefix = f"{namespace}:response:"
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.ttl_s = ttl_s

    async def put(self, response: dict, conversation: list[dict]) -> None:
        body = json.dumps({"response": response, "conversation": conversation}, ensure_ascii=False)
        await self._call(self._redis.set(self._prefix + response["id"], body, px=self.ttl_ms))

    async def get(self, response_id: str, param: str = "response_id") -> tuple[dict, list[dict]]:
        raw = await self._call(self._redis.get(self._prefix + response_id))
        if raw is None:
            raise _not_found(response_id, param, f"stored responses expire {self.ttl_s:g} s after they were made "
                                                 "(--response-store-ttl)")
        stored = json.loads(raw)
        return stored["response"], stored["conversation"]

    async def delete(self, response_id: str) -> None:
        if not await self._call(self._redis.delete(self._prefix + response_id)):
            raise _not_found(response_id, "response_id", "it expired or was never stored")

    async def close(self) -> None:
        await self._redis.aclose()

    @staticmethod
    async def _call(op):
        from redis.exceptions import RedisError
        try:
            return await op
        except RedisError as e:
            raise StoreUnavailable(f"the response store (Redis) is unavailable: {e}") from e


class StoreUnavailable(Exception):
    pass


def _not_found(response_id: str, param: str, why: str):
    from pdserve.services.router.errors import APIError
    return APIError(404, f"Response with id '{response_id}' not found ({why}).", param=param,
                    code="response_not_found")


def _unavailable(e: StoreUnavailable):
    from pdserve.services.router.errors import APIError
    return APIError(503, str(e), type="server_error", code="store_unavailable")


# ---- the request -> a chat request ---------------------------------------------------------------
def input_messages(req: ResponsesRequest) -> list[dict]:
    """The request's `input` as chat messages (OpenAI's message dicts)."""
    if isinstance(req.input, str):
        if not req.input:
            raise ParameterError("input", "the input is empty")
        return [{"role": "user", "content": req.input}]
    if not req.input:
        raise ParameterError("input", "the input is empty: give a string or at least one item")
    messages: list[dict] = []
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise ParameterError(f"{where}.role", f"role must be user, system, developer or assistant, got {role!r}")
            messages.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", where), "type": "function",
                    "function": {"name": _field(item, "name", where), "arguments": _field(item, "arguments", where)}}
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls") is not None:
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                output = _text_of(output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where), "content": output})
        else:
            raise ParameterError(f"{where}.type", f"input items of type {kind!r} are not supported (message, "
                                                  "function_call, function_call_output)")
    return messages


def _field(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ParameterError(f"{where}.{key}", f"{key} must be a string")
    return value


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ParameterError(where, "content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ParameterError(f"{where}[{j}]", f"content part of type {kind!r} is not supported (text only)")
        texts.append(part["text"])
    return "\n".join(texts)


def chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """Responses' flat function tools -> chat's {"type": "function", "function": {...}}."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise ParameterError(f"tools[{i}].type", f"tools of type {tool.get('type')!r} are not supported "
                                                     "(function tools only)")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function" and "function" not in choice:
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def response_format(text: dict | None) -> dict | None:
    """text.format -> chat's response_format."""
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                       if k in fmt}}
    raise ParameterError("text.format", f"text.format.type must be text, json_object or json_schema, "
                                        f"got {fmt.get('type')!r}")


def to_chat_request(req: ResponsesRequest, history: list[dict]) -> oa.ChatCompletionRequest:
    if req.background:
        raise ParameterError("background", "background responses are not supported: leave background false")
    if req.prompt_logprobs is not None:
        raise ParameterError("prompt_logprobs", "a response carries no prompt logprobs: ask /v1/completions or "
                                                "/v1/chat/completions for them")
    if req.response_format is not None and req.text is not None:
        raise ParameterError("text.format", "give the output format as text.format only (not response_format)")
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history \
        + input_messages(req)
    body = req.model_dump(exclude={"input", "instructions", "max_output_tokens", "tools", "tool_choice", "text",
                                   "previous_response_id", "store", "background", "metadata",
                                   "stream_options"}, exclude_none=True)
    body.update(messages=messages, max_tokens=req.max_output_tokens, tools=chat_tools(req.tools),
                tool_choice=chat_tool_choice(req.tool_choice))
    fmt = response_format(req.text)
    if fmt is not None:
        body["response_format"] = fmt
    try:
        return oa.ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise ParameterError("input", f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


# ---- the answer ----------------------------------------------------------------------------------
def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class _Answer:
    """One response's state: its request, conversation, items so far and the JSON object."""

    def __init__(self, server: "OpenAIServer", req: ResponsesRequest, tools: ToolPlan, prompt_ids: list[int],
                 response_id: str):
        self.server, self.req, self.tools = server, req, tools
        self.id = response_id
        self.created_at = int(time.time())
        self.prompt_ids = prompt_ids
        self.output: list[dict] = []
        self.usage: dict | None = None

    def response(self, status: str, finish: CompletionOutput | None = None, out: RequestOutput | None = None) -> dict:
        req = self.req
        incomplete = status == "incomplete"
        if finish is not None:
            cached = out.num_cached_tokens if out is not None else 0
            self.usage = {"input_tokens": len(self.prompt_ids), "input_tokens_details": {"cached_tokens": cached},
                          "output_tokens": len(finish.token_ids), "output_tokens_details": {"reasoning_tokens": 0},
                          "total_tokens": len(self.prompt_ids) + len(finish.token_ids)}
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "error": None, "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
                "model": self.server.model_name, "output": self.output,
                "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": req.previous_response_id,
                "temperature": 1.0 if req.temperature is None else req.temperature,
                "top_p": 1.0 if req.top_p is None else req.top_p,
                "tool_choice": req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none"),
                "tools": req.tools or [], "text": req.text or {"format": {"type": "text"}},
                "metadata": req.metadata or {}, "store": req.store, "usage": self.usage}

    async def finish(self, status: str, finish: CompletionOutput, out: RequestOutput, history: list[dict]) -> dict:
        """The final object; stored with its conversation when asked."""
        body = self.response(status, finish, out)
        if self.req.store:  # instructions are not carried over (OpenAI's rule); the input is
            try:
                await self.server.responses.put(body, history + input_messages(self.req) + _as_messages(self.output))
            except StoreUnavailable as e:
                log.warning("response %s not stored: %s", self.id, e)
                body["store"] = False
        return body


def _as_messages(output: list[dict]) -> list[dict]:
    """Output items -> the assistant turn as chat messages (for previous_response_id)."""
    text = "".join(part["text"] for item in output if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                       "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    msg: dict = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        msg["tool_calls"] = calls
    return [msg]


def _status(c: CompletionOutput) -> str:
    """finish_reason -> the response's status. "abort" is a request the server ended before its end
    (`serve` / the router shutting down): "cancelled", as vLLM reports it, not "failed", which
    OpenAI keeps for a response with an error."""
    return {"length": "incomplete", "abort": "cancelled"}.get(c.finish_reason, "completed")


# ---- the endpoint --------------------------------------------------------------------------------
async def create(server: "OpenAIServer", request: Request) -> Response:
    from pdserve.services.router.errors import _json_obj, _parse
    req = await _parse(request, ResponsesRequest, server.limits.max_request_body_bytes)
    server.check_model(req.model)
    history = (await _stored(server, req.previous_response_id, "previous_response_id"))[1] \
        if req.previous_response_id else []
    chat = to_chat_request(req, history)
    tools = plan_tools(chat.tools, chat.tool_choice, server.tool_call_parser, server.enable_auto_tool_choice,
                       chat.parallel_tool_calls)
    try:
        params = chat.to_sampling_params(tools.structured_outputs(), server.sampling_defaults, server.check_params)
    except ParameterError as e:  # named as this API names them
        renamed = {"max_tokens": "max_output_tokens"}.get(e.param)
        if e.param.startswith("response_format"):  # response_format.json_schema.name -> text.format.name
            renamed = "text.format" + e.param.removeprefix("response_format").removeprefix(".json_schema")
        if renamed is None:
            raise
        raise ParameterError(renamed, str(e).replace(e.param, renamed)) from None
    if params.n != 1:
        raise ParameterError("n", "a response has one output: n must be 1")
    text = server.render_chat(chat.template_messages(), chat.tools, True, chat.chat_template_kwargs,
                              offer_tools=tools.mode != "none")
    ids = server._truncate(await server._encode(text, False, "input"), chat)
    server._check_length(ids, params, "input", "max_output_tokens")
    job = server._job("resp_", [(text, ids)], params)  # (OpenAI's ids: resp_...)
    answer = _Answer(server, req, tools, ids, job.request_id)

    async def whole(finals: list[RequestOutput]) -> Response:
        out = finals[0]
        c = out.outputs[0]
        content, calls = (c.text, []) if tools.mode == "none" else tools.parse(c.text)
        status = _status(c)
        item_status = "completed" if status == "completed" else "incomplete"
        if content or not calls:
            answer.output.append(message_item(_id("msg"), content or "", item_status))
        for call in calls:
            answer.output.append(call_item(_id("fc"), call.id, call.function.name, call.function.arguments,
                                           item_status))
        return _json_obj(await answer.finish(status, c, out, history))
    return await server.answer(request, job, req.stream, lambda firsts: _events(server, job, answer, firsts, history),
                               whole)


async def _events(server: "OpenAIServer", job, answer: _Answer, firsts: list[RequestOutput],
                  history: list[dict]) -> AsyncIterator[str]:
    """The SSE body (see the module's docstring)."""
    from pdserve.services.router.errors import as_api_error
    seq = 0

    def event(kind: str, **fields) -> str:
        nonlocal seq
        data = json.dumps({"type": kind, "sequence_number": seq, **fields}, ensure_ascii=False)
        seq += 1
        return f"event: {kind}\ndata: {data}\n\n"

    stream = answer.tools.stream() if answer.tools.mode != "none" else None
    message: dict | None = None  # the open message item (its text so far in content[0])
    call: dict | None = None  # the open function_call item
    calls: dict[int, dict] = {}  # tool call index -> its item

    def open_message() -> list[str]:
        nonlocal message
        message = message_item(_id("msg"), "", "in_progress")
        answer.output.append(message)
        index = len(answer.output) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [event("response.output_item.added", output_index=index, item={**message, "content": []}),
                event("response.content_part.added", item_id=message["id"], output_index=index, content_index=0,
                      part=part)]

    def close_message(status: str) -> list[str]:
        nonlocal message
        if message is None:
            return []
        index, text = answer.output.index(message), message["content"][0]["text"]
        message["status"] = status
        done = [event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                      text=text, logprobs=[]),
                event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                      part=message["content"][0]),
                event("response.output_item.done", output_index=index, item=message)]
        message = None
        return done

    def close_call(status: str) -> list[str]:
        nonlocal call
        if call is None:
            return []
        index = answer.output.index(call)
        call["status"] = status
        done = [event("response.function_call_arguments.done", item_id=call["id"], output_index=index,
                      arguments=call["arguments"]),
                event("response.output_item.done", output_index=index, item=call)]
        call = None
        return done

    try:
        yield event("response.created", response=answer.response("in_progress"))
        yield event("response.in_progress", response=answer.response("in_progress"))
        sent = 0
        last = firsts[0]
        async with aclosing(server._outputs(job, firsts)) as outputs:
            async for _, out in outputs:
                last = out
                c = out.outputs[0]
                new, sent = c.text[sent:], len(c.text)
                final = c.finish_reason is not None
                content, deltas = (new, []) if stream is None else stream.feed(new, final)
                if content:
                    for e in close_call("completed"):
                        yield e
                    if message is None:
                        for e in open_message():
                            yield e
                    message["content"][0]["text"] += content
                    yield event("response.output_text.delta", item_id=message["id"],
                                output_index=answer.output.index(message), content_index=0, delta=content,
                                logprobs=[])
                for d in deltas:
                    if d.id is not None:  # a new call
                        for e in close_message("completed") + close_call("completed"):
                            yield e
                        call = call_item(_id("fc"), d.id, d.function.name, "", "in_progress")
                        calls[d.index] = call
                        answer.output.append(call)
                        yield event("response.output_item.added", output_index=len(answer.output) - 1, item=call)
                    piece = d.function.arguments if d.function is not None else None
                    if piece:
                        target = calls[d.index]
                        target["arguments"] += piece
                        yield event("response.function_call_arguments.delta", item_id=target["id"],
                                    output_index=answer.output.index(target), delta=piece)
                if final:
                    break
        c = last.outputs[0]
        status = _status(c)
        if not answer.output:  # nothing generated: an empty message, as the whole answer has
            for e in open_message():
                yield e
        item_status = "completed" if status == "completed" else "incomplete"
        for e in close_message(item_status) + close_call(item_status):
            yield e
        body = await answer.finish(status, c, last, history)
        yield event("response.incomplete" if status == "incomplete" else "response.completed", response=body)
    except Exception as e:
        job.close_trackers("error")
        err = as_api_error(e)
        yield event("error", code=err.code or err.type, message=err.message, param=err.param)
    finally:
        job.close_trackers("abort")  # a no-op once finished


async def _stored(server: "OpenAIServer", response_id: str, param: str = "response_id") -> tuple[dict, list[dict]]:
    try:
        return await server.responses.get(response_id, param)
    except StoreUnavailable as e:
        raise _unavailable(e) from None


async def retrieve(server: "OpenAIServer", response_id: str) -> dict:
    return (await _stored(server, response_id))[0]


async def delete(server: "OpenAIServer", response_id: str) -> dict:
    try:
        await server.responses.delete(response_id)
    except StoreUnavailable as e:
        raise _unavailable(e) from None
    return {"id": response_id, "object": "response.deleted", "deleted": True}
