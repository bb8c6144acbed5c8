"""GGUF files: architecture from the metadata, weights dequantized through the `gguf` package.

GGUF names -> HF names (llama.cpp's convention):
    token_embd            -> embed_tokens          blk.N.attn_q/k/v/output -> layers.N.self_attn.{q,k,v,o}_proj
    blk.N.attn_norm       -> input_layernorm       blk.N.ffn_gate/up/down  -> layers.N.mlp.{gate,up,down}_proj
    blk.N.ffn_norm        -> post_attention_layernorm   output_norm -> norm   output -> lm_head
    blk.N.attn_q_norm / attn_k_norm -> self_attn.q_norm / k_norm (Qwen3)
llama.cpp stores Llama's q/k rows permuted for its interleaved RoPE; they are permuted back here
so the weights equal the HF checkpoint's (Qwen files are not permuted). The header is parsed once
per process (gguf_header.py); dequantization is the `gguf` package's.

With --quantization gguf, the projections whose blocks have a kernel layout (Q8_0, Q4_0, Q4_1,
Q4_K: quantization/gguf_blocks.py) are not dequantized: `iter_weights` yields their converted
qweight / scales / qzeros (rows permuted the same way) for the model's IntLinear modules.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
import torch

from pdserve.common.config import ArchConfig, ConfigError
from pdserve.common.models.gguf_header import GGUFHeader, read_header, tensor_data

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}


def open_reader(path: str) -> GGUFHeader:
    """The file's header, parsed once per process (ConfigError: missing, truncated, not GGUF)."""
    return read_header(path)


def _field(reader: GGUFHeader, key: str, default=None):
    return reader.field(key, default)


