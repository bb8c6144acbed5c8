"""Configuration: frozen dataclasses, validated in `__post_init__`, built once at the entry point.

Each component receives only its part: the scheduler a `SchedulerConfig`, the KV manager a
`CacheConfig`, the model runner a `ModelConfig`. This is the only module that reads environment
variables (`env_flag`), so nothing deep in the code changes behaviour behind the caller's back.

Every engine option is declared once, here, as a dataclass field with `option(...)`: its default,
its help text, its CLI flag and its keyword name. `add_engine_args` generates the flags of
`pdserve serve/prefill/decode/generate/chat/bench` from these fields, and
`EngineConfig.from_options(**kwargs)` builds the config from those keywords (the parsed flags, or
`LLM(model, **kwargs)`), so a default is written in exactly one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field

from pdserve.common.sampling_params import DEFAULT_MAX_LOGPROBS

DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNELS = ("auto", "reference")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}  # vLLM's spellings
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


def option(default, help: str, *, name: str | None = None, flag: str | None = None, choices=None,
           type=None, boolean: bool = False, aliases: tuple[str, ...] = (), nargs: str | None = None):
    """A config field that is also a user option: `name` is its keyword (default: the field name),
    `flag` its CLI spelling (default: --name with dashes), `aliases` more spellings (-tp),
    `boolean` makes --x / --no-x, `nargs` "+" takes several values on the command line."""
    return field(default=default, metadata={"help": help, "name": name, "flag": flag, "choices": choices,
                                            "type": type, "boolean": boolean, "aliases": aliases,
                                            "nargs": nargs})

# --quantization: weight formats with a kernel (docs/quantization.md); None = the checkpoint's own
# (its config.json `quantization_config`, or full precision)
QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "gguf")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
KV_CACHE_SCALES = ("per-head", "per-tensor")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the flag."""


def check_output_path(path: str | None, flag: str) -> None:
    """A file a command writes at its end: its folder must exist before the work starts (else the
    work is lost to a one-line error at the end)."""
    if path and path != "-":
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ConfigError(f"{flag}: folder {folder} does not exist")
        if os.path.isdir(path):
            raise ConfigError(f"{flag}: {path} is a folder")


def check_max_logprobs(value: int) -> None:
    """--max-logprobs (engine and router): -1 (no cap: the vocabulary) or a count."""
    if value < -1:
        raise ConfigError(f"--max-logprobs must be -1 (no cap) or >= 0, got {value}")


