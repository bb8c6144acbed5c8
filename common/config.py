"""Configuration: frozen dataclasses, validated in `__post_init__`, built once at the entry point.

Each component receives only its part: the scheduler a `SchedulerConfig`, the KV manager a
`CacheConfig`, the model runner a `ModelConfig`. This is the only module that reads environment
variables (`env_flag`), so nothing deep in the code changes behaviour behind the caller's back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DTYPES = ("auto", "float32", "bfloat16", "float16")
# --quantization: weight formats with a kernel (docs/quantization.md); None = the checkpoint's own
# (its config.json `quantization_config`, or full precision)
QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "gguf")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
KV_CACHE_SCALES = ("per-head", "per-tensor")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag."""


def env_flag(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how. Architecture numbers live in `ArchConfig` (read from the model)."""
    model: str
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's context length
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    tokenizer: str | None = None
    served_model_name: str | None = None
    seed: int = 0
    device: str = "cpu"
    quantization: str | None = None  # QUANTIZATION_METHODS; None: detected from the checkpoint

    def __post_init__(self):
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                              f"got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be positive, got {self.max_model_len}")
        if self.load_format not in ("auto", "safetensors", "gguf", "dummy"):
            raise ConfigError(f"--load-format must be auto, safetensors, gguf or dummy, got {self.load_format!r}")


@dataclass(frozen=True)
class ArchConfig:
    """Llama-family architecture numbers (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2)."""
    architecture: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from kv_cache_memory_gb / gpu_memory_utilization
    kv_cache_memory_gb: float = 2.0  # CPU: memory for the KV pool when num_blocks is None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: auto = the model's dtype; fp8 = e4m3 with scales
    kv_cache_scale: str = "per-head"  # KV_CACHE_SCALES: granularity of the fp8 KV scales

    def __post_init__(self):
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_scale not in KV_CACHE_SCALES:
            raise ConfigError(f"--kv-cache-scale must be one of {', '.join(KV_CACHE_SCALES)}, "
                              f"got {self.kv_cache_scale!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"--num-gpu-blocks-override must be positive, got {self.num_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")

    @property
    def fp8_kv(self) -> bool:
        return self.kv_cache_dtype in ("fp8", "fp8_e4m3")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    max_model_len: int = 2048  # filled from the model at start-up

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be positive, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be >= --max-model-len "
                f"({self.max_model_len}) when chunked prefill is disabled")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    enforce_eager: bool = False  # True: no CUDA graphs for decode (only matters on CUDA)
    # Overlapped steps: schedule step k on the host while step k-1 runs on the device.
    # None: on for CUDA, off elsewhere (a CPU forward pass leaves no host time to hide).
    async_scheduling: bool | None = None
