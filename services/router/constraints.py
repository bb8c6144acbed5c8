"""Request fields that constrain the output -> SamplingParams fields (torch-free).

    response_format {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema"}}
    vLLM's guided_json | guided_regex | guided_choice | guided_grammar
    vLLM's structured_outputs {"json" | "json_object" | "regex" | "choice" | "grammar"}
        -> one StructuredOutputsParams (two of them in one request: 400), its `param` the field
           the client used, so a bad schema's 400 names it
    logit_bias {"token id": bias}  -> {int: float}
"""

from __future__ import annotations

from pdserve.common.sampling_params import ParameterError, StructuredOutputsParams

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}


def logit_bias_of(raw: dict[str, float] | None) -> dict[int, float] | None:
    if not raw:
        return None
    bias = {}
    for key, value in raw.items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise ParameterError("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
    return bias


def structured_outputs_of(req) -> StructuredOutputsParams | None:
    """The one output grammar a completions or chat request asks for, if any."""
    specs = []
    rf = req.response_format
    if rf is not None:
        spec = _response_format(rf)
        if spec is not None:
            specs.append(spec)
    for name, kind in GUIDED_FIELDS.items():
        value = getattr(req, name, None)
        if value is not None:
            specs.append(StructuredOutputsParams(**{kind: value}, param=name))
    if req.structured_outputs is not None:
        so = req.structured_outputs
        if not isinstance(so, dict):
            raise ParameterError("structured_outputs", "structured_outputs must be an object")
        known = {"json", "json_object", "regex", "choice", "grammar", "disable_any_whitespace"}
        unknown = sorted(set(so) - known)
        if unknown:
            raise ParameterError("structured_outputs", f"unsupported structured_outputs field(s): {', '.join(unknown)}")
        specs.append(StructuredOutputsParams(**so, param="structured_outputs"))
    if len(specs) > 1:
        raise ParameterError(specs[1].param, f"{specs[0].param} and {specs[1].param} both constrain the output: give one")
    return specs[0] if specs else None


def _response_format(rf: dict) -> StructuredOutputsParams | None:
    if not isinstance(rf, dict):
        raise ParameterError("response_format", "response_format must be an object")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True, param="response_format")
    if kind == "json_schema":
        return StructuredOutputsParams(json=_json_schema(rf.get("json_schema")), param="response_format")
    raise ParameterError("response_format", f"response_format type must be text, json_object or json_schema, "
                                            f"got {kind!r}")


def _json_schema(js) -> dict | str:
    """The schema of response_format's json_schema {"name", "schema", "strict", "description"}:
    OpenAI requires the name; the schema is what the grammar is built from. A missing part is a
    400 naming its path (the message starts with it, so the Responses API can rename it)."""
    where = "response_format.json_schema"
    if not isinstance(js, dict):
        raise ParameterError(where, f"{where} is required with type json_schema: "
                                    '{"name": ..., "schema": {...}, "strict": true}')
    if not isinstance(js.get("name"), str) or not js["name"]:
        raise ParameterError(f"{where}.name", f"{where}.name is required: a non-empty string naming the format")
    if js.get("schema") is None:
        raise ParameterError(f"{where}.schema", f"{where}.schema is required: the JSON schema the output must "
                                                f"follow")
    return js["schema"]
