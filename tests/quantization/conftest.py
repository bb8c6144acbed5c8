"""Tiny models quantized by `pdserve quantize` into the real checkpoint layouts, shared by the tests."""

from __future__ import annotations

import random

import pytest

from pdserve.common.models.quantization.writer import quantize_checkpoint

# name -> (method, options of quantize_checkpoint); group 32 divides the tiny models' 64 / 128 inputs
VARIANTS = {
    "fp8": ("fp8", {}),
    "fp8-tensor": ("fp8", {"fp8_per_tensor": True}),
    "awq": ("awq", {"group_size": 32}),
    "gptq": ("gptq", {"group_size": 32}),
    "gptq-asym-act": ("gptq", {"group_size": 32, "sym": False, "act_order": True}),
    "gptq-head": ("gptq", {"group_size": 32, "lm_head": True}),  # GPTQModel's lm_head=True
}


@pytest.fixture(scope="session")
def quant_models(tmp_path_factory, tiny_model_factory) -> dict[str, str]:
    """Llama (and Qwen2, whose q/k/v have biases) with weight std 0.02, and each quantized variant."""
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for arch in ("llama", "qwen2"):
        src = tiny_model_factory(str(root / arch), arch, initializer_range=0.02)
        out[arch] = src
        for name, (method, options) in VARIANTS.items():
            if arch == "qwen2" and name not in ("fp8", "gptq-asym-act", "awq"):
                continue
            folder = str(root / f"{arch}-{name}")
            quantize_checkpoint(src, folder, method, **options)
            out[f"{arch}-{name}"] = folder
    return out


@pytest.fixture(scope="session")
def scoring_ids() -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(3, 49152) for _ in range(200)]


@pytest.fixture(scope="session")
def short_prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(4, 40))] for _ in range(16)]
