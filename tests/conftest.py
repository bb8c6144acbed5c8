"""Shared fixtures: tiny random HF models built with save_pretrained, the packaged SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

from pdserve.common.models.loader import default_model_path
from pdserve.common.tokenizer import gguf_tokenizer_folder

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(smollm2_path) -> str:
    return gguf_tokenizer_folder(smollm2_path)


def build_tiny_model(folder: str, arch: str, tokenizer_dir: str, initializer_range: float = 0.3, **overrides) -> str:
    """A random model of the given family, float32, saved as an HF folder with a real tokenizer.
    The default weight std 0.3 makes outputs sensitive to every rounding (a strict test of exact
    paths); 0.02 gives logits that tolerate quantization noise the way trained models do."""
    import shutil

    import transformers
    cfg_name, model_name, extra = ARCHS[arch]
    defaults = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, initializer_range=initializer_range,
        tie_word_embeddings=arch in ("qwen2", "qwen3"), bos_token_id=1, eos_token_id=2)
    cfg = getattr(transformers, cfg_name)(**{**defaults, **extra, **overrides})
    torch.manual_seed(1234)
    model = getattr(transformers, model_name)(cfg).to(torch.float32).eval()
    model.save_pretrained(folder)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_factory(smollm2_tokenizer_dir):
    """build(folder, arch, **config_overrides) -> folder, for models a test needs of its own."""
    return lambda folder, arch, **kw: build_tiny_model(folder, arch, smollm2_tokenizer_dir, **kw)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_tokenizer_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(str(root / arch), arch, smollm2_tokenizer_dir) for arch in ARCHS}
