"""SamplingParams, logprobs and finish reasons survive a trip through the proto messages."""

import pytest

from pdserve.common.outputs import Logprob
from pdserve.common.sampling_params import ParameterError, SamplingParams
from pdserve.proto import convert
from pdserve.proto import pdserve_pb2 as pb


def _round_trip(params: SamplingParams) -> SamplingParams:
    wire = convert.sampling_params_to_proto(params).SerializeToString()
    return convert.sampling_params_from_proto(pb.SamplingParams.FromString(wire))


def test_sampling_params_defaults_round_trip():
    assert _round_trip(SamplingParams()) == SamplingParams()


def test_sampling_params_every_field_round_trips():
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=-12345,
                            max_tokens=None, min_tokens=2, stop=["\n\n", "END"], stop_token_ids=[2, 7],
                            ignore_eos=True, include_stop_str_in_output=True, presence_penalty=0.5,
                            frequency_penalty=-0.25, repetition_penalty=1.1, logprobs=0,
                            prompt_logprobs=5, skip_special_tokens=False)
    assert _round_trip(params) == params


def test_sampling_params_from_proto_validates():
    msg = convert.sampling_params_to_proto(SamplingParams())
    msg.top_p = 1.5
    with pytest.raises(ParameterError) as error:
        convert.sampling_params_from_proto(msg)
    assert error.value.param == "top_p"


@pytest.mark.parametrize("field,value", [("seed", 2**64), ("seed", -(2**63) - 1), ("top_k", 2**31),
                                         ("min_tokens", 2**32), ("max_tokens", 2**32), ("stop_token_ids", [2**40])])
def test_values_the_wire_cannot_carry_are_parameter_errors(field, value):
    """Checked when the params are made, at the edge, so the proto conversion never overflows."""
    with pytest.raises(ParameterError) as error:
        SamplingParams(**{field: value})
    assert error.value.param == field


def test_token_logprobs_round_trip():
    logprobs = {5: Logprob(-0.5, rank=2), 9: Logprob(-0.25, rank=1), 11: Logprob(-3.0, rank=None)}
    msg = pb.TokenLogprobs.FromString(convert.token_logprobs_to_proto(5, logprobs).SerializeToString())
    assert (msg.token_id, msg.rank, [t.token_id for t in msg.top]) == (5, 2, [9, 11])
    assert convert.token_logprobs_from_proto(msg) == logprobs


def test_token_logprobs_must_contain_the_chosen_token():
    with pytest.raises(ValueError, match="token 4"):
        convert.token_logprobs_to_proto(4, {5: Logprob(-0.5)})


@pytest.mark.parametrize("reason", [None, "stop", "length", "abort", "error"])
def test_finish_reason_round_trip(reason):
    assert convert.finish_reason_from_proto(convert.finish_reason_to_proto(reason)) == reason


def test_unknown_finish_reason_is_refused():
    with pytest.raises(ValueError, match="unknown finish_reason 'eos'"):
        convert.finish_reason_to_proto("eos")


@pytest.mark.parametrize("stop_reason", [None, "###", 0, 128001])
def test_stop_reason_round_trip(stop_reason):
    delta = pb.SequenceDelta(index=0)
    convert.set_stop_reason(delta, stop_reason)
    received = pb.SequenceDelta.FromString(delta.SerializeToString())
    assert convert.stop_reason_from_proto(received) == stop_reason


@pytest.mark.parametrize("spec", [{"json": {"type": "object", "properties": {"a": {"enum": [1, "x"]}}}},
                                  {"json_object": True}, {"regex": r"\d+"}, {"choice": ["a", "b c"]},
                                  {"grammar": 'root ::= "x"', "disable_any_whitespace": False}])
def test_token_constraints_round_trip(spec):
    params = SamplingParams(logit_bias={7: -100, 9: 2.5}, allowed_token_ids=[1, 2, 3], bad_words=["foo", "a b"],
                            structured_outputs=spec)
    assert _round_trip(params) == params


def test_packed_rows_round_trip_through_the_wire():
    rows = convert.PackedRows()
    rows.add("a", [5, 6, 7], None)
    rows.add("b", [], "abort")
    rows.add("c#x", [9], "stop")
    rows.add("d", [1, 2], "length")
    msg = pb.DecodeChunks(chunks=[pb.DecodeChunk(request_id="e", error="boom", finished=True)])
    rows.fill(msg)
    assert len(rows) == 0 and rows.new_token_ids == []  # emptied for the next message
    got = convert.unpack_rows(pb.DecodeChunks.FromString(msg.SerializeToString()))
    assert [(rid, d.new_token_ids, d.finish_reason, d.finished) for rid, d in got] == [
        ("a", [5, 6, 7], None, False), ("b", [], "abort", True), ("c#x", [9], "stop", True),
        ("d", [1, 2], "length", True)]
    out = got[0][1].output("a")
    assert (out.request_id, out.index, out.new_token_ids, out.finish_reason, out.stop_reason) == ("a", 0, [5, 6, 7],
                                                                                                  None, None)
    assert convert.unpack_rows(pb.DecodeChunks()) == []


def test_packed_rows_that_do_not_add_up_are_refused():
    msg = pb.DecodeChunks(request_ids=["a"], num_new_tokens=[2], new_token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="add up to 2"):
        convert.unpack_rows(msg)
