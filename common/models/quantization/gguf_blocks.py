"""GGUF block formats -> IntLinear's running layout, so GGUF weights run quantized (--quantization gguf).

A GGUF weight [N, K] is stored row by row, each row as K / block values in blocks (little endian):

    Q8_0  32 values, 34 bytes: d fp16 | q int8[32]                      w = d * q
    Q4_0  32 values, 18 bytes: d fp16 | 16 bytes of nibbles              w = d * (q - 8)
    Q4_1  32 values, 20 bytes: d fp16 | m fp16 | 16 bytes of nibbles     w = d * q + m
          nibbles: byte j holds value j (low) and value j + 16 (high)
    Q4_K  256 values, 144 bytes: d fp16 | dmin fp16 | 12 bytes of 6-bit scales and mins of the
          eight 32-value sub-blocks | 128 bytes: value chunk c (64 values) = 32 bytes, whose low
          nibbles are sub-block 2c and high nibbles sub-block 2c + 1      w = d*sc*q - dmin*m

Each becomes groups of 32 inputs with w = (q - zero) * scale (zero may be fractional):
    Q8_0 -> 8-bit, q + 128, zero 128     Q4_0 -> zero 8     Q4_1 -> zero = -m / d
    Q4_K -> scale = d * sc, zero = dmin * m / (d * sc)
(a group whose scale is 0 holds the constant m: scale = m, zero = -1, its codes being 0).
Returns qweight [K / P, N] int32, scales and zeros [K / 32, N] fp32.
"""

from __future__ import annotations

import numpy as np
import torch

from pdserve.common.models.quantization.packing import pack_rows

KERNEL_TYPES = {"Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q4_K": 4}  # GGUF type -> bits in the running layout
GROUP_SIZE = 32


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles_16(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values (low nibbles first, then high)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def decode_blocks(raw: np.ndarray, qtype: str):
    """raw [N, row bytes] uint8 -> codes [N, K] int32, scales and zeros [N, K/32] float32, and
    flat [N, K/32] bool (groups of scale 0, represented as scale = their constant, zero = -1)."""
    n = raw.shape[0]
    if qtype == "Q8_0":
        b = raw.reshape(n, -1, 34)
        d = _f16(b[..., 0:2])
        return (b[..., 2:].view(np.int8).astype(np.int32) + 128).reshape(n, -1), d, \
            np.full(d.shape, 128.0, np.float32), np.zeros(d.shape, bool)
    if qtype == "Q4_0":
        b = raw.reshape(n, -1, 18)
        d = _f16(b[..., 0:2])
        return _nibbles_16(b[..., 2:]).reshape(n, -1).astype(np.int32), d, \
            np.full(d.shape, 8.0, np.float32), np.zeros(d.shape, bool)
    if qtype == "Q4_1":
        b = raw.reshape(n, -1, 20)
        return _nibbles_16(b[..., 4:]).reshape(n, -1).astype(np.int32), *_affine(_f16(b[..., 0:2]), _f16(b[..., 2:4]))
    if qtype == "Q4_K":
        b = raw.reshape(n, -1, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [N, S]
        sc, mn = _k_scales(b[..., 4:16].astype(np.int32))  # [N, S, 8]
        qs = b[..., 16:].reshape(n, -1, 4, 32)  # 4 chunks of 32 bytes
        codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, -1).astype(np.int32)  # chunk c: sub-blocks 2c, 2c+1
        scales, zeros, flat = _affine(d[..., None] * sc, -dmin[..., None] * mn)
        return codes, scales.reshape(n, -1), zeros.reshape(n, -1), flat.reshape(n, -1)
    raise ValueError(f"no kernel layout for GGUF type {qtype}")


def _affine(scale: np.ndarray, offset: np.ndarray):
    """w = scale * q + offset -> (scale, zero, flat) of w = (q - zero) * scale."""
    flat = scale == 0
    safe = np.where(flat, 1.0, scale)
    return (np.where(flat, offset, scale).astype(np.float32), np.where(flat, -1.0, -offset / safe).astype(np.float32),
            flat)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes [.., 12] -> 6-bit scales and mins [.., 8] of the Q4_K sub-blocks."""
    sc = np.empty(s.shape[:-1] + (8,), np.float32)
    mn = np.empty_like(sc)
    sc[..., :4], mn[..., :4] = s[..., 0:4] & 63, s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def to_running_layout(raw: np.ndarray, qtype: str) -> dict[str, torch.Tensor]:
    """GGUF rows [N, bytes] -> {"qweight": [K/P, N] int32, "scales", "qzeros": [K/32, N] fp32}."""
    codes, scales, zeros, flat = decode_blocks(raw, qtype)
    flat = np.repeat(flat, GROUP_SIZE, axis=1)
    if flat.any() and codes[flat].any():
        raise ValueError(f"a {qtype} block with scale 0 has non-zero codes (llama.cpp writes zeros there)")
    return {"qweight": pack_rows(torch.from_numpy(codes).t().contiguous(), KERNEL_TYPES[qtype]),
            "scales": torch.from_numpy(np.ascontiguousarray(scales.T)),
            "qzeros": torch.from_numpy(np.ascontiguousarray(zeros.T))}
