"""The OpenAI API objects of /v1/completions, /v1/chat/completions and /v1/models (torch-free).

Requests are validated by pydantic (a type error names the field) and turned into `SamplingParams`
(a range error raises `ParameterError` naming the parameter): together they give OpenAI's 400 body.
Unknown fields are ignored, as OpenAI's SDK `extra_body` expects; vLLM's sampling extras (top_k,
min_p, repetition_penalty, ignore_eos, min_tokens, stop_token_ids, include_stop_str_in_output,
skip_special_tokens) are accepted in the body.

Responses mirror OpenAI's shapes; `stop_reason` (the stop string or token id that ended a choice) is
vLLM's extra. The engine's per-token logprobs (`{token_id: Logprob}` holding the chosen token and the
top-k) become OpenAI's two logprob shapes here: `completion_logprobs` and `chat_logprobs`.
"""

from __future__ import annotations

import json
import time
import types
import typing
from typing import Annotated, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_serializer, model_validator

from pdserve.common.outputs import TokenLogprobs
from pdserve.common.sampling_params import ParameterError, SamplingParams, StructuredOutputsParams

TokenId = Annotated[StrictInt, Field(ge=0)]
MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM reports this floor too


class _Request(BaseModel):
    """A request object. JSON `null` for a field that cannot be None means its default, as OpenAI
    and vLLM take it (clients send `"n": null`, `"stream": null`, ...); a field that can be None
    keeps it (None has its own meaning there: the completions' `max_tokens: null` is "up to the
    context length")."""
    model_config = ConfigDict(extra="ignore")
    _null_is_default: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._null_is_default = frozenset(name for name, f in cls.model_fields.items()
                                         if not f.is_required() and not _admits_none(f.annotation))

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data):
        if isinstance(data, dict) and any(data.get(name, 0) is None for name in cls._null_is_default):
            return {k: v for k, v in data.items() if v is not None or k not in cls._null_is_default}
        return data


def _admits_none(annotation) -> bool:
    if annotation is None or annotation is type(None):
        return True
    if typing.get_origin(annotation) is Annotated:
        return _admits_none(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_admits_none(a) for a in typing.get_args(annotation))
    return False


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far (with include_usage)


class _SamplingRequest(_Request):
    """Fields shared by completions and chat. None means "the default" (clients send nulls)."""
    model: str | None = None  # None: the served model
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None  # the prompt tokens' logprobs, top-k each (not streamed)
    truncate_prompt_tokens: Annotated[int, Field(ge=-1)] | None = None  # keep the last k (-1: max_model_len)
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:{id}"
    use_beam_search: bool = False  # vLLM's; refused (a 400), never ignored into sampling
    # the output's grammar (services/router/constraints.py)
    response_format: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats

    def check_prompt_logprobs(self) -> None:
        """What goes with `stream` only, or without it only (vLLM's checks)."""
        if self.prompt_logprobs is not None and self.stream:
            raise ParameterError("prompt_logprobs", "prompt_logprobs are not returned on a stream: send it with "
                                                    "stream false")
        if self.stream_options is not None and not self.stream:
            raise ParameterError("stream_options", "stream_options can only be given with stream true")

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None,
                         structured: StructuredOutputsParams | None = None, defaults: dict | None = None,
                         check: Callable[[SamplingParams], None] | None = None) -> SamplingParams:
        """`defaults`: the server's default sampling parameters (the model's generation config)
        for the fields the request leaves unset; `check`: the server's own limits on the result
        (--max-logprobs), raising ParameterError as the parameters' own checks do."""
        from pdserve.services.router.constraints import logit_bias_of, structured_outputs_of
        if self.use_beam_search:
            raise ParameterError("use_beam_search", "beam search is not supported: pdserve samples (temperature 0 "
                                                    "for greedy; n for several sequences)")
        d = defaults or {}
        if max_tokens is None:
            max_tokens = d.get("max_tokens")
        asked = structured_outputs_of(self)
        if asked is not None and structured is not None:
            raise ParameterError(asked.param, f"{asked.param} and {structured.param} both constrain the output")
        params = SamplingParams(
            logit_bias=logit_bias_of(self.logit_bias), allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words or [], structured_outputs=structured or asked,
            n=self.n, temperature=_or(self.temperature, d.get("temperature", 1.0)),
            top_p=_or(self.top_p, d.get("top_p", 1.0)), top_k=_or(self.top_k, d.get("top_k", -1)),
            min_p=_or(self.min_p, d.get("min_p", 0.0)), seed=self.seed, max_tokens=max_tokens,
            min_tokens=self.min_tokens, stop=_or(self.stop, []), stop_token_ids=self.stop_token_ids or [],
            ignore_eos=self.ignore_eos, include_stop_str_in_output=self.include_stop_str_in_output,
            presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
            repetition_penalty=_or(self.repetition_penalty, d.get("repetition_penalty", 1.0)), logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens)
        if check is not None:
            check(params)
        return params


