"""Quantization as a transform on the finished model: its nn.Linear projections are swapped for
quantized modules (fp8.Fp8Linear, int_linear.IntLinear) that the model calls like any linear
(`ops.linear(layer, x)` runs a non-nn.Linear layer's own forward).

    load_model (loader.py):
      build on meta -> cast to dtype -> prepare_model(): prequantized checkpoints (AWQ, GPTQ, fp8)
        swap the linears for empty quantized modules, still on meta
      -> materialize on the device -> load_weights (each quantized parameter's weight_loader puts
        the checkpoint's layout into the running one) or init_dummy
      -> finish_model(): online fp8 quantizes the loaded nn.Linears; act-order permutations

Which method runs is `config.resolve_quantization` (flag + the checkpoint's quantization_config).
The embedding and norms stay in the model dtype; so does lm_head, unless the checkpoint quantized it
(GPTQ's `lm_head: true`): then it is an IntLinear too, over the vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.common.config import ArchConfig, ConfigError
from pdserve.common.models.quantization import gguf_blocks
from pdserve.common.models.quantization.config import FUSED_LINEARS, QuantConfig, resolve_quantization
from pdserve.common.models.quantization.fp8 import Fp8Linear
from pdserve.common.models.quantization.int_linear import IntLinear
from pdserve.common.models.parallel import local_output_sizes, shard_quantized

__all__ = ["QuantConfig", "resolve_quantization", "prepare_model", "attach_loaders", "finish_model",
           "quantized_modules"]


def _output_sizes(arch: ArchConfig, name: str, layer: nn.Linear) -> list[int]:
    if name == "qkv_proj":
        return [arch.num_heads * arch.head_dim] + [arch.num_kv_heads * arch.head_dim] * 2
    if name == "gate_up_proj":
        return [arch.intermediate_size] * 2
    return [layer.out_features]


def _targets(model: nn.Module, qcfg: QuantConfig):
    """(parent module, attribute, nn.Linear, module path) of every linear the method quantizes."""
    for path, parent in model.named_modules():
        for attr in FUSED_LINEARS:
            layer = getattr(parent, attr, None)
            if isinstance(layer, nn.Linear) and not qcfg.is_ignored(f"model.{path}", attr):
                yield parent, attr, layer, path
    if qcfg.lm_head:
        if not isinstance(getattr(model, "lm_head", None), nn.Linear):
            raise ConfigError("quantization_config.lm_head: the checkpoint quantized the LM head, but this model "
                              "ties its head to the embedding (tie_word_embeddings) and has none of its own")
        yield model, "lm_head", model.lm_head, ""


def prepare_model(model: nn.Module, qcfg: QuantConfig | None, arch: ArchConfig, dtype: torch.dtype,
                  device: torch.device, use_triton: bool, gguf_types: dict[str, str] | None = None) -> set[str]:
    """Before weights are loaded (model on meta, already in `dtype`): swap in empty quantized modules.
    GGUF (`gguf_types`: HF weight name -> GGUF type): a fused linear whose parts all have a kernel
    layout of one bit width runs quantized; returns those parts' names (the others load dequantized)."""
    if qcfg is None:
        return set()
    if qcfg.method == "fp8" and device.type == "cuda" and dtype != torch.bfloat16:
        raise ConfigError(f"--quantization fp8 on CUDA runs bf16 activations (torch._scaled_mm's row-wise "
                          f"scaling): pass --dtype bfloat16, not {dtype}")
    if not qcfg.prequantized:
        return set()
    kept: set[str] = set()
    for parent, attr, layer, path in list(_targets(model, qcfg)):
        full = f"{path}.{attr}" if path else attr
        sizes = local_output_sizes(model, full, layer) or _output_sizes(arch, attr, layer)  # this rank's
        if qcfg.method == "gguf":
            parts = [f"{path}.{part}.weight" for part in FUSED_LINEARS[attr]]
            bits = {gguf_blocks.KERNEL_TYPES.get(gguf_types.get(p, "")) for p in parts}
            if len(bits) != 1 or None in bits:
                continue  # some part has no kernel layout (F16, Q6_K, ...): dequantized at load
            kept.update(parts)
            with torch.device("meta"):
                new = IntLinear(layer.in_features, sizes, bits.pop(), gguf_blocks.GROUP_SIZE, "gguf",
                                layer.bias is not None, use_triton, dtype, scales_dtype=torch.float32)
            setattr(parent, attr, new)
            if f"{full}.weight" in model.weight_loaders:  # tensor parallelism
                shard_quantized(model, full, new, "gguf", gguf_blocks.GROUP_SIZE, False)
            continue
        with torch.device("meta"):
            if qcfg.method == "fp8":
                new = Fp8Linear(layer.in_features, sizes, layer.bias is not None, use_triton, dtype)
            else:
                # scales and zeros stay fp16 as AWQ/GPTQ store them (bf16 would round the scales)
                new = IntLinear(layer.in_features, sizes, qcfg.bits, qcfg.group_size, qcfg.method,
                                layer.bias is not None, use_triton, dtype, desc_act=qcfg.desc_act,
                                zero_offset=qcfg.zero_offset, scales_dtype=torch.float16)
        setattr(parent, attr, new)
        if f"{full}.weight" in model.weight_loaders:  # tensor parallelism: slice, then the module's loader
            shard_quantized(model, full, new, qcfg.method, qcfg.group_size, qcfg.desc_act)
    return kept


def attach_loaders(model: nn.Module) -> None:
    """After materializing the model (to_empty): the quantized parameters' weight_loaders."""
    for module in quantized_modules(model):
        module.attach_loaders()


def finish_model(model: nn.Module, qcfg: QuantConfig | None, use_triton: bool) -> None:
    """After weights are loaded: online fp8 quantization; per-module post-load steps (act-order)."""
    if qcfg is None:
        return
    if qcfg.method == "fp8" and not qcfg.prequantized:
        for parent, attr, layer, _ in list(_targets(model, qcfg)):
            setattr(parent, attr, Fp8Linear.from_linear(layer, use_triton))
            del layer  # the full-precision weight is freed layer by layer
    for module in quantized_modules(model):
        if hasattr(module, "finish_loading"):
            module.finish_loading()


def quantized_modules(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, (Fp8Linear, IntLinear)))


def init_dummy_quantized(model: nn.Module, gen: torch.Generator) -> set[int]:
    """Random quantized weights drawn directly in their format; returns ids of the parameters done."""
    done: set[int] = set()
    for module in quantized_modules(model):
        module.init_dummy(gen)
        done.update(id(p) for p in module.parameters())
    return done
