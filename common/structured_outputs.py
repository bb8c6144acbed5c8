"""StructuredOutputsParams: what grammar a request's output must follow (torch-free).

Exactly one kind per request, spelled as vLLM's `StructuredOutputsParams`:

    json          a JSON schema (dict or JSON text)   -> an object/value valid under it
    json_object   True                                -> any JSON object
    regex         a regular expression                -> a string it matches in full
    choice        a list of strings                   -> exactly one of them
    grammar       an EBNF grammar (xgrammar's GBNF)   -> a string of its language

Validated where it is built (the router, the CLI, `LLM`): a malformed JSON schema is caught here
with `jsonschema`; regexes and grammars are checked by the engine when it compiles them
(`common/engine/structured_output.py`), which raises `ParameterError` the same way. `param`
names the API field the spec came from (`response_format`, `guided_json`, `tool_choice` ...), so
the 400 points at what the client sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from pdserve.common.errors import ParameterError, check

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass
class StructuredOutputsParams:
    json: dict | bool | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    # vLLM's option, inverted default: pdserve writes compact JSON (one space after ':' and ',')
    # unless asked for any whitespace, which small models tend to fill with runs of newlines.
    disable_any_whitespace: bool = True
    param: str = field(default="structured_outputs", compare=False)  # the API field, for errors

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        check(len(given) == 1, self.param,
              f"give exactly one of {', '.join(KINDS)}, got {', '.join(given) or 'none'}")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ParameterError(self.param, f"the JSON schema is not valid JSON: {e}") from None
        if self.json is not None:
            check_json_schema(self.json, self.param)
        check(self.regex is None or (isinstance(self.regex, str) and self.regex != ""), self.param,
              "regex must be a non-empty string")
        check(self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip() != ""), self.param,
              "grammar must be a non-empty string")
        if self.choice is not None:
            check(isinstance(self.choice, list) and len(self.choice) > 0
                  and all(isinstance(c, str) and c for c in self.choice), self.param,
                  "choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """A hashable identity of the grammar, for the compiled-grammar cache."""
        kind = self.kind
        value = getattr(self, kind)
        if isinstance(value, (dict, list, bool)):
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        return kind, value, self.disable_any_whitespace

    def to_wire(self) -> tuple[str, str]:
        """(kind, text) for the proto message: dicts and lists as JSON."""
        kind = self.kind
        value = getattr(self, kind)
        return kind, value if isinstance(value, str) else json.dumps(value)

    @classmethod
    def from_wire(cls, kind: str, text: str, disable_any_whitespace: bool) -> "StructuredOutputsParams":
        check(kind in KINDS, "structured_outputs", f"unknown structured output kind {kind!r}")
        value = {"json": lambda: json.loads(text), "json_object": lambda: True, "regex": lambda: text,
                 "choice": lambda: json.loads(text), "grammar": lambda: text}[kind]()
        return cls(**{kind: value}, disable_any_whitespace=disable_any_whitespace)


def check_json_schema(schema, param: str) -> None:
    """A JSON schema must be an object (or a boolean) valid under its draft's meta-schema."""
    check(isinstance(schema, (dict, bool)), param,
          f"a JSON schema must be an object, got {type(schema).__name__}")
    if isinstance(schema, bool):
        return
    import jsonschema  # small and torch-free; imported only when a schema is given
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ParameterError(param, f"invalid JSON schema{f' at {where}' if where else ''}: {e.message}") from None
