"""Fp8Linear: e4m3 weights with per-output-channel scales, W8A8 with dynamic per-token activations.

    weight        [N, K] float8_e4m3fn        w ~= weight * weight_scale[:, None]
    weight_scale  [N] fp32                    per output channel (a per-tensor checkpoint scale is
                                              expanded over its shard's rows: exact, no requantizing)
    input_scale   [] fp32, optional           a static activation scale from the checkpoint: read
                                              (max over fused shards) but activations are scaled
                                              per token at run time, which is never less accurate
    bias          [N], optional

Two ways in:
  - `Fp8Linear.from_linear(nn.Linear)`: online quantization of a bf16/fp16/fp32 weight, per output
    channel (amax -> 448), when --quantization fp8 meets a full-precision checkpoint;
  - a prequantized checkpoint ("fp8" with per-tensor `weight_scale`, or compressed-tensors with
    strategy tensor/channel): `weight_loader` places each checkpoint tensor (fused q/k/v and
    gate/up shards included).
forward: CUDA -> M <= 16 rows (decode batches): `fp8_gemv` (W8A16, weight-only), else
`quantize_fp8_per_token` + torch._scaled_mm (W8A8, Hopper); CPU -> `reference.fp8_linear_ref`'s W8A8 numbers in fp32 (the weight widened to fp32 once
and kept: the CPU path is the reference, not a memory saver), chosen once at construction.
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.common.config import ConfigError
from pdserve.kernels.reference import fp8_quantize_per_row_ref

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (fp8 [N, K], fp32 scales [N]) with the row's amax mapped to 448."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Fp8Linear(nn.Module):
    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, use_triton: bool,
                 dtype: torch.dtype):
        super().__init__()
        self.in_features, self.output_sizes = in_features, list(output_sizes)
        self.out_features = sum(output_sizes)
        self.use_triton = use_triton
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(self.out_features, dtype=torch.float32), requires_grad=False)
        self.input_scale = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False) if bias else None
        self._widened: torch.Tensor | None = None  # CPU path: the weight in fp32, made at the first call
        self.attach_loaders()

    def attach_loaders(self) -> None:
        """Marks the parameters for LlamaForCausalLM.load_weights (again after to_empty, which
        makes new Parameter objects)."""
        self.weight.weight_loader = self._load_weight
        self.weight_scale.weight_loader = self._load_weight_scale
        self.input_scale.weight_loader = self._load_input_scale
        self.input_scale.optional = True  # static-activation checkpoints only

    @classmethod
    def from_linear(cls, layer: nn.Linear, use_triton: bool) -> "Fp8Linear":
        with torch.device("meta"):
            out = cls(layer.in_features, [layer.out_features], layer.bias is not None, use_triton, layer.weight.dtype)
        weight, scale = quantize_weight_per_channel(layer.weight.data)
        out.weight = nn.Parameter(weight, requires_grad=False)
        out.weight_scale = nn.Parameter(scale, requires_grad=False)
        out.input_scale = None
        out.bias = None if layer.bias is None else nn.Parameter(layer.bias.data, requires_grad=False)
        out._widened = None
        return out

    def _rows(self, shard: int | None) -> slice:
        shard = shard or 0
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def _load_weight(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        rows = self._rows(shard)
        if tensor.dtype != FP8:
            raise ConfigError(f"an fp8 checkpoint's weight is {tensor.dtype}, expected float8_e4m3fn")
        if tuple(tensor.shape) != (rows.stop - rows.start, self.in_features):
            raise ConfigError(f"fp8 weight of shape {tuple(tensor.shape)}, expected {(rows.stop - rows.start, self.in_features)}")
        param.data[rows].copy_(tensor)

    def _load_weight_scale(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        rows = self._rows(shard)
        n = rows.stop - rows.start
        if tensor.numel() == 1:  # per tensor: the shard's rows share it
            param.data[rows].fill_(float(tensor.float().reshape(())))
        elif tensor.numel() == n:  # per channel: [N, 1] or [N]
            param.data[rows].copy_(tensor.float().reshape(n))
        else:
            raise ConfigError(f"fp8 weight_scale of shape {tuple(tensor.shape)} is neither per tensor nor per "
                              f"channel for {n} outputs (block-wise scales are not supported)")

    def _load_input_scale(self, param: nn.Parameter, tensor: torch.Tensor, shard: int | None) -> None:
        if tensor.numel() != 1:
            raise ConfigError(f"fp8 input_scale of shape {tuple(tensor.shape)}: only a per-tensor scale is supported")
        param.data.fill_(max(float(param.data), float(tensor.float().reshape(()))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        if not self.use_triton:  # fp8_linear_ref's numbers, the weight widened once (CPU reference path)
            if self._widened is None:
                self._widened = self.weight.float()
            xq, x_scale = fp8_quantize_per_row_ref(x)
            y = torch.nn.functional.linear(xq.float(), self._widened) * x_scale * self.weight_scale[None, :]
            return (y if self.bias is None else y + self.bias.float()).to(x.dtype)
        from pdserve.kernels.fp8_linear import fp8_gemv, fp8_linear_method, quantize_fp8_per_token
        if fp8_linear_method(x.shape[0]) == "gemv":
            return fp8_gemv(x.contiguous(), self.weight, self.weight_scale, self.bias)
        # fast accumulation (Hopper's fp8 MMA sums without the periodic fp32 promotion, as vLLM's
        # CUTLASS fp8 kernels run): 8-12 % off the prompt GEMMs, W1 1.33x -> 1.42x of bf16 (H200, 8B
        # shape); its error against exact sums of the quantized operands 2.1e-3 / 3.3e-3 relative at
        # K = 4096 / 14336 (1.7e-3 without), below fp8 quantization's own (docs/benchmarks.md,
        # seventeenth session)
        xq, x_scale = quantize_fp8_per_token(x)
        return torch._scaled_mm(xq, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale[None, :],
                                bias=self.bias, out_dtype=x.dtype, use_fast_accum=True)

    def forward_gated(self, gate_up: torch.Tensor) -> torch.Tensor:  # [T, 2K] -> [T, N]
        """forward(silu(gate) * up): on the GEMV path (decode batches on CUDA) the activation runs
        inside the GEMV (kernels/gemv_fp8_v2.py, GATED), else as its own kernel first."""
        from pdserve.kernels.fp8_linear import fp8_gemv, fp8_linear_method
        if self.use_triton and fp8_linear_method(gate_up.shape[0]) == "gemv":
            return fp8_gemv(gate_up.contiguous(), self.weight, self.weight_scale, self.bias, gated=True)
        from pdserve.kernels.activation import silu_and_mul
        return self.forward(silu_and_mul(gate_up))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3 per-channel"

    def init_dummy(self, gen: torch.Generator) -> None:
        """Random fp8 codes (~N(0, 1) * 64) with scales making w ~ N(0, 0.02), drawn on the device."""
        w = torch.empty(self.weight.shape, dtype=torch.bfloat16, device=self.weight.device)
        w.normal_(0.0, 64.0, generator=gen)
        self.weight.data.copy_(w.clamp(-FP8_MAX, FP8_MAX).to(FP8))
        self.weight_scale.data.fill_(0.02 / 64.0)
        if self.bias is not None:
            self.bias.data.fill_(1.0)
