"""The packaged SmolLM2-135M-Instruct (GGUF Q4_1): same greedy tokens as HF transformers'
own GGUF loader (same dequantized weights) in float32, with the HF-exact reference kernels and
with the CPU fast path; bf16 (what `--dtype auto` runs on a CPU with AVX512-BF16/AMX) predicts
the float32 greedy continuation teacher-forced; and a sensible chat answer."""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams

PROMPTS = ["The capital of Germany is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at a temperature of"]
GREEDY_32 = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module", params=["auto", "reference"])
def llm(request, smollm2_path):
    return LLM(smollm2_path, max_model_len=2048, dtype="float32", kernels=request.param)


@pytest.fixture(scope="module")
def hf_greedy_32(smollm2_path) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.dirname(smollm2_path), os.path.basename(smollm2_path)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    outs = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([tok.encode(prompt)])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False)
            outs.append((ids[0].tolist(), ref[0, ids.shape[1]:].tolist()))
    return outs


def test_first_32_greedy_tokens_match_hf(llm, hf_greedy_32):
    outs = llm.generate(PROMPTS, GREEDY_32, use_tqdm=False)
    for prompt, out, (ids, ref) in zip(PROMPTS, outs, hf_greedy_32):
        assert ids == out.prompt_token_ids
        assert out.outputs[0].token_ids == ref, prompt


def test_bf16_predicts_the_float32_greedy_tokens(smollm2_path, hf_greedy_32):
    """Teacher-forced: bf16 (fast path) ranks the float32 greedy token first at >= 97% of the 128
    positions (measured 99.2% on 12 prompts, the same as the reference kernels in bf16; free-running
    greedy text drifts apart after the first disagreement, so it is not the measure)."""
    llm = LLM(smollm2_path, max_model_len=2048, dtype="bfloat16")
    assert llm.engine.runner.dtype == torch.bfloat16
    outs = llm.generate([{"prompt_token_ids": ids + ref} for ids, ref in hf_greedy_32],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    ranks = [out.prompt_logprobs[len(ids) + i][t].rank for out, (ids, ref) in zip(outs, hf_greedy_32)
             for i, t in enumerate(ref)]
    assert sum(r == 1 for r in ranks) >= 0.97 * len(ranks), ranks
    # free-running, the default CPU dtype still answers sensibly (a faulty bf16 prefill-attention
    # kernel answered "L'Étoile, la Marseillaise, ..." here)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24))[0]
    assert "Paris" in out.outputs[0].text, out.outputs[0].text


def test_chat_knows_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=40))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks
