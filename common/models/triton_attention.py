"""The CUDA backend: Triton paged attention, fused norm / rotary / SiLU-mul, and its step inputs.

`TRITON_OPS` has the members of `TorchOps` (llama.py), so the model is built once with either;
the runner picks it at start-up. Per layer and step:

    rotary_store_kv(q, k, v)    q rotated in place on the qkv output's view; rotated k and v
                                stored at slot_mapping (-1: skipped, CUDA-graph padding)
    decode rows  [0, Bd)        paged_decode_attention: one query per sequence, split-K
    prefill rows [Bd, T)        paged_prefill_attention: ONE varlen call for all chunks; fresh
                                prompts, prefix hits and later chunks alike read their prefix
                                from the blocks

`TritonInputs` turns the runner's `StepInputs` (numpy) into `TritonMetadata` with one
host-to-device copy per step (not per layer):

    pinned host int32:  | ids T | positions T | slots T | ctx B | prefill qsl Bp+1 | rows S | table B*M |
                         each segment starts 16-byte aligned (one Triton specialization per kernel)
                              | one non_blocking copy
    device int32:       the same layout; the metadata tensors are views of it

Importing this module imports triton: only the runner does, and only on CUDA (or under the
Triton interpreter in a test).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.common.models.attention import PagedAttentionBase, StepInputs
from pdserve.common.models.packed_upload import PackedUpload
from pdserve.kernels.activation import silu_and_mul
from pdserve.kernels.decode_attention import paged_decode_attention
from pdserve.kernels.gemv import ROWS_CONFIGS, ROWS_MAX, gemv, gemv_rows
from pdserve.kernels.timing import graph_us
from pdserve.kernels.prefill_attention import paged_prefill_attention
from pdserve.kernels.rms_norm import rms_norm
from pdserve.kernels.rotary import apply_rotary, rotary_store_kv


@dataclass
class TritonMetadata:
    slot_mapping: torch.Tensor  # [T] int32; -1 skips the token
    num_decodes: int  # tokens [0, num_decodes) are one-query sequences
    decode_block_tables: torch.Tensor  # [Bd, M] int32
    decode_context_lens: torch.Tensor  # [Bd] int32; 0 = padded row (zero output)
    decode_max_context: int  # host bound used to choose the split count when num_splits is None
    decode_num_splits: int | None  # fixed in CUDA graphs (any value is correct for any length)
    prefill_block_tables: torch.Tensor | None  # [Bp, M] int32; None: decode-only step
    prefill_query_start_loc: torch.Tensor | None  # [Bp + 1] int32, from the first prefill token
    prefill_context_lens: torch.Tensor | None  # [Bp] int32
    decode_row_groups: torch.Tensor | None = None  # [Bd] int32 (StepInputs.row_groups); None: none
    decode_group_rows: int = 1  # with decode_row_groups: the longest group (a compiled bound)


class TritonPagedAttention(PagedAttentionBase):
    """Same constructor and `forward` as `TorchPagedAttention`, with `TritonMetadata`."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: TritonMetadata, rotary, positions: torch.Tensor) -> torch.Tensor:
        # q [T, H, D], k/v [T, KVH, D] (strided views are fine), kv_cache [2, NB, BS, KVH, D] -> [T, H, D]
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        # one kernel: q rotated in place, rotated k and v written to their slots (fp8: scaled)
        rotary_store_kv(q, k, v, positions, rotary.cos_sin, k_cache, v_cache, meta.slot_mapping, *self._scales())
        nd = meta.num_decodes
        if meta.prefill_context_lens is None:
            return self._decode(q, k_cache, v_cache, meta)
        if nd == 0:
            return self._prefill(q, k_cache, v_cache, meta)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        out[nd:] = self._prefill(q[nd:], k_cache, v_cache, meta)
        return out

    def _decode(self, q, k_cache, v_cache, meta: TritonMetadata) -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                      self.scale, self.sliding_window, num_splits=meta.decode_num_splits,
                                      max_context_len=meta.decode_max_context, row_groups=meta.decode_row_groups,
                                      max_group_rows=meta.decode_group_rows, **self._scale_kwargs())

    def _prefill(self, q, k_cache, v_cache, meta: TritonMetadata) -> torch.Tensor:
        return paged_prefill_attention(q, k_cache, v_cache, meta.prefill_block_tables, meta.prefill_query_start_loc,
                                       meta.prefill_context_lens, self.scale, self.sliding_window,
                                       **self._scale_kwargs())

    def _scales(self) -> tuple:
        return () if self.kv_scale is None else (self.kv_scale[0], self.kv_scale[1])

    def _scale_kwargs(self) -> dict:
        return {} if self.kv_scale is None else {"k_scale": self.kv_scale[0], "v_scale": self.kv_scale[1]}


