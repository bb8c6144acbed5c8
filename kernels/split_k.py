"""Epilogue of the small-batch GEMVs: split-K partial sums reduced in one kernel, no extra launch
(`store_rows`), and the FMA paths' per-row accumulators gathered into one tile (`rows_of`).

With split_k programs along K for one block of BLOCK_N outputs, each program adds its partial
[BLOCK_M, BLOCK_N] fp32 sums into a workspace and bumps the block's counter; the program that
finds split_k - 1 there (the last to arrive) reads the sums and zeroes them (the workspace is
zero again for the next call), adds the bias, rounds to the output dtype and stores,
then resets the counter:

    program (n, s):  atomic_add(ws[rows, cols], partial)          relaxed
                     barrier; c = atomic_add(lock[n], 1)           acq_rel: publishes this CTA's adds
                     if c == split_k - 1:                          the last one of column block n
                         y = atomic_add(ws[rows, cols], 0)         sums of all splits (read at L2)
                         ws[rows, cols] = 0; out[rows, cols] = y (+ b); lock[n] = 0

So the workspace (fp32 [16 * N]) and the counters (int32 [N / BLOCK_N]) are zero between calls,
which CUDA graphs rely on: a graph replays the kernel with the same buffers. One workspace per
device, shared by every GEMV of the model: the calls run one after another on one stream (two
streams running these GEMVs at once would need their own workspaces).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 16


@triton.jit
def store_rows(y, rows, cols, M, N, out_ptr, stride_om, b_ptr, ws_ptr, lock_ptr, lock_index, split_k,
               HAS_BIAS: tl.constexpr):
    """y [BLOCK_M, BLOCK_N] fp32 partial (or whole, split_k == 1) sums of out[rows, cols]."""
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if split_k > 1:
        ws = ws_ptr + rows[:, None] * N + cols[None, :]
        tl.atomic_add(ws, y, mask=mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds precede the release below
        count = tl.atomic_add(lock_ptr + lock_index, 1, sem="acq_rel")
        # (the count widened to the tile: the interpreter cannot mask atomics with a scalar & tile)
        mask = mask & ((tl.zeros(y.shape, dtype=tl.int32) + count) == split_k - 1)
        y = tl.atomic_add(ws, tl.zeros_like(y), mask=mask, sem="acq_rel")  # read at L2: the sums
        tl.store(ws, tl.zeros_like(y), mask=mask)  # zero again for the next call
        tl.atomic_xchg(lock_ptr + lock_index, 0, mask=count == split_k - 1, sem="relaxed")
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def rows_of(acc0, acc1, acc2, acc3, rows, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, AXIS: tl.constexpr):
    """[BLOCK_M, BLOCK_N] from the FMA paths' per-row accumulators (acc_m summed along AXIS, once
    after the K loop; rows past BLOCK_M are not read)."""
    y = tl.where(rows[:, None] == 0, tl.sum(acc0, axis=AXIS)[None, :], tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
    if BLOCK_M > 1:
        y = tl.where(rows[:, None] == 1, tl.sum(acc1, axis=AXIS)[None, :], y)
    if BLOCK_M > 2:
        y = tl.where(rows[:, None] == 2, tl.sum(acc2, axis=AXIS)[None, :], y)
        y = tl.where(rows[:, None] == 3, tl.sum(acc3, axis=AXIS)[None, :], y)
    return y


@triton.jit
def stack_rows(acc0, acc1, acc2, acc3, rows, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] from per-row [BLOCK_N] accumulators (rows past BLOCK_M are not read)."""
    y = tl.where(rows[:, None] == 0, acc0[None, :], tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
    if BLOCK_M > 1:
        y = tl.where(rows[:, None] == 1, acc1[None, :], y)
    if BLOCK_M > 2:
        y = tl.where(rows[:, None] == 2, acc2[None, :], y)
        y = tl.where(rows[:, None] == 3, acc3[None, :], y)
    return y


class _Workspace:
    """Zeroed fp32 sums and int32 counters per device, grown (never shrunk or freed: captured
    CUDA graphs keep pointers into them) outside graph capture."""

    def __init__(self):
        self._by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[torch.Tensor] = []

    def get(self, device: torch.device, n: int, num_locks: int) -> tuple[torch.Tensor, torch.Tensor]:
        ws, locks = self._by_device.get(device, (None, None))
        if ws is None or ws.numel() < MAX_ROWS * n or locks.numel() < num_locks:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"the split-K workspace must grow to N = {n} during CUDA graph capture: "
                                   "run the GEMV once before capturing (the runner's warm-up does)")
            if ws is not None:
                self._retired += [ws, locks]
            size = max(MAX_ROWS * n, MAX_ROWS * 65536, 0 if ws is None else ws.numel())
            ws = torch.zeros(size, dtype=torch.float32, device=device)
            locks = torch.zeros(max(num_locks, 8192, 0 if locks is None else locks.numel()), dtype=torch.int32,
                                device=device)
            self._by_device[device] = (ws, locks)
        return ws, locks


WORKSPACE = _Workspace()


def launch_buffers(x: torch.Tensor, n: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, counters) for a launch, passed even with split_k == 1 (the kernel then never
    touches them) so that one compiled kernel serves every split count."""
    return WORKSPACE.get(x.device, n, triton.cdiv(n, block_n))
