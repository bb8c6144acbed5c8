"""Bad input gets a clear error naming the parameter, and the engine keeps serving others."""

from __future__ import annotations

import pytest

from pdserve.common.config import ConfigError
from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import ParameterError, SamplingParams


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"n": 0}, "n"), ({"min_p": 2.0}, "min_p"),
    ({"logprobs": -1}, "logprobs"), ({"repetition_penalty": 0.0}, "repetition_penalty"),  # the cap: test_sampling
    ({"stop": [""]}, "stop"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
])
def test_invalid_sampling_params_name_the_parameter(kwargs, param):
    with pytest.raises(ParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_bad_prompts_fail_alone_while_the_engine_serves_others(tiny_models):
    llm = LLM(tiny_models["llama"], max_model_len=64, num_gpu_blocks_override=64)
    engine = llm.engine
    llm.add_request("good-1", [1, 2, 3], SamplingParams(temperature=0, max_tokens=5))
    for prompt, needle in (([], "empty"), (list(range(65)), "maximum context length is 64"),
                           ([10 ** 9], "outside the vocabulary")):
        with pytest.raises(ParameterError, match=needle) as e:
            llm.add_request("bad", prompt, SamplingParams())
        assert e.value.param == "prompt"
    with pytest.raises(ParameterError, match="already running"):
        llm.add_request("good-1", [4], SamplingParams())
    llm.add_request("good-2", [4, 5], SamplingParams(temperature=0, max_tokens=3))
    finished = {}
    while engine.has_unfinished():
        for out in llm.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["good-1", "good-2"]
    assert [len(finished[r].outputs[0].token_ids) for r in ("good-1", "good-2")] == [5, 3]
    assert engine.kv.num_free_blocks == engine.runner.num_blocks
    with pytest.raises(ParameterError, match="empty"):
        llm.generate([""], SamplingParams())


def test_abort_frees_blocks(tiny_models):
    llm = LLM(tiny_models["llama"], num_gpu_blocks_override=64)
    engine = llm.engine
    llm.add_request("a", list(range(100)), SamplingParams(max_tokens=50))
    llm.step()
    assert engine.kv.num_free_blocks < 64
    outs = llm.abort(["a"])
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished() and engine.kv.num_free_blocks == 64


@pytest.mark.parametrize("make,needle", [
    (lambda d: str(d / "missing"), "not found"),
    (lambda d: _write(d / "bad.gguf", b"GGUF\x03\x00\x00\x00garbage"), "not a valid GGUF"),
    (lambda d: _write(d / "empty" / "config.json", b"{not json"), "not valid JSON"),
    (lambda d: str((d / "nocfg").mkdir() or d / "nocfg"), "no config.json"),
])
def test_bad_model_paths_are_clear_errors(tmp_path, make, needle):
    with pytest.raises(ConfigError, match=needle):
        LLM(make(tmp_path))


def _write(path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path.parent if path.name == "config.json" else path)
