"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2) over a paged KV cache.

Inputs are the step's flattened tokens (no batch dimension, no padding): `input_ids [T]`,
`positions [T]`. Differences between the families are config flags, not subclasses:
  Qwen2  attention_bias (q/k/v bias)      Qwen3  qk_norm (RMSNorm per head on q and k)
  Mistral sliding_window                   SmolLM2 / Llama-3.2 tie_word_embeddings
  Llama 3 rope_scaling {"rope_type": "llama3"}, Qwen2.5 long context {"rope_type": "yarn"}
q/k/v and gate/up are fused into one matmul each; `load_weights` maps HF names onto the shards.
Transforms of the finished model (tensor parallelism: models/parallel.py) register per-parameter
loaders in `weight_loaders` and may set `gather_logits`; the forward pass does not know about them.
Linear layers, norm, rotary, SiLU-mul, logits and attention come from an ops object given at
construction: `TorchOps` (HF-exact eager torch, the reference), `CpuOps` (cpu_ops.py, packed
oneDNN weights, the runner's choice on CPU) or `TritonOps` (fused kernels, its choice on CUDA).
"""

from __future__ import annotations

import math
import re
from typing import Callable, Iterable

import torch
from torch import nn

from pdserve.common.config import ArchConfig, ConfigError
from pdserve.common.models.attention import AttentionMetadata, TorchPagedAttention


class TorchOps:
    """HF-exact eager ops (the reference): the operations of transformers, in its order and dtypes.

    `TritonOps` (`triton_attention.py`) and `CpuOps` (`cpu_ops.py`) have the same members;
    the model runner picks one at start-up and the modules call `self.ops.*`, so the forward pass
    holds no device branches.
    """
    attention_backend = TorchPagedAttention
    uses_triton = False

    @staticmethod
    def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        # As HF: normalise in fp32, cast back, then scale. With `residual`, add first and return both.
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        out = weight * h.to(x.dtype)
        return out if residual is None else (out, residual)

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
        # q [T, H, D], k [T, KVH, D], cos_sin [P, D] fp32 = cat(cos, sin) of the D/2 frequencies
        cos, sin = cos_sin[positions].to(q.dtype).chunk(2, dim=-1)  # [T, D/2] each
        cos = torch.cat((cos, cos), dim=-1)[:, None, :]  # HF's table repeats the frequencies
        sin = torch.cat((sin, sin), dim=-1)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)  # x [T, 2I]
        return nn.functional.silu(gate) * up

    @staticmethod
    def logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return hidden @ weight.t()  # [N, h] x [V, h] -> [N, V]

    def silu_mul_linear(self, layer: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        """linear(layer, silu_and_mul(gate_up)): the MLP's down projection (TritonOps fuses it)."""
        return self.linear(layer, self.silu_and_mul(gate_up))


TORCH_OPS = TorchOps()


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, ops=TORCH_OPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] fp32, the factor cos and sin are multiplied by) of a rope
    scaling config, as HF transformers computes them: default, linear, llama3, yarn, and GGUF's
    per-dimension divisors (`freq_factors`: llama.cpp's rope_freqs tensor of Llama 3.1+ files)."""
    # on the CPU even inside `with torch.device("meta")` (the loader's): a meta op here would go
    # through torch._refs and import torch._dynamo, seconds of a server's start
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "freq_factors":
        factors = torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu")
        if factors.shape != inv_freq.shape:
            raise ConfigError(f"rope_freqs has {factors.numel()} factors; head_dim {head_dim} needs {inv_freq.numel()}")
        return inv_freq / factors, 1.0
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(head_dim, theta, scaling, inv_freq)
    raise ConfigError(f"rope scaling type {kind!r} is not supported (default, linear, llama3, yarn are)")


def _yarn(head_dim: int, theta: float, scaling: dict, inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al.): dimensions that turn fewer than beta_slow times over the original context
    are interpolated (divided by factor), those turning more than beta_fast times kept, a linear
    ramp between; cos and sin are scaled by the attention factor 0.1 ln(factor) + 1 (or the
    mscale / mscale_all_dim ratio, or the config's attention_factor)."""
    factor, old_len = scaling.get("factor"), scaling.get("original_max_position_embeddings")
    if factor is None or old_len is None:
        raise ConfigError("yarn rope scaling needs factor and original_max_position_embeddings")

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over old_len
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_of(fast), dim_of(slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention)


class Rotary(nn.Module):
    """NeoX-style rotary embedding (HF's rotate_half) from a precomputed fp32 cos|sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, ops=TORCH_OPS):
        super().__init__()
        inv_freq, attention = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device), inv_freq)  # [P, D/2]
        # [P, D] = cat(cos, sin): the kernel's layout; kept fp32 (the loader rebuilds it after casting)
        self.register_buffer("cos_sin", torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention, persistent=False)
        self.ops = ops

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        # q [T, H, D], k [T, KVH, D] -> rotated (q, k); the Triton op rotates in place
        return self.ops.rotary(q, k, positions, self.cos_sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: Rotary, block_size: int, ops=TORCH_OPS):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.rotary = rotary
        self.ops = ops
        self.attn = ops.attention_backend(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, block_size,
                                          cfg.sliding_window)

    def forward(self, x, positions, kv_cache, meta: AttentionMetadata):
        t = x.shape[0]
        q, k, v = self.ops.linear(self.qkv_proj, x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn.forward(q, k, v, kv_cache, meta, self.rotary, positions)  # rotates q/k, stores K/V: [T, H, D]
        return self.ops.linear(self.o_proj, out.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig, ops=TORCH_OPS):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate_up = self.ops.linear(self.gate_up_proj, x)  # [T, 2I]
        return self.ops.silu_mul_linear(self.down_proj, gate_up)  # silu(gate) * up [T, I] -> [T, h]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: Rotary, block_size: int, ops=TORCH_OPS):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, rotary, block_size, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, residual, positions, kv_cache, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    # HF checkpoint name -> (our parameter, shard index) for fused projections
    _SHARDS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ArchConfig, block_size: int, max_positions: int, ops=TORCH_OPS):
        super().__init__()
        self.cfg = cfg
        self.ops = ops
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rotary = Rotary(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, ops)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, block_size, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # parameter name -> loader(param, full checkpoint tensor, fused shard index or None), set by
        # transforms (tensor parallelism: this rank's slice); parameters without one are copied whole
        self.weight_loaders: dict[str, Callable[[nn.Parameter, torch.Tensor, int | None], None]] = {}
        # tensor parallelism: this rank's vocab-shard logits -> full logits on rank 0, None elsewhere
        self.gather_logits: Callable[[torch.Tensor], torch.Tensor | None] | None = None
        # fp8 KV-cache scales the checkpoint carries: {layer: {"k"|"v": fp32 [1 or KVH]}} (load_weights)
        self.checkpoint_kv_scales: dict[int, dict[str, torch.Tensor]] = {}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x  # [T, hidden]

    def shard_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, h] -> [N, vocab] in the model's dtype (this rank's vocab shard under tensor parallelism)."""
        if self.lm_head is not None and not isinstance(self.lm_head, nn.Linear):
            return self.ops.linear(self.lm_head, hidden)  # a quantized head (GPTQ's lm_head: true)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return self.ops.logits(hidden, weight)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.shard_logits(hidden)
        if self.gather_logits is not None and (logits := self.gather_logits(logits)) is None:
            return None  # a tensor-parallel rank other than 0: rank 0 has the logits
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], owned: bool = False) -> None:
        """Copy HF-named tensors into the (fused) parameters; every parameter must be filled.
        `owned`: the tensors are fresh and held by no one else (the GGUF loader's), so an unfused
        one of the parameter's dtype and device becomes the parameter instead of being copied."""
        params = dict(self.named_parameters())
        filled: set[str] = set()
        sizes = {"qkv_proj": [self.cfg.num_heads * self.cfg.head_dim, self.cfg.num_kv_heads * self.cfg.head_dim,
                              self.cfg.num_kv_heads * self.cfg.head_dim],
                 "gate_up_proj": [self.cfg.intermediate_size] * 2}
        self.checkpoint_kv_scales = {}
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if self._take_kv_scale(name, tensor):
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints still carry a copy
            parts = name.split(".")
            target, shard = name, None
            if len(parts) >= 2 and parts[-2] in self._SHARDS:
                fused, shard = self._SHARDS[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
            if target not in params:
                owner = target.rpartition(".")[0]
                if f"{owner}.qweight" in params:
                    raise ConfigError(f"checkpoint tensor {name!r} is a full-precision weight, but the checkpoint's "
                                      f"quantization_config makes {owner} a quantized layer (expects "
                                      f"{owner}.qweight, .qzeros, .scales)")
                raise ConfigError(f"checkpoint tensor {name!r} has no place in the model")
            param = params[target]
            # TP shards (the model's dict) or a quantized parameter's own placement (its attribute)
            loader = self.weight_loaders.get(target) or getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor, shard)
            elif shard is not None:
                offset = sum(sizes[fused][:shard])
                param.data[offset:offset + sizes[fused][shard]].copy_(tensor)
            else:
                if param.shape != tensor.shape:
                    raise ConfigError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                      f"the model expects {tuple(param.shape)}")
                if owned and tensor.dtype == param.dtype and tensor.device == param.device and tensor.is_contiguous():
                    param.data = tensor  # the loader's fresh tensor becomes the parameter: no copy
                else:
                    param.data.copy_(tensor)
            filled.add(target if shard is None else f"{target}#{shard}")
        missing = []
        for pname in params:
            if getattr(params[pname], "optional", False):  # e.g. a quantized layer's static input scale
                continue
            head = pname.rsplit(".", 2)
            if len(head) == 3 and head[1] in sizes:
                shards = len(sizes[head[1]])
                missing += [f"{pname}#{i}" for i in range(shards) if f"{pname}#{i}" not in filled]
            elif pname not in filled:
                missing.append(pname)
        if missing:
            raise ConfigError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
        self._check_kv_scales()

    # fp8 KV-cache scales of a checkpoint (llm-compressor / AutoFP8 / ModelOpt names): layer i's
    # self_attn.{k,v}_scale, self_attn.kv_scale (one for both), self_attn.{k,v}_proj.{k,v}_scale
    # or self_attn.{k,v}_proj.output_scale. Query and softmax scales (q_scale, prob_scale) are for
    # fp8 attention arithmetic, which pdserve does not do: read and not used.
    _KV_SCALE = re.compile(r"layers\.(\d+)\.self_attn\.(?:(k|v|q)_proj\.)?(k_scale|v_scale|kv_scale|output_scale|q_scale|prob_scale)")

    def _take_kv_scale(self, name: str, tensor: torch.Tensor) -> bool:
        """Keeps a KV-cache scale tensor in `checkpoint_kv_scales` {layer: {"k"|"v": fp32 [1 or KVH]}};
        False for any other tensor."""
        m = self._KV_SCALE.fullmatch(name)
        if m is None:
            return False
        layer, proj, leaf = int(m.group(1)), m.group(2), m.group(3)
        if leaf in ("q_scale", "prob_scale") or proj == "q":
            return True
        which = ("k", "v") if leaf == "kv_scale" else (proj,) if leaf == "output_scale" else (leaf[0],)
        value = tensor.detach().float().flatten().cpu()
        if value.numel() not in (1, self.cfg.num_kv_heads) or not bool(torch.isfinite(value).all()) or \
                bool((value <= 0).any()):
            raise ConfigError(f"checkpoint tensor {name!r}: a KV-cache scale must be one positive number or "
                              f"one per KV head ({self.cfg.num_kv_heads}), got {tuple(tensor.shape)} {value[:4].tolist()}")
        if layer >= self.cfg.num_layers:
            raise ConfigError(f"checkpoint tensor {name!r} names layer {layer}; the model has {self.cfg.num_layers}")
        for w in which:
            self.checkpoint_kv_scales.setdefault(layer, {})[w] = value
        return True

    def _check_kv_scales(self) -> None:
        """KV-cache scales come for every layer, K and V, or not at all."""
        scales = self.checkpoint_kv_scales
        if not scales:
            return
        partial = [f"{i}{w}" for i in range(self.cfg.num_layers) for w in "kv" if w not in scales.get(i, {})]
        if partial:
            raise ConfigError(f"the checkpoint has KV-cache scales for some layers only (missing: "
                              f"{', '.join(partial[:6])}{' ...' if len(partial) > 6 else ''})")
