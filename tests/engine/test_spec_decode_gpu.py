"""Speculative decoding on CUDA (Triton backend, CUDA graphs; marked gpu, skipped without CUDA):
verify steps run as one-token rows through the decode graphs and the draft's steps through its
own; greedy tokens equal a run without speculation (float32, tiny models), every self-draft is
accepted, seeded n-gram outputs equal plain sampling and seeded draft-model outputs do not
depend on k; the KV pool is sized for target and draft from GPU memory and is whole again."""

from __future__ import annotations

import pytest
import torch

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def run(folder, prompts, params, **kw):
    llm = LLM(folder, device="cuda", dtype="float32", max_model_len=512, **kw)
    engine = llm.engine
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert engine.kv.num_free_blocks == engine.runner.num_blocks, "KV blocks leaked"
    tokens = [[c.token_ids for c in o.outputs] for o in outs]
    del llm
    torch.cuda.empty_cache()
    return tokens, engine


def test_greedy_equal_and_verify_steps_replay_graphs(tiny_models, prompts):
    folder = tiny_models["llama"]
    batch = prompts[:8]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    want, _ = run(folder, batch, greedy)
    for spec in (NGRAM, {"model": folder, "num_speculative_tokens": 3},
                 {"model": tiny_models["qwen3"], "num_speculative_tokens": 4}):
        got, engine = run(folder, batch, greedy, speculative_config=spec, gpu_memory_utilization=0.5)
        assert got == want, spec
        spec_decoder = engine.runner.spec
        assert spec_decoder.verify_as_decodes and engine.runner.graphs.num_replays > 0
        if spec_decoder.draft is not None:
            assert spec_decoder.draft.runner.graphs.num_replays > 0
        st = engine.stats().spec_decode
        if spec.get("model") == folder:
            assert st.num_accepted_tokens == st.num_draft_tokens > 0


def test_seeded_sampling_rules_hold_on_cuda(tiny_models, prompts):
    folder = tiny_models["llama"]
    batch = prompts[:6]
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=50 + i, max_tokens=16) for i in range(len(batch))]
    plain, _ = run(folder, batch, params)
    ngram, _ = run(folder, batch, params, speculative_config=NGRAM)
    assert ngram == plain
    k2, _ = run(folder, batch, params, speculative_config={"model": tiny_models["qwen3"], "num_speculative_tokens": 2})
    k4, _ = run(folder, batch, params, speculative_config={"model": tiny_models["qwen3"], "num_speculative_tokens": 4})
    assert k2 == k4
