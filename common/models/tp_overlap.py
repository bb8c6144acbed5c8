"""Tensor-parallel prefill in two halves whose all-reduces overlap the other half's compute.

A prefill step's all-reduces (two per layer, [T, hidden] each: 64 MiB for an 8,192-token chunk of
an 8B model) take ~12 % of the step at TP=2 on H200s when the GEMMs wait for them. With the
step's prompts split into two halves A and B (whole prompts each, so neither half's attention
reads the other's tokens), each half's all-reduce runs on NCCL's stream while the other half
computes:

    layer l:  A: norm, attention -> all-reduce A (async) | B: norm, attention -> all-reduce B (async)
              A: wait, norm, MLP -> all-reduce A (async) | B: wait, norm, MLP -> all-reduce B (async)
    end:      A, B: wait, final norm -> hidden [T_A + T_B, h] in the step's row order

The norms after the all-reduces are the plain ones (the reducing norm's all-reduce is the async
one here). Rows, sums and norms are the same as the one-piece forward's; the GEMMs see half the
rows (cuBLAS may pick other kernels, so bf16 bits can differ as between any two batch shapes).
Decode rows (a mixed step's first rows) go with half A. Used when the step has >= 2 prompts and
>= MIN_TOKENS tokens (ModelRunner, `--tp-prefill-overlap`).
"""

from __future__ import annotations

import numpy as np
import torch

from pdserve.common.models.attention import StepInputs
from pdserve.common.models.llama import RMSNorm

MIN_TOKENS = 2048  # below this the halves' smaller GEMMs cost more than the hidden all-reduce time


def split_step(step: StepInputs, min_tokens: int = MIN_TOKENS) -> tuple[StepInputs, StepInputs] | None:
    """The step as two StepInputs of whole requests, A = the decodes and the first k prompts, B =
    the rest, k chosen to halve the tokens; None when it has < 2 prompts or < min_tokens tokens.
    sample_rows are left empty: the caller samples from the joined hidden states, in row order."""
    nd, num_reqs, num_tokens = step.num_decodes, step.num_reqs, step.num_tokens
    if num_reqs - nd < 2 or num_tokens < min_tokens:
        return None
    ends = step.query_start_loc[nd + 1:num_reqs]  # token end of prompt j (j < last): split candidates
    k = int(np.argmin(np.abs(ends - num_tokens / 2)))
    req, tok = nd + k + 1, int(ends[k])  # A = requests [0, req), tokens [0, tok)
    empty = np.zeros(0, np.int32)
    a = StepInputs(nd, step.input_ids[:tok], step.positions[:tok], step.slot_mapping[:tok],
                   step.query_start_loc[:req + 1], step.context_lens[:req], step.block_table[:req], empty)
    b = StepInputs(0, step.input_ids[tok:], step.positions[tok:], step.slot_mapping[tok:],
                   step.query_start_loc[req:] - tok, step.context_lens[req:], step.block_table[req:], empty)
    return a, b


class _Half:
    def __init__(self, x: torch.Tensor, positions: torch.Tensor, meta):
        self.x, self.positions, self.meta = x, positions, meta  # x: a partial sum once `work` is set
        self.residual: torch.Tensor | None = None
        self.work = None

    def norm(self, norm: RMSNorm) -> torch.Tensor:
        """The norm after an all-reduce: wait for it, add the residual, normalise (RMSNorm's own
        forward, not the reducing one's). First call: the embedding, already summed."""
        if self.residual is None:
            self.residual = self.x
            return RMSNorm.forward(norm, self.x)
        self.work.wait()  # the current stream waits for NCCL's; the host does not
        out, self.residual = RMSNorm.forward(norm, self.x, self.residual)
        return out

    def reduce(self, partial: torch.Tensor, comm) -> None:
        self.x, self.work = partial, comm.all_reduce_async(partial)


def forward_halves(model, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                   split: int, meta_a, meta_b, comm) -> torch.Tensor:
    """LlamaForCausalLM.forward over tokens [0, split) (meta_a) and [split, T) (meta_b) -> hidden [T, h]."""
    x = model.embed_tokens(input_ids)  # [T, h], summed over the vocab shards
    halves = [_Half(x[:split], positions[:split], meta_a), _Half(x[split:], positions[split:], meta_b)]
    for layer, kv_cache in zip(model.layers, kv_caches):
        for h in halves:
            h.reduce(layer.self_attn(h.norm(layer.input_layernorm), h.positions, kv_cache, h.meta), comm)
        for h in halves:
            h.reduce(layer.mlp(h.norm(layer.post_attention_layernorm)), comm)
    return torch.cat([h.norm(model.norm) for h in halves])
