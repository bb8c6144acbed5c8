"""Model loading: an HF folder (config.json + *.safetensors), a GGUF file, or dummy weights.

Model paths (the packaged default included) are resolved in the torch-free `model_path` module.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os

import torch

from pdserve.common.config import ArchConfig, ConfigError, ModelConfig
from pdserve.common.model_path import default_model_path, resolve_model_path  # noqa: F401 (re-export)
from pdserve.common.models import gguf_loader, quantization
from pdserve.common.models.llama import TORCH_OPS, LlamaForCausalLM

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_gguf(path: str) -> bool:
    return os.path.isfile(path) and (path.endswith(".gguf") or _has_gguf_magic(path))


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def read_hf_config(folder: str) -> ArchConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{folder} has no config.json (expected an HF model folder or a .gguf file)")
    try:
        with open(path) as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from e
    archs = c.get("architectures") or []
    arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise ConfigError(f"{path}: architectures {archs} not supported ({', '.join(ARCHITECTURES)} are)")
    heads = c["num_attention_heads"]
    rope = c.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling here
    scaling = c.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    window = c.get("sliding_window")
    if arch in ("qwen2", "qwen3") and not c.get("use_sliding_window", False):
        window = None
    eos = c.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    from pdserve.common.generation_config import eos_token_ids as generation_eos
    eos_ids = tuple(dict.fromkeys(eos_ids + generation_eos(folder)))  # chat models' end of turn (vLLM too)
    return ArchConfig(
        architecture=arch, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=c.get("max_position_embeddings", 2048),
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        attention_bias=arch == "qwen2" or c.get("attention_bias", False),
        qk_norm=arch == "qwen3", sliding_window=window,
        bos_token_id=c.get("bos_token_id"), eos_token_ids=eos_ids)


def read_arch_config(path: str) -> ArchConfig:
    if is_gguf(path):
        return gguf_loader.read_arch_config(gguf_loader.open_reader(path), path)
    return read_hf_config(path)


def _iter_safetensors(folder: str):
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ConfigError(f"{folder} has no *.safetensors weights")
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(f"cannot read {file}: {e}") from e


def resolve_dtype(requested: str, arch_dtype: torch.dtype | None = None) -> torch.dtype:
    if requested == "auto":
        return arch_dtype or torch.float32
    return TORCH_DTYPES[requested]


def checkpoint_dtype(path: str) -> torch.dtype | None:
    """The dtype the checkpoint declares (HF config's torch_dtype / dtype); GGUF: float32."""
    if is_gguf(path):
        return torch.float32
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    name = c.get("dtype") or c.get("torch_dtype")
    return TORCH_DTYPES.get(name, torch.float32)


def load_model(cfg: ModelConfig, path: str, arch: ArchConfig, block_size: int, max_positions: int,
               dtype: torch.dtype, device: torch.device, ops=TORCH_OPS, tp=None) -> LlamaForCausalLM:
    """Build the model on `meta` (with `tp`, a rank's TPComm: sharded, models/parallel.py),
    materialise it in `dtype` on `device`, fill it.

    Weights go straight into their final dtype and device (checkpoint tensors are read on the CPU
    and copied in, which rounds exactly as a later `.to(dtype)` would), so an 8B model never
    exists in fp32 or twice. A CUDA out-of-memory becomes a ConfigError.
    """
    torch.manual_seed(cfg.seed)
    qcfg = quantization.resolve_quantization(cfg.quantization, path, is_gguf(path), cfg.load_format == "dummy")
    use_triton = ops.uses_triton  # quantized modules pick their kernels by the same choice
    # Built on meta directly in `dtype` (the default dtype while the modules are made), so the
    # quantized modules swapped in below keep the dtypes they declare (int32 / fp8 / fp16 parts).
    with torch.device("meta"), _no_init(), _default_dtype(dtype):
        model = LlamaForCausalLM(arch, block_size, max_positions, ops)
        if tp is not None:
            from pdserve.common.models.parallel import shard_model
            shard_model(model, tp)
    reader = gguf_loader.open_reader(path) if is_gguf(path) and cfg.load_format != "dummy" else None
    gguf_types = gguf_loader.tensor_types(reader) if reader is not None and qcfg is not None else None
    # quantized modules, on meta; GGUF: the weights that keep their blocks
    kept = quantization.prepare_model(model, qcfg, arch, dtype, device, use_triton, gguf_types)
    out_of_memory = None
    try:
        _materialize(model, device)
        quantization.attach_loaders(model)
        if cfg.load_format == "dummy":
            _init_dummy(model, cfg.seed, device)
        elif reader is not None:
            model.load_weights(gguf_loader.iter_weights(reader, arch, path, kept), owned=True)
        else:
            model.load_weights(_iter_safetensors(path))
        quantization.finish_model(model, qcfg, use_triton)  # online fp8; act-order permutations
    except torch.OutOfMemoryError as e:
        out_of_memory = str(e).splitlines()[0]
    if out_of_memory is not None:  # raised here, so no traceback keeps the partly loaded weights alive
        del model
        raise ConfigError(f"the model does not fit on {device}: {out_of_memory}")
    # rotary tables were created on meta (and cast): rebuild them for real, in fp32
    _rebuild_rotary(model, arch, max_positions, ops, device)
    model.quant_config = qcfg
    return model.eval()


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Replace the meta parameters and buffers with uninitialised ones on `device`, each in its own
    dtype, as `.to_empty(device)` would, without the torch._refs path that meta tensors take
    there (its first use imports torch.fx and sympy, ~1 s)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                              requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _no_init():
    """Modules built on `meta` skip their random init: every weight is loaded (or drawn by
    _init_dummy) later, and init on meta under torch.device() goes through torch._refs, whose
    first use imports torch._dynamo (seconds of a server's start)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}
    for name in _INIT_FUNCTIONS:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _init_dummy(model: LlamaForCausalLM, seed: int, device: torch.device) -> None:
    """Random weights for benchmarks: matrices ~ N(0, 0.02), norms and biases 1. The small std
    keeps activations of a deep model finite in bf16. Drawn on the device (seconds for 8B)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    done = quantization.init_dummy_quantized(model, gen)  # drawn in their quantized format
    for p in model.parameters():
        if id(p) in done:
            continue
        if p.dim() > 1:
            p.data.normal_(0.0, 0.02, generator=gen)
        else:
            p.data.fill_(1.0)


def _rebuild_rotary(model: LlamaForCausalLM, arch: ArchConfig, max_positions: int, ops, device) -> None:
    from pdserve.common.models.llama import Rotary
    rotary = Rotary(arch.head_dim, max_positions, arch.rope_theta, arch.rope_scaling, ops).to(device)
    for layer in model.layers:
        layer.self_attn.rotary = rotary
