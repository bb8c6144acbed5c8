"""Constrained decoding in the engine (tiny random Llama, real xgrammar): grammar outputs are
valid whatever the sampling, the matcher catches up with output tokens given at admission (the
decode side of a disaggregated request), overlapped steps drain for grammar requests and leave
unconstrained rows untouched, logit_bias / allowed_token_ids / bad_words follow vLLM."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import ParameterError, SamplingParams

# Every string bounded, so even a random model's output ends inside max_tokens.
SCHEMA = {"type": "object", "properties": {
    "color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
    "n": {"type": "integer", "minimum": 0, "maximum": 99},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["color", "ok", "n", "tags"]}
PROMPT = [1, 504, 3458, 282, 253, 1345, 28]


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["llama"], num_gpu_blocks_override=256)


def run(llm, params, prompt=PROMPT):
    return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(llm, temperature):
    outs = run(llm, SamplingParams(n=3, temperature=temperature, seed=3, max_tokens=80,
                                   structured_outputs={"json": SCHEMA}))
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_regex_choice_and_grammar(llm):
    outs = run(llm, SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=20,
                                   structured_outputs={"regex": r"[0-9]{3}-[a-c]{2}"}))
    assert all(re.fullmatch(r"[0-9]{3}-[a-c]{2}", o.text) for o in outs), [o.text for o in outs]
    outs = run(llm, SamplingParams(n=4, temperature=1.0, seed=2, max_tokens=20,
                                   structured_outputs={"choice": ["alpha", "beta gamma"]}))
    assert {o.text for o in outs} <= {"alpha", "beta gamma"}
    outs = run(llm, SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=20,
                                   structured_outputs={"grammar": 'root ::= "x" ("y" | "z") "!"'}))
    assert {o.text for o in outs} <= {"xy!", "xz!"}


def test_grammar_end_finishes_with_ignore_eos(llm):
    out = run(llm, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                  structured_outputs={"choice": ["done"]}))[0]
    # the grammar allows only EOS after "done"; accepting it ends the matcher and the request
    assert out.text == "done" and out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_token_ids
    assert len(out.token_ids) < 30


def test_min_tokens_does_not_hold_a_complete_grammar_open(llm):
    """min_tokens bans EOS, but once the grammar is complete EOS is all it allows: the grammar
    ends the request before min_tokens (it was a row of -inf logits, a token the grammar rejects,
    and finish_reason "error"). Where the grammar allows more, min_tokens still holds."""
    for temperature in (0.0, 1.0):
        outs = run(llm, SamplingParams(n=3, temperature=temperature, seed=5, max_tokens=30, min_tokens=8,
                                       structured_outputs={"choice": ["yes", "no"]}))
        assert [(o.text in ("yes", "no"), o.finish_reason) for o in outs] == [(True, "stop")] * 3, outs
    out = run(llm, SamplingParams(temperature=0, max_tokens=40, min_tokens=6,
                                  structured_outputs={"regex": r"[a-z]{1,30}"}))[0]
    assert out.finish_reason in ("stop", "length") and len(out.token_ids) >= 6, out
    assert re.fullmatch(r"[a-z]{1,30}", out.text), out.text


def test_matcher_catches_up_with_given_output_tokens(llm):
    """A decode worker admits a request with the first token the prefill side sampled; the
    grammar state must continue from there (here: two tokens given)."""
    tok = llm.get_tokenizer()
    given = tok.encode('{"color": "blue", "ok": ', add_special_tokens=False)
    engine = llm.engine
    engine.add_request("r", PROMPT, SamplingParams(temperature=1.0, seed=9, max_tokens=60,
                                                   structured_outputs={"json": SCHEMA}), output_token_ids=[given])
    new_ids, finish = [], None
    while engine.has_unfinished():
        for o in engine.step():
            new_ids += o.new_token_ids
            finish = o.finish_reason or finish
    assert finish == "stop"
    full = tok.decode(given + new_ids, skip_special_tokens=True)
    data = json.loads(full)
    jsonschema.validate(data, SCHEMA)
    assert data["color"] == "blue"
    assert engine.structured.num_requests == 0


def test_overlapped_steps_equal_one_at_a_time(tiny_models):
    """Grammar, bad_words and allowed_token_ids rows keep steps overlapped (the token in flight is
    read from the previous step) and give exactly the tokens of one-at-a-time steps, seeded
    sampling included; unconstrained rows are untouched by their neighbours' masks."""
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPT[:k]} for k in (7, 6, 5, 4, 3)]
    params = [plain,
              SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=80, structured_outputs={"json": SCHEMA}),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, allowed_token_ids=[28, 29, 30]),
              SamplingParams(temperature=0.8, seed=8, max_tokens=20, ignore_eos=True,
                             structured_outputs={"choice": ["done"]}),
              SamplingParams(temperature=1.0, seed=6, max_tokens=24, ignore_eos=True, bad_words=["the", "a b"])]
    runs = {}
    for overlap in (False, True):
        llm = LLM(tiny_models["llama"], num_gpu_blocks_override=256, async_scheduling=overlap)
        alone = run(llm, plain)[0].token_ids
        outs = llm.generate(prompts, params, use_tqdm=False)
        engine = llm.engine
        assert outs[0].outputs[0].token_ids == alone
        for o in outs[1].outputs:
            jsonschema.validate(json.loads(o.text), SCHEMA)
        assert set(outs[2].outputs[0].token_ids) <= {28, 29, 30}
        assert outs[3].outputs[0].text == "done" and outs[3].outputs[0].finish_reason == "stop"
        assert engine.kv.num_free_blocks == engine.runner.num_blocks and engine.structured.num_requests == 0
        if overlap:
            assert engine.num_overlapped_steps > engine.num_steps // 2
        runs[overlap] = [[c.token_ids for c in o.outputs] for o in outs]
    assert runs[True] == runs[False]


