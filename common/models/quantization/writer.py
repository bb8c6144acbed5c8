"""`pdserve quantize`: an HF folder -> an FP8, AWQ-layout or GPTQ-layout checkpoint that other tools load too.

    HF folder (config.json, *.safetensors, tokenizer) --per projection weight [N, K]-->
      fp8   compressed-tensors "float-quantized": weight fp8 [N, K], weight_scale fp32 [N, 1] per
            channel (llm-compressor's FP8_DYNAMIC scheme); --fp8-scale tensor: quant_method "fp8",
            one weight_scale per tensor (AutoFP8's layout), activations dynamic
      awq   AutoAWQ GEMM: qweight int32 [K, N/8] (interleaved), qzeros [K/G, N/8], scales fp16 [K/G, N]
      gptq  AutoGPTQ / GPTQModel v1: qweight [K/8, N], qzeros [K/G, N/8] (zero - 1), scales fp16,
            g_idx int32 [K] (act-order: groups over inputs in descending order of importance)
    -> out folder: model.safetensors (or shards + index), config.json with quantization_config,
       the tokenizer and other files copied.

AWQ and GPTQ are calibrated when given a Calibration (calibrate.py: GPTQ's Hessian error
compensation, act-order by diag(H); AWQ's activation-aware scales folded into the norms, and
clipping), else round-to-nearest per group (RTN; act-order then by a proxy: |RMSNorm weight|
feeding q/k/v and gate/up, so fused projections share one order, the weight's column norm for
o_proj and down_proj). Embeddings and norms keep their dtype; so does lm_head, unless `lm_head=True`
(`--lm-head`, GPTQ only, as GPTQModel's `lm_head=True`): the head is then quantized too, round to
nearest (calibration covers the decoder layers), act-order by its column norms, and the config says
`"lm_head": true`. q/k/v and gate/up are quantized separately, as the tools do.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import torch

from pdserve.common.config import ConfigError
from pdserve.common.models.quantization.calibrate import Calibration, calibrate
from pdserve.common.models.quantization.fp8 import FP8, FP8_MAX, quantize_weight_per_channel
from pdserve.common.models.quantization.int4 import Int4Weight, rtn, rtn_groups
from pdserve.common.models.quantization.packing import pack_cols, pack_rows

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHARD_BYTES = 2 * 2**30


def pack_awq(wt: Int4Weight, bits: int = 4) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors of an int4 weight whose groups are consecutive inputs."""
    if not torch.equal(wt.g_idx, (torch.arange(wt.q.shape[1]) // (wt.q.shape[1] // wt.scale.shape[1])).to(wt.g_idx)):
        raise ValueError("AWQ's layout has no act-order: groups must be consecutive inputs")
    return {"qweight": pack_cols(wt.q.t().contiguous(), bits, awq_order=True),  # [K, N/8]
            "qzeros": pack_cols(wt.zero.t().contiguous(), bits, awq_order=True),  # [K/G, N/8]
            "scales": wt.scale.t().contiguous().to(torch.float16)}  # [K/G, N]


def pack_gptq(wt: Int4Weight, bits: int = 4) -> dict[str, torch.Tensor]:
    """GPTQ v1 tensors (zero points stored minus one, so every zero must be >= 1)."""
    return {"qweight": pack_rows(wt.q.t().contiguous(), bits),  # [K/8, N]
            "qzeros": pack_cols((wt.zero - 1).t().contiguous(), bits),  # [K/G, N/8], v1: zero - 1
            "scales": wt.scale.t().contiguous().to(torch.float16), "g_idx": wt.g_idx.to(torch.int32)}


def quantize_awq(w: torch.Tensor, group_size: int, sym: bool, bits: int = 4) -> dict[str, torch.Tensor]:
    return pack_awq(rtn(w, bits, group_size, sym), bits)


def quantize_gptq(w: torch.Tensor, group_size: int, sym: bool, act_order: torch.Tensor | None,
                  bits: int = 4) -> dict[str, torch.Tensor]:
    """Round to nearest. `act_order`: a [K] importance per input (groups follow its descending
    order), or None."""
    n, k = w.shape
    perm = torch.argsort(act_order.float(), descending=True, stable=True) if act_order is not None else torch.arange(k)
    q_perm, scale, zero = rtn_groups(w[:, perm], bits, group_size, sym, zero_min=1)
    q = torch.empty_like(q_perm)
    q[:, perm] = q_perm  # back to input order; input perm[i] belongs to group i // G
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group_size).to(torch.int32)
    return pack_gptq(Int4Weight(q, scale, zero, g_idx), bits)


def quantize_fp8(w: torch.Tensor, per_tensor: bool) -> dict[str, torch.Tensor]:
    if per_tensor:
        scale = (w.float().abs().amax() / FP8_MAX).clamp_min(1e-12)
        return {"weight": (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), "weight_scale": scale.reshape(())}
    weight, scale = quantize_weight_per_channel(w)
    return {"weight": weight, "weight_scale": scale[:, None]}


def quantization_config(method: str, group_size: int, sym: bool, act_order: bool, fp8_per_tensor: bool,
                        lm_head: bool = False) -> dict:
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": None}
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": sym,
                "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq", "damp_percent": 0.0,
                "lm_head": lm_head}
    if fp8_per_tensor:
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                            "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                                      "dynamic": True}}}}


