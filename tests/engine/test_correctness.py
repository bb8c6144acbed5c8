"""Greedy outputs token-identical to HF transformers, whatever the scheduling does.

16 prompts of 1..~300 tokens, a third sharing a 120-token prefix, on tiny random Llama, Mistral,
Qwen2 and Qwen3 models (float32). The same outputs must come out with prefix caching off,
with a 16-token chunked-prefill budget, with a pool so small that requests get preempted, and
with decodes deferred while prompts wait (decode_defer_steps).
Both kernel sets: `--kernels reference` (HF-exact eager torch) and the device's fast path
(`auto`: on CPU packed oneDNN GEMMs and the C++ kernels of kernels/cpu.py).
"""

from __future__ import annotations


import pytest
import torch

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams

MAX_TOKENS = 24


def hf_greedy(folder: str, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
            outs.append(gen[0, len(p):].tolist())
    return outs


_HF_CACHE: dict[str, list[list[int]]] = {}


def reference(tiny_models, arch, prompts):
    if arch not in _HF_CACHE:
        _HF_CACHE[arch] = hf_greedy(tiny_models[arch], prompts)
    return _HF_CACHE[arch]


def run(folder, prompts, **engine_kwargs):
    llm = LLM(folder, **{"dtype": "float32", **engine_kwargs})
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    engine = llm.engine
    assert engine.kv.num_free_blocks == engine.runner.num_blocks, "KV blocks leaked"
    assert engine.kv.num_requests() == 0
    return [o.outputs[0].token_ids for o in outs], engine


@pytest.mark.parametrize("kernels", ["auto", "reference"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_matches_hf(tiny_models, prompts, arch, kernels):
    got, engine = run(tiny_models[arch], prompts, kernels=kernels)
    assert got == reference(tiny_models, arch, prompts)
    assert engine.kv.num_prefix_hits > 0  # the shared prefix was served from the cache


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("variant", ["no_prefix_cache", "chunked_16", "preemption", "decode_defer", "warm_cache",
                                     "no_chunked_prefill"])
def test_scheduling_variants_keep_outputs(tiny_models, prompts, arch, variant):
    folder = tiny_models[arch]
    if variant == "no_prefix_cache":
        got, engine = run(folder, prompts, enable_prefix_caching=False)
        assert engine.kv.num_prefix_hits == 0
    elif variant == "no_chunked_prefill":  # the budget is checked against the model's length (1,024), no placeholder
        from pdserve.common.config import ConfigError
        with pytest.raises(ConfigError, match=r"\(1023\) must be >= --max-model-len \(1024\)"):
            LLM(folder, dtype="float32", enable_chunked_prefill=False, max_num_batched_tokens=1023)
        got, engine = run(folder, prompts, enable_chunked_prefill=False, max_num_batched_tokens=1024)
    elif variant == "chunked_16":
        got, engine = run(folder, prompts, max_num_batched_tokens=16)
        assert engine.num_steps > sum(len(p) for p in prompts) // 16
    elif variant == "preemption":
        got, engine = run(folder, prompts, num_gpu_blocks_override=24, max_model_len=384)
        assert engine.scheduler.num_preemptions > 0
        # the prefix-cache counters count each prompt once, however often the pool refused it
        assert engine.kv.num_prefix_queries == sum(len(p) for p in prompts)
    elif variant == "decode_defer":  # prompts first while they wait, in a pool that also preempts
        got, engine = run(folder, prompts, max_num_batched_tokens=64, decode_defer_steps=3,
                          num_gpu_blocks_override=24, max_model_len=384)
        assert engine.scheduler.num_deferred_steps > 0 and engine.scheduler.num_preemptions > 0
    else:
        llm = LLM(folder, dtype="float32")
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        hits_before = llm.engine.kv.num_prefix_hits
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        assert llm.engine.kv.num_prefix_hits - hits_before > sum(len(p) for p in prompts) // 2
        assert all(o.num_cached_tokens > 0 for o, p in zip(outs, prompts) if len(p) > 16)
    assert got == reference(tiny_models, arch, prompts)


def test_sliding_window_matches_hf(tmp_path, tiny_model_factory, prompts):
    folder = tiny_model_factory(str(tmp_path / "mistral_sw"), "mistral", sliding_window=32)
    long_prompts = [p for p in prompts if len(p) > 40][:6]
    want = hf_greedy(folder, long_prompts)
    for kernels in ("auto", "reference"):
        got, _ = run(folder, long_prompts, max_num_batched_tokens=24, kernels=kernels)
        assert got == want, kernels
