"""IntLinear: 4-/8-bit grouped-int weights (AWQ, GPTQ, GGUF Q8_0 / Q4_0) run by kernels/int_gemm.py.

Running layout (whatever the checkpoint's), K inputs, N outputs, G inputs per group:

    qweight  [K / P, N] int32   P = 32 / bits inputs per word, in order (GPTQ's qweight layout)
    scales   [K / G, N]         model dtype
    qzeros   [K / G, N]         model dtype: the zero points unpacked to numbers (GPTQ v1's +1 applied)
    perm     [K] int64 or None  GPTQ act-order: inputs are gathered x[:, perm] so that groups are
                                contiguous (the checkpoint's g_idx sorted at load; qweight rows permuted)
    w[k, n] = (q[k, n] - qzeros[k // G, n]) * scales[k // G, n]

Loading a checkpoint (`weight_loader` of each parameter; `shard` = q/k/v or gate/up index):
    GPTQ  qweight [K/P, Ns] copied into columns of the shard; qzeros [G, Ns/P] unpacked (+ v1 offset);
          scales [G, Ns]; g_idx [K] (equal over fused shards) -> perm in `finish_loading`
    AWQ   qweight [K, Ns/8] unpacked with AWQ's interleave and repacked along K; qzeros likewise
    GGUF  already in the running layout (gguf_blocks.py converts the blocks while reading the
          file); scales and (fractional) zeros are kept in fp32
forward: CUDA -> `int_matmul` (Triton: gemv_int for M <= 16 rows, dequantize + cuBLAS above); CPU -> `int_matmul_ref`'s numbers, with the
dequantized weight kept after the first call (the CPU path is the reference, not a memory saver).
"""

from __future__ import annotations

import torch
from torch import nn

from pdserve.common.config import ConfigError
from pdserve.common.models.quantization.packing import pack_rows, unpack_cols, unpack_rows, per_word
from pdserve.kernels.reference import dequantize_int_ref


def _param(shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)


