"""Tensor parallelism on CPU: ranks 1..N-1 are real worker processes, collectives go over gloo.

Greedy tokens at TP=2 and TP=4 equal TP=1's (itself HF-exact, test_correctness.py) on tiny
random Llama and Qwen3 models (4 heads / 2 KV heads: TP=4 replicates each KV head on two
ranks) and, from a GGUF file, on an uneven split (6 heads / 3 KV heads: 4 + 2); overlapped steps,
chunked prefill, prefix hits, logprobs and seeded sampling go through the worker path too. A
killed rank fails every open request at once, and the engine reports itself dead.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from pdserve.common.config import ConfigError
from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine.llm import LLM
from pdserve.common.engine_client import EngineDeadError
from pdserve.common.sampling_params import SamplingParams

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
# logprobs (rank 0 only), prompt logprobs (every rank takes part in the logits gather), seeded sampling
EXTRA = SamplingParams(temperature=0.8, seed=7, max_tokens=MAX_TOKENS, logprobs=2, prompt_logprobs=1)


def run(folder: str, prompts: list[list[int]], **kwargs) -> tuple[list, LLM]:
    llm = LLM(folder, kv_cache_memory_gb=0.05, dtype="float32", **kwargs)
    try:
        params = [GREEDY] * len(prompts) + [EXTRA]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts + [prompts[1]]], params, use_tqdm=False)
        assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks, "KV blocks leaked"
        return outs, llm.engine.stats()
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def few_prompts(prompts) -> list[list[int]]:
    return [prompts[i] for i in (0, 1, 3, 8)]  # two share a 120-token prefix; 5..160 tokens


_TP1: dict[str, list] = {}


def assert_same(got, folder, prompts):
    if folder not in _TP1:
        _TP1[folder], _ = run(folder, prompts)
    want = _TP1[folder]
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    lp_got, lp_want = got[-1].outputs[0].logprobs, want[-1].outputs[0].logprobs
    assert [sorted(e) for e in lp_got] == [sorted(e) for e in lp_want]
    assert all(abs(g[t].logprob - w[t].logprob) < 1e-4 for g, w in zip(lp_got, lp_want) for t in g)
    plp_got, plp_want = got[-1].prompt_logprobs, want[-1].prompt_logprobs
    assert plp_got[0] is None and len(plp_got) == len(plp_want) > 1
    assert all(abs(g[t].logprob - w[t].logprob) < 1e-4 for g, w in zip(plp_got[1:], plp_want[1:]) for t in g)


@pytest.mark.parametrize("arch,tp,kwargs", [
    ("llama", 2, {"async_scheduling": True, "max_num_batched_tokens": 64}),  # overlapped, chunked
    ("llama", 4, {}),
    ("qwen3", 2, {"async_scheduling": True}),
    ("qwen3", 4, {"max_num_batched_tokens": 64}),
])
def test_tokens_equal_tp1(tiny_models, few_prompts, arch, tp, kwargs):
    got, stats = run(tiny_models[arch], few_prompts, tensor_parallel_size=tp, **kwargs)
    assert_same(got, tiny_models[arch], few_prompts)
    assert stats.tensor_parallel_size == tp and len(stats.kv_blocks_fit_by_rank) == tp
    assert stats.num_blocks == min(stats.kv_blocks_fit_by_rank)
    assert stats.prefix_hits > 0


def write_gguf(hf_folder: str, path: str, extra_tensors: dict | None = None, metadata=None) -> str:
    """The HF folder's weights as a llama.cpp-style F32 GGUF (q/k rows permuted as llama.cpp does);
    `extra_tensors` (name -> float32 array) and `metadata(writer)` add what a test needs."""
    import json

    import gguf
    from safetensors.torch import load_file
    c = json.load(open(os.path.join(hf_folder, "config.json")))
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(c.get("head_dim") or c["hidden_size"] // heads)
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c.get("rope_theta", 10000.0))
    w.add_vocab_size(c["vocab_size"])
    w.add_eos_token_id(c["eos_token_id"])
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    permute = lambda t, n: t.reshape(n, 2, t.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(t.shape)  # noqa: E731
    for name, t in load_file(os.path.join(hf_folder, "model.safetensors")).items():
        t = t.float().numpy()
        base = name.removeprefix("model.").removesuffix(".weight")
        if base.startswith("layers."):
            _, n, module = base.split(".", 2)
            t = permute(t, heads) if module.endswith("q_proj") else permute(t, kv_heads) if module.endswith("k_proj") else t
            base = f"blk.{n}.{names[module]}"
        else:
            base = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output"}[base]
        w.add_tensor(base + ".weight", t)
    for name, t in (extra_tensors or {}).items():
        w.add_tensor(name, t)
    if metadata is not None:
        metadata(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_checkpoint_sharded_as_read(tmp_path, tiny_model_factory, few_prompts):
    """GGUF tensors (llama.cpp's permuted q/k rows) are sharded as read, on an uneven split:
    6 heads / 3 KV heads over 2 ranks -> 4 + 2 heads."""
    folder = tiny_model_factory(str(tmp_path / "llama_6h"), "llama", hidden_size=96, num_attention_heads=6,
                                num_key_value_heads=3, head_dim=16)
    path = write_gguf(folder, str(tmp_path / "tiny.gguf"))
    got, stats = run(path, few_prompts[:3], tensor_parallel_size=2, tokenizer=folder)
    assert_same(got, folder, few_prompts[:3])  # TP=1 on the HF folder
    fit = stats.kv_blocks_fit_by_rank
    assert fit[1] // 2 == fit[0]  # rank 0 holds 2 KV heads, rank 1 one, in the same memory


def test_head_partitions():
    """Every query head on exactly one rank, with the KV head of its group (the docstring's examples)."""
    from pdserve.common.config import ArchConfig
    from pdserve.common.models.parallel import head_shard
    cases = {(32, 8, 2): [(0, 16, 0, 4), (16, 16, 4, 4)], (9, 3, 2): [(0, 6, 0, 2), (6, 3, 2, 1)],
             (4, 2, 4): [(0, 1, 0, 1), (1, 1, 0, 1), (2, 1, 1, 1), (3, 1, 1, 1)],
             (64, 8, 2): [(0, 32, 0, 4), (32, 32, 4, 4)]}
    for (heads, kv, n), want in cases.items():
        arch = ArchConfig("llama", 100, 64, 128, 1, heads, kv, 16)
        shards = [head_shard(arch, r, n) for r in range(n)]
        assert [(h.q_start, h.num_q, h.kv_start, h.num_kv) for h in shards] == want
        for h in shards:  # query head q reads KV head q // (heads // kv)
            assert all(h.kv_start <= q // (heads // kv) < h.kv_start + h.num_kv
                       for q in range(h.q_start, h.q_start + h.num_q))


def test_sizes_that_do_not_split_are_config_errors(tiny_models):
    with pytest.raises(ConfigError, match="--tensor-parallel-size 3 cannot split this model's 2 KV heads"):
        LLM(tiny_models["llama"], tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="--tensor-parallel-size must be positive"):
        LLM(tiny_models["llama"], tensor_parallel_size=0)


def test_killed_rank_fails_open_requests_fast(tiny_models):
    engine = AsyncLLM(core=LLM(tiny_models["llama"], tensor_parallel_size=2, kv_cache_memory_gb=0.05,
                               dtype="float32").engine)
    worker = engine.core.runner.workers.procs[0]
    params = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)

    async def consume(i: int, started: asyncio.Event):
        async for out in engine.generate([5, 6, 7, 8 + i], params, f"r{i}"):
            if len(out.outputs[0].token_ids) >= 3:
                started.set()

    async def scenario():
        started = asyncio.Event()
        tasks = [asyncio.create_task(consume(i, started)) for i in range(3)]
        await asyncio.wait_for(started.wait(), 60)
        killed_at = time.monotonic()
        os.kill(worker.pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        assert time.monotonic() - killed_at < 5
        for r in results:
            assert isinstance(r, EngineDeadError) and "tensor-parallel rank 1" in str(r), r
        assert not await engine.is_healthy()
        with pytest.raises(EngineDeadError, match="tensor-parallel rank 1"):
            async for _ in engine.generate([5, 6], params, "late"):
                pass
    try:
        asyncio.run(scenario())
    finally:
        engine.shutdown()
    assert worker.poll() is not None


def test_online_fp8_quantizes_each_shard(tmp_path, tiny_model_factory, few_prompts):
    """--quantization fp8 at TP=2: each rank quantizes its shard after the sharded load (column-parallel
    rows exactly as TP=1 does; row-parallel rows' per-channel scales over the rank's inputs, as vLLM's
    online fp8 does). Its prompt logprobs are as close to TP=1 fp8's as fp8's are to full precision."""
    from pdserve.common.models.quantization.fp8 import Fp8Linear
    folder = tiny_model_factory(str(tmp_path / "llama02"), "llama", initializer_range=0.02)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, prompt_logprobs=1)
    results = {}
    for quantization, tp in ((None, 1), ("fp8", 1), ("fp8", 2)):
        llm = LLM(folder, kv_cache_memory_gb=0.05, dtype="float32", quantization=quantization, tensor_parallel_size=tp)
        try:
            layer = llm.engine.runner.model.layers[0]
            if quantization:
                assert isinstance(layer.self_attn.qkv_proj, Fp8Linear) and isinstance(layer.mlp.down_proj, Fp8Linear)
                assert layer.mlp.down_proj.in_features == 128 // tp  # the rank's slice of the intermediate size
            outs = llm.generate([{"prompt_token_ids": p} for p in few_prompts], params, use_tqdm=False)
            results[quantization, tp] = (
                [list(o.outputs[0].token_ids) for o in outs],
                [e[t].logprob for o, p in zip(outs, few_prompts) for e, t in zip(o.prompt_logprobs[1:], p[1:])])
            assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks
        finally:
            llm.shutdown()

    def max_diff(a, b):
        return max(abs(x - y) for x, y in zip(results[a][1], results[b][1]))
    sharded, quantized = max_diff(("fp8", 2), ("fp8", 1)), max_diff(("fp8", 1), (None, 1))
    first = sum(a[0] == b[0] for a, b in zip(results["fp8", 2][0], results["fp8", 1][0]))
    print(f"\nprompt logprobs, max diff: TP=2 fp8 vs TP=1 fp8 {sharded:.4f}, TP=1 fp8 vs fp32 {quantized:.4f}; "
          f"first greedy tokens equal {first}/{len(few_prompts)}")
    assert 0 < sharded <= quantized and first >= len(few_prompts) - 1


@pytest.mark.parametrize("granularity", ["per-head", "per-tensor"])
def test_fp8_kv_cache_at_tp2(tmp_path, tiny_model_factory, few_prompts, granularity):
    """--kv-cache-dtype fp8 at TP=2: every rank runs the calibration prefill in step and keeps its KV
    heads' scales (per tensor: the max over the ranks, as TP=1's), the scales TP=1 finds for them:
    prompt logprobs equal TP=1 fp8 KV's to fp32 summation noise, far below fp8's own error."""
    folder = tiny_model_factory(str(tmp_path / "llama02"), "llama", initializer_range=0.02)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, prompt_logprobs=1)
    results, scales = {}, {}
    for fp8, tp in ((False, 1), (True, 1), (True, 2)):
        extra = {"kv_cache_dtype": "fp8", "kv_cache_scale": granularity} if fp8 else {}
        llm = LLM(folder, kv_cache_memory_gb=0.05, dtype="float32", tensor_parallel_size=tp,
                  enable_prefix_caching=False, **extra)
        try:
            runner = llm.engine.runner
            if fp8:
                assert runner.kv_caches[0].dtype == torch.float8_e4m3fn and runner.kv_scales_source == "calibrated"
                scales[tp] = torch.stack(runner.kv_scales)  # rank 0's: [L, 2, its KV heads]
            outs = llm.generate([{"prompt_token_ids": p} for p in few_prompts], params, use_tqdm=False)
            results[fp8, tp] = [e[t].logprob for o, p in zip(outs, few_prompts)
                                for e, t in zip(o.prompt_logprobs[1:], p[1:])]
            assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks
        finally:
            llm.shutdown()
    # 4 q / 2 KV heads: rank 0 holds KV head 0
    assert scales[2].shape == (2, 2, 1)
    assert torch.allclose(scales[2][:, :, 0], scales[1][:, :, 0], rtol=1e-4)
    sharded = max(abs(a - b) for a, b in zip(results[True, 2], results[True, 1]))
    quantized = max(abs(a - b) for a, b in zip(results[True, 1], results[False, 1]))
    print(f"\nfp8 KV {granularity}: prompt logprobs max diff TP=2 vs TP=1 {sharded:.2e}, fp8 vs full {quantized:.5f}")
    assert sharded < 1e-4 < 1e-3 < quantized  # measured < 1e-5 against 0.008-0.009