def _or(value, default):
    return default if value is None else value


# ---- /v1/completions ------------------------------------------------------------------------
class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = 16  # None: up to the context length
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompt_list(self) -> list[str | list[int]]:
        """One entry per prompt: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise ParameterError("prompt", "the prompt is empty")
        return list(p)

    @property
    def scoring_only(self) -> bool:
        """echo with max_tokens 0: return the prompt (and its logprobs) without generating."""
        return self.echo and self.max_tokens == 0

    def to_sampling_params(self, defaults: dict | None = None,
                           check: Callable[[SamplingParams], None] | None = None) -> SamplingParams:
        if self.suffix:
            raise ParameterError("suffix", "suffix is not supported: pdserve does not do fill-in-the-middle "
                                           "insertion; put the whole text in the prompt")
        if self.best_of is not None and self.best_of != self.n:
            raise ParameterError("best_of", f"best_of must equal n ({self.n}) if given: pdserve returns every "
                                            f"sequence it generates, got best_of={self.best_of}")
        max_tokens = 1 if self.scoring_only else self.max_tokens
        self.check_prompt_logprobs()
        asked = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs) if k is not None]
        return self._sampling_params(max_tokens, self.logprobs, max(asked) if asked else None, defaults=defaults,
                                     check=check)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []

    def extend(self, other: "CompletionLogprobs") -> "CompletionLogprobs":
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset
        return self


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, None for the first, else {token id: its logprob}
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions -------------------------------------------------------------------
class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None

    def to_template(self, index: int) -> dict:
        """The message as the chat template sees it: content a string ("developer" is "system").
        OpenAI's rules: content is required except on an assistant message with tool_calls; a
        tool message names the call it answers."""
        content = self.content
        if content is None and not (self.role == "assistant" and self.tool_calls):
            raise ParameterError(f"messages[{index}].content", f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ParameterError(f"messages[{index}].tool_call_id", "a tool message needs the tool_call_id it answers")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise ParameterError(f"messages[{index}].content[{j}]",
                                         f"content part of type {part.type!r} is not supported (text only)")
                if part.text is None:
                    raise ParameterError(f"messages[{index}].content[{j}].text", "a text content part needs its text")
            content = "\n".join(part.text for part in content)
        msg = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                msg[key] = getattr(self, key)
        return msg


class FunctionDefinition(_Request):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: str | dict | None = None  # None: auto with tools, else none
    parallel_tool_calls: bool = True  # false: one tool call at most
    # vLLM's extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    chat_template: str | None = None  # refused (OpenAIServer.render_chat)
    echo: bool = False  # the last message's content leads the answer if it is the assistant's

    def template_messages(self) -> list[dict]:
        return [m.to_template(i) for i, m in enumerate(self.messages)]

    def echoed(self) -> str:
        """vLLM's echo: what leads each choice's content, the last message's content when that
        message is the assistant's (the reply the caller started: continue_final_message)."""
        last = self.messages[-1]
        if not self.echo or last.role != "assistant":
            return ""
        return last.to_template(len(self.messages) - 1)["content"]

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self, tool_grammar: StructuredOutputsParams | None = None, defaults: dict | None = None,
                           check: Callable[[SamplingParams], None] | None = None) -> SamplingParams:
        """`tool_grammar`: the output grammar a forced tool choice implies (tool_calls.ToolPlan);
        `defaults`: the server's default sampling parameters; `check`: its limits."""
        if self.top_logprobs and not self.logprobs:  # (0 asks for nothing: accepted, as vLLM)
            raise ParameterError("top_logprobs", "top_logprobs needs logprobs set to true")
        max_tokens = _or(self.max_completion_tokens, self.max_tokens)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        self.check_prompt_logprobs()
        try:
            return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs, structured=tool_grammar,
                                         defaults=defaults, check=check)
        except ParameterError as e:
            if e.param == "max_tokens":
                e.param = self.max_tokens_param
            elif e.param == "logprobs":
                e.param = "top_logprobs"
            raise


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = []


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_logprobs: PromptLogprobs | None = None


