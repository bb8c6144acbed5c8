"""The greedy sampling tail: hidden rows -> LM head -> argmax -> tokens, with no full logits.

A step whose sampled rows are all plain greedy (temperature 0; no logprobs, penalties, min_tokens,
logit_bias or token mask; no speculative verify) needs only the argmax of each row's logits. The
runner then skips the Sampler, and under tensor parallelism the logits gather and the token
broadcast: each rank takes the argmax of its own vocab shard and the ranks all-gather the
(max value, vocab id) pairs, a few bytes per row, so every rank ends with the same tokens:

    hidden [N, h] --LM head shard--> logits [N, rows] (padding columns past the vocab -> -inf)
        --max--> (value, start + column) [N, 2] fp32 --all_gather--> [world, N, 2]
        --argmax over ranks (first: the lowest rank, so the lowest vocab id on a tie)--> tokens [N] int64

Exactly `torch.argmax` of the full row: a rank's `max` returns its first maximal column, and
the ranks' shards are in vocab order. Values travel as fp32 (bf16/fp16/fp32 logits convert
exactly; the runner's eager path compares the same values after `.float()`), ids as fp32 too
(exact below 2^24). At one rank there is no collective.

The function is pure torch and launches no host sync: on CUDA, `DecodeGraphs` captures it per
decode bucket right after the forward pass (a "tail" graph replayed after the forward graph;
its NCCL all-gather is captured like the embedding's all-reduce); on the CPU, and for steps the
graphs do not cover, the runner calls it eagerly. The choice is made identically on every rank:
from the step (decode-only, every row sampled) and `SchedulerOutput.all_greedy`, which rank 0
decides from the sampling params and the step message carries to the other ranks.
"""

from __future__ import annotations

import torch

from pdserve.common.engine.outputs import SchedulerOutput
from pdserve.common.engine.sampler import row_argmax


def plain_greedy(sched: SchedulerOutput) -> bool:
    """Every sampled row of the step takes the plain argmax of its logits (module docstring).
    any_host_history covers penalties, min_tokens, logprobs and prompt logprobs."""
    if sched.any_host_history:
        return False
    for s in sched.scheduled:
        p = s.params
        if s.sample and (p.temperature != 0 or p.logit_bias or p.has_token_mask):
            return False
    return True


def shard_best(logits: torch.Tensor, start: int, num_valid: int) -> torch.Tensor:
    """This rank's logits [N, rows] (vocab ids start..start + rows) -> [N, 2] fp32 of each row's
    max over its first num_valid columns and that column's vocab id (the first maximal one)."""
    if num_valid < logits.shape[1]:  # vocab padding of the last shard: never chosen
        logits = logits.clone()
        logits[:, num_valid:] = float("-inf")
    values, cols = logits.max(dim=-1)  # [N], [N]: first maximal column
    return torch.stack((values.float(), (cols + start).float()), dim=-1)


def merge_best(gathered: torch.Tensor) -> torch.Tensor:
    """[world, N, 2] of the ranks' shard_best, in rank (= vocab) order -> tokens [N] int64."""
    winner = gathered[..., 0].argmax(dim=0)  # [N]: the first rank holding the row's max
    return gathered[..., 1].gather(0, winner[None]).squeeze(0).long()


class GreedyTail:
    """tail(hidden [N, h]) -> tokens [N] int64 on this rank's device, the same on every rank."""

    def __init__(self, model, comm=None):
        from pdserve.common.models.parallel import vocab_shard
        self.model, self.comm = model, comm
        vocab = model.cfg.vocab_size
        if comm is None or comm.world_size == 1:
            self.start, self.num_valid = 0, vocab
        else:
            self.start, rows = vocab_shard(vocab, comm.rank, comm.world_size)
            self.num_valid = max(0, min(rows, vocab - self.start))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.shard_logits(hidden)  # [N, rows]: this rank's vocab shard
        if self.comm is None or self.comm.world_size == 1:
            return row_argmax(logits)
        return merge_best(self.comm.all_gather_stacked(shard_best(logits, self.start, self.num_valid)))
