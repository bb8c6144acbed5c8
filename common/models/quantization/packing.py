"""Bit packing of int weights into int32 words, in the orders that AutoGPTQ/GPTQModel and AutoAWQ write.

4-bit, 8 values per word (8-bit: 4 per word); value j of a word sits at bits [bits*j, bits*(j+1)):

    GPTQ qweight [K/8, N]   word (r, n) holds inputs k = 8r .. 8r+7 of output n, in order
    GPTQ qzeros  [G, N/8]   word (g, c) holds outputs n = 8c .. 8c+7, in order (v1: zero - 1)
    AWQ  qweight [K, N/8]   word (k, c) holds outputs 8c + AWQ_ORDER[j] at position j:
                                positions  0  1  2  3  4  5  6  7
                                outputs    0  2  4  6  1  3  5  7      (+ 8c)
    AWQ  qzeros  [G, N/8]   the same interleave

pdserve's running layout is GPTQ's qweight [K/pack, N] (N contiguous: a GEMV program reads
whole rows of words), whatever the checkpoint's format; AWQ weights are repacked at load.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ_ORDER[j] = output (within 8) stored at position j


def per_word(bits: int) -> int:
    return 32 // bits


def _to_int32(acc: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 with the same bits."""
    return torch.where(acc >= 2**31, acc - 2**32, acc).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[K, N] ints in [0, 2^bits) -> [K / per_word, N] int32, sequential along K (GPTQ qweight)."""
    n = per_word(bits)
    k, cols = values.shape
    if k % n:
        raise ValueError(f"{k} rows do not pack into words of {n}")
    v = values.to(torch.int64).view(k // n, n, cols)
    shifts = (torch.arange(n, device=values.device) * bits).view(1, n, 1)
    return _to_int32((v << shifts).sum(dim=1))


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_rows: [K / per_word, N] int32 -> [K, N] int32."""
    n = per_word(bits)
    shifts = (torch.arange(n, device=packed.device) * bits).view(1, n, 1)
    v = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return v.reshape(packed.shape[0] * n, packed.shape[1])


def pack_cols(values: torch.Tensor, bits: int, awq_order: bool = False) -> torch.Tensor:
    """[R, N] ints -> [R, N / per_word] int32, along N (GPTQ qzeros; AWQ qweight/qzeros with awq_order)."""
    n = per_word(bits)
    rows, cols = values.shape
    if cols % n:
        raise ValueError(f"{cols} columns do not pack into words of {n}")
    v = values.to(torch.int64).view(rows, cols // n, n)
    if awq_order:
        v = v[:, :, list(AWQ_ORDER)]  # position j holds output AWQ_ORDER[j]
    shifts = (torch.arange(n, device=values.device) * bits).view(1, 1, n)
    return _to_int32((v << shifts).sum(dim=2))


def unpack_cols(packed: torch.Tensor, bits: int, awq_order: bool = False) -> torch.Tensor:
    """Inverse of pack_cols: [R, N / per_word] int32 -> [R, N] int32."""
    n = per_word(bits)
    shifts = (torch.arange(n, device=packed.device) * bits).view(1, 1, n)
    v = (packed.unsqueeze(2) >> shifts) & ((1 << bits) - 1)  # [R, C, position]
    if awq_order:
        inverse = [AWQ_ORDER.index(i) for i in range(n)]  # output i sits at position inverse[i]
        v = v[:, :, inverse]
    return v.reshape(packed.shape[0], packed.shape[1] * n)
