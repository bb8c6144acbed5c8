"""The two kernels around a device round of n-gram speculation (common/engine/spec_decode/device_rounds.py).

    round_inputs  (one program)  hist [C], length -> the lookup (device_rounds.lookup's rule: the
                  longest suffix of min_n..max_n tokens that occurs earlier, its latest occurrence)
                  -> drafts [K], count; and the k + 1 rows' inputs written straight into the
                  decode graph's static int32 buffers: ids [t, d1 .. dK], positions, slots, contexts
    round_accept  (one program)  the tail's tokens x [K + 1] -> accepted = leading drafts equal to
                  x (of the count found); x into hist past `length`; the round's record
                  (xs[round], took[round] = accepted + 1, found[round] = count); length += accepted
                  + 1; round += 1

In torch ops the same round took ~55 small kernels (~0.25 ms of an H200's time per round, against
~0.8 ms for the 9-row forward itself); here it is two. Both are captured in CUDA graphs; the
torch version stays the CPU's path and the reference (tests/kernels/test_ngram_round.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # history positions scored per iteration


@triton.jit
def _round_inputs_kernel(hist_ptr, length_ptr, table_ptr, drafts_ptr, count_ptr,
                         ids_ptr, pos_ptr, slots_ptr, ctx_ptr, cap, block_size,
                         MIN_N: tl.constexpr, MAX_N: tl.constexpr, K: tl.constexpr, N_PAD: tl.constexpr,
                         BLOCK: tl.constexpr):
    length = tl.load(length_ptr)
    last = length - 1
    best = tl.full((), -1, tl.int64)
    for start in range(0, cap, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        run = j < last
        score = tl.zeros([BLOCK], tl.int64)
        for m in tl.static_range(MAX_N):
            target = tl.load(hist_ptr + tl.maximum(last - m, 0))
            ok = run & (j >= m) & (j * 0 + last > m)  # (a block-shaped mask: the interpreter's loads want one)
            src = tl.load(hist_ptr + j - m, mask=ok, other=0)
            run = ok & (src == target)
            score += run.to(tl.int64)
        val = tl.where(score >= MIN_N, score * cap + j, -1)
        best = tl.maximum(best, tl.max(val, axis=0))
    found = best >= 0
    first = tl.where(found, best % cap, 0) + 1  # the drafts' first position
    count = tl.where(found, tl.minimum(length - first, K), 0)
    tl.store(count_ptr, count)
    r = tl.arange(0, N_PAD).to(tl.int64)
    drafts = tl.load(hist_ptr + tl.minimum(first + r, cap - 1), mask=r < K, other=0)
    tl.store(drafts_ptr + r, drafts, mask=r < K)
    rows = r < K + 1
    ids = tl.load(hist_ptr + tl.where(r == 0, last, tl.minimum(first + r - 1, cap - 1)), mask=rows, other=0)
    pos = last + r
    block = tl.load(table_ptr + pos // block_size, mask=rows, other=0)
    tl.store(ids_ptr + r, ids.to(tl.int32), mask=rows)
    tl.store(pos_ptr + r, pos.to(tl.int32), mask=rows)
    tl.store(slots_ptr + r, (block * block_size + pos % block_size).to(tl.int32), mask=rows)
    tl.store(ctx_ptr + r, (pos + 1).to(tl.int32), mask=rows)


@triton.jit
def _round_accept_kernel(hist_ptr, length_ptr, round_ptr, drafts_ptr, count_ptr, x_ptr,
                         xs_ptr, took_ptr, found_ptr, K: tl.constexpr, N_PAD: tl.constexpr):
    length = tl.load(length_ptr)
    rnd = tl.load(round_ptr)
    count = tl.load(count_ptr)
    r = tl.arange(0, N_PAD).to(tl.int64)
    rows = r < K + 1
    x = tl.load(x_ptr + r, mask=rows, other=0)
    drafts = tl.load(drafts_ptr + r, mask=r < K, other=0)
    match = (drafts == x) & (r < count) & (r < K)
    accepted = tl.min(tl.where(match, N_PAD, r), axis=0)  # the first draft not accepted
    tl.store(hist_ptr + length + r, x, mask=rows)
    tl.store(xs_ptr + rnd * (K + 1) + r, x, mask=rows)
    tl.store(took_ptr + rnd, accepted + 1)
    tl.store(found_ptr + rnd, count)
    tl.store(length_ptr, length + accepted + 1)
    tl.store(round_ptr, rnd + 1)


def round_inputs(hist: torch.Tensor, length: torch.Tensor, table: torch.Tensor, drafts: torch.Tensor,
                 count: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, ctx: torch.Tensor,
                 block_size: int, min_n: int, max_n: int, k: int) -> None:
    """hist [C], length [], table [B] int64; drafts [k], count [] int64 out; ids, pos, slots, ctx:
    int32 views of at least k + 1 rows (the decode graph's static inputs), written."""
    _round_inputs_kernel[(1,)](hist, length, table, drafts, count, ids, pos, slots, ctx, hist.shape[0], block_size,
                               MIN_N=min_n, MAX_N=max_n, K=k, N_PAD=triton.next_power_of_2(k + 1), BLOCK=BLOCK)


def round_accept(hist: torch.Tensor, length: torch.Tensor, rnd: torch.Tensor, drafts: torch.Tensor,
                 count: torch.Tensor, x: torch.Tensor, xs: torch.Tensor, took: torch.Tensor, found: torch.Tensor,
                 k: int) -> None:
    """x [k + 1] int64 (the tail's tokens); xs [R, k + 1], took [R], found [R] int64: row `rnd` written."""
    _round_accept_kernel[(1,)](hist, length, rnd, drafts, count, x, xs, took, found,
                               K=k, N_PAD=triton.next_power_of_2(k + 1))
