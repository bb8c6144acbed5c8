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

from pdserve.common.outputs import EngineOutput, Logprob, TokenLogprobs
from pdserve.common.request import FINISH_REASON_NAMES
from pdserve.common.sampling_params import SamplingParams, StructuredOutputsParams
from pdserve.proto import pdserve_pb2 as pb

# Wire enum <-> the engine's finish reasons, derived by name from the one table
# (common/request.py FINISH_REASONS): a reason added there without its FINISH_REASON_<NAME> in the
# proto fails here, at import, not in a running stream.
FINISH_REASONS = {None: pb.FINISH_REASON_NONE,
                  **{name: pb.FinishReason.Value(f"FINISH_REASON_{name.upper()}") for name in FINISH_REASON_NAMES}}
_FINISH_BY_NUMBER = {number: name for name, number in FINISH_REASONS.items()}
ROLES = {"prefill": pb.ROLE_PREFILL, "decode": pb.ROLE_DECODE, "both": pb.ROLE_BOTH}
STATUSES = {"serving": pb.SERVING, "draining": pb.DRAINING, "not_serving": pb.NOT_SERVING}

_OPTIONAL_FIELDS = ("seed", "max_tokens", "logprobs", "prompt_logprobs")
_PLAIN_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "min_tokens", "ignore_eos",
                 "include_stop_str_in_output", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "skip_special_tokens")


def sampling_params_to_proto(params: SamplingParams) -> pb.SamplingParams:
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
    try:
        return _FINISH_BY_NUMBER[value]
    except KeyError:
        raise ValueError(f"unknown FinishReason value {value}") from None


def delta_to_proto(out: EngineOutput) -> pb.SequenceDelta:
    """An engine delta on the wire (its prompt-level fields travel in the enclosing message)."""
    msg = pb.SequenceDelta(index=out.index, new_token_ids=out.new_token_ids,
                           finish_reason=finish_reason_to_proto(out.finish_reason))
    if out.new_logprobs:
        msg.new_logprobs.extend(token_logprobs_to_proto(t, e) for t, e in zip(out.new_token_ids, out.new_logprobs))
    set_stop_reason(msg, out.stop_reason)
    return msg


def delta_from_proto(request_id: str, msg: pb.SequenceDelta, error: str | None = None) -> EngineOutput:
    return EngineOutput(request_id=request_id, index=msg.index, new_token_ids=list(msg.new_token_ids),
                        new_logprobs=[token_logprobs_from_proto(x) for x in msg.new_logprobs] or None,
                        finish_reason=finish_reason_from_proto(msg.finish_reason),
                        stop_reason=stop_reason_from_proto(msg), error=error)


def prompt_logprobs_to_proto(prompt_token_ids: list[int], entries: list[TokenLogprobs | None]) -> list[pb.TokenLogprobs]:
    """Entries of prompt tokens 1.. (token 0 has none and is not sent)."""
    return [token_logprobs_to_proto(t, e) for t, e in zip(prompt_token_ids[1:], entries[1:])]


def prompt_logprobs_from_proto(msgs) -> list[TokenLogprobs | None] | None:
    return [None] + [token_logprobs_from_proto(m) for m in msgs] if msgs else None


def set_stop_reason(msg: pb.SequenceDelta, stop_reason: int | str | None) -> None:
    """Fill the `stop_reason` oneof of a SequenceDelta."""
    if isinstance(stop_reason, str):
        msg.stop_str = stop_reason
    elif isinstance(stop_reason, int):
        msg.stop_token_id = stop_reason
    elif stop_reason is not None:
        raise TypeError(f"stop_reason must be str, int or None, got {type(stop_reason).__name__}")


def stop_reason_from_proto(msg: pb.SequenceDelta) -> int | str | None:
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


# ---- DecodeChunks' packed rows (requests whose news is only tokens, and maybe their end) ------
class PackedRows:
    """The decode side: rows gathered over a message interval, then copied into a DecodeChunks
    with one `extend` per field (services/decode/mux.py)."""

    def __init__(self):
        self.request_ids: list[str] = []
        self.num_new_tokens: list[int] = []
        self.new_token_ids: list[int] = []
        self.finished_rows: list[int] = []
        self.finish_reasons: list[int] = []

    def __len__(self) -> int:
        return len(self.request_ids)

    def add(self, request_id: str, new_token_ids: list[int], finish_reason: str | None) -> None:
        if finish_reason is not None:
            self.finished_rows.append(len(self.request_ids))
            self.finish_reasons.append(FINISH_REASONS[finish_reason])
        self.request_ids.append(request_id)
        self.num_new_tokens.append(len(new_token_ids))
        self.new_token_ids += new_token_ids

    def fill(self, msg: pb.DecodeChunks) -> None:
        """Copy the rows into `msg` (and start over empty)."""
        msg.request_ids.extend(self.request_ids)
        msg.num_new_tokens.extend(self.num_new_tokens)
        msg.new_token_ids.extend(self.new_token_ids)
        msg.finished_rows.extend(self.finished_rows)
        msg.finish_reasons.extend(self.finish_reasons)
        self.__init__()


class PackedDelta:
    """The router side: one packed row of a DecodeChunks (read where a DecodeChunk would be: it
    has the DecodeChunk attributes MuxedDecode reads, `finished` and `status_code`)."""
    __slots__ = ("new_token_ids", "finish_reason")
    status_code = 0  # never refused: a refusal is a DecodeChunk

    def __init__(self, new_token_ids: list[int], finish_reason: str | None):
        self.new_token_ids, self.finish_reason = new_token_ids, finish_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def output(self, request_id: str) -> EngineOutput:
        return EngineOutput(request_id=request_id, index=0, new_token_ids=self.new_token_ids,
                            finish_reason=self.finish_reason)


def unpack_rows(msg: pb.DecodeChunks) -> list[tuple[str, PackedDelta]]:
    """A DecodeChunks' packed rows as (request id, PackedDelta), in row order."""
    ids = list(msg.request_ids)
    if not ids:
        return []
    flat = list(msg.new_token_ids)  # one copy out of the message, then plain list slices
    finished = dict(zip(msg.finished_rows, msg.finish_reasons))
    rows, pos = [], 0
    for i, (rid, n) in enumerate(zip(ids, msg.num_new_tokens)):
        end = pos + n
        reason = finished.get(i)
        rows.append((rid, PackedDelta(flat[pos:end], None if reason is None else finish_reason_from_proto(reason))))
        pos = end
    if pos != len(flat):
        raise ValueError(f"DecodeChunks: num_new_tokens add up to {pos}, new_token_ids has {len(flat)}")
    return rows
