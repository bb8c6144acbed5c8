"""Programmatic dependent launch (PDL, Hopper and later) for the decode path's Triton kernels.

At batch 1 a decode step is ~10 small kernels per layer replayed from a CUDA graph; between two
of them the GPU drains one grid and then launches and ramps up the next. A kernel launched with
`launch_pdl=True` may be put on the SMs as soon as every program of the kernel before it on the
stream has called gdc_launch_dependents; it then waits (gdc_wait) until that kernel has finished
and its writes are visible. Each kernel here does both before anything else:

    @triton.jit
    def kernel(..., PDL: tl.constexpr = False):
        if PDL:
            pdl.prologue()        # gdc_wait(); gdc_launch_dependents()
        ... every global read and write comes after it

So a kernel reads and writes nothing before the kernel before it has ended (ordering as without
PDL, transitively down the chain: each waits for its predecessor, which waited for its own); only
the launch and the grid's ramp-up overlap the predecessor's tail. Kernels of other libraries
(cuBLAS, torch ops) are launched without the attribute and wait as always. Measured on an H200:
a CUDA graph of 320 GEMV-shaped kernels (one 8B decode step's sizes) 4.43 -> 4.20 ms.

Launch: `kernel[grid](..., **pdl.launch_args(x))` — {} off CUDA, before sm_90, with a Triton
without the instructions, or after `set_enabled(False)` (the benchmarks' A/B switch).

Weight prefetch (`prefetch_l2`, the small-batch GEMVs): a GEMV's weights are never written by
the kernels before it, so a GEMV launched early may ask L2 for the first lines of its weights
*before* its gdc_wait. HBM then starts on them while the kernel before still runs (at batch 1
that kernel is usually a norm, attention merge or another GEMV's tail, with HBM mostly idle), and
the GEMV's first loads after the wait hit L2. Only reads of constant weights may come before the
wait; x, the workspace and the output stay after it. `prefetch_lines()` is the per-program budget
in 128-byte lines ($PDSERVE_GEMV_PREFETCH_LINES, 0 = off); no prefetch without PDL.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = True
except ImportError:  # an older Triton: PDL stays off
    AVAILABLE = False

_enabled = True
PREFETCH_ENV = "PDSERVE_GEMV_PREFETCH_LINES"
_DEFAULT_PREFETCH_LINES = 256  # 32 KiB of weights per program


if AVAILABLE:
    @triton.jit
    def prologue():
        gdc_wait()
        gdc_launch_dependents()
else:
    @triton.jit
    def prologue():
        pass


@triton.jit
def prefetch_l2(ptrs, mask):
    """Asks L2 for the 128-byte line holding each of `ptrs` where `mask` (no data comes back, nothing
    waits for it). One element per line: the callers build their pointer tiles at 128-byte steps."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.b32 $0, 0; }",
                              "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_lines(launch: dict) -> int:
    """Weight lines a GEMV program prefetches before its wait: 0 without PDL (nothing to overlap)."""
    if not launch:
        return 0
    return _prefetch_lines()


@functools.cache
def _prefetch_lines() -> int:
    value = os.environ.get(PREFETCH_ENV, "").strip()
    if not value:
        return _DEFAULT_PREFETCH_LINES
    try:
        lines = int(value)
    except ValueError:
        raise ValueError(f"${PREFETCH_ENV} must be a whole number of 128-byte lines, got {value!r}") from None
    if lines < 0:
        raise ValueError(f"${PREFETCH_ENV} must be >= 0, got {lines}")
    return lines


def pow2_floor(n: int) -> int:
    """The largest power of two <= n (0 for n < 1): Triton tiles have power-of-two sides."""
    return 1 << (n.bit_length() - 1) if n >= 1 else 0


def set_enabled(flag: bool) -> None:
    """Turn PDL on or off for launches from now on (kernels already captured in CUDA graphs keep theirs)."""
    global _enabled
    _enabled = flag


@functools.cache
def _supported(device_index: int) -> bool:
    return AVAILABLE and torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_args(t: torch.Tensor) -> dict:
    """The PDL keywords of a launch whose tensors live where `t` does."""
    if _enabled and t.is_cuda and _supported(t.device.index if t.device.index is not None
                                             else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {}
