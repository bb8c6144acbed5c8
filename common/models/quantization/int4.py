"""Round-to-nearest int4 (and other widths) per group of inputs: the primitives the checkpoint
writer and the calibrated methods share. A weight w [N, K] becomes ints q [N, K], a scale and a
zero per (output, group) and the group of each input: w ~= (q - zero[:, g_idx]) * scale[:, g_idx]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def rtn_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool, zero_min: int = 0):
    """Round-to-nearest per group of inputs. w [N, K] (groups are consecutive inputs of the
    given order) -> (q [N, K] ints, scales [N, K/G] fp32, zeros [N, K/G] ints) with
    w ~= (q - zero) * scale. `zero_min` 1 keeps zero points >= 1 (GPTQ v1 cannot store 0)."""
    n, k = w.shape
    maxq = (1 << bits) - 1
    g = w.float().view(n, k // group_size, group_size)
    if sym:
        amax = g.abs().amax(dim=2).clamp_min(1e-8)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        lo = g.amin(dim=2).clamp(max=0.0)
        hi = g.amax(dim=2).clamp(min=0.0)
        scale = ((hi - lo) / maxq).clamp_min(1e-8)
        zero = torch.round(-lo / scale)
        if zero_min:  # no negative weights in the group: put zero at 1 and stretch the steps to fit
            low = zero < zero_min
            scale = torch.where(low, (hi / (maxq - zero_min)).clamp_min(1e-8), scale)
            zero = torch.where(low, torch.full_like(zero, zero_min), zero)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, maxq)
    return q.view(n, k).to(torch.int32), scale, zero.to(torch.int32)


@dataclass
class Int4Weight:
    """w ~= (q - zero[:, g_idx]) * scale[:, g_idx]; q in input order."""
    q: torch.Tensor  # [N, K] int32
    scale: torch.Tensor  # [N, G] fp32
    zero: torch.Tensor  # [N, G] int32
    g_idx: torch.Tensor  # [K] int32: the group of each input

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.q.float() - self.zero[:, g].float()) * self.scale[:, g]


def group_params(w: torch.Tensor, bits: int, sym: bool, zero_min: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row of w [N, G] (one group of inputs), as rtn_groups computes them."""
    _, scale, zero = rtn_groups(w, bits, w.shape[1], sym, zero_min)
    return scale[:, 0], zero[:, 0]


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, zero_min: int = 0) -> torch.Tensor:
    """w [N, K] rounded to nearest per group of consecutive inputs, dequantized again."""
    n, k = w.shape
    q, scale, zero = rtn_groups(w, bits, group_size, sym, zero_min)
    return ((q.view(n, -1, group_size) - zero[..., None]) * scale[..., None]).view(n, k)


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, zero_min: int = 0) -> Int4Weight:
    q, scale, zero = rtn_groups(w.float(), bits, group_size, sym, zero_min)
    g_idx = (torch.arange(w.shape[1]) // group_size).to(torch.int32)
    return Int4Weight(q.cpu(), scale.cpu(), zero.cpu(), g_idx)


def group_params_mse(w: torch.Tensor, bits: int, sym: bool, zero_min: int = 0, grid: int = 20,
                     max_shrink: float = 0.2, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Like group_params, with each row's range shrunk (1, 1 - 1/grid*max_shrink, ... 1 - max_shrink)
    to the one whose rounding error sum |w - q(w)|^norm is smallest (large weights clipped, the
    rest rounded more finely)."""
    best_err = torch.full((w.shape[0],), math.inf, device=w.device)
    best_scale = best_zero = None
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    for i in range(grid):
        r = 1 - max_shrink * i / grid
        clipped = torch.maximum(torch.minimum(w, hi * r), lo * r)
        q, scale, zero = rtn_groups(clipped, bits, w.shape[1], sym, zero_min)
        err = ((q - zero).float() * scale - w).abs().pow(norm).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = scale[:, 0] if best_scale is None else torch.where(better, scale[:, 0], best_scale)
        best_zero = zero[:, 0] if best_zero is None else torch.where(better, zero[:, 0], best_zero)
    return best_scale, best_zero
