"""QuantConfig: which weight format a model runs, from --quantization and the checkpoint's config.json.

    --quantization      checkpoint's quantization_config            -> QuantConfig
    (none)              none                                           None (full precision)
    (none) / fp8        quant_method "fp8" (per-tensor weight_scale)   fp8, prequantized
    (none) / fp8        "compressed-tensors", float 8-bit weights      fp8, prequantized
                        (strategy tensor | channel)
    fp8                 none (bf16 / fp16 / fp32 weights)              fp8, quantized at load
    (none) / awq        quant_method "awq", version gemm, 4 bits       awq
    (none) / gptq       quant_method "gptq", 4 or 8 bits               gptq (v1: zeros stored - 1; with
                        ("lm_head": true: the head quantized too)      lm_head: the head runs quantized)
    gguf                a .gguf file with Q8_0 / Q4_0 / Q4_K tensors  gguf (runs quantized)

Anything else (AWQ GEMV/Marlin packing, 2/3-bit GPTQ, block-wise fp8, an explicit flag that
contradicts the checkpoint) is a ConfigError naming the field. Torch-free: read by the CLI too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from pdserve.common.config import ConfigError

# The model's quantizable linears, with the HF checkpoint names fused into each.
FUSED_LINEARS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                 "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "fp8" | "awq" | "gptq" | "gguf"
    prequantized: bool  # the checkpoint holds quantized tensors (False: fp8 quantized at load)
    bits: int = 8
    group_size: int | None = None  # inputs per scale; None: one group over all inputs (per channel)
    sym: bool = True
    desc_act: bool = False  # GPTQ act-order: g_idx permutes inputs into groups
    zero_offset: int = 0  # added to stored zero points (GPTQ v1 stores zero - 1)
    ignore: tuple[str, ...] = ()  # HF module names (or "re:" patterns) left unquantized
    lm_head: bool = False  # the LM head is quantized too (GPTQModel's `lm_head: true`; awq / gptq only)

    def __post_init__(self):
        if self.method in ("awq", "gptq"):
            if self.bits not in ((4,) if self.method == "awq" else (4, 8)):
                raise ConfigError(f"{self.method} with {self.bits}-bit weights is not supported "
                                  f"(bits must be {'4' if self.method == 'awq' else '4 or 8'})")
            if self.group_size is not None and (self.group_size < 16 or self.group_size & (self.group_size - 1)):
                raise ConfigError(f"{self.method} group_size must be a power of two >= 16 or -1, "
                                  f"got {self.group_size}")

    def is_ignored(self, layer_prefix: str, fused: str) -> bool:
        """Whether the fused linear `fused` of `layer_prefix` ("model.layers.3.self_attn") stays
        unquantized; a fused linear whose parts disagree cannot run and is an error."""
        names = [f"{layer_prefix}.{part}" for part in FUSED_LINEARS[fused]]
        hits = [any(_matches(rule, name) for rule in self.ignore) for name in names]
        if any(hits) and not all(hits):
            raise ConfigError(f"quantization_config ignores {[n for n, h in zip(names, hits) if h]} but not "
                              f"{[n for n, h in zip(names, hits) if not h]}: fused projections must agree")
        return all(hits)


def _matches(rule: str, name: str) -> bool:
    if rule.startswith("re:"):
        return re.fullmatch(rule[3:], name) is not None or re.fullmatch(rule[3:], name.removeprefix("model.")) is not None
    rule = rule.removeprefix("model.")
    name = name.removeprefix("model.")
    return name == rule or name.endswith("." + rule) or name.startswith(rule + ".")


def read_quantization_config(folder: str) -> dict | None:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("quantization_config")


def resolve_quantization(requested: str | None, path: str, is_gguf: bool, dummy: bool = False) -> QuantConfig | None:
    """The QuantConfig of a run: `requested` (--quantization) checked against the checkpoint.
    With dummy weights, awq/gptq mean random 4-bit weights in that format (group 128, asym)."""
    if dummy and requested in ("awq", "gptq") and read_quantization_config(path) is None:
        return QuantConfig(requested, prequantized=True, bits=4, group_size=128, sym=False)
    if is_gguf:
        if requested not in (None, "gguf"):
            raise ConfigError(f"--quantization {requested} does not apply to a GGUF file (use gguf or leave it out)")
        return QuantConfig("gguf", prequantized=True) if requested == "gguf" else None
    if requested == "gguf":
        raise ConfigError("--quantization gguf needs a .gguf model file")
    found = read_quantization_config(path)
    if found is not None:
        _check_kv_cache_scheme(found)
        if str(found.get("quant_method", "")).lower() == "compressed-tensors" and not found.get("config_groups"):
            found = None  # fp8 KV-cache scales only (llm-compressor's KV-only recipe): the weights are plain
    if found is None:
        if requested in ("awq", "gptq"):
            raise ConfigError(f"--quantization {requested} needs a checkpoint in that format (config.json has no "
                              f"quantization_config); make one with `pdserve quantize --method {requested}`")
        return QuantConfig("fp8", prequantized=False) if requested == "fp8" else None
    cfg = parse_quantization_config(found)
    if requested is not None and requested != cfg.method:
        raise ConfigError(f"--quantization {requested} contradicts the checkpoint's quantization_config "
                          f"({cfg.method}): leave the flag out or pass --quantization {cfg.method}")
    return cfg


def _check_kv_cache_scheme(q: dict) -> None:
    """A checkpoint's kv_cache_scheme (its self_attn.k_scale / v_scale tensors) must be static fp8:
    those scales are what `--kv-cache-dtype fp8` stores with (quantization/kv_cache.py)."""
    scheme = q.get("kv_cache_scheme")
    if scheme is None or scheme == "static":
        return
    if not isinstance(scheme, dict) or scheme.get("type", "float") != "float" or int(scheme.get("num_bits", 8)) != 8 \
            or scheme.get("dynamic", False) or scheme.get("strategy", "tensor") not in ("tensor", "attn_head"):
        raise ConfigError(f"quantization_config.kv_cache_scheme {scheme!r}: static fp8 (8-bit float, per tensor "
                          "or per head) is the KV-cache scheme supported")


def parse_quantization_config(q: dict) -> QuantConfig:
    method = str(q.get("quant_method", "")).lower()
    if method == "awq":
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise ConfigError(f"quantization_config.version {version!r}: only AWQ's GEMM packing is supported")
        if not q.get("zero_point", True):
            raise ConfigError("quantization_config.zero_point false: AWQ GEMM checkpoints without zero points "
                              "are not supported")
        return QuantConfig("awq", True, bits=int(q.get("bits", q.get("w_bit", 4))),
                           group_size=_group_size(q.get("group_size", q.get("q_group_size", 128))), sym=False,
                           ignore=tuple(q.get("modules_to_not_convert") or ()))
    if method == "gptq":
        fmt = str(q.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ConfigError(f"quantization_config.checkpoint_format {fmt!r}: gptq and gptq_v2 are supported")
        return QuantConfig("gptq", True, bits=int(q.get("bits", 4)), group_size=_group_size(q.get("group_size", 128)),
                           sym=bool(q.get("sym", True)), desc_act=bool(q.get("desc_act", False)),
                           zero_offset=1 if fmt == "gptq" else 0,
                           ignore=tuple(q.get("modules_to_not_convert") or ()), lm_head=bool(q.get("lm_head", False)))
    if method == "fp8":
        if q.get("weight_block_size"):
            raise ConfigError(f"quantization_config.weight_block_size {q['weight_block_size']}: block-wise fp8 "
                              "is not supported (per-tensor and per-channel are)")
        return QuantConfig("fp8", True, ignore=tuple(q.get("ignored_layers") or ()))
    if method == "compressed-tensors":
        return _compressed_tensors(q)
    raise ConfigError(f"quantization_config.quant_method {method!r} is not supported (fp8, awq, gptq, "
                      "compressed-tensors fp8 are)")


def _group_size(value) -> int | None:
    value = int(value)
    return None if value in (-1, 0) else value


def _compressed_tensors(q: dict) -> QuantConfig:
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(f"compressed-tensors with {len(groups)} config_groups: one is supported")
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    if weights.get("type") != "float" or int(weights.get("num_bits", 0)) != 8:
        raise ConfigError(f"compressed-tensors weights {weights.get('type')}/{weights.get('num_bits')} bits: "
                          "only 8-bit float (fp8) is supported")
    if weights.get("strategy") not in ("tensor", "channel"):
        raise ConfigError(f"compressed-tensors weight strategy {weights.get('strategy')!r}: tensor or channel")
    acts = group.get("input_activations")
    if acts is not None and (acts.get("type") != "float" or int(acts.get("num_bits", 0)) != 8):
        raise ConfigError("compressed-tensors input_activations must be fp8 (or absent)")
    targets = group.get("targets") or ["Linear"]
    if targets != ["Linear"]:
        raise ConfigError(f"compressed-tensors targets {targets}: only ['Linear'] is supported")
    return QuantConfig("fp8", True, ignore=tuple(q.get("ignore") or ()))
