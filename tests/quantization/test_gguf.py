"""GGUF weights run quantized (--quantization gguf): block conversion and the packaged SmolLM2 (Q4_1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from pdserve.common.engine.llm import LLM
from pdserve.common.models.quantization.gguf_blocks import KERNEL_TYPES, to_running_layout
from pdserve.common.models.quantization.int_linear import IntLinear
from pdserve.common.sampling_params import SamplingParams
from pdserve.kernels.reference import dequantize_int_ref

from helpers import LINEARS, dequantized_weight


def gguf_rows(qtype: str, n: int = 24, k: int = 512) -> np.ndarray:
    rng = np.random.default_rng(0)
    if qtype != "Q4_K":
        return quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), GGMLQuantizationType[qtype])
    raw = rng.integers(0, 256, (n, k // 256 * 144), dtype=np.uint8)  # gguf-py cannot quantize K-quants
    blocks = raw.reshape(n, -1, 144)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)
    blocks[..., 4:16] |= 1  # sub-block scales > 0
    return raw


@pytest.mark.parametrize("qtype", list(KERNEL_TYPES))
def test_blocks_convert_to_the_weights_gguf_decodes(qtype):
    raw = gguf_rows(qtype)
    want = dequantize(raw, GGMLQuantizationType[qtype])
    parts = to_running_layout(raw, qtype)
    got = dequantize_int_ref(parts["qweight"], parts["scales"], parts["qzeros"], KERNEL_TYPES[qtype], 32).t()
    assert parts["qweight"].shape == (512 * KERNEL_TYPES[qtype] // 32, 24)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6 * np.abs(want).max())


def test_smollm2_runs_its_q4_1_blocks(smollm2_path):
    """The packaged SmolLM2 is Q4_1 (projections) + Q8_0 (embedding): every projection runs as a
    4-bit IntLinear computing the weights the dequantizing loader produces; greedy text is the same."""
    # float32 (greedy texts compared); the reference path keeps the nn.Linear weights read below
    plain = LLM(smollm2_path, dtype="float32", kernels="reference", enable_prefix_caching=False)
    quant = LLM(smollm2_path, quantization="gguf", dtype="float32", enable_prefix_caching=False)
    for i in (0, 29):
        for name in LINEARS:
            q = quant.engine.runner.model.layers[i].get_submodule(name)
            assert isinstance(q, IntLinear) and q.bits == 4 and q.group_size == 32
            w = plain.engine.runner.model.layers[i].get_submodule(name).weight.detach()
            torch.testing.assert_close(dequantized_weight(q), w, rtol=0, atol=1e-6)
    assert isinstance(quant.engine.runner.model.embed_tokens, torch.nn.Embedding)
    params = SamplingParams(temperature=0, max_tokens=12)
    prompts = ["The capital of Germany is", "def fibonacci(n):"]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in quant.generate(prompts, params, use_tqdm=False)] == want
