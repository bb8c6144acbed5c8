"""The model folder's generation_config.json, read as vLLM reads it: its eos_token_id ends
generation (a chat model's end-of-turn token listed only there), its sampling fields are the
defaults of requests that set none (`--generation-config auto`; `vllm`: none), in the offline LLM
and in the OpenAI API (the official client against a real uvicorn server)."""

from __future__ import annotations

import json
import os
import shutil

import openai
import pytest
from servers import ThreadedServer

from pdserve.common.config import ConfigError
from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine.llm import LLM
from pdserve.common.generation_config import sampling_defaults
from pdserve.common.models.loader import read_arch_config
from pdserve.common.sampling_params import SamplingParams
from pdserve.services.router.app import build_app

PROMPT = [{"prompt_token_ids": [1, 450, 3000, 77, 912, 40]}]


@pytest.fixture
def folder(tiny_models, tmp_path):
    """A copy of the tiny Llama whose generation_config.json the test writes."""
    path = str(tmp_path / "llama")
    shutil.copytree(tiny_models["llama"], path)
    return path


def write(folder: str, **fields) -> None:
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump(fields, f)


def greedy(folder: str, **options) -> list[int]:
    llm = LLM(folder, dtype="float32", num_gpu_blocks_override=64, **options)
    try:
        out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0].outputs[0]
        return list(out.token_ids), out.finish_reason
    finally:
        llm.shutdown()


def test_its_eos_token_ids_end_generation(folder):
    write(folder)
    tokens, reason = greedy(folder)
    assert reason == "length" and len(tokens) == 12
    stop = tokens[4]
    first = tokens.index(stop)
    write(folder, eos_token_id=[read_arch_config(folder).eos_token_ids[0], stop])
    assert stop in read_arch_config(folder).eos_token_ids
    assert greedy(folder) == (tokens[:first + 1], "stop")


def test_its_sampling_fields_are_the_defaults_of_requests_that_set_none(folder):
    write(folder, temperature=0.0, top_k=5, max_new_tokens=7, repetition_penalty=1.3, do_sample=True)
    assert sampling_defaults(folder) == {"temperature": 0.0, "top_k": 5, "max_tokens": 7, "repetition_penalty": 1.3}
    assert sampling_defaults(folder, "vllm") == {}
    with pytest.raises(ConfigError, match="generation_config.json"):
        sampling_defaults(folder, str(os.path.dirname(folder)))

    llm = LLM(folder, dtype="float32", num_gpu_blocks_override=64)
    try:
        p = llm.get_default_sampling_params()
        assert (p.temperature, p.top_k, p.max_tokens, p.repetition_penalty) == (0.0, 5, 7, 1.3)
        plain = llm.generate(PROMPT, use_tqdm=False)[0].outputs[0]  # no params: the defaults
        explicit = llm.generate(PROMPT, SamplingParams(temperature=0, top_k=5, max_tokens=7, repetition_penalty=1.3),
                                use_tqdm=False)[0].outputs[0]
        assert plain.token_ids == explicit.token_ids and len(plain.token_ids) == 7
    finally:
        llm.shutdown()
    assert LLM(folder, dtype="float32", num_gpu_blocks_override=64, generation_config="vllm") \
        .get_default_sampling_params().temperature == 1.0


def test_the_api_applies_the_defaults_to_unset_fields_only(folder):
    write(folder, temperature=0.0, max_new_tokens=6)
    engine = AsyncLLM(core=LLM(folder, dtype="float32", num_gpu_blocks_override=64).engine)
    try:
        app = build_app(engine, "tiny", sampling_defaults=engine.core.sampling_defaults)
        with ThreadedServer(app) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
            msgs = [{"role": "user", "content": "Hi"}]
            runs = [client.chat.completions.create(model="tiny", messages=msgs, extra_body={"ignore_eos": True})
                    for _ in range(2)]
            assert runs[0].usage.completion_tokens == 6  # max_new_tokens
            assert runs[0].choices[0].message.content == runs[1].choices[0].message.content  # temperature 0
            longer = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=9, temperature=0,
                                                    extra_body={"ignore_eos": True})
            assert longer.usage.completion_tokens == 9
            assert longer.choices[0].message.content.startswith(runs[0].choices[0].message.content)
            resp = client.responses.create(model="tiny", input="Hi", extra_body={"ignore_eos": True})
            assert resp.usage.output_tokens == 6
    finally:
        engine.shutdown()