def drive(engine, requests, abort_at=None):
    """Step an engine to the end -> {request id: (token ids, finish reason)}; `abort_at`:
    (step, request id) aborted right after that step, while the next step's mask fill runs."""
    for rid, params in requests.items():
        engine.add_request(rid, PROMPT, params)
    got, finish, step = {rid: [] for rid in requests}, {}, 0
    while engine.has_unfinished():
        outs = engine.step()
        step += 1
        if abort_at is not None and step == abort_at[0]:
            assert engine.structured._fill is not None  # the launched step's fill is in flight
            outs += engine.abort([abort_at[1]])
        for o in outs:
            got[o.request_id] += o.new_token_ids
            finish[o.request_id] = o.finish_reason or finish.get(o.request_id)
    assert engine.structured.num_requests == 0 and engine.kv.num_free_blocks == engine.runner.num_blocks
    return {rid: (got[rid], finish[rid]) for rid in requests}


def test_abort_while_the_fill_runs_leaves_the_others_exact(tiny_models):
    """Overlapped steps: a grammar request aborted while the workers fill its next mask ends
    with "abort"; the other requests get exactly the tokens of one-at-a-time steps without it."""
    grammar = {f"g{i}": SamplingParams(temperature=1.0, seed=10 + i, max_tokens=60,
                                       structured_outputs={"json": SCHEMA}) for i in range(3)}
    overlapped = drive(LLM(tiny_models["llama"], num_gpu_blocks_override=256, async_scheduling=True).engine,
                       grammar, abort_at=(4, "g1"))
    alone = drive(LLM(tiny_models["llama"], num_gpu_blocks_override=256, async_scheduling=False).engine,
                  {rid: p for rid, p in grammar.items() if rid != "g1"})
    assert overlapped.pop("g1")[1] == "abort"
    assert overlapped == alone and all(f == "stop" for _, f in alone.values())


def test_given_tokens_the_grammar_rejects_fail_the_request(llm):
    """A decode worker admits a request whose given output the grammar rejects: it finishes with
    "error" (reported once), its neighbours go on."""
    tok = llm.get_tokenizer()
    bad = tok.encode("nope", add_special_tokens=False)
    params = SamplingParams(temperature=0, max_tokens=20, structured_outputs={"json": SCHEMA})
    engine = llm.engine
    engine.add_request("bad", PROMPT, params, output_token_ids=[bad])
    engine.add_request("ok", PROMPT, params)
    finish = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id not in finish or finish[o.request_id] is None
            finish[o.request_id] = o.finish_reason
    assert finish["bad"] == "error" and finish["ok"] in ("stop", "length") and engine.structured.num_requests == 0