def read_arch_config(reader: GGUFHeader, path: str) -> ArchConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported ({', '.join(SUPPORTED_ARCHS)} are)")
    names = {t.name for t in reader.tensors}
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"])
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(dict.fromkeys(int(t) for t in (eos, eot) if t is not None))
    scaling = _rope_scaling(reader, arch, path)
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ArchConfig(
        architecture=arch, vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")), num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp wrote rows as [head, half, pair] (interleaved); HF wants [head, pair, half].
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


DEQUANT_GROUP_ELEMENTS = 1 << 22  # rows per gguf call: big enough to amortise its per-call cost


def dequantize(raw: np.ndarray, qtype) -> np.ndarray:
    """float32 values of one tensor's raw array (tensor_data's shape). gguf's own `dequantize`
    works through groups of 16 rows (12,800 calls for the packaged SmolLM2, most of its time);
    here its per-type `dequantize_rows` runs on groups of ~4M elements into one output."""
    from gguf import quants
    traits = getattr(quants, "_type_traits", {}).get(qtype)
    if traits is None or raw.ndim < 1:
        return quants.dequantize(raw, qtype).astype(np.float32, copy=False)
    rows = raw.reshape(-1, raw.shape[-1])
    block_size, type_size = quants.GGML_QUANT_SIZES[qtype]
    row_elems = rows.shape[1] // type_size * block_size
    out = np.empty((rows.shape[0], row_elems), dtype=np.float32)
    step = max(1, DEQUANT_GROUP_ELEMENTS // row_elems)
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = traits.dequantize_rows(rows[start:start + step]).reshape(-1, row_elems)
    return out.reshape(*raw.shape[:-1], row_elems)


def tensor_types(reader: GGUFHeader) -> dict[str, str]:
    """HF tensor name ("layers.0.self_attn.q_proj.weight") -> GGUF type name ("Q4_K")."""
    from gguf import GGMLQuantizationType
    out = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        try:
            out[f"{_hf_name(base)}.{suffix}"] = GGMLQuantizationType(t.ggml_type).name
        except ConfigError:
            continue
    return out


def iter_weights(reader: GGUFHeader, cfg: ArchConfig, path: str,
                 quantized: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named float tensors; the names in `quantized` come as their running int layout instead."""
    from gguf import GGMLQuantizationType

    from pdserve.common.models.quantization.gguf_blocks import to_running_layout
    data = np.memmap(path, dtype=np.uint8, mode="r")  # mapped while the weights load, then dropped
    for t in reader.tensors:
        qtype = GGMLQuantizationType(t.ggml_type)
        if qtype.name not in SUPPORTED_TYPES:
            raise ConfigError(f"{path}: tensor {t.name} has type {qtype.name}, "
                              f"supported: {', '.join(SUPPORTED_TYPES)}")
        base, _, suffix = t.name.rpartition(".")
        if base == "rope_freqs":  # read into the config's rope scaling (_rope_scaling)
            continue
        name = f"{_hf_name(base)}.{suffix}"
        if name in quantized:  # raw rows [N, bytes]; q/k rows un-permuted like the float weights
            rows = tensor_data(data, t)
            if cfg.architecture == "llama" and base.endswith((".attn_q", ".attn_k")):
                rows = _unpermute(rows, cfg.num_heads if base.endswith(".attn_q") else cfg.num_kv_heads)
            try:
                parts = to_running_layout(np.ascontiguousarray(rows), qtype.name)
            except ValueError as e:
                raise ConfigError(f"{path}: tensor {t.name}: {e}") from e
            prefix = name.removesuffix(".weight")
            yield from ((f"{prefix}.{key}", value) for key, value in parts.items())
            continue
        w = dequantize(tensor_data(data, t), qtype)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if cfg.architecture == "llama" and base.endswith(".attn_q"):
            w = _unpermute(w, cfg.num_heads)
        elif cfg.architecture == "llama" and base.endswith(".attn_k"):
            w = _unpermute(w, cfg.num_kv_heads)
        if not (w.flags.writeable and w.flags.c_contiguous):  # F32 tensors: views of the file's map
            w = np.array(w, dtype=np.float32, order="C")
        yield name, torch.from_numpy(w)


def _rope_scaling(reader: GGUFHeader, arch: str, path: str) -> dict | None:
    """The HF-style rope scaling of a GGUF file: llama.cpp's `{arch}.rope.scaling.*` keys (linear,
    yarn), or the `rope_freqs` tensor (per-dimension divisors of the frequencies) that its converter
    writes for Llama 3.1+ rope scaling (rope_inv_freq's "freq_factors")."""
    kind = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor),
                   "original_max_position_embeddings": int(_field(reader, f"{arch}.rope.scaling.original_context_length"))}
        for key in ("beta_fast", "beta_slow"):
            value = _field(reader, f"{arch}.rope.scaling.yarn_{key}")
            if value is not None:
                scaling[key] = float(value)
        attn = _field(reader, f"{arch}.rope.scaling.attn_factor")
        if attn is not None:  # llama.cpp multiplies YaRN's own 0.1 ln(factor) + 1 by it
            scaling["attention_factor"] = float(attn) * (0.1 * math.log(float(factor)) + 1.0 if factor > 1 else 1.0)
        return scaling
    if kind not in (None, "none"):
        raise ConfigError(f"{path}: rope scaling {kind!r} is not supported (linear, yarn, and rope_freqs are)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {"rope_type": "freq_factors", "factors": [float(x) for x in tensor_data(data, freqs).reshape(-1)]}


def _hf_name(base: str) -> str:
    if base == "token_embd":
        return "embed_tokens"
    if base == "output_norm":
        return "norm"
    if base == "output":
        return "lm_head"
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _NAMES:
        return f"layers.{parts[1]}.{_NAMES[parts[2]]}"
    raise ConfigError(f"unknown GGUF tensor {base!r}")


_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def export_hf_folder(path: str, out: str) -> str:
    """A GGUF file -> an HF folder (config.json, model.safetensors in fp32, the tokenizer): the
    weights dequantized, as the float loader sees them. Lets `pdserve quantize` start from GGUF."""
    import json
    import shutil

    from safetensors.torch import save_file

    from pdserve.common.tokenizer import gguf_tokenizer_folder
    reader = open_reader(path)
    cfg = read_arch_config(reader, path)
    if (cfg.rope_scaling or {}).get("rope_type") == "freq_factors":
        raise ConfigError(f"{path}: its rope_freqs (Llama 3.1+ rope scaling) has no HF config form to export; "
                          "quantize the model's HF folder instead")
    os.makedirs(out, exist_ok=True)
    tensors = {(name if name.startswith("lm_head") else f"model.{name}"): t for name, t in iter_weights(reader, cfg, path)}
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": [_HF_ARCHITECTURES[cfg.architecture]], "model_type": cfg.architecture,
              "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
              "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
              "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps,
              "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
              "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
              "attention_bias": cfg.attention_bias, "bos_token_id": cfg.bos_token_id,
              "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
              "hidden_act": "silu", "torch_dtype": "float32"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    tok = gguf_tokenizer_folder(path)
    for name in os.listdir(tok):
        shutil.copy(os.path.join(tok, name), out)
    return out