class IntLinear(nn.Module):
    def __init__(self, in_features: int, output_sizes: list[int], bits: int, group_size: int | None,
                 checkpoint_format: str, bias: bool, use_triton: bool, dtype: torch.dtype,
                 desc_act: bool = False, zero_offset: int = 0, scales_dtype: torch.dtype | None = None):
        super().__init__()
        k, n = in_features, sum(output_sizes)
        self.group_size = group_size or k
        if k % self.group_size or self.group_size % per_word(bits):
            raise ConfigError(f"a {checkpoint_format} group size of {self.group_size} does not divide the "
                              f"{k} inputs of a layer")
        if any(size % per_word(bits) for size in output_sizes):
            raise ConfigError(f"{checkpoint_format}: output sizes {output_sizes} must be multiples of {per_word(bits)}")
        self.in_features, self.out_features, self.output_sizes = k, n, list(output_sizes)
        self.bits, self.format, self.use_triton = bits, checkpoint_format, use_triton
        self.zero_offset = zero_offset
        groups = k // self.group_size
        self.qweight = _param((k // per_word(bits), n), torch.int32)
        self.scales = _param((groups, n), scales_dtype or dtype)
        self.qzeros = _param((groups, n), scales_dtype or dtype)
        self.bias = _param((n,), dtype) if bias else None
        self.desc_act = desc_act
        # present in GPTQ files with or without act-order
        self.g_idx = _param((k,), torch.int32) if checkpoint_format == "gptq" else None
        self.register_buffer("perm", None)
        self._g_idx_shards: set[int] = set()
        self._dequantized: torch.Tensor | None = None  # CPU path: [N, K] in the activations' dtype
        self.attach_loaders()

    def attach_loaders(self) -> None:
        """Marks the parameters for LlamaForCausalLM.load_weights (again after to_empty, which
        makes new Parameter objects)."""
        self.qweight.weight_loader = self._load_qweight
        self.scales.weight_loader = self._load_scales
        self.qzeros.weight_loader = self._load_qzeros
        if self.g_idx is not None:
            self.g_idx.weight_loader = self._load_g_idx
            self.g_idx.optional = not self.desc_act

    def _cols(self, shard: int | None) -> slice:
        shard = shard or 0
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def _check(self, name: str, tensor: torch.Tensor, expected: tuple) -> None:
        if tuple(tensor.shape) != expected:
            raise ConfigError(f"{self.format} {name} of shape {tuple(tensor.shape)}, expected {expected} "
                              f"({self.bits} bits, group size {self.group_size})")

    def _load_qweight(self, param, tensor: torch.Tensor, shard: int | None) -> None:
        cols = self._cols(shard)
        ns, p = cols.stop - cols.start, per_word(self.bits)
        tensor = tensor.to(param.device)
        if self.format == "awq":  # [K, Ns/8], outputs interleaved -> [K/8, Ns]
            self._check("qweight", tensor, (self.in_features, ns // p))
            tensor = pack_rows(unpack_cols(tensor, self.bits, awq_order=True), self.bits)
        else:  # gptq, gguf
            self._check("qweight", tensor, (self.in_features // p, ns))
        param.data[:, cols].copy_(tensor)

    def _load_qzeros(self, param, tensor: torch.Tensor, shard: int | None) -> None:
        cols = self._cols(shard)
        ns = cols.stop - cols.start
        if self.format == "gguf":  # numbers already
            self._check("qzeros", tensor, (self.in_features // self.group_size, ns))
            param.data[:, cols].copy_(tensor)
            return
        self._check("qzeros", tensor, (self.in_features // self.group_size, ns // per_word(self.bits)))
        zeros = unpack_cols(tensor.to(param.device), self.bits, awq_order=self.format == "awq") + self.zero_offset
        param.data[:, cols].copy_(zeros)

    def _load_scales(self, param, tensor: torch.Tensor, shard: int | None) -> None:
        cols = self._cols(shard)
        self._check("scales", tensor, (self.in_features // self.group_size, cols.stop - cols.start))
        param.data[:, cols].copy_(tensor)

    def _load_g_idx(self, param, tensor: torch.Tensor, shard: int | None) -> None:
        self._check("g_idx", tensor, (self.in_features,))
        tensor = tensor.to(device=param.device, dtype=torch.int32)
        if self._g_idx_shards and not torch.equal(param.data, tensor):
            raise ConfigError("GPTQ g_idx differs between projections fused into one matmul (q/k/v or gate/up)")
        param.data.copy_(tensor)
        self._g_idx_shards.add(shard or 0)

    def finish_loading(self) -> None:
        """After every tensor is in: act-order g_idx -> a permutation of the inputs (or nothing)."""
        if self.g_idx is None:
            return
        g_idx = self.g_idx.data.long() if self._g_idx_shards else None
        self.g_idx = None
        self._g_idx_shards = set()
        if g_idx is None:
            return
        k = self.in_features
        groups = torch.arange(k, device=g_idx.device) // self.group_size
        if torch.equal(g_idx, groups):
            return
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], groups):
            raise ConfigError(f"GPTQ g_idx does not assign {self.group_size} inputs to each group")
        q = unpack_rows(self.qweight.data, self.bits)[perm]
        self.qweight.data.copy_(pack_rows(q, self.bits))
        self.perm = perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        if self.perm is not None:
            x = x.index_select(1, self.perm)
        if self.use_triton:
            from pdserve.kernels.int_gemm import int_matmul
            return int_matmul(x.contiguous(), self.qweight, self.scales, self.qzeros, self.bits, self.group_size,
                              self.bias)
        # CPU (the reference path): int_matmul_ref's numbers, with the dequantized weight kept
        # after the first call (unpacking every step would dominate a CPU forward pass)
        if self._dequantized is None or self._dequantized.dtype != x.dtype:
            self._dequantized = dequantize_int_ref(self.qweight, self.scales, self.qzeros, self.bits,
                                                   self.group_size).to(x.dtype).t().contiguous()  # [N, K]
        if x.dtype == torch.float32:
            return torch.nn.functional.linear(x, self._dequantized, self.bias)
        y = torch.nn.functional.linear(x.float(), self._dequantized.float(), None if self.bias is None else self.bias.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.format} {self.bits}-bit, "
                f"group {self.group_size}{', act-order' if self.perm is not None else ''}")

    def init_dummy(self, gen: torch.Generator) -> None:
        """Random codes, zero points at the middle, scales making w ~ U-ish with std 0.02 (on the device)."""
        self.qweight.data.random_(generator=gen)  # every bit pattern of int32
        self.qzeros.data.fill_(float(1 << (self.bits - 1)))
        levels = 1 << self.bits
        self.scales.data.fill_(0.02 / ((levels * levels - 1) / 12) ** 0.5)
        if self.bias is not None:
            self.bias.data.fill_(1.0)
        self.g_idx = None
