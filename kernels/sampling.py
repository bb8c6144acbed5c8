"""sample: temperature / top-k / top-p / min-p sampling of one token per row, without a sort.

    logits       [B, V] fp32
    temperature  [B] fp32     0: greedy (argmax of logits)
    top_k        [B] int32    <= 0 or >= V: off
    top_p        [B] fp32     >= 1: off
    min_p        [B] fp32     0: off
    exp_noise    [B, V] fp32  Exp(1) samples drawn by the caller (per-request seeded generators)
    token_ids    [B] int64

Sampling is an exponential race: argmax over allowed tokens of probs / exp_noise is a draw from the
renormalised allowed distribution, so the caller owns the randomness and the kernel is exact.

Filters, in this order, with thresholds on logit values, so tied logits are kept or dropped together:
  top-k  keep logits >= the k-th largest logit (counted with multiplicity);
  top-p  keep logits >= the largest logit t such that the tokens with logit >= t hold at least
         top_p of the probability mass of the top-k set (the top token is always kept);
  min-p  keep probs >= min_p * max(probs).
argmax picks the lowest index among equal scores, as torch.argmax does.

Thresholds come from a radix select over the logits' order-preserving uint32 keys, RADIX_BITS
bits per pass over the row (8 passes for 4 bits): each pass counts tokens (top-k) or sums their
unnormalised probability exp((logit - max) / T) (top-p) at or above 16 candidate thresholds at once
and keeps the largest candidate that still satisfies the condition. After the last pass the
threshold is exact: the key of an actual logit. One program per row; rows with no top-k / top-p
make only two passes (max, then the race).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logit_key(x):
    """Order-preserving uint32 key of fp32 (a <= b iff key(a) <= key(b)); -0.0 keys as +0.0."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    return bits ^ tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000)