def test_logit_bias_allowed_token_ids_and_bad_words(llm):
    assert run(llm, SamplingParams(temperature=1.0, seed=1, max_tokens=6, ignore_eos=True,
                                   logit_bias={1234: 100}))[0].token_ids == [1234] * 6
    greedy = run(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].token_ids
    banned = run(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True,
                                     logit_bias={greedy[0]: -100}))[0].token_ids
    assert banned[0] != greedy[0]
    outs = run(llm, SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True,
                                   allowed_token_ids=[100, 200]))
    assert all(set(o.token_ids) <= {100, 200} for o in outs)
    tok = llm.get_tokenizer()
    word = tok.decode(greedy[:1]).strip() or "the"
    out = run(llm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, bad_words=[word]))[0]
    ids = llm.engine.structured._bad_word_ids([word])
    assert not any(w[0] in out.token_ids for w in ids if len(w) == 1)


def test_bad_constraints_are_parameter_errors(llm):
    with pytest.raises(ParameterError) as e:
        SamplingParams(structured_outputs={"json": {"type": "objekt"}})
    assert e.value.param == "structured_outputs"
    for spec in ({"regex": "(ab"}, {"grammar": "root ::= missing"}):
        with pytest.raises(ParameterError) as e:
            llm.engine.validate(PROMPT, SamplingParams(structured_outputs=spec))
        assert e.value.param == "structured_outputs" and "cannot compile" in str(e.value)
    with pytest.raises(ParameterError) as e:
        llm.engine.validate(PROMPT, SamplingParams(logit_bias={10 ** 6: 1}))
    assert e.value.param == "logit_bias"
    with pytest.raises(ParameterError):
        SamplingParams(logit_bias={1: 101})


def test_compiled_grammars_are_cached(llm):
    grammars = llm.engine.structured.grammars
    spec = SamplingParams(structured_outputs={"json": {"type": "object", "properties": {"z": {"type": "integer"}}}})
    before = grammars.num_compiled
    for _ in range(3):
        llm.engine.validate(PROMPT, spec)
    assert grammars.num_compiled == before + 1


@pytest.mark.gpu
def test_cuda_grammar_rows_overlapped_and_graphs(tiny_models):
    """On CUDA (Triton attention, CUDA graphs, pinned bitmasks, xgrammar's Triton mask kernel):
    grammar outputs validate, and overlapped steps give the tokens of one-at-a-time steps."""
    params = [SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=80, structured_outputs={"json": SCHEMA}),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=["the"]),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2,
                             structured_outputs={"regex": r"[a-z]{3,20}"})]
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:5]}, {"prompt_token_ids": PROMPT[:4]}]
    runs = {}
    for overlap in (False, True):
        llm = LLM(tiny_models["llama"], device="cuda", num_gpu_blocks_override=256, async_scheduling=overlap)
        outs = llm.generate(prompts, params, use_tqdm=False)
        for o in outs[0].outputs:
            jsonschema.validate(json.loads(o.text), SCHEMA)
        assert re.fullmatch(r"[a-z]{3,20}", outs[2].outputs[0].text)
        runs[overlap] = [[c.token_ids for c in o.outputs] for o in outs]
        assert (llm.engine.num_overlapped_steps > 0) == overlap
        del llm
    assert runs[True] == runs[False]


def test_tensor_parallel_grammar_rows_equal_tp1(tiny_models):
    """With --tensor-parallel-size 2 rank 0 samples, so only it masks; overlapped steps read the
    in-flight token from rank 0's previous step. Same tokens as one rank."""
    params = [SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=60, structured_outputs={"json": SCHEMA}),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, allowed_token_ids=[28, 29, 30])]
    prompts = [{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT[:4]}]
    runs = []
    for tp in (1, 2):
        llm = LLM(tiny_models["llama"], kv_cache_memory_gb=0.05, tensor_parallel_size=tp, async_scheduling=True)
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
        for o in outs[0].outputs:
            jsonschema.validate(json.loads(o.text), SCHEMA)
        runs.append([[c.token_ids for c in o.outputs] for o in outs])
    assert runs[0] == runs[1]
