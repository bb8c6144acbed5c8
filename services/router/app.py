"""The OpenAI-compatible HTTP front end over any `EngineClient` (torch-free).

    POST /v1/completions | /v1/chat/completions | /v1/responses (services/router/responses.py)
      parse (pydantic; unknown fields ignored) -> SamplingParams -> chat template -> token ids
      -> one engine.generate() per prompt, each yielding cumulative RequestOutputs
      -> wait for every prompt's first output (so bad input and a dead engine are HTTP errors)
      -> JSON response, or Server-Sent Events: per choice, text[len(sent):] and the new logprobs
    GET /v1/models, /health (also /ping, GET or POST), /metrics, /version; POST /tokenize, /detokenize (vLLM's,
    services/router/tokenize.py)

`pdserve serve` passes the in-process AsyncLLM, `pdserve router` the disaggregated client: both
expose the same API because this module only sees the protocol. The two endpoints differ only in
how a choice is rendered (`_CompletionFormat`, `_ChatFormat`); the engine streams, cancellation,
SSE framing, usage and metrics are shared.

Cancellation: a client that goes away cancels the work. While the handler waits (first output, or
the whole non-streaming answer) a watcher on the ASGI receive channel cancels it; during a stream
Starlette cancels the body and `_EventStream` closes it however it ends. Closing the engine's async
iterator aborts the request there, so its KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pdserve.common.engine_client import EngineClient, EngineDeadError
from pdserve.common.outputs import CompletionOutput, RequestOutput
from pdserve.common.sampling_params import DEFAULT_MAX_LOGPROBS, ParameterError, SamplingParams, check_logprobs
from pdserve.services.router import openai_schema as oa
from pdserve.services.router.limits import Limits
from pdserve.common.metrics import RequestTracker, ServerMetrics, StatsCollector
from pdserve.services.router import responses
from pdserve.services.router.errors import APIError, InternalErrors, _json, _json_obj, _parse, as_api_error  # noqa: F401
from pdserve.services.router import tokenize as tk
from pdserve.services.router.tool_calls import ToolPlan, hermes_messages, plan_tools

log = logging.getLogger("pdserve.api")

LONG_TEXT_CHARS = 16384  # longer texts are tokenized off the event loop


class _ClientGone(Exception):
    pass


@dataclass
class _Job:
    """One API request: its prompts (each one engine request with n choices) and engine streams."""
    request_id: str
    model: str
    prompts: list[tuple[str | None, list[int]]]  # (text if known, token ids)
    params: SamplingParams
    trackers: list[RequestTracker]
    created: int = field(default_factory=lambda: int(time.time()))
    gens: list = field(default_factory=list)
    pumps: list[asyncio.Task] = field(default_factory=list)

    def close_trackers(self, reason: str) -> None:
        for tracker in self.trackers:
            tracker.close(reason)


@dataclass
class _Sent:
    """How much of one choice the client has: fresh for a whole answer, advanced while streaming."""
    num_chars: int = 0
    num_logprobs: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False
    tool_stream: object = None  # tool_calls.ToolStream of this choice (chat with tools)


class _CompletionFormat:
    response_cls = chunk_cls = oa.CompletionResponse

    def __init__(self, req: oa.CompletionRequest, job: _Job, tokenizer, decode_one):
        self.req, self.job, self.tokenizer, self.decode_one = req, job, tokenizer, decode_one

    def delta(self, i: int, out: RequestOutput, c: CompletionOutput, sent: _Sent):
        req, text, lps = self.req, "", None
        if not sent.started:
            sent.started = True
            if req.echo:  # the prompt (and its logprobs) lead the choice
                prompt_text, prompt_ids = self.job.prompts[i]
                text = prompt_text if prompt_text is not None else self.tokenizer.decode(prompt_ids)
                if req.logprobs is not None:
                    entries = out.prompt_logprobs or [None] * len(prompt_ids)
                    lps, sent.text_offset = oa.completion_logprobs(prompt_ids, entries, 0, self.decode_one)
        if req.scoring_only:
            return text, lps
        text += c.text[sent.num_chars:]
        sent.num_chars = len(c.text)
        if req.logprobs is not None and c.logprobs and len(c.logprobs) > sent.num_logprobs:
            new = c.logprobs[sent.num_logprobs:]
            ids = c.token_ids[sent.num_logprobs:sent.num_logprobs + len(new)]
            piece, sent.text_offset = oa.completion_logprobs(ids, new, sent.text_offset, self.decode_one)
            sent.num_logprobs += len(new)
            lps = piece if lps is None else lps.extend(piece)
        return text, lps

    def choice(self, index: int, text: str | None, lps=None, c: CompletionOutput | None = None):
        return oa.CompletionChoice(index=index, text=text or "", logprobs=lps, finish_reason=c and c.finish_reason,
                                   stop_reason=c and c.stop_reason)

    full_choice = choice

    def head(self) -> list:
        return []

    def num_completion_tokens(self, outs: list[RequestOutput]) -> int:
        return 0 if self.req.scoring_only else sum(len(c.token_ids) for out in outs if out for c in out.outputs)


class _ChatFormat:
    """Chat choices; with tools (tool_choice other than none) the text becomes tool calls: a
    stream's deltas go through the choice's ToolStream, a whole answer through ToolPlan.parse."""
    response_cls, chunk_cls = oa.ChatCompletionResponse, oa.ChatCompletionChunk

    def __init__(self, req: oa.ChatCompletionRequest, decode_one, tools: ToolPlan | None = None):
        self.req, self.decode_one = req, decode_one
        self.num_top = req.top_logprobs or 0
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.called: set[int] = set()  # choices that streamed a tool call
        self.echoed = req.echoed()  # vLLM's echo: leads each choice's content

    def delta(self, i: int, out: RequestOutput, c: CompletionOutput, sent: _Sent):
        text, lps = c.text[sent.num_chars:], None
        sent.num_chars = len(c.text)
        if self.req.logprobs and c.logprobs and len(c.logprobs) > sent.num_logprobs:
            new = c.logprobs[sent.num_logprobs:]
            ids = c.token_ids[sent.num_logprobs:sent.num_logprobs + len(new)]
            lps = oa.chat_logprobs(ids, new, self.num_top, self.decode_one)
            sent.num_logprobs += len(new)
        if self.tools is not None:  # -> a DeltaMessage of content and tool calls, or None
            sent.tool_stream = sent.tool_stream or self.tools.stream()
            content, calls = sent.tool_stream.feed(text, c.finish_reason is not None)
            if calls:
                self.called.add(i * self.req.n + c.index)
            text = oa.DeltaMessage(content=content or None, tool_calls=calls or None) if content or calls else None
        return text, lps

    def choice(self, index: int, text: str | oa.DeltaMessage | None, lps=None, c: CompletionOutput | None = None):
        """A stream choice: text None is the finishing chunk's empty delta."""
        delta = text if isinstance(text, oa.DeltaMessage) else oa.DeltaMessage(content=text)
        return oa.ChatStreamChoice(index=index, delta=delta, logprobs=lps,
                                   finish_reason=c and self._finish_reason(c, index in self.called),
                                   stop_reason=c and c.stop_reason)

    def full_choice(self, index: int, text: str, lps, c: CompletionOutput) -> oa.ChatChoice:
        if self.req.logprobs and lps is None:
            lps = oa.ChatLogprobs(content=[])
        content, calls = (text, []) if self.tools is None else self.tools.parse(c.text)
        if self.echoed:
            content = self.echoed + (content or "")
        return oa.ChatChoice(index=index, message=oa.ChatResponseMessage(content=content, tool_calls=calls),
                             logprobs=lps, finish_reason=self._finish_reason(c, bool(calls)), stop_reason=c.stop_reason)

    def _finish_reason(self, c: CompletionOutput, called: bool) -> str | None:
        """"tool_calls" when the model stopped after calling tools (a named tool_choice stays
        "stop", as OpenAI answers it)."""
        if called and c.finish_reason == "stop" and self.tools.mode != "named":
            return "tool_calls"
        return c.finish_reason

    def head(self) -> list:
        """Per choice its role chunk; with echo, then the echoed text (vLLM's order)."""
        roles = [oa.ChatStreamChoice(index=i, delta=oa.DeltaMessage(role="assistant", content=""))
                 for i in range(self.req.n)]
        echoes = [oa.ChatStreamChoice(index=i, delta=oa.DeltaMessage(content=self.echoed)) for i in range(self.req.n)]
        return roles + echoes if self.echoed else roles

    def num_completion_tokens(self, outs: list[RequestOutput]) -> int:
        return sum(len(c.token_ids) for out in outs if out for c in out.outputs)