def quantize_checkpoint(src: str, out: str, method: str, group_size: int = 128, sym: bool | None = None,
                        act_order: bool = False, fp8_per_tensor: bool = False,
                        calibration: Calibration | None = None, log=None,
                        kv_scales: list[tuple[float, float]] | None = None, lm_head: bool = False) -> dict:
    """Writes the quantized checkpoint; returns a summary (tensors, bytes before and after).
    calibration: run GPTQ / AWQ on that text (calibrate.py); None: round to nearest.
    kv_scales: fp8 only, per layer (K, V) KV-cache scales written as self_attn.k_scale / v_scale
    with `kv_cache_scheme` in the quantization_config (llm-compressor's layout; kv_cache.py)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pdserve.common.models.loader import read_hf_config
    if method not in ("fp8", "awq", "gptq"):
        raise ConfigError(f"--method must be fp8, awq or gptq, got {method!r}")
    arch = read_hf_config(src)  # a supported model, or a ConfigError
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config.get("quantization_config"):
        raise ConfigError(f"{src} is already quantized ({config['quantization_config'].get('quant_method')})")
    sym = (method == "gptq") if sym is None else sym
    if method != "fp8":
        for k in (arch.hidden_size, arch.intermediate_size, arch.num_heads * arch.head_dim):
            if k % group_size:
                raise ConfigError(f"--group-size {group_size} does not divide a layer's {k} inputs")
    if method == "awq" and act_order:
        raise ConfigError("--act-order is a GPTQ option")
    if lm_head and method != "gptq":
        raise ConfigError("--lm-head is a GPTQ option (GPTQModel's lm_head=True; AWQ and fp8 checkpoints keep "
                          "the head in full precision)")
    if lm_head and arch.tie_word_embeddings:
        raise ConfigError(f"--lm-head: {src} ties its LM head to the embedding; only an untied head is quantized")
    if lm_head and arch.vocab_size % 8:
        raise ConfigError(f"--lm-head: a vocabulary of {arch.vocab_size} does not pack into 32-bit words of 8")
    files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
    if not files:
        raise ConfigError(f"{src} has no *.safetensors weights")
    if calibration is not None and method == "fp8":
        raise ConfigError("fp8 takes no calibration data (its scales are per channel, activations dynamic)")
    if kv_scales is not None and (method != "fp8" or len(kv_scales) != arch.num_layers):
        raise ConfigError("KV-cache scales go with --method fp8, one (K, V) pair per layer")
    os.makedirs(out, exist_ok=True)
    calibrated, changed = {}, {}
    if calibration is not None:
        calibrated, changed = calibrate(src, method, group_size, sym, act_order, calibration, log=log)
    norms = _input_norms(files) if act_order and not calibrated else {}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = before = 0
    num_quantized = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                before += t.numel() * t.element_size()
                if name in changed:  # awq: a norm weight with the inputs' scales folded in
                    t = changed[name].to(t.dtype)
                base, _, leaf = name.rpartition(".")
                head = lm_head and name == "lm_head.weight"
                if head or (leaf == "weight" and base.rsplit(".", 1)[-1] in PROJECTIONS and t.dim() == 2):
                    if name in calibrated:
                        pack = pack_awq if method == "awq" else pack_gptq
                        parts = pack(calibrated[name])
                    elif calibration is not None and not head:
                        raise ConfigError(f"calibration did not reach {name} (a layer outside the decoder?)")
                    elif method == "fp8":
                        parts = quantize_fp8(t, fp8_per_tensor)
                    elif method == "awq":
                        parts = quantize_awq(t, group_size, sym)
                    else:
                        importance = None
                        if act_order:
                            importance = norms.get(name, t.float().norm(dim=0))
                        parts = quantize_gptq(t, group_size, sym, importance)
                    num_quantized += 1
                    new = {f"{base}.{k}": v.contiguous() for k, v in parts.items()}
                else:
                    new = {name: t.contiguous()}
                for key, value in new.items():
                    nbytes = value.numel() * value.element_size()
                    if size + nbytes > SHARD_BYTES and shards[-1]:
                        shards.append({})
                        size = 0
                    shards[-1][key] = value
                    size += nbytes
    if lm_head and not any(k.startswith("lm_head.") for shard in shards for k in shard):
        raise ConfigError(f"--lm-head: {src} has no lm_head.weight")
    for i, (k_scale, v_scale) in enumerate(kv_scales or []):
        shards[-1][f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([k_scale], dtype=torch.float32)
        shards[-1][f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([v_scale], dtype=torch.float32)
    after = 0
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard_name, shard in zip(names, shards):
        save_file(shard, os.path.join(out, shard_name), metadata={"format": "pt"})
        after += sum(v.numel() * v.element_size() for v in shard.values())
        weight_map.update({k: shard_name for k in shard})
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": after}, "weight_map": weight_map}, f, indent=2)
    config["quantization_config"] = quantization_config(method, group_size, sym, act_order, fp8_per_tensor, lm_head)
    if calibration is not None and method == "gptq":
        config["quantization_config"]["damp_percent"] = calibration.damp
    if kv_scales is not None:  # static per-tensor fp8 KV scales, as llm-compressor / AutoFP8 declare them
        config["quantization_config"]["kv_cache_scheme"] = "static" if fp8_per_tensor else dict(KV_CACHE_SCHEME)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for path in glob.glob(os.path.join(src, "*")):
        base = os.path.basename(path)
        if os.path.isfile(path) and not base.endswith(".safetensors") and base not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy(path, os.path.join(out, base))
    return {"method": method, "calibrated": calibration is not None, "quantized_weights": num_quantized,
            "kv_cache_scales": kv_scales is not None, "bytes_before": before, "bytes_after": after,
            "quantization_config": config["quantization_config"]}


def _input_norms(files: list[str]) -> dict[str, torch.Tensor]:
    """q/k/v and gate/up weight name -> |the RMSNorm weight| scaling their inputs (act-order proxy)."""
    from safetensors import safe_open
    feeds = {"input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
             "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj"))}
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                parts = name.split(".")
                if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in feeds:
                    block, projs = feeds[parts[-2]]
                    prefix = ".".join(parts[:-2])
                    norm = f.get_tensor(name).float().abs()
                    out.update({f"{prefix}.{block}.{p}.weight": norm for p in projs})
    return out


KV_CACHE_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def add_kv_scales(src: str, out: str, kv_scales: list[tuple[float, float]]) -> None:
    """A copy of the unquantized HF folder `src` at `out` with static fp8 KV-cache scales only
    (llm-compressor's KV-cache-only layout: compressed-tensors without weight groups)."""
    from safetensors.torch import save_file
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config.get("quantization_config"):
        raise ConfigError(f"{src} is already quantized: give its KV scales with `pdserve quantize --kv-cache-scales`")
    shutil.copytree(src, out, dirs_exist_ok=True)
    save_file({f"model.layers.{i}.self_attn.{w}_scale": torch.tensor([s], dtype=torch.float32)
               for i, pair in enumerate(kv_scales) for w, s in zip("kv", pair)},
              os.path.join(out, "kv_cache_scales.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                     "quantization_status": "compressed", "config_groups": {},
                                     "kv_cache_scheme": dict(KV_CACHE_SCHEME)}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