@triton.jit
def _top_k_key(logits_row, vocab_size, k, BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Key of the k-th largest logit: the largest key c with count(key >= c) >= k."""
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.uint32)
    offs = tl.arange(0, BLOCK_V)
    prefix = tl.full([], 0, tl.uint32)
    for step in range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (step + 1)
        candidates = prefix | (digits << shift)                          # [NUM_CANDIDATES]
        counts = tl.zeros([1 << RADIX_BITS], dtype=tl.int32)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offs
            valid = cols < vocab_size
            keys = _logit_key(tl.load(logits_row + cols, mask=valid, other=0.0))
            above = (keys[None, :] >= candidates[:, None]) & valid[None, :]  # [NUM_CANDIDATES, BLOCK_V]
            counts += tl.sum(above.to(tl.int32), axis=1)
        prefix = prefix | (tl.max(tl.where(counts >= k, digits, 0), axis=0) << shift)
    return prefix


@triton.jit
def _top_p_key(logits_row, vocab_size, row_max, log2_scale, top_p, top_k_key,
               BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr):
    """Largest key c with mass(key >= c) >= top_p * mass(key >= top_k_key)."""
    digits = tl.arange(0, 1 << RADIX_BITS).to(tl.uint32)
    offs = tl.arange(0, BLOCK_V)
    prefix = tl.full([], 0, tl.uint32)
    for step in range(32 // RADIX_BITS):
        shift = 32 - RADIX_BITS * (step + 1)
        candidates = prefix | (digits << shift)
        masses = tl.zeros([1 << RADIX_BITS], dtype=tl.float32)
        top_k_mass = tl.zeros([], dtype=tl.float32)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offs
            logits = tl.load(logits_row + cols, mask=cols < vocab_size, other=float("-inf"))
            keys = _logit_key(logits)
            weights = tl.exp2((logits - row_max) * log2_scale)              # padding: 0
            masses += tl.sum(tl.where(keys[None, :] >= candidates[:, None], weights[None, :], 0.0), axis=1)
            top_k_mass += tl.sum(tl.where(keys >= top_k_key, weights, 0.0), axis=0)
        target = top_p * top_k_mass
        prefix = prefix | (tl.max(tl.where(masses >= target, digits, 0), axis=0) << shift)
    return prefix


@triton.jit
def _sample_kernel(
    logits_ptr, noise_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, out_ptr,
    vocab_size, stride_logits, stride_noise,
    BLOCK_V: tl.constexpr, RADIX_BITS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: max logit and its first index (the greedy answer).
    row_max = tl.full([], float("-inf"), dtype=tl.float32)
    token = tl.full([], 0, dtype=tl.int32)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + offs
        logits = tl.load(logits_row + cols, mask=cols < vocab_size, other=float("-inf"))
        chunk_max = tl.max(logits, axis=0)
        token = tl.where(chunk_max > row_max, start + tl.argmax(logits, axis=0), token)
        row_max = tl.maximum(row_max, chunk_max)

    temperature = tl.load(temperature_ptr + row)
    if temperature > 0:
        log2_scale = 1.4426950408889634 / temperature
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        min_p = tl.load(min_p_ptr + row)
        threshold = tl.full([], 0, tl.uint32)                             # key 0: every logit passes
        if (top_k > 0) & (top_k < vocab_size):
            threshold = _top_k_key(logits_row, vocab_size, top_k, BLOCK_V, RADIX_BITS)
        if top_p < 1.0:
            threshold = _top_p_key(logits_row, vocab_size, row_max, log2_scale, top_p, threshold,
                                   BLOCK_V, RADIX_BITS)

        # Last pass: exponential race among the allowed tokens.
        noise_row = noise_ptr + row * stride_noise
        best_score = tl.full([], -1.0, dtype=tl.float32)
        for start in range(0, vocab_size, BLOCK_V):
            cols = start + offs
            valid = cols < vocab_size
            logits = tl.load(logits_row + cols, mask=valid, other=float("-inf"))
            noise = tl.load(noise_row + cols, mask=valid, other=1.0)
            weights = tl.exp2((logits - row_max) * log2_scale)              # probs * normaliser
            allowed = valid & (_logit_key(logits) >= threshold) & (weights >= min_p)
            scores = tl.where(allowed, weights / noise, -1.0)
            chunk_best = tl.max(scores, axis=0)
            token = tl.where(chunk_best > best_score, start + tl.argmax(scores, axis=0), token)
            best_score = tl.maximum(best_score, chunk_best)
    tl.store(out_ptr + row, token.to(tl.int64))


def sample(
    logits: torch.Tensor,       # [B, V] fp32
    temperature: torch.Tensor,  # [B] fp32
    top_k: torch.Tensor,        # [B] int32
    top_p: torch.Tensor,        # [B] fp32
    min_p: torch.Tensor,        # [B] fp32
    exp_noise: torch.Tensor,    # [B, V] fp32
) -> torch.Tensor:              # [B] int64
    assert logits.dim() == 2 and logits.dtype == torch.float32 and logits.stride(1) == 1, \
        f"logits must be [B, V] fp32 contiguous in V, got {tuple(logits.shape)} {logits.dtype}"
    batch_size, vocab_size = logits.shape
    assert exp_noise.shape == logits.shape and exp_noise.dtype == torch.float32 and exp_noise.stride(1) == 1
    for name, t, dtype in (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int32),
                           ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32)):
        assert t.shape == (batch_size,) and t.dtype == dtype, f"{name} must be [{batch_size}] {dtype}"
    token_ids = torch.empty(batch_size, dtype=torch.int64, device=logits.device)
    if batch_size == 0:
        return token_ids
    _sample_kernel[(batch_size,)](
        logits, exp_noise, temperature.contiguous(), top_k.contiguous(), top_p.contiguous(),
        min_p.contiguous(), token_ids,
        vocab_size, logits.stride(0), exp_noise.stride(0),
        BLOCK_V=min(1024, triton.next_power_of_2(vocab_size)), RADIX_BITS=4, num_warps=8,
    )
    return token_ids