def env_flag(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def cpu_has_bf16() -> bool:
    """The host CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo's flags):
    `--dtype auto` runs bf16 there. Read here, with the environment, so nothing deeper probes the host."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how. Architecture numbers live in `ArchConfig` (read from the model)."""
    model: str = option("default", "HF folder or .gguf file (default: the packaged SmolLM2-135M-Instruct)")
    dtype: str = option("auto", "weights and activations dtype (auto: bfloat16 on a CPU with AVX512-BF16 or AMX, "
                                "float32 on other CPUs, the checkpoint's on CUDA; half = float16, float = float32)",
                        choices=(*DTYPES, *DTYPE_ALIASES))
    max_model_len: int | None = option(None, "context length (default: the model's)", type=int)
    max_logprobs: int = option(DEFAULT_MAX_LOGPROBS, "most logprobs a request may ask for per token (logprobs, prompt_logprobs, "
                                   "top_logprobs); -1: no cap (the whole vocabulary)", type=int)
    load_format: str = option("auto", "weights format; dummy: random weights of the model's shape",
                              choices=LOAD_FORMATS)
    tokenizer: str | None = option(None, "tokenizer folder or .gguf (default: the model's)")
    served_model_name: str | None = option(None, "name(s) in the API: answers carry the first, requests may name "
                                                 "any (default: the model's folder or file name)", nargs="+")
    seed: int = option(0, "engine seed: random weights of --load-format dummy and unseeded sampling "
                          "(generate/chat: also the sampling seed of every prompt)", type=int)
    device: str = option("auto", "cpu, cuda, cuda:N or auto (cuda when present)")
    kernels: str = option("auto", "auto: the fast path of the device (Triton kernels on CUDA, packed oneDNN GEMMs "
                                  "and batched paged attention on CPU); reference: HF-exact eager torch",
                          choices=KERNELS)
    pdl: bool = option(True, "CUDA on Hopper or later: the decode path's Triton kernels start while the kernel "
                             "before them ends (programmatic dependent launch, kernels/pdl.py)", boolean=True)
    graph_sampler: bool = option(True, "steps whose rows all sample plain greedy take the argmax in a small graph "
                                       "after the decode CUDA graph (eagerly elsewhere); tensor parallel: each "
                                       "rank's vocab shard, no logits gather (engine/greedy_tail.py)", boolean=True)
    batch_invariant: bool = option(False, "CPU bfloat16: a request's tokens do not depend on what it is batched "
                                          "with (one-row products of layers with more inputs than outputs run as "
                                          "two rows, products of more than 32 rows in blocks of 32: oneDNN's "
                                          "summation order changes with the row count; about 4-10 percent of a "
                                          "batch-1 step)",
                                   boolean=True)
    chat_template: str | None = option(None, "chat template: a Jinja file, or the template itself "
                                             "(default: the tokenizer's)")
    quantization: str | None = option(None, "weight quantization: fp8 (online per-channel, or an fp8 checkpoint), "
                                            "awq, gptq, gguf (run GGUF blocks quantized); default: the "
                                            "checkpoint's quantization_config, else full precision",
                                      choices=QUANTIZATION_METHODS, aliases=("-q",))
    generation_config: str = option("auto", "default sampling parameters of requests that set none (temperature, "
                                            "top_p, top_k, min_p, repetition_penalty, max_new_tokens): auto: the "
                                            "model folder's generation_config.json (vLLM's default); vllm: none; "
                                            "or a folder holding one")
    trust_remote_code: bool = option(False, "accepted for vLLM compatibility and ignored: pdserve runs no code "
                                            "from a checkpoint and downloads nothing", boolean=True)

    def __post_init__(self):
        object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}, "
                              f"got {self.quantization!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"--kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"--max-model-len must be positive, got {self.max_model_len}")
        check_max_logprobs(self.max_logprobs)
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
    block_size: int = option(16, "tokens per KV block (a power of two)", type=int)
    num_blocks: int | None = option(None, "KV blocks (default: sized from memory)", type=int,
                                    name="num_gpu_blocks_override")
    kv_cache_memory_gb: float = option(2.0, "GB for the KV cache on CPU", type=float, flag="--kv-cache-memory")
    gpu_memory_utilization: float = option(0.9, "fraction of GPU memory for weights, activations and KV",
                                           type=float)
    enable_prefix_caching: bool = option(True, "reuse the KV of equal prompt prefixes", boolean=True)
    kv_cache_dtype: str = option("auto", "KV cache dtype: auto = the model's dtype; fp8 (fp8_e4m3) = e4m3 with "
                                         "scales, ~2x the tokens", choices=KV_CACHE_DTYPES)
    kv_cache_scale: str = option("per-head", "granularity of the fp8 KV scales", choices=KV_CACHE_SCALES)
    # Not a user option: a worker with --kv-transport ipc sets it, so that a CPU pool lives in
    # memory other processes of the host can map (kv_transfer/host_shm.py); GPU pools ignore it.
    shared_host_kv: bool = False

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