class _DropNone(BaseModel):
    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_DropNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_DropNone):
    """A piece of a streamed call: the first carries id, type and name; later ones more arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


class DeltaMessage(_DropNone):
    """A streamed piece of the message; unset fields are left out (`{}` in the finishing chunk)."""
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---- /v1/models and errors ------------------------------------------------------------------
class ModelPermission(BaseModel):
    """vLLM's (and the old OpenAI API's) permission entry of a model card: clients written for
    them read it; nothing here is enforced by it."""
    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pdserve"
    root: str | None = None
    parent: str | None = None  # a base model's name for an adapter (none are served here)
    max_model_len: int | None = None
    permission: list[ModelPermission] = []


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ---- streaming: the hot path ----------------------------------------------------------------
_SENTINEL_INDEX = 918273645
_SENTINEL_TEXT = "@@pdserve-text@@"


def text_chunk_renderer(build: Callable[[int, str], BaseModel], **dump_kwargs) -> Callable[[int, str], str]:
    """A fast `(index, text) -> JSON` for the chunk `build(index, text)` makes. Most chunks of a stream
    differ only in the choice index and the text, so the chunk is rendered once by pydantic with
    sentinels and each token costs one json.dumps of its text (~1 us instead of ~12 us)."""
    rendered = build(_SENTINEL_INDEX, _SENTINEL_TEXT).model_dump_json(**dump_kwargs)
    index_mark, text_mark = str(_SENTINEL_INDEX), json.dumps(_SENTINEL_TEXT)
    if rendered.count(index_mark) != 1 or rendered.count(text_mark) != 1 or \
            rendered.index(index_mark) > rendered.index(text_mark):  # a sentinel clash: stay exact
        return lambda index, text: build(index, text).model_dump_json(**dump_kwargs)
    head, _, rest = rendered.partition(index_mark)
    mid, _, tail = rest.partition(text_mark)
    return lambda index, text: f"{head}{index}{mid}{json.dumps(text, ensure_ascii=False)}{tail}"


# ---- logprobs: engine entries -> OpenAI shapes -------------------------------------------------
def token_id_text(token_id: int) -> str:
    """A token as vLLM's return_tokens_as_token_ids writes it (given as `decode` below)."""
    return f"token_id:{token_id}"


def _token_text(entry, token_id: int, decode) -> str:
    if decode is token_id_text or entry.decoded_token is None:
        return decode(token_id)
    return entry.decoded_token


def prompt_logprobs(entries: list[TokenLogprobs | None], decode) -> PromptLogprobs:
    """The engine's prompt entries (None for the first token) in vLLM's shape."""
    return [None if entry is None else {
        t: PromptLogprob(logprob=max(lp.logprob, MIN_LOGPROB), rank=lp.rank, decoded_token=_token_text(lp, t, decode))
        for t, lp in entry.items()} for entry in entries]


def completion_logprobs(token_ids: list[int], entries: list[TokenLogprobs | None], text_offset: int,
                        decode) -> tuple[CompletionLogprobs, int]:
    """Legacy shape for `token_ids[i]` with `entries[i]` (None: the first prompt token, which has no
    logprob). Offsets count from `text_offset`; returns the next offset for the following piece."""
    out = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries):
        chosen = entry.get(token_id) if entry else None
        text = _token_text(chosen, token_id, decode) if chosen else decode(token_id)
        out.tokens.append(text)
        out.token_logprobs.append(None if chosen is None else max(chosen.logprob, MIN_LOGPROB))
        top = None
        if entry:
            top = {}  # keyed by text: of tokens with the same text (e.g. partial UTF-8) the likelier stays
            for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank or 0):
                top.setdefault(_token_text(lp, t, decode), max(lp.logprob, MIN_LOGPROB))
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(text)
    return out, text_offset


def chat_logprobs(token_ids: list[int], entries: list[TokenLogprobs], num_top: int, decode) -> ChatLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries):
        chosen = entry[token_id]
        text = _token_text(chosen, token_id, decode)
        top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= num_top),
                     key=lambda kv: kv[1].rank)
        content.append(ChatTokenLogprob(
            token=text, logprob=max(chosen.logprob, MIN_LOGPROB), bytes=list(text.encode()),
            top_logprobs=[ChatTopLogprob(token=(s := _token_text(lp, t, decode)), logprob=max(lp.logprob, MIN_LOGPROB),
                                         bytes=list(s.encode())) for t, lp in top]))
    return ChatLogprobs(content=content)
