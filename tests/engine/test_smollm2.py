"""The packaged SmolLM2-135M-Instruct (GGUF Q4_1): same greedy tokens as HF transformers'
own GGUF loader (same dequantized weights), and a sensible chat answer."""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.common.engine.llm import LLM
from pdserve.common.sampling_params import SamplingParams

PROMPTS = ["The capital of Germany is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, max_model_len=2048)


def test_first_32_greedy_tokens_match_hf(llm, smollm2_path):
    from transformers import AutoModelForCausalLM
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path),
                                              dtype=torch.float32).eval()
    tok = llm.get_tokenizer()
    with torch.inference_mode():
        for prompt, out in zip(PROMPTS, outs):
            ids = torch.tensor([tok.encode(prompt)])
            assert ids[0].tolist() == out.prompt_token_ids
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                              do_sample=False)
            assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist(), prompt


def test_chat_knows_paris(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=40))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert llm.engine.kv.num_free_blocks == llm.engine.runner.num_blocks