class TritonOps:
    """Fused-kernel versions of `TorchOps`' members (kernels/ documents their numerics)."""
    attention_backend = TritonPagedAttention
    uses_triton = True

    def __init__(self):
        # (weight shape, dtype) -> the gemv kernel beat cuBLAS on it at M = 1 (choose_gemv)
        self.gemv_weights: set[tuple[tuple[int, int], torch.dtype]] = set()
        # (weight shape, dtype) -> (up to how many rows (2..16) gemv_rows beat cuBLAS on it, its
        # fastest launch configuration)
        self.gemv_rows: dict[tuple[tuple[int, int], torch.dtype], tuple[int, tuple[int, int]]] = {}

    def linear(self, layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(layer, torch.nn.Linear):  # quantized linears (models/quantization) pick their kernels
            return layer(x)
        rows = x.shape[0]
        if rows <= ROWS_MAX:
            key = (tuple(layer.weight.shape), x.dtype)
            if rows == 1 and key in self.gemv_weights:
                return gemv(x, layer.weight, layer.bias)
            up_to, config = self.gemv_rows.get(key, (0, None))
            if 1 < rows <= up_to:
                return gemv_rows(x, layer.weight, layer.bias, config)
        return layer(x)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        if residual is not None:
            return rms_norm(x, weight, eps, residual)  # x, residual [T, h] -> (out, x + residual)
        # [..., N] -> rows of N (a view for the hidden states; Qwen3's per-head q/k norm copies)
        return rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)

    @staticmethod
    def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
        apply_rotary(q, k, positions, cos_sin)  # in place
        return q, k

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

    @staticmethod
    def logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return hidden @ weight.t()  # [N, h] x [V, h] -> [N, V]

    def silu_mul_linear(self, layer: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        # a quantized linear with a gated GEMV (Fp8Linear) runs the activation inside it
        gated = getattr(layer, "forward_gated", None)
        if gated is not None:
            return gated(gate_up)
        return self.linear(layer, silu_and_mul(gate_up))


TRITON_OPS = TritonOps()


ROW_COUNTS = (2, 4, 8, 16)  # choose_gemv times gemv_rows at these M (a call of M rows goes by the next one up)


def choose_gemv(ops: TritonOps, model: torch.nn.Module, reps: int = 20, margin: float = 0.03) -> dict:
    """Time cuBLAS and the gemv kernel at M = 1 on each distinct Linear weight of the decoder
    layers (one CUDA graph of `reps` calls each, so launch costs do not count) and route a
    weight to gemv when that is `margin` faster; then gemv_rows's fastest configuration at M = 16
    against cuBLAS at M = 2, 4, 8, 16, routing M rows to gemv_rows up to the largest of those
    counts below which it won every time. bf16/fp16 only (fp32 keeps cuBLAS's numerics).
    Returns {"NxK": (cublas_us, gemv_us, chosen)} for the log, and {"NxK rows": {M: (cublas_us,
    gemv_rows_us)}, "NxK rows up to": M, "NxK rows config": (BLOCK_N, BLOCK_K)} beside it."""
    report, seen = {}, set()
    for name, layer in model.named_modules():
        if not isinstance(layer, torch.nn.Linear) or name.endswith("lm_head"):  # logits stay on cuBLAS
            continue
        key = (tuple(layer.weight.shape), layer.weight.dtype)
        if layer.weight.dtype not in (torch.bfloat16, torch.float16) or key in seen:
            continue
        seen.add(key)
        x = torch.randn(1, layer.weight.shape[1], dtype=layer.weight.dtype, device=layer.weight.device)
        cublas_us = graph_us(lambda: layer(x), reps)
        gemv_us = graph_us(lambda: gemv(x, layer.weight, layer.bias), reps)
        chosen = gemv_us < (1 - margin) * cublas_us
        if chosen:
            ops.gemv_weights.add(key)
        label = "x".join(map(str, key[0]))
        report[label] = (round(cublas_us, 1), round(gemv_us, 1), chosen)
        x16 = torch.randn(ROW_COUNTS[-1], layer.weight.shape[1], dtype=layer.weight.dtype, device=layer.weight.device)
        config = min(ROWS_CONFIGS, key=lambda c: graph_us(lambda: gemv_rows(x16, layer.weight, layer.bias, c), reps))
        rows_us, up_to, smaller = {}, 0, 0
        for m in ROW_COUNTS:
            xm = x16[:m]
            rows_us[m] = (round(graph_us(lambda: layer(xm), reps), 1),
                          round(graph_us(lambda: gemv_rows(xm, layer.weight, layer.bias, config), reps), 1))
            if up_to == smaller and rows_us[m][1] < (1 - margin) * rows_us[m][0]:  # (every smaller count won too)
                up_to = m
            smaller = m
        if up_to:
            ops.gemv_rows[key] = (up_to, config)
        report[label + " rows"], report[label + " rows up to"], report[label + " rows config"] = rows_us, up_to, config
    return report


class TritonInputs:
    """StepInputs -> (input_ids, positions, TritonMetadata, sample_rows) on the device."""

    def __init__(self, device: torch.device):
        self.upload = PackedUpload(device)

    def prepare(self, step: StepInputs):
        nd, num_reqs = step.num_decodes, step.num_reqs
        has_prefill = num_reqs > nd
        prefill_qsl = step.query_start_loc[nd:] - nd
        arrays = [step.input_ids, step.positions, step.slot_mapping, step.context_lens, prefill_qsl,
                  step.sample_rows, step.block_table]
        groups = step.row_groups if nd == num_reqs else None  # (decode-only steps: rows as verify steps run)
        if groups is not None:
            arrays.append(groups)
        ids, pos, slots, ctx, qsl, rows, table, *uploaded = self.upload.upload(arrays)
        table = table.view(step.block_table.shape)
        meta = TritonMetadata(
            slot_mapping=slots, num_decodes=nd, decode_block_tables=table[:nd], decode_context_lens=ctx[:nd],
            decode_max_context=int(step.context_lens[:nd].max()) if nd else 0, decode_num_splits=None,
            prefill_block_tables=table[nd:] if has_prefill else None,
            prefill_query_start_loc=qsl if has_prefill else None,
            prefill_context_lens=ctx[nd:] if has_prefill else None,
            decode_row_groups=uploaded[0] if groups is not None else None,
            decode_group_rows=int(groups.max()) if groups is not None else 1)
        return ids, pos, meta, rows
