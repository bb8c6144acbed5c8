"""Conversions between the engine's Python objects and the proto messages (torch-free).

proto3 scalars have no presence, so `sampling_params_to_proto` always writes every field and
`sampling_params_from_proto` rebuilds (and so re-validates) a SamplingParams: a servicer turns the
ParameterError it may raise into INVALID_ARGUMENT. Absent values map to None, never to -1:

    proto                      Python
    optional field unset       None
    TopLogprob.rank == 0       Logprob.rank None (ranks are 1-based)
    FINISH_REASON_NONE         finish_reason None
    stop_reason oneof unset    stop_reason None
"""

from __future__ import annotations

from pdserve.common.outputs import Logprob, TokenLogprobs
from pdserve.common.sampling_params import ParameterError, SamplingParams, StructuredOutputsParams
from pdserve.proto import pdserve_pb2 as pb

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# The one table between wire enums and the strings the engine and OpenAI use.
FINISH_REASONS = {
    None: pb.FINISH_REASON_NONE,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
ROLES = {"prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE, "both": pb.ROLE_BOTH}
STATUSES = {"serving": pb.SERVING, "draining": pb.DRAINING, "not_serving": pb.NOT_SERVING}

_OPTIONAL_FIELDS = ("seed", "max_tokens", "logprobs", "prompt_logprobs")
_PLAIN_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "min_tokens", "ignore_eos",
                 "include_stop_str_in_output", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "skip_special_tokens")


def sampling_params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    if params.seed is not None and not _INT64_MIN <= params.seed <= _INT64_MAX:
        raise ParameterError("seed", f"seed must fit in a signed 64-bit integer, got {params.seed}")
    msg = pb.SamplingParams(stop=params.stop, stop_token_ids=params.stop_token_ids)
    for name in _PLAIN_FIELDS:
        setattr(msg, name, getattr(params, name))
    for name in _OPTIONAL_FIELDS:
        if getattr(params, name) is not None:
            setattr(msg, name, getattr(params, name))
    msg.logit_bias.update(params.logit_bias or {})
    msg.allowed_token_ids.extend(params.allowed_token_ids or [])
    msg.bad_words.extend(params.bad_words)
    if params.structured_outputs is not None:
        kind, spec = params.structured_outputs.to_wire()
        msg.structured_outputs.CopyFrom(pb.StructuredOutputs(
            kind=kind, spec=spec, disable_any_whitespace=params.structured_outputs.disable_any_whitespace))
    return msg


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    kwargs = {name: getattr(msg, name) for name in _PLAIN_FIELDS}
    kwargs.update({name: getattr(msg, name) if msg.HasField(name) else None for name in _OPTIONAL_FIELDS})
    so = msg.structured_outputs
    return SamplingParams(stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids),
                          logit_bias=dict(msg.logit_bias) or None, allowed_token_ids=list(msg.allowed_token_ids) or None,
                          bad_words=list(msg.bad_words), structured_outputs=StructuredOutputsParams.from_wire(
                              so.kind, so.spec, so.disable_any_whitespace) if msg.HasField("structured_outputs") else None,
                          **kwargs)


def finish_reason_to_proto(finish_reason: str | None) -> int:
    try:
        return FINISH_REASONS[finish_reason]
    except KeyError:
        raise ValueError(f"unknown finish_reason {finish_reason!r}; "
                         f"expected one of {[k for k in FINISH_REASONS if k]} or None") from None


def finish_reason_from_proto(value: int) -> str | None:
    for name, number in FINISH_REASONS.items():
        if number == value:
            return name
    raise ValueError(f"unknown FinishReason value {value}")


def set_stop_reason(msg: pb.FirstToken | pb.SequenceDelta, stop_reason: int | str | None) -> None:
    """Fill the `stop_reason` oneof of a FirstToken or SequenceDelta."""
    if isinstance(stop_reason, str):
        msg.stop_str = stop_reason
    elif isinstance(stop_reason, int):
        msg.stop_token_id = stop_reason
    elif stop_reason is not None:
        raise TypeError(f"stop_reason must be str, int or None, got {type(stop_reason).__name__}")


def stop_reason_from_proto(msg: pb.FirstToken | pb.SequenceDelta) -> int | str | None:
    which = msg.WhichOneof("stop_reason")
    return None if which is None else getattr(msg, which)


def token_logprobs_to_proto(token_id: int, logprobs: TokenLogprobs) -> pb.TokenLogprobs:
    """`logprobs` holds the chosen `token_id` and its top alternatives (common/outputs.py)."""
    if token_id not in logprobs:
        raise ValueError(f"logprobs for token {token_id} do not contain the token itself")
    chosen = logprobs[token_id]
    top = [pb.TopLogprob(token_id=tid, logprob=lp.logprob, rank=lp.rank or 0)
           for tid, lp in logprobs.items() if tid != token_id]
    return pb.TokenLogprobs(token_id=token_id, logprob=chosen.logprob, rank=chosen.rank or 0, top=top)


def token_logprobs_from_proto(msg: pb.TokenLogprobs) -> TokenLogprobs:
    result = {msg.token_id: Logprob(logprob=msg.logprob, rank=msg.rank or None)}
    for entry in msg.top:
        result[entry.token_id] = Logprob(logprob=entry.logprob, rank=entry.rank or None)
    return result
