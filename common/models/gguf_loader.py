"""GGUF files: architecture from the metadata, weights dequantized through the `gguf` package.

GGUF names -> HF names (llama.cpp's convention):
    token_embd            -> embed_tokens          blk.N.attn_q/k/v/output -> layers.N.self_attn.{q,k,v,o}_proj
    blk.N.attn_norm       -> input_layernorm       blk.N.ffn_gate/up/down  -> layers.N.mlp.{gate,up,down}_proj
    blk.N.ffn_norm        -> post_attention_layernorm   output_norm -> norm   output -> lm_head
    blk.N.attn_q_norm / attn_k_norm -> self_attn.q_norm / k_norm (Qwen3)
llama.cpp stores Llama's q/k rows permuted for its interleaved RoPE; they are permuted back here
so the weights equal the HF checkpoint's (Qwen files are not permuted). The header is parsed once
per process (gguf_header.py); dequantization is the `gguf` package's.
"""

from __future__ import annotations

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
    scaling = None
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
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


def iter_weights(reader: GGUFHeader, cfg: ArchConfig, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGMLQuantizationType
    data = np.memmap(path, dtype=np.uint8, mode="r")  # mapped while the weights load, then dropped
    for t in reader.tensors:
        qtype = GGMLQuantizationType(t.ggml_type)
        if qtype.name not in SUPPORTED_TYPES:
            raise ConfigError(f"{path}: tensor {t.name} has type {qtype.name}, "
                              f"supported: {', '.join(SUPPORTED_TYPES)}")
        w = dequantize(tensor_data(data, t), qtype)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        base, _, suffix = t.name.rpartition(".")
        if cfg.architecture == "llama" and base.endswith(".attn_q"):
            w = _unpermute(w, cfg.num_heads)
        elif cfg.architecture == "llama" and base.endswith(".attn_k"):
            w = _unpermute(w, cfg.num_kv_heads)
        if not (w.flags.writeable and w.flags.c_contiguous):  # F32 tensors: views of the file's map
            w = np.array(w, dtype=np.float32, order="C")
        yield _hf_name(base) + "." + suffix, torch.from_numpy(w)


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
