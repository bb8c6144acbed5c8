"""Tool calling for /v1/chat/completions (torch-free): tool_choice -> grammar, text -> tool calls.

    tool_choice   what the engine is asked for                 how the text becomes tool_calls
    none          the text                                     content only
    auto          the text (needs --enable-auto-tool-choice    a parser (--tool-call-parser): hermes
                  and --tool-call-parser, as vLLM)             <tool_call>{json}</tool_call>, or
                                                               llama3_json {"name", "parameters"}; ...
    required      JSON array [{"name", "parameters"}, ...],    each element is one call
                  an anyOf over the tools (vLLM's schema)
    {"type": "function", "function": {"name": N}}
                  the JSON schema of N's parameters            the whole text is N's arguments

Streaming: `ToolStream.feed(new_text, final)` -> (content delta, [DeltaToolCall]). Constrained
outputs (named, required) stream their arguments as they are generated; auto-parsed calls are
sent whole once their closing tag (or the end of the output) arrives, the text before them as
content.

Templates that ignore tools (SmolLM2's ChatML has no `tools` variable) get them in Hermes form
instead: a system message listing the tools and how to call them, earlier assistant calls as
<tool_call> text; `tool` messages keep their role.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from pdserve.common.sampling_params import ParameterError, StructuredOutputsParams
from pdserve.services.router import openai_schema as oa

TOOL_CALL_PARSERS = ("hermes", "llama3_json")
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:parameters|arguments)"\s*:\s*(?=\S)')


def add_tool_args(p) -> None:
    """vLLM's flags, on `pdserve serve` and `pdserve router`."""
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='tool_choice "auto": parse tool calls from the text (needs --tool-call-parser)')
    p.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="how tool calls are written in the model's text (hermes: <tool_call>{json}</tool_call>)")


def check_tool_args(args) -> None:
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        from pdserve.common.config import ConfigError
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    mode: str  # none | auto | required | named
    tools: list[oa.ChatTool] = field(default_factory=list)
    name: str | None = None  # the forced function (named)
    parser: str | None = None  # auto
    parallel: bool = True  # parallel_tool_calls false: at most one call (OpenAI's rule; vLLM keeps the first)

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            return StructuredOutputsParams(json=_parameters(self._tool(self.name)), param="tool_choice")
        if self.mode == "required":
            alternatives = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                                              "parameters": _parameters(t)},
                             "required": ["name", "parameters"]} for t in self.tools]
            schema = {"type": "array", "minItems": 1,
                      "items": alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}}
            if not self.parallel:  # the grammar ends the array after one call
                schema["maxItems"] = 1
            return StructuredOutputsParams(json=schema, param="tool_choice")
        return None

    def _tool(self, name: str) -> oa.ChatTool:
        return next(t for t in self.tools if t.function.name == name)

    def parse(self, text: str) -> tuple[str | None, list[oa.ToolCall]]:
        """(content, tool calls) of a whole output. Forced calls (named, required) are what their
        stream sends, joined: the same scanner, so an output cut by max_tokens answers as its
        stream does (a call once its name is complete, its arguments as far as they go, no
        content). Auto: text that does not parse stays content."""
        if self.mode in ("named", "required"):
            return None, joined_calls(self.stream().feed(text, True)[1])
        if self.mode == "auto":
            content, calls = (parse_hermes if self.parser == "hermes" else parse_llama3_json)(text)
            return content, calls if self.parallel else calls[:1]
        return text, []

    def stream(self) -> "ToolStream | None":
        if self.mode == "named":
            return _NamedStream(self.name)
        if self.mode == "required":
            return _ArrayStream()
        if self.mode == "auto":
            return _AutoStream(self.parser, max_calls=None if self.parallel else 1)
        return None


def plan_tools(tools: list[oa.ChatTool] | None, tool_choice, parser: str | None, auto_enabled: bool,
               parallel: bool = True) -> ToolPlan:
    """`parallel`: the request's parallel_tool_calls (false: one call at most)."""
    tools = tools or []
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if tool_choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ParameterError("tool_choice", 'a named tool_choice is {"type": "function", "function": {"name": ...}}')
        if name not in {t.function.name for t in tools}:
            raise ParameterError("tool_choice", f"tool_choice names function {name!r}, which is not in tools")
        return ToolPlan("named", tools, name=name)
    if tool_choice == "none" or (tool_choice == "auto" and not tools):
        return ToolPlan("none", tools)
    if tool_choice == "required":
        if not tools:
            raise ParameterError("tool_choice", "tool_choice 'required' needs at least one tool in tools")
        return ToolPlan("required", tools, parallel=parallel)
    if tool_choice == "auto":
        if not (auto_enabled and parser):
            raise ParameterError("tool_choice", '"auto" tool choice requires --enable-auto-tool-choice and '
                                                "--tool-call-parser to be set")
        return ToolPlan("auto", tools, parser=parser, parallel=parallel)
    raise ParameterError("tool_choice", f"tool_choice must be none, auto, required or a named function, "
                                        f"got {tool_choice!r}")


