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
"""

from __future__ import annotations

import functools

import torch
import triton

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = True
except ImportError:  # an older Triton: PDL stays off
    AVAILABLE = False

_enabled = True


if AVAILABLE:
    @triton.jit
    def prologue():
        gdc_wait()
        gdc_launch_dependents()
else:
    @triton.jit
    def prologue():
        pass


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