class OpenAIServer:
    def __init__(self, engine: EngineClient, served_model_name: str, metrics: ServerMetrics,
                 limits: Limits = Limits(), tool_call_parser: str | None = None,
                 enable_auto_tool_choice: bool = False):
        self.engine = engine
        self.limits = limits
        self.num_pending = 0  # requests submitted whose first output has not arrived
        self.model_name = served_model_name
        self.metrics = metrics
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        vocab = getattr(self.tokenizer, "max_token_chars", None)
        self.max_token_chars = vocab if vocab else 1 << 10
        self.tool_call_parser = tool_call_parser
        self.enable_auto_tool_choice = enable_auto_tool_choice
        self.responses = responses.ResponseStore()  # stored responses (POST /v1/responses, store: true)
        self.request_log: RequestLog | None = None  # --enable-log-requests
        self.sampling_defaults: dict = {}  # the model's generation config (common/generation_config.py)
        self.max_logprobs = DEFAULT_MAX_LOGPROBS  # --max-logprobs (-1: the vocabulary)
        self.model_root: str | None = None  # /v1/models' `root`: the model as --model named it (vLLM's)
        self.model_aliases: tuple[str, ...] = ()  # more names it is served under (--served-model-name A B)

    # ---- the endpoints ----------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        req = await _parse(request, oa.CompletionRequest, self.limits.max_request_body_bytes)
        self.check_model(req.model)
        params = req.to_sampling_params(self.sampling_defaults, self.check_params)
        prompts = []
        for p in req.prompt_list():
            if isinstance(p, str):
                if not p:
                    raise ParameterError("prompt", "the prompt is empty: give at least one token")
                ids = await self._encode(p, True)
                prompts.append((p, ids) if req.truncate_prompt_tokens is None else (None, self._truncate(ids, req)))
            else:
                vocab = getattr(self.tokenizer, "vocab_size", None)
                bad = next((t for t in p if vocab is not None and t >= vocab), None)
                if bad is not None:
                    raise ParameterError("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")
                prompts.append((None, self._truncate(list(p), req)))
            self._check_length(prompts[-1][1], params, "prompt")
        job = self._job("cmpl-", prompts, params)
        fmt = _CompletionFormat(req, job, self.tokenizer, self._token_text(req))
        return await self._run(request, job, fmt, req.stream, req.include_usage, req.continuous_usage)

    async def chat(self, request: Request) -> Response:
        req = await _parse(request, oa.ChatCompletionRequest, self.limits.max_request_body_bytes)
        self.check_model(req.model)
        tools = plan_tools(req.tools, req.tool_choice, self.tool_call_parser, self.enable_auto_tool_choice,
                           req.parallel_tool_calls)
        params = req.to_sampling_params(tools.structured_outputs(), self.sampling_defaults, self.check_params)
        text = self.render_chat(req.template_messages(), req.tools, req.add_generation_prompt, req.chat_template_kwargs,
                                offer_tools=tools.mode != "none", continue_final_message=req.continue_final_message,
                                chat_template=req.chat_template)
        ids = self._truncate(await self._encode(text, False), req)
        self._check_length(ids, params, "messages", req.max_tokens_param)
        job = self._job("chatcmpl-", [(text, ids)], params)
        return await self._run(request, job, _ChatFormat(req, self._token_text(req), tools), req.stream,
                               req.include_usage, req.continuous_usage)

    def render_chat(self, messages: list[dict], tools: list[oa.ChatTool] | None, add_generation_prompt: bool,
                    kwargs: dict | None, offer_tools: bool = True, continue_final_message: bool = False,
                    chat_template: str | None = None) -> str:
        """The chat template's text. A template that ignores tools gets them in Hermes form (the
        listing only when `offer_tools`: not for tool_choice none), earlier calls as text.
        `continue_final_message`: the text stops inside the last message (Tokenizer).
        `chat_template`: the request's own template, refused (as vLLM refuses it without
        --trust-request-chat-template) rather than silently not used."""
        if chat_template is not None or (kwargs or {}).get("chat_template") is not None:
            raise ParameterError("chat_template", "a chat template sent with the request is not used: this server "
                                                  "renders with the model's template (or its --chat-template)")
        template = getattr(self.tokenizer, "chat_template", None) or ""
        if "tools" not in template and (tools or any(m.get("tool_calls") for m in messages)):
            messages, tools = hermes_messages(messages, tools if offer_tools else None), None
        # chat_template_kwargs go over the request's own arguments, as vLLM merges them (a key of
        # both, e.g. add_generation_prompt, is the kwargs' value, not a "multiple values" error)
        args = {"tools": [t.model_dump(exclude_none=True) for t in tools] if tools else None,
                "add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                **(kwargs or {})}
        try:
            return self.tokenizer.apply_chat_template(messages, **args)
        except ParameterError:
            raise
        except Exception as e:  # jinja's TemplateError (e.g. roles must alternate), no template, bad kwargs
            raise APIError(400, f"cannot apply the chat template: {e}", param="messages") from e

    def models(self) -> oa.ModelList:
        """A card per served name (vLLM's), the same model behind each."""
        return oa.ModelList(data=[self.card(name) for name in (self.model_name, *self.model_aliases)])

    def card(self, name: str) -> oa.ModelCard:
        return oa.ModelCard(id=name, created=self.created, root=self.model_root or self.engine.model_name,
                            max_model_len=self.engine.max_model_len,
                            permission=[oa.ModelPermission(id=f"modelperm-{name}", created=self.created)])

    def check_model(self, model: str | None) -> str:
        """A served name, or the model as --model gave it (the name vLLM serves it under when no
        --served-model-name is given, so vLLM's clients find it) -> the served name it means (the
        first for the path). Every request passes here: names are compared, no card is built."""
        if model is None or model == self.model_root:
            return self.model_name
        if model == self.model_name or model in self.model_aliases:
            return model
        names = ", ".join(f"`{n}`" for n in (self.model_name, *self.model_aliases))
        raise APIError(404, f"The model `{model}` does not exist (this server serves {names}).", param="model",
                       code="model_not_found")

    # ---- request preparation ----------------------------------------------------------------------
    async def _encode(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        limit = self.engine.max_model_len
        if len(text) > limit * self.max_token_chars:  # certainly too long: no need to tokenize it
            raise APIError(400, f"This model's maximum context length is {limit} tokens; the {param} has "
                                f"{len(text)} characters, more than {limit} tokens can hold.",
                           param=param, code="context_length_exceeded")
        if len(text) > LONG_TEXT_CHARS:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_length(self, ids: list[int], params: SamplingParams, prompt_param: str,
                      max_tokens_param: str = "max_tokens") -> None:
        """The prompt fits the context with room for one token, and for max_tokens (named
        `max_tokens_param`: what the request called it)."""
        if not ids:
            raise ParameterError(prompt_param, "the prompt is empty: give at least one token")
        limit = self.engine.max_model_len
        if len(ids) >= limit or (params.max_tokens is not None and len(ids) + params.max_tokens > limit):
            # OpenAI's wording (vLLM's too), which clients and tests match
            if params.max_tokens is None:
                asked = (f"your {prompt_param} has {len(ids)} tokens, which leaves no room for the completion. "
                         f"Please reduce the length of the {prompt_param}.")
            else:
                asked = (f"you requested {len(ids) + params.max_tokens} tokens ({len(ids)} in the {prompt_param}, "
                         f"{params.max_tokens} in the completion). Please reduce the length of the {prompt_param} "
                         "or completion.")
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, {asked}",
                           param=prompt_param if len(ids) >= limit else max_tokens_param,
                           code="context_length_exceeded")
        if len(ids) + params.min_tokens > limit:
            raise APIError(400, f"min_tokens {params.min_tokens} with a prompt of {len(ids)} tokens exceeds this "
                                f"model's maximum context length of {limit} tokens.", param="min_tokens",
                           code="context_length_exceeded")

    def check_params(self, params: SamplingParams) -> None:
        """This front end's limits on a request's sampling parameters (the schema renames what it raises)."""
        check_logprobs(params, self.max_logprobs, getattr(self.tokenizer, "vocab_size", None))

    def _job(self, prefix: str, prompts, params: SamplingParams) -> _Job:
        arrival = time.time()
        return _Job(f"{prefix}{uuid.uuid4().hex}", self.model_name, prompts, params,
                    [self.metrics.track(arrival) for _ in prompts])

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _token_text(self, req: oa._SamplingRequest):
        """How the request's logprobs name tokens: their text, or vLLM's "token_id:{id}"."""
        return oa.token_id_text if req.return_tokens_as_token_ids else self._decode_one

    def _truncate(self, ids: list[int], req: oa._SamplingRequest) -> list[int]:
        """vLLM's truncate_prompt_tokens: the prompt's last k tokens (-1: max_model_len)."""
        k = req.truncate_prompt_tokens
        if k is None:
            return ids
        limit = self.engine.max_model_len
        if k > limit:
            raise ParameterError("truncate_prompt_tokens", f"truncate_prompt_tokens ({k}) is larger than this "
                                                           f"model's maximum context length ({limit})")
        if k == 0:
            raise ParameterError("truncate_prompt_tokens", "truncate_prompt_tokens must be -1 or at least 1")
        return ids[-(limit if k == -1 else k):]

    # ---- engine streams ---------------------------------------------------------------------------
    async def _start(self, job: _Job) -> list[RequestOutput]:
        """Submit every prompt; return each one's first output. Errors the engine raises before its
        first output (bad input, dead engine) surface here, before any response is sent."""
        if len(job.prompts) > self.limits.max_pending_requests:  # never admitted, however idle the server
            raise APIError(400, f"this request holds {len(job.prompts)} prompts; the server admits at most "
                                f"{self.limits.max_pending_requests} waiting for their first token "
                                "(--max-pending-requests): send them in smaller batches", param="prompt")
        if self.num_pending + len(job.prompts) > self.limits.max_pending_requests:
            raise APIError(503, f"the server is overloaded ({self.num_pending} requests waiting for their first "
                                "token); retry shortly", type="server_error", code="overloaded")
        self.num_pending += len(job.prompts)
        try:
            return await self._submit(job)
        finally:
            self.num_pending -= len(job.prompts)

    async def _submit(self, job: _Job) -> list[RequestOutput]:
        rids = ([job.request_id] if len(job.prompts) == 1
                else [f"{job.request_id}-{i}" for i in range(len(job.prompts))])
        if self.request_log is not None:
            for rid, (text, ids) in zip(rids, job.prompts):
                self.request_log.received(rid, text, ids, job.params)
        job.gens = [self.engine.generate(ids, job.params, rid, prompt=text)
                    for rid, (text, ids) in zip(rids, job.prompts)]
        try:
            if len(job.gens) == 1:
                firsts = [await _first(job.gens[0])]
            else:
                try:
                    async with asyncio.TaskGroup() as tg:
                        tasks = [tg.create_task(_first(g)) for g in job.gens]
                except BaseExceptionGroup as eg:
                    raise eg.exceptions[0] from None
                firsts = [t.result() for t in tasks]
            for out in firsts:
                if out.error:
                    raise _engine_error(out)
            return firsts
        except BaseException:
            await _close(job)
            raise

    async def _outputs(self, job: _Job, firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) for every output of every prompt, the first ones included. An output
        carrying an engine error raises. Closing this iterator aborts what is still running."""
        try:
            for i, out in enumerate(firsts):
                yield i, self._observe(job, i, out)
            if len(job.gens) == 1:
                if not firsts[0].finished:
                    async for out in job.gens[0]:
                        yield 0, self._observe(job, 0, out)
                return
            queue: asyncio.Queue = asyncio.Queue()
            job.pumps = [asyncio.create_task(_pump(i, g, queue)) for i, (g, f) in enumerate(zip(job.gens, firsts))
                         if not f.finished]
            for _ in job.pumps:
                while (item := await queue.get())[1] is not None:  # until this prompt's end mark
                    i, out = item
                    if isinstance(out, BaseException):
                        raise out
                    yield i, self._observe(job, i, out)
        finally:
            await _close(job)

    def _observe(self, job: _Job, i: int, out: RequestOutput) -> RequestOutput:
        job.trackers[i].observe(out, time.time())
        if self.request_log is not None and (out.finished or out.error):
            self.request_log.finished(out)
        if out.error:
            raise _engine_error(out)
        return out

    async def _collect(self, job: _Job) -> list[RequestOutput]:
        finals = await self._start(job)
        async with aclosing(self._outputs(job, finals)) as outputs:
            async for i, out in outputs:
                finals[i] = out
        return finals

    # ---- responses --------------------------------------------------------------------------------
    async def _run(self, request: Request, job: _Job, fmt, stream: bool, include_usage: bool,
                   continuous_usage: bool = False) -> Response:
        async def whole(finals: list[RequestOutput]) -> Response:
            return self._response(job, fmt, finals)
        return await self.answer(request, job, stream, lambda firsts: self._events(
            job, fmt, firsts, include_usage, continuous_usage), whole)

    async def answer(self, request: Request, job: _Job, stream: bool, events, whole) -> Response:
        """Answer whole (`await whole(final outputs)`), or as the SSE body `events(first outputs)`
        once the first outputs are in; a client that leaves meanwhile cancels the work."""
        try:
            if stream:
                firsts = await _until_disconnect(request, self._start(job))
                return _EventStream(events(firsts))
            return await whole(await _until_disconnect(request, self._collect(job)))
        except _ClientGone:
            job.close_trackers("abort")
            return Response(status_code=499)
        except BaseException:
            job.close_trackers("error")
            raise

    def _response(self, job: _Job, fmt, finals: list[RequestOutput]) -> Response:
        n = job.params.n
        choices = []
        asked = fmt.req.prompt_logprobs is not None  # vLLM's: per choice (completions), per response (chat)
        for i, out in enumerate(finals):
            for c in out.outputs:
                text, lps = fmt.delta(i, out, c, _Sent())
                choices.append(fmt.full_choice(i * n + c.index, text, lps, c))
                if asked and isinstance(fmt, _CompletionFormat):
                    choices[-1].prompt_logprobs = oa.prompt_logprobs(out.prompt_logprobs or [], fmt.decode_one)
        usage = oa.UsageInfo.of(sum(len(ids) for _, ids in job.prompts), fmt.num_completion_tokens(finals))
        response = fmt.response_cls(id=job.request_id, created=job.created, model=job.model, choices=choices,
                                    usage=usage)
        if asked and isinstance(fmt, _ChatFormat):
            response.prompt_logprobs = oa.prompt_logprobs(finals[0].prompt_logprobs or [], fmt.decode_one)
        return _json(response)

    async def _events(self, job: _Job, fmt, firsts: list[RequestOutput], include_usage: bool,
                      continuous_usage: bool = False) -> AsyncIterator[str]:
        """The SSE body: role chunks (chat), per-choice deltas, a finishing chunk per choice, the usage
        chunk if asked, [DONE]. `continuous_usage` (vLLM's continuous_usage_stats): each delta and
        finishing chunk also carries its prompt's tokens and its choice's tokens so far. An error
        after the stream started becomes an `error` event, as OpenAI's clients expect."""
        n = job.params.n
        exclude = None if include_usage else {"usage"}

        def chunk(choices: list, usage=None) -> str:
            return fmt.chunk_cls(id=job.request_id, created=job.created, model=job.model, choices=choices,
                                 usage=usage).model_dump_json(exclude=exclude)
        text_chunk = oa.text_chunk_renderer(lambda index, text: fmt.chunk_cls(
            id=job.request_id, created=job.created, model=job.model, choices=[fmt.choice(index, text)]),
            exclude=exclude)
        sent = [_Sent() for _ in range(len(job.prompts) * n)]
        last: list[RequestOutput | None] = [None] * len(job.prompts)
        try:
            # (vLLM's continuous usage: the role and echo chunks carry the prompt's tokens too)
            head_usage = oa.UsageInfo.of(len(job.prompts[0][1]), 0) if continuous_usage else None
            for choice in fmt.head():
                yield f"data: {chunk([choice], head_usage)}\n\n"
            async with aclosing(self._outputs(job, firsts)) as outputs:
                async for i, out in outputs:
                    last[i] = out
                    for c in out.outputs:
                        index = i * n + c.index
                        s = sent[index]
                        if s.finished:
                            continue
                        text, lps = fmt.delta(i, out, c, s)
                        usage = oa.UsageInfo.of(len(job.prompts[i][1]), len(c.token_ids)) if continuous_usage else None
                        if lps is not None or isinstance(text, oa.DeltaMessage) or (text and usage):
                            yield f"data: {chunk([fmt.choice(index, text, lps)], usage)}\n\n"
                        elif text:
                            yield f"data: {text_chunk(index, text)}\n\n"
                        if c.finish_reason is not None:
                            s.finished = True
                            yield f"data: {chunk([fmt.choice(index, None, None, c)], usage)}\n\n"
            if include_usage:
                usage = oa.UsageInfo.of(sum(len(ids) for _, ids in job.prompts), fmt.num_completion_tokens(last))
                yield f"data: {chunk([], usage)}\n\n"
        except Exception as e:
            job.close_trackers("error")
            err = as_api_error(e)
            if err.status >= 500:
                log.warning("stream %s failed: %s", job.request_id, err.message)
            yield f"data: {err.body().model_dump_json()}\n\n"
        finally:
            job.close_trackers("abort")  # a no-op for the finished ones
        yield "data: [DONE]\n\n"


# ---- helpers --------------------------------------------------------------------------------------
class RequestLog:
    """--enable-log-requests: a line per engine request as it arrives and as it ends (logger
    pdserve.requests, INFO). `max_len` cuts the prompt text and the token id list."""

    def __init__(self, max_len: int | None):
        self.max_len = max_len
        self.log = logging.getLogger("pdserve.requests")
        self.log.setLevel(logging.INFO)

    def _cut(self, seq):
        return seq if seq is None or self.max_len is None else seq[:self.max_len]

    def received(self, request_id: str, text: str | None, ids: list[int], params: SamplingParams) -> None:
        self.log.info("Received request %s: prompt: %r, params: %s, prompt_token_ids: %s", request_id,
                      self._cut(text), params, self._cut(ids))

    def finished(self, out: RequestOutput) -> None:
        if out.error:
            self.log.info("Failed request %s: %s", out.request_id, out.error)
            return
        ends = ", ".join(f"{c.finish_reason} after {len(c.token_ids)} tokens" for c in out.outputs)
        self.log.info("Finished request %s: %d prompt tokens (%d cached), %s", out.request_id,
                      len(out.prompt_token_ids), out.num_cached_tokens, ends)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("pdserve")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _engine_error(out: RequestOutput) -> APIError:
    return APIError(500, f"the engine failed the request: {out.error}", type="server_error")


async def _first(gen) -> RequestOutput:
    try:
        return await anext(gen)
    except StopAsyncIteration:
        raise APIError(500, "the engine ended the request without output", type="server_error") from None


async def _pump(i: int, gen, queue: asyncio.Queue) -> None:
    """Forward one prompt's outputs into the shared queue; (i, None) marks its end."""
    try:
        async for out in gen:
            queue.put_nowait((i, out))
    except Exception as e:
        queue.put_nowait((i, e))
    queue.put_nowait((i, None))


async def _close(job: _Job) -> None:
    for task in job.pumps:
        task.cancel()  # the cancellation runs through the engine iterator it is inside: abort
    for gen in job.gens:
        if not getattr(gen, "ag_running", False) and hasattr(gen, "aclose"):
            await gen.aclose()


async def _until_disconnect(request: Request, coro):
    """Run coro, cancelling it if the client disconnects first (then raises _ClientGone)."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled (server shutdown)
        task.cancel()
        raise
    finally:
        waiter.cancel()
    if not task.done():
        task.cancel()  # its cleanup (closing the engine iterators: abort) runs on the loop
        raise _ClientGone()
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """SSE response that always closes its body iterator (and so the engine request), however the
    stream ends: finished, client gone while a chunk was being sent, or cancelled."""
    media_type = "text/event-stream"

    def __init__(self, body):
        super().__init__(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


# ---- the app ----------------------------------------------------------------------------------
def build_app(engine: EngineClient, served_model_name: str, api_key: str | None = None,
              collector: StatsCollector | None = None, limits: Limits = Limits(),
              tool_call_parser: str | None = None, enable_auto_tool_choice: bool = False,
              metrics_route: bool = True, metrics_dir: str | None = None, response_store=None,
              log_requests: bool = False, max_log_len: int | None = None,
              sampling_defaults: dict | None = None, fastapi_docs: bool = True,
              max_logprobs: int = DEFAULT_MAX_LOGPROBS, model_root: str | None = None,
              model_aliases: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app. `collector` (state for /metrics) is the deployment's: the in-process
    engine's stats, or the router's view of its fleet and its routing counters.
    `tool_call_parser` + `enable_auto_tool_choice` (vLLM's flags) let tool_choice "auto" turn the
    model's text into tool calls. `metrics_route` False: no /metrics here (served on a port of
    its own, or not at all). `metrics_dir`: request metrics summed with other processes'
    (ServerMetrics' shared_dir). `response_store`: where /v1/responses keeps stored responses
    (default: this process's memory; the router passes its Redis one). `log_requests`: a log line
    per request as it arrives (prompt and token ids cut to `max_log_len`, parameters) and ends.
    `sampling_defaults`: default sampling parameters of requests that leave them unset (the
    model's generation config, common/generation_config.py). `fastapi_docs` False: no /openapi.json,
    /docs or /redoc (vLLM's --disable-fastapi-docs). `max_logprobs`: vLLM's --max-logprobs, checked
    here so a request over it is a 400 before it reaches an engine. `model_root`: /v1/models' `root`,
    the model as --model gave it (vLLM's: the served name is the `id`; default: the engine's name).
    `model_aliases`: more names requests may give (--served-model-name's after the first, each
    distinct: common.model_path.served_names), each a card of /v1/models as in vLLM; answers
    carry `served_model_name`."""
    metrics = ServerMetrics(served_model_name, engine.max_model_len, collector, shared_dir=metrics_dir)
    server = OpenAIServer(engine, served_model_name, metrics, limits, tool_call_parser, enable_auto_tool_choice)
    docs = {} if fastapi_docs else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(title="pdserve", description="OpenAI-compatible API of pdserve", **docs)
    app.state.server = server
    server.sampling_defaults = dict(sampling_defaults or {})
    server.max_logprobs = max_logprobs
    server.model_root = model_root
    server.model_aliases = tuple(model_aliases)
    if log_requests:
        server.request_log = RequestLog(max_log_len)
    if response_store is not None:
        server.responses = response_store

    async def on_error(request: Request, e: Exception) -> Response:
        err = as_api_error(e)
        if err.code == "overloaded":  # load shedding, not a fault
            log.warning("%s %s refused: %s", request.method, request.url.path, err.message)
        elif err.status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, err.message,
                      exc_info=not isinstance(e, (APIError, EngineDeadError)))
        return err.response()

    for exc in (APIError, ParameterError, EngineDeadError):
        app.add_exception_handler(exc, on_error)
    app.add_middleware(InternalErrors, on_error=on_error)  # any other exception (errors.InternalErrors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException) -> Response:
        response = APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None).response()
        response.headers.update(e.headers or {})  # a 405's Allow: the methods the path takes
        return response

    deps = []
    if api_key:
        expected = api_key.encode()

        async def check_api_key(request: Request) -> None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
                raise APIError(401, "Incorrect API key provided: send `Authorization: Bearer <key>`.",
                               code="invalid_api_key")
        deps = [Depends(check_api_key)]

    v1 = APIRouter(prefix="/v1", dependencies=deps)

    @v1.get("/models")
    async def list_models() -> Response:
        return _json(server.models())

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        return _json(server.card(server.check_model(model_id)))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.chat(request)

    @v1.post("/responses")  # OpenAI's Responses API over the chat path (services/router/responses.py)
    async def create_response(request: Request) -> Response:
        return await responses.create(server, request)

    @v1.get("/responses/{response_id}")
    async def get_response(response_id: str) -> Response:
        return _json_obj(await responses.retrieve(server, response_id))

    @v1.delete("/responses/{response_id}")
    async def delete_response(response_id: str) -> Response:
        return _json_obj(await responses.delete(server, response_id))

    app.include_router(v1)

    @app.post("/tokenize")  # vLLM's, outside /v1 (services/router/tokenize.py)
    async def tokenize(request: Request) -> Response:
        req = await _parse(request, tk.TokenizeRequest, server.limits.max_request_body_bytes)
        return _json(await tk.tokenize(server, req))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        req = await _parse(request, tk.DetokenizeRequest, server.limits.max_request_body_bytes)
        return _json(tk.detokenize(server, req))

    @app.get("/version")  # vLLM's
    async def version() -> Response:
        return _json_obj({"version": _version()})

    @app.get("/health")
    @app.get("/ping")  # vLLM's (SageMaker's) name for the same check, GET or POST
    @app.post("/ping")
    async def health() -> Response:
        try:
            healthy = await engine.is_healthy()
        except Exception:
            healthy = False
        if healthy:
            return Response(status_code=200)
        return APIError(503, "the engine is not healthy", type="server_error", code="engine_unavailable").response()

    if metrics_route:
        @app.get("/metrics")
        async def prometheus_metrics() -> Response:
            return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