def test_checkpoint_kv_scales_at_tp2(tmp_path, tiny_model_factory, few_prompts):
    """A checkpoint's per-head KV scales are sliced to each rank's KV heads."""
    from safetensors.torch import save_file
    folder = tiny_model_factory(str(tmp_path / "llama02"), "llama", initializer_range=0.02)
    save_file({f"model.layers.{i}.self_attn.{w}_scale": torch.tensor([0.02 + i / 100, 0.05]) for i in range(2)
               for w in "kv"}, os.path.join(folder, "kv-scales.safetensors"))
    llm = LLM(folder, kv_cache_memory_gb=0.05, dtype="float32", tensor_parallel_size=2, kv_cache_dtype="fp8")
    try:
        runner = llm.engine.runner
        assert runner.kv_scales_source == "checkpoint"
        assert torch.equal(torch.stack(runner.kv_scales), torch.tensor([[[0.02], [0.02]], [[0.03], [0.03]]]))
        outs = llm.generate([{"prompt_token_ids": p} for p in few_prompts], GREEDY, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == MAX_TOKENS for o in outs)
    finally:
        llm.shutdown()


def _speculate_at_tp2(folder: str, inputs: list, params: list, spec: dict, **kw):
    """(outputs, spec counters) of a TP=2 engine with `spec`; no KV block left behind."""
    llm = LLM(folder, kv_cache_memory_gb=0.05, dtype="float32", tensor_parallel_size=2, speculative_config=spec, **kw)
    try:
        got = llm.generate(inputs, params, use_tqdm=False)
        assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks, "KV blocks leaked"
        return got, llm.engine.stats().spec_decode
    finally:
        llm.shutdown()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_ngram_speculation_at_tp2(tmp_path, tiny_model_factory, async_scheduling):
    """n-gram speculative decoding at TP=2: rank 0 looks the drafts up and sends them with the step;
    every rank runs the verify rows and the logits gather (or the greedy tail) in step. Greedy and
    seeded tokens equal TP=1 without speculation (n-gram drafts never change outputs). The model:
    a 512-token vocabulary, whose greedy outputs soon repeat, so drafts are found and accepted."""
    import random
    folder = tiny_model_factory(str(tmp_path / "v512"), "llama", vocab_size=512, initializer_range=0.02)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (9, 40, 77)]
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1,
            "draft_budget": "all"}  # every draft fed (the CPU's default budget trims them by step cost)
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, seed=11, max_tokens=40, ignore_eos=True)
    params = [greedy] * len(prompts) + [seeded]
    inputs = [{"prompt_token_ids": p} for p in prompts + [prompts[0]]]
    want = LLM(folder, kv_cache_memory_gb=0.05, dtype="float32").generate(inputs, params, use_tqdm=False)
    got, stats = _speculate_at_tp2(folder, inputs, params, spec, async_scheduling=async_scheduling)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    print(f"\nTP=2 n-gram: {stats.num_drafts} verify rounds, {stats.num_draft_tokens} drafts, "
          f"{stats.num_accepted_tokens} accepted")
    assert stats.num_drafts > 10 and stats.num_accepted_tokens > 0