def joined_calls(deltas: list[oa.DeltaToolCall]) -> list[oa.ToolCall]:
    """A stream's tool call deltas as the calls a client accumulates from them (the first delta of
    a call has its id and name, later ones more arguments)."""
    calls: dict[int, oa.ToolCall] = {}
    for d in deltas:
        if d.id is not None:
            calls[d.index] = _call(d.function.name, d.function.arguments or "", d.id)
        elif d.function is not None and d.function.arguments:
            calls[d.index].function.arguments += d.function.arguments
    return list(calls.values())


def _parameters(tool: oa.ChatTool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _call(name: str, arguments: str, call_id: str | None = None) -> oa.ToolCall:
    return oa.ToolCall(id=call_id or new_call_id(), function=oa.FunctionCall(name=name, arguments=arguments))


def _call_of(obj) -> oa.ToolCall:
    """{"name", "arguments" | "parameters"} -> a ToolCall (arguments as JSON text); ValueError
    for anything else the model wrote."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise ValueError("a tool call is an object with a name")
    args = obj.get("arguments", obj.get("parameters", {}))
    return _call(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))


# ---- auto parsers -------------------------------------------------------------------------
# The model writes these calls, so nothing it writes is an error of the request: text that is not
# a call (broken JSON, a call cut short by max_tokens, an object without a name) stays content,
# as vLLM's parsers keep it, and the request answers 200.
def hermes_blocks(text: str) -> tuple[str, list[oa.ToolCall]]:
    """The <tool_call> blocks of `text` (the last may lack its closing tag) -> (the raw text of
    those whose body is not a call, in order: content; the calls)."""
    not_calls, calls = [], []
    for m in _HERMES_CALL.finditer(text):
        body = m.group(1)
        if not body.strip():
            continue
        try:
            calls.append(_call_of(json.loads(body)))
        except ValueError:  # (json's errors are ValueErrors too)
            not_calls.append(m.group(0))
    return "".join(not_calls), calls


def parse_hermes(text: str) -> tuple[str | None, list[oa.ToolCall]]:
    """Content before the first <tool_call>, then every block that is not a call; the calls."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    not_calls, calls = hermes_blocks(text[start:])
    content = text[:start] + not_calls
    return (content if content.strip() else None), calls


def parse_llama3_json(text: str) -> tuple[str | None, list[oa.ToolCall]]:
    """Calls as JSON objects separated by ';' (after an optional <|python_tag|>). Text that does not
    start as a call is content; where the calls stop parsing, the rest is content (all of it when
    none parsed)."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
            calls.append(_call_of(obj))
        except ValueError:
            return (body[pos:] if calls else text), calls
        pos = len(body) - len(body[end:].lstrip().removeprefix(";").lstrip())
    return None, calls


# ---- streaming ----------------------------------------------------------------------------
class ToolStream:
    """Text deltas of one choice -> (content delta, tool call deltas). `called`: a call was sent."""
    called = False

    def feed(self, text: str, final: bool) -> tuple[str, list[oa.DeltaToolCall]]:
        raise NotImplementedError


class _NamedStream(ToolStream):
    def __init__(self, name: str):
        self.name = name

    def feed(self, text, final):
        if not self.called:
            self.called = True
            return "", [oa.DeltaToolCall(index=0, id=new_call_id(), type="function",
                                         function=oa.DeltaFunctionCall(name=self.name, arguments=text))]
        return "", [oa.DeltaToolCall(index=0, function=oa.DeltaFunctionCall(arguments=text))] if text else []


class _ArrayStream(ToolStream):
    """The grammar-shaped array [{"name": N, "parameters": {...}}, ...], scanned as it grows:
    a call's header goes out once its name is complete, then its arguments as they arrive."""

    def __init__(self):
        self.buf = ""
        self.pos = 0  # next char to scan
        self.depth = 0
        self.in_string = self.escape = False
        self.elem_start: int | None = None  # where the current element ("{") starts
        self.args_start: int | None = None
        self.args_end: int | None = None  # the arguments value closed here
        self.args_sent = 0
        self.index = -1

    def feed(self, text, final):
        self.buf += text
        deltas = []
        for self.pos in range(self.pos, len(self.buf)):
            ch = self.buf[self.pos]
            if self.in_string:
                self.escape = not self.escape and ch == "\\"
                self.in_string = self.escape or ch != '"'
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
                if self.depth == 2:
                    self.elem_start, self.args_start, self.args_end = self.pos, None, None
            elif ch in "]}":
                self.depth -= 1
                if self.depth == 2 and self.args_start is not None and self.args_end is None:
                    self.args_end = self.pos + 1
                elif self.depth == 1 and self.elem_start is not None:
                    deltas += self._progress(self.pos)
                    self.elem_start = None
            if self.depth >= 2 and self.args_start is None:
                deltas += self._progress(self.pos + 1)
        self.pos = len(self.buf)
        if self.elem_start is not None:
            deltas += self._progress(len(self.buf))
        return "", _merged(deltas)

    def _progress(self, upto: int) -> list[oa.DeltaToolCall]:
        deltas = []
        if self.args_start is None:
            m = _CALL_HEAD.match(self.buf, self.elem_start, upto)
            if m is None:
                return []
            self.args_start = self.args_sent = m.end()
            self.index += 1
            self.called = True
            deltas.append(oa.DeltaToolCall(index=self.index, id=new_call_id(), type="function",
                                           function=oa.DeltaFunctionCall(name=json.loads(f'"{m.group(1)}"'),
                                                                         arguments="")))
        end = min(upto, self.args_end) if self.args_end is not None else upto
        if end > self.args_sent:
            deltas.append(oa.DeltaToolCall(index=self.index,
                                           function=oa.DeltaFunctionCall(arguments=self.buf[self.args_sent:end])))
            self.args_sent = end
        return deltas


def _merged(deltas: list[oa.DeltaToolCall]) -> list[oa.DeltaToolCall]:
    """One delta per call: a call's later pieces of one feed joined to its first (clients read
    `delta.tool_calls` as one entry per call index, as OpenAI and vLLM send it)."""
    out: list[oa.DeltaToolCall] = []
    for d in deltas:
        if out and out[-1].index == d.index and d.id is None and out[-1].function is not None:
            out[-1].function.arguments = (out[-1].function.arguments or "") + (d.function.arguments or "")
        else:
            out.append(d)
    return out


class _AutoStream(ToolStream):
    """Content passes through until a call starts; each call goes out whole once it is complete.
    `max_calls` (parallel_tool_calls false: 1): later calls are dropped, as vLLM drops them."""

    def __init__(self, parser: str, max_calls: int | None = None):
        self.parser = parser
        self.max_calls = max_calls
        self.buf = ""
        self.sent = 0  # chars of buf already sent as content (hermes: or read as calls)
        self.num_calls = 0

    def feed(self, text, final):
        self.buf += text
        if self.parser == "llama3_json":
            return self._feed_json(final)
        start = self.buf.find("<tool_call>")
        if start < 0:
            keep = 0 if final else _partial_tag(self.buf, "<tool_call>")
            content, self.sent = self.buf[self.sent:len(self.buf) - keep], len(self.buf) - keep
            return content, []
        content = self.buf[self.sent:start] if self.sent < start else ""
        self.sent = max(self.sent, start)
        # the blocks completed since the last feed (all that is left, at the end): calls, or content
        closed = self.buf.rfind("</tool_call>", self.sent)
        end = len(self.buf) if final else -1 if closed < 0 else closed + len("</tool_call>")
        if end <= self.sent:
            return content, []
        not_calls, calls = hermes_blocks(self.buf[self.sent:end])
        self.sent = end
        return content + not_calls, self._new_calls(calls)

    def _feed_json(self, final):
        body = self.buf.lstrip()
        if not body or (not final and "<|python_tag|>".startswith(body[:14]) and len(body) < 14):
            return "", []
        if not body.removeprefix("<|python_tag|>").lstrip().startswith("{"):
            content, self.sent = self.buf[self.sent:], len(self.buf)
            return content, []
        if not final:
            return "", []
        content, calls = parse_llama3_json(self.buf)
        return content or "", self._new_calls(calls)

    def _new_calls(self, new: list[oa.ToolCall]) -> list[oa.DeltaToolCall]:
        """Calls found since the last feed, numbered on from those sent."""
        if self.max_calls is not None:
            new = new[:max(self.max_calls - self.num_calls, 0)]
        first, self.num_calls = self.num_calls, self.num_calls + len(new)
        self.called |= bool(new)
        return [oa.DeltaToolCall(index=first + i, id=c.id, type="function",
                                 function=oa.DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
                for i, c in enumerate(new)]


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag (held back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---- templates without tools --------------------------------------------------------------
def hermes_messages(messages: list[dict], tools: list[oa.ChatTool] | None) -> list[dict]:
    """The conversation with the tools (if any) and earlier calls in Hermes form, for a template
    that has no `tools`."""
    listing = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in tools or [])
    prompt = ("You may call one or more functions to assist with the user query. The functions are listed "
              f"in <tools></tools>:\n<tools>\n{listing}\n</tools>\nFor each function call, answer with a JSON "
              'object {"name": <function-name>, "arguments": <args-json-object>} inside <tool_call></tool_call>.')
    out = []
    for m in messages:
        m = dict(m)
        for call in m.pop("tool_calls", None) or []:
            fn = call.get("function", {})
            body = json.dumps({"name": fn.get("name"), "arguments": _json_or_text(fn.get("arguments") or {})},
                              ensure_ascii=False)
            m["content"] = (m.get("content") or "") + f"<tool_call>\n{body}\n</tool_call>"
        out.append(m)
    if not tools:
        return out
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out


def _json_or_text(value):
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value
