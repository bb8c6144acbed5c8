"""Rope scaling beyond default / linear / llama3: YaRN (Qwen2.5's long-context configs), and GGUF
files whose Llama 3.1+ scaling is llama.cpp's `rope_freqs` tensor (per-dimension divisors) or its
`rope.scaling.*` yarn keys. Greedy tokens equal HF transformers' on tiny random models (fp32)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from pdserve.common.engine.llm import LLM
from pdserve.common.models.loader import read_arch_config
from pdserve.common.sampling_params import SamplingParams
from tests.engine.test_correctness import hf_greedy
from tests.engine.test_tensor_parallel import write_gguf

GREEDY = SamplingParams(temperature=0, max_tokens=16)
# a short original context, so that interpolated and ramped dimensions both exist at head_dim 16
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def _prompts() -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (5, 70, 150)]


def _llm(model: str, **kw) -> LLM:
    return LLM(model, dtype="float32", num_gpu_blocks_override=64, **kw)  # (a small pool on CUDA too)


def _tokens(model: str, prompts, **kw) -> list[list[int]]:
    llm = _llm(model, **kw)
    try:
        return [list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                                                                   GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("arch,kernels", [("qwen2", "auto"), ("llama", "reference")])
def test_yarn_matches_hf(tmp_path, tiny_model_factory, arch, kernels):
    folder = tiny_model_factory(str(tmp_path / arch), arch, rope_scaling=dict(YARN), max_position_embeddings=256)
    assert read_arch_config(folder).rope_scaling["rope_type"] == "yarn"
    prompts = _prompts()
    assert _tokens(folder, prompts, kernels=kernels) == hf_greedy(folder, prompts, GREEDY.max_tokens)


def _llama3_factors(head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's converter: the divisor of each frequency under Llama 3 rope scaling."""
    factor, low, high, old = (LLAMA3[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings"))
    out = []
    for freq in 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def test_gguf_rope_freqs_as_llama3_scaling(tmp_path, tiny_model_factory):
    """A Llama 3.1-style GGUF (rope_freqs tensor, no scaling keys) decodes as its HF folder with
    rope_scaling llama3 does; the file loaded before this failed ("unknown GGUF tensor 'rope_freqs'")."""
    folder = tiny_model_factory(str(tmp_path / "llama3"), "llama", rope_scaling=dict(LLAMA3))
    path = write_gguf(folder, str(tmp_path / "llama3.gguf"),
                      extra_tensors={"rope_freqs.weight": _llama3_factors(16, 10000.0)})
    assert read_arch_config(path).rope_scaling["rope_type"] == "freq_factors"
    prompts = _prompts()
    want = hf_greedy(folder, prompts, GREEDY.max_tokens)
    assert _tokens(path, prompts, tokenizer=folder) == want
    # without the factors the outputs differ: the test would see a loader that dropped them
    plain = write_gguf(folder, str(tmp_path / "plain.gguf"))
    assert _tokens(plain, prompts, tokenizer=folder) != want


def test_gguf_yarn_keys(tmp_path, tiny_model_factory):
    folder = tiny_model_factory(str(tmp_path / "llama"), "llama", rope_scaling=dict(YARN), max_position_embeddings=256)

    def yarn(w):
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)
    path = write_gguf(folder, str(tmp_path / "yarn.gguf"), metadata=yarn)
    assert read_arch_config(path).rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 64}
    prompts = _prompts()
    assert _tokens(path, prompts, tokenizer=folder) == hf_greedy(folder, prompts, GREEDY.max_tokens)