def test_draft_model_at_tp2(tiny_models, few_prompts):
    """A draft model at TP=2 runs unsharded on rank 0 (its own KV in rank 0's block ids), its drafts
    read on the host and sent with the step. The target as its own draft: greedy tokens equal TP=1
    without speculation with every draft accepted; seeded tokens equal TP=1 with the same draft
    (a draft model's draws are decided by position, not by the route)."""
    spec = {"model": tiny_models["llama"], "num_speculative_tokens": 3}
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    seeded = SamplingParams(temperature=0.8, seed=5, max_tokens=MAX_TOKENS)
    inputs = [{"prompt_token_ids": p} for p in few_prompts[:3]]
    params = [greedy] * 2 + [seeded]
    plain = LLM(tiny_models["llama"], kv_cache_memory_gb=0.05, dtype="float32").generate(inputs[:2], greedy,
                                                                                        use_tqdm=False)
    tp1 = LLM(tiny_models["llama"], kv_cache_memory_gb=0.05, dtype="float32", speculative_config=spec)
    want = tp1.generate(inputs, params, use_tqdm=False)
    got, stats = _speculate_at_tp2(tiny_models["llama"], inputs, params, spec)
    tokens = [o.outputs[0].token_ids for o in got]
    assert tokens[:2] == [o.outputs[0].token_ids for o in plain]
    assert tokens == [o.outputs[0].token_ids for o in want]
    print(f"\nTP=2 self-draft: {stats.num_draft_tokens} drafts, {stats.num_accepted_tokens} accepted")
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0
