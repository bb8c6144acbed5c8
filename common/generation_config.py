"""The model's generation_config.json, as vLLM reads it (torch-free: the router uses it too).

    eos_token_id    added to config.json's end-of-sequence ids (read_arch_config): chat models
                    often list their end-of-turn token only there (Llama-3-Instruct's <|eot_id|>)
    temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens (-> max_tokens)
                    default sampling parameters of requests that do not set them
                    (`--generation-config auto`, vLLM's default: the model folder's file;
                    `vllm`: none, the API's own defaults; or a folder holding the file)

A GGUF file has no generation config; `auto` then gives no defaults.
"""

from __future__ import annotations

import json
import logging
import os

from pdserve.common.config import ConfigError

log = logging.getLogger("pdserve.generation_config")

FILE = "generation_config.json"
# generation_config.json key -> SamplingParams field, the keys vLLM takes as default sampling parameters
SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def read(folder: str) -> dict:
    """The folder's generation_config.json ({} when there is none)."""
    path = os.path.join(folder, FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def eos_token_ids(folder: str) -> tuple[int, ...]:
    eos = read(folder).get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


def sampling_defaults(model_path: str, choice: str = "auto") -> dict:
    """SamplingParams field -> default, from `--generation-config CHOICE` (see the module)."""
    if choice == "vllm":
        return {}
    if choice == "auto":
        folder = model_path if os.path.isdir(model_path) else None
        if folder is None:
            return {}
    else:
        folder = choice
        if not os.path.isfile(os.path.join(folder, FILE)):
            raise ConfigError(f"--generation-config {choice}: no {FILE} there (auto: the model's; vllm: none)")
    config = read(folder)
    defaults = {field: config[key] for key, field in SAMPLING_KEYS.items() if config.get(key) is not None}
    if defaults:
        log.warning("default sampling parameters from %s: %s (requests that set them keep theirs; "
                    "--generation-config vllm: none)", os.path.join(folder, FILE), defaults)
    return defaults
