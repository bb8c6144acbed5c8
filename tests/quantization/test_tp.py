"""Pre-quantized checkpoints at --tensor-parallel-size 2 (gloo, a worker process per rank): every
rank loads its slice of the checkpoint's own tensors (packed words, groups, per-channel scales cut in
their units), so the ranks together hold exactly TP=1's weights. Weight-only int4 (AWQ, GPTQ) then
equals TP=1 up to fp32 summation order; fp8 quantizes its activations per token on each rank's
slice of a row-parallel input (as vLLM), so it differs from TP=1 by less than fp8 differs from the
unquantized model."""

from __future__ import annotations

import pytest

from pdserve.common.config import ConfigError
from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1)


def _run(folder: str, prompts: list[list[int]], tp: int):
    llm = LLM(folder, dtype="float32", kv_cache_memory_gb=0.05, tensor_parallel_size=tp)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
        assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks
        return llm.engine.runner.model, [list(o.outputs[0].token_ids) for o in outs], [
            e[t].logprob for o, p in zip(outs, prompts) for e, t in zip(o.prompt_logprobs[1:], p[1:])]
    finally:
        llm.shutdown()


# fp8 per channel and per tensor, AWQ (packed along outputs), GPTQ (packed along inputs), and Qwen2's
# q/k/v biases under a column split
@pytest.mark.parametrize("variant", ["llama-fp8", "llama-fp8-tensor", "llama-awq", "llama-gptq", "qwen2-awq",
                                     "llama-gptq-head"])  # a quantized head: vocab-parallel int4 rows
def test_quantized_checkpoint_at_tp2_equals_tp1(quant_models, short_prompts, variant):
    prompts = short_prompts[:4]
    model1, tokens1, logprobs1 = _run(quant_models[variant], prompts, 1)
    model2, tokens2, logprobs2 = _run(quant_models[variant], prompts, 2)
    qkv1, qkv2 = model1.layers[0].self_attn.qkv_proj, model2.layers[0].self_attn.qkv_proj
    assert type(qkv1) is type(qkv2) and type(qkv2).__name__ in ("Fp8Linear", "IntLinear")
    assert qkv2.out_features * 2 == qkv1.out_features  # rank 0's half of the heads
    assert model2.layers[0].mlp.down_proj.in_features * 2 == model1.layers[0].mlp.down_proj.in_features
    diff = max(abs(a - b) for a, b in zip(logprobs1, logprobs2))
    if "fp8" not in variant:
        print(f"\n{variant}: TP=2 vs TP=1 prompt logprobs max diff {diff:.2e}")
        assert diff < 1e-4 and tokens1 == tokens2
        return
    _, _, logprobs_full = _run(quant_models[variant.split("-")[0]], prompts, 1)
    error = max(abs(a - b) for a, b in zip(logprobs1, logprobs_full))
    print(f"\n{variant}: TP=2 vs TP=1 prompt logprobs max diff {diff:.2e}, TP=1 vs unquantized {error:.2e}")
    assert diff < error


def test_gptq_act_order_at_tp2_is_refused(quant_models):
    with pytest.raises(ConfigError, match="act-order"):
        LLM(quant_models["llama-gptq-asym-act"], dtype="float32", kv_cache_memory_gb=0.05, tensor_parallel_size=2)


def test_gguf_blocks_at_tp2_equal_tp1(smollm2_path):
    """--quantization gguf at TP=2: the packaged SmolLM2's Q4_1 blocks (in the running int layout)
    cut per rank, on its uneven head split (9 q / 3 KV heads -> 6 + 3 / 2 + 1)."""
    prompts = [[1, 504, 3575, 282, 4649, 314], [1, 378, 7042, 3575, 282]]
    runs = {}
    for tp in (1, 2):
        llm = LLM(smollm2_path, quantization="gguf", dtype="float32", kv_cache_memory_gb=0.05,
                  max_model_len=512, tensor_parallel_size=tp, enable_prefix_caching=False)
        try:
            qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
            assert type(qkv).__name__ == "IntLinear" and qkv.format == "gguf"
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
            runs[tp] = ([list(o.outputs[0].token_ids) for o in outs],
                        [e[t].logprob for o, p in zip(outs, prompts) for e, t in zip(o.prompt_logprobs[1:], p[1:])],
                        qkv.out_features)
        finally:
            llm.shutdown()
    assert runs[2][2] == 6 * 64 + 2 * 2 * 64 and runs[1][2] == 9 * 64 + 2 * 3 * 64  # rank 0's heads
    diff = max(abs(a - b) for a, b in zip(runs[1][1], runs[2][1]))
    print(f"\nSmolLM2 gguf Q4_1: TP=2 vs TP=1 prompt logprobs max diff {diff:.2e}")
    assert diff < 1e-4 and runs[1][0] == runs[2][0]