# Default tokens per step. The prompts of a step all get their first token at its end, so smaller
# steps spread first tokens out under a burst of prompts, but every step also pays a fixed cost
# (the host's dispatch of ~300 ops, the decodes of the requests already running). A bf16 CPU server
# lets those decodes sit out up to CPU_DECODE_DEFER_STEPS steps in a row while prompts wait
# (SchedulerConfig.decode_defer_steps). On the 2-core AMD EPYC (AVX512-BF16, no AMX), a burst of
# 64 x 200-token prompts / 64 out favoured 512 tokens with 3 deferred steps over 1024 with none
# (mean TTFT 2-8% lower, total time the same). On the 2-vCPU Xeon with AMX, where prompt tokens cost
# less, the fixed cost dominates: the same burst run in one process, 5 interleaved rounds
# (docs/benchmarks.md, eleventh session), 2048 tokens with 3 deferred steps vs 512: total 8.7 vs
# 9.6 s, mean TTFT 2.1 vs 2.8 s (medians; 70 steps vs 89), 512 worse than 2048 without deferral in
# total and TTFT in 5 of 5 rounds. So bf16 servers take 2048, as vLLM's CPU server does. fp32 keeps
# 1024 tokens and no deferral (1024 was 4.6% better than 2048 in TTFT, cpu6; 512 no better). A GPU
# needs larger steps to fill and carries the decodes cheaply. The offline `LLM` on a CPU, where no
# one waits for a first token, takes 4096 as vLLM's LLM class does there (64 prompts of 200 tokens /
# 64 out ran 3-4% faster than at 2048) and defers nothing.
TOKEN_BUDGET = 8192
CPU_TOKEN_BUDGET = 1024  # fp32
CPU_HALF_TOKEN_BUDGET = 2048  # bf16 / fp16
CPU_OFFLINE_TOKEN_BUDGET = 4096
CPU_DECODE_DEFER_STEPS = 3  # a bf16 / fp16 CPU server


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = option(256, "requests in a batch at most", type=int)
    max_num_batched_tokens: int | None = option(
        None, f"tokens per step at most (default: {TOKEN_BUDGET}, on CPU {CPU_TOKEN_BUDGET} in fp32 and "
              f"{CPU_HALF_TOKEN_BUDGET} in bf16 ({CPU_OFFLINE_TOKEN_BUDGET} in the offline LLM), or --max-model-len "
              "without chunked prefill)", type=int)
    enable_chunked_prefill: bool = option(True, "split long prompts over steps", boolean=True)
    decode_defer_steps: int | None = option(
        None, "while prompts wait, steps in a row that may leave the running requests' decodes out to give "
              f"the prompts the whole step (0: every step carries them; default 0, {CPU_DECODE_DEFER_STEPS} "
              "for a server on CPU in bf16)", type=int)
    max_model_len: int = 2048  # filled from the model at start-up (0 from EngineConfig until then)
    on_cpu: bool = False  # filled at start-up: the engine runs on the CPU (the smaller default budget)
    half_precision: bool = False  # filled at start-up: the model computes in bf16 / fp16 (CPU defaults)
    offline: bool = False  # set by the offline `LLM` (on CPU its default budget is CPU_OFFLINE_TOKEN_BUDGET)

    @property
    def token_budget(self) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        default = (TOKEN_BUDGET if not self.on_cpu else CPU_OFFLINE_TOKEN_BUDGET if self.offline
                   else CPU_HALF_TOKEN_BUDGET if self.half_precision else CPU_TOKEN_BUDGET)
        return default if self.enable_chunked_prefill else max(self.max_model_len, default)

    @property
    def decode_defer_limit(self) -> int:
        if self.decode_defer_steps is not None:
            return self.decode_defer_steps
        return CPU_DECODE_DEFER_STEPS if self.on_cpu and self.half_precision and not self.offline else 0

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ConfigError(f"--max-num-seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ConfigError(f"--max-num-batched-tokens must be positive, got {self.max_num_batched_tokens}")
        if self.decode_defer_steps is not None and self.decode_defer_steps < 0:
            raise ConfigError(f"--decode-defer-steps must be >= 0, got {self.decode_defer_steps}")
        if not self.enable_chunked_prefill and self.max_model_len and self.token_budget < self.max_model_len:
            raise ConfigError(
                f"--max-num-batched-tokens ({self.token_budget}) must be >= --max-model-len "
                f"({self.max_model_len}) when chunked prefill is disabled")


SPEC_METHODS = ("ngram", "draft_model")
_SPEC_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "draft_budget",
              "device_rounds")
MAX_DEVICE_ROUNDS = 64
DRAFT_BUDGETS = ("auto", "cost", "all")
MAX_SPECULATIVE_TOKENS = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (docs/speculative.md), with vLLM's keys:

        {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
        {"model": "path/to/draft", "num_speculative_tokens": 4}      (method "draft_model")

    Prompt lookup as vLLM: neither bound given -> both 5; one given -> the other equals it.
    pdserve's own key `draft_budget` (n-gram): "cost" feeds a request's drafts only while their
    expected tokens beat what the rows cost the step (spec_decode/budget.py), "all" feeds every
    draft there is room for, "auto" (default) is "cost" on CPU and "all" on a GPU. And
    `device_rounds` (n-gram): a lone greedy request's step chains this many verify rounds on the
    device, the lookup there too (spec_decode/device_rounds.py); 0 or 1: one round per step, drafts
    from the host; default (null): spec_decode.device_rounds.DEFAULT_ROUNDS on CUDA, 0 on CPU."""
    method: str
    num_speculative_tokens: int
    model: str | None = None  # the draft model (method "draft_model")
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    draft_budget: str = "auto"
    device_rounds: int | None = None

    def __post_init__(self):
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"--speculative-config: num_speculative_tokens must be an integer in "
                              f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        if self.draft_budget not in DRAFT_BUDGETS:
            raise ConfigError(f"--speculative-config: draft_budget must be one of {', '.join(DRAFT_BUDGETS)}, "
                              f"got {self.draft_budget!r}")
        if self.method not in SPEC_METHODS:
            raise ConfigError(f"--speculative-config: method must be one of {', '.join(SPEC_METHODS)}, "
                              f"got {self.method!r}")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model:
                raise ConfigError("--speculative-config: method draft_model needs \"model\": the draft's path")
            if self.prompt_lookup_max is not None or self.prompt_lookup_min is not None:
                raise ConfigError("--speculative-config: prompt_lookup_max/min apply to method ngram only")
            if self.draft_budget != "auto":
                raise ConfigError("--speculative-config: draft_budget applies to method ngram only")
            if self.device_rounds is not None:
                raise ConfigError("--speculative-config: device_rounds applies to method ngram only")
            return
        rounds = self.device_rounds
        if rounds is not None and (not _is_int(rounds) or not 0 <= rounds <= MAX_DEVICE_ROUNDS):
            raise ConfigError(f"--speculative-config: device_rounds must be an integer in [0, {MAX_DEVICE_ROUNDS}], "
                              f"got {rounds!r}")
        if self.model is not None:
            raise ConfigError("--speculative-config: method ngram takes no \"model\"")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        lo, hi = (5, 5) if lo is None and hi is None else (hi if lo is None else lo, lo if hi is None else hi)
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not _is_int(value) or value < 1:
                raise ConfigError(f"--speculative-config: {name} must be a positive integer, got {value!r}")
        if lo > hi:
            raise ConfigError(f"--speculative-config: prompt_lookup_min ({lo}) must not exceed "
                              f"prompt_lookup_max ({hi})")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig":
        """From a JSON string (the flag), a dict (`LLM(speculative_config={...})`) or itself."""
        if isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--speculative-config is not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"--speculative-config must be a JSON object, got {type(value).__name__}")
        unknown = sorted(set(value) - set(_SPEC_KEYS))
        if unknown:
            raise ConfigError(f"--speculative-config: unsupported key(s) {', '.join(unknown)} "
                              f"(supported: {', '.join(_SPEC_KEYS)})")
        value = dict(value)
        if value.get("model") == "ngram":  # vLLM's older spelling
            value.pop("model")
            value.setdefault("method", "ngram")
        if "method" not in value:
            if "model" not in value:
                raise ConfigError("--speculative-config needs \"method\" (ngram) or \"model\" (a draft model)")
            value["method"] = "draft_model"
        if "num_speculative_tokens" not in value:
            raise ConfigError("--speculative-config needs \"num_speculative_tokens\"")
        return cls(**value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: the model's heads, MLP columns and vocabulary split over N ranks
    (one process each; rank r uses device index base + r on CUDA). Per-rank memory settings
    (--gpu-memory-utilization, --kv-cache-memory) apply to each rank."""
    tensor_parallel_size: int = option(1, "split the model over N ranks, one process each (GPUs base..base+N-1; "
                                          "gloo processes on CPU)", type=int, aliases=("-tp",))
    all_reduce: str = option(
        "auto", "tensor-parallel all-reduce on CUDA: fused (all-reduce + residual add + RMSNorm in one "
                "kernel over NVLink/P2P peer memory for decode-sized steps, NCCL above), nccl, symm_mem "
                "(torch's one-shot all-reduce, then the norm), or auto (fused where the GPUs can map each "
                "other's memory, else nccl; gloo on CPU)",
        flag="--tp-all-reduce", choices=("auto", "fused", "nccl", "symm_mem"))

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be positive, got {self.tensor_parallel_size}")
        if self.all_reduce not in ("auto", "nccl", "symm_mem", "fused"):
            raise ConfigError(f"--tp-all-reduce must be auto, fused, nccl or symm_mem, got {self.all_reduce!r}")

    def check_model(self, arch: ArchConfig) -> None:
        """KV heads go whole to ranks (as even as the count allows), or, when there are fewer KV
        heads than ranks, each is replicated on N / num_kv_heads ranks that split its query heads."""
        n, kv, heads = self.tensor_parallel_size, arch.num_kv_heads, arch.num_heads
        if kv < n and (n % kv or heads % n):
            raise ConfigError(
                f"--tensor-parallel-size {n} cannot split this model's {kv} KV heads / {heads} attention heads: "
                f"use a size <= {kv}, or a multiple of {kv} that divides {heads}")
        if arch.intermediate_size < n:
            raise ConfigError(f"--tensor-parallel-size {n} exceeds the model's intermediate size "
                              f"{arch.intermediate_size}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    enforce_eager: bool = option(False, "no CUDA graphs for decode steps", boolean=True)
    # Overlapped steps: schedule step k on the host while step k-1 runs on the device.
    # None: on for CUDA, off elsewhere (a CPU forward pass leaves no host time to hide).
    async_scheduling: bool | None = option(
        None, "schedule the next step while the device runs the current one (default: on CUDA only)", boolean=True)
    # Speculative decoding: `speculative_config` is canonical; the two shorthands are folded into
    # it (and cleared) in __post_init__.
    speculative_config: SpeculativeConfig | None = option(
        None, 'speculative decoding, JSON with vLLM\'s keys: {"method": "ngram", "num_speculative_tokens": 4, '
              '"prompt_lookup_max": 4} or {"model": DRAFT, "num_speculative_tokens": 4} (docs/speculative.md)')
    speculative_model: str | None = option(
        None, "shorthand for --speculative-config: a draft model sharing the vocabulary, or ngram")
    num_speculative_tokens: int | None = option(None, "tokens proposed per step with --speculative-model "
                                                      "(default: 4)", type=int)

    SECTIONS = ("model", "cache", "scheduler", "parallel")

    def __post_init__(self):
        spec, model, k = self.speculative_config, self.speculative_model, self.num_speculative_tokens
        if spec is not None and (model is not None or k is not None):
            raise ConfigError("give --speculative-config or --speculative-model/--num-speculative-tokens, not both")
        if model is not None:
            spec = {"model": model, "num_speculative_tokens": 4 if k is None else k}
        elif k is not None:
            raise ConfigError("--num-speculative-tokens needs --speculative-model")
        object.__setattr__(self, "speculative_config", None if spec is None else SpeculativeConfig.parse(spec))
        object.__setattr__(self, "speculative_model", None)
        object.__setattr__(self, "num_speculative_tokens", None)

    @classmethod
    def from_options(cls, **options) -> "EngineConfig":
        """Build from option keywords (`option(name=...)`, e.g. max_num_seqs, num_gpu_blocks_override);
        an unknown keyword is a ConfigError naming it. Unset (None) options keep their defaults
        where the default is not None."""
        known = {name: (section, f) for section, f, name in _options()}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"unknown engine option(s): {', '.join(unknown)}")
        parts: dict[str | None, dict] = {s: {} for s in (None, *cls.SECTIONS)}
        for name, value in options.items():
            section, f = known[name]
            if value is None and f.default is not None:
                continue
            parts[section][f.name] = value
        if parts["model"].get("model") is None:
            parts["model"]["model"] = "default"
        model = ModelConfig(**parts["model"])
        scheduler = dict(parts["scheduler"])
        scheduler.setdefault("max_model_len", model.max_model_len or 0)  # 0: the model's, known at start-up
        return cls(model=model, cache=CacheConfig(**parts["cache"]), scheduler=SchedulerConfig(**scheduler),
                   parallel=ParallelConfig(**parts["parallel"]), **parts[None])


def _options():
    """(section or None, field, keyword name) of every user option of EngineConfig."""
    for section in (None, *EngineConfig.SECTIONS):
        cls = EngineConfig if section is None else {"model": ModelConfig, "cache": CacheConfig,
                                                    "scheduler": SchedulerConfig, "parallel": ParallelConfig}[section]
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                yield section, f, f.metadata["name"] or f.name


class HelpFormatter(argparse.HelpFormatter):
    """Every `pdserve` parser's formatter: a flag's help ends with its default unless the text
    already names one (engine flags carry the config's default in their help; their argparse
    default is None so that an unset flag keeps the config's value)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default in (None, False, [], "")
                or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags, generated from the config fields (help shows each default)."""
    g = parser.add_argument_group("engine")
    for _, f, name in _options():
        m = f.metadata
        flag = m["flag"] or "--" + name.replace("_", "-")
        shown = f.default is not None and "default" not in m["help"]
        help_text = m["help"] + (f" (default: {f.default})" if shown else "")
        flags = (flag, *m["aliases"])
        if m["boolean"]:
            g.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            g.add_argument(*flags, dest=name, default=None, type=m["type"], choices=m["choices"], help=help_text,
                           nargs=m["nargs"])


def engine_options(args: argparse.Namespace) -> dict:
    """The engine keywords of parsed flags (None: not given, the config's default applies). Of
    several --served-model-name names the engine takes the first (the front end accepts them all)."""
    options = {name: getattr(args, name) for _, _, name in _options()}
    if isinstance(options.get("served_model_name"), list):
        options["served_model_name"] = options["served_model_name"][0]
    return options


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    return EngineConfig.from_options(**{**engine_options(args), **overrides})
