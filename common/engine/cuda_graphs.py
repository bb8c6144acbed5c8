"""CUDA graphs of decode-only steps, one per batch-size bucket.

A decode step of an 8B model launches ~15 kernels per layer; at small batches the GPU finishes
each before Python issues the next. Capturing the forward pass once per bucket and replaying it
leaves only one launch per step.

    buckets: 1 2 4 8 16 32 64 128 256 (those <= max_num_seqs, plus max_num_seqs itself), and
             past 256 one per 128 up to max_num_seqs (--max-num-seqs 512: 384, 512), so a
             larger batch still replays a graph instead of running ~500 eager launches; plus
             the sizes a speculative engine's verify steps fill (spec_decode.verify_graph_sizes)
    static device buffers (one int32 block, filled by one pinned copy per step):
        | ids maxB | positions maxB | slots maxB | context_lens maxB | sample rows maxB | table maxB x M |
    a step of B decodes replays the smallest bucket bs >= B; rows B..bs are padding:
        slot -1 (store_kv skips it), context_len 0 (attention writes zeros), token 0, position 0
    graph: model forward only -> hidden [bs, h]; logits and sampling run eagerly on the rows
        that sample (the sampler is per-request Python: penalties, generators, logprobs).
    tail graph (with a `tail`, engine/greedy_tail.py): hidden [bs, h] -> LM head -> argmax ->
        tokens [bs] int64, replayed right after the forward graph when every row samples plain
        greedy (`run_tail`); at TP > 1 its all-gather of each rank's (max, id) pairs is inside.
        A separate graph, so steps that need the Sampler replay the same forward graph. Its
        tokens buffer is overwritten by the bucket's next tail replay: the next step's input
        fill reads it before its own replay (stream order).

Decode attention gets a fixed `num_splits` per bucket (chosen for max_model_len): the kernel is
correct for any split count, and a captured graph cannot re-choose it per step. All graphs share
one memory pool; they are captured largest first so the smaller ones reuse its blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from pdserve.common.models.attention import StepInputs
from pdserve.common.models.packed_upload import PackedUpload
from pdserve.common.models.triton_attention import TritonMetadata
from pdserve.kernels.decode_attention import choose_num_splits

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


LARGE_BUCKET_STEP = 128  # buckets past BUCKETS[-1]


def bucket_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in BUCKETS if b <= max_num_seqs]
    sizes += range(BUCKETS[-1] + LARGE_BUCKET_STEP, max_num_seqs + 1, LARGE_BUCKET_STEP)
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], num_kv_heads: int, block_size: int,
                 max_num_seqs: int, max_model_len: int, device: torch.device, extra_sizes=()):
        """extra_sizes: batch sizes captured beside the buckets (a speculative engine's verify rows)."""
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.sizes = sorted(set(bucket_sizes(max_num_seqs)) | set(extra_sizes))
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.num_splits = {bs: choose_num_splits(bs, num_kv_heads, max_model_len, device) for bs in self.sizes}
        n, m = self.max_batch, self.max_blocks
        # host staging in the static layout; the device block is uploaded whole up to the table rows used
        self._host_arrays = [np.zeros(n, np.int32) for _ in range(5)] + [np.zeros((n, m), np.int32)]
        self._host_arrays[2][:] = -1
        self._upload = PackedUpload(device, 5 * n + n * m + 64)
        ids, pos, slots, ctx, rows, table = self._upload.upload(self._host_arrays)
        self._static = dict(ids=ids, pos=pos, slots=slots, ctx=ctx, rows=rows, table=table.view(n, m))
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._tail_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._tokens: dict[int, torch.Tensor] = {}  # bucket -> the tail graph's tokens [bs] int64
        self._last_bucket: int | None = None  # of the last forward replay, which run_tail follows
        self.num_replays = 0
        self.num_tail_replays = 0

    def _metadata(self, bs: int) -> TritonMetadata:
        st = self._static
        return TritonMetadata(slot_mapping=st["slots"][:bs], num_decodes=bs, decode_block_tables=st["table"][:bs],
                              decode_context_lens=st["ctx"][:bs], decode_max_context=0,
                              decode_num_splits=self.num_splits[bs], prefill_block_tables=None,
                              prefill_query_start_loc=None, prefill_context_lens=None)

    def capture(self, tail=None) -> None:
        """Warm up (compiles the kernels for this shape) and capture each bucket, largest first;
        with `tail` (hidden [bs, h] -> tokens [bs]) also its tail graph after each forward graph.
        The static buffers hold padding only, so neither run writes the KV cache."""
        pool = torch.cuda.graph_pool_handle()
        st = self._static
        for bs in reversed(self.sizes):
            meta = self._metadata(bs)
            self.model(st["ids"][:bs], st["pos"][:bs], self.kv_caches, meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bs] = self.model(st["ids"][:bs], st["pos"][:bs], self.kv_caches, meta)
            self._graphs[bs] = graph
            if tail is not None:
                tail(self._outputs[bs])  # warm-up (every rank: its all-gather pairs up)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._tokens[bs] = tail(self._outputs[bs])
                self._tail_graphs[bs] = graph
        torch.cuda.synchronize(self.device)

    def can_run(self, step: StepInputs) -> bool:
        return step.num_decodes == step.num_reqs <= self.max_batch

    def run(self, step: StepInputs, fill=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the bucket of a decode-only step -> (hidden [bs, h], sample_rows [S]).
        `fill(input_ids)` writes the inputs sampled by the step in flight (ModelRunner)."""
        num = step.num_reqs
        bs = next(b for b in self.sizes if b >= num)
        ids, pos, slots, ctx, rows, table = self._host_arrays
        ids[:num], pos[:num], slots[:num], ctx[:num] = (step.input_ids, step.positions, step.slot_mapping,
                                                        step.context_lens)
        ids[num:bs], pos[num:bs], slots[num:bs], ctx[num:bs] = 0, 0, -1, 0
        rows[:len(step.sample_rows)] = step.sample_rows
        table[:num, :step.block_table.shape[1]] = step.block_table
        # one copy of the whole static block up to the last table row this bucket reads
        self._upload.upload(self._host_arrays[:5] + [table[:bs]])
        if fill is not None:
            fill(self._static["ids"][:num])
        self._graphs[bs].replay()
        self._last_bucket = bs
        self.num_replays += 1
        return self._outputs[bs], self._static["rows"][:len(step.sample_rows)]

    def can_run_tail(self) -> bool:
        """The last `run` has a tail graph (captured with one)."""
        return self._last_bucket in self._tail_graphs

    def run_tail(self, num: int) -> torch.Tensor:
        """Replay the tail of the last `run`'s bucket -> tokens [num] int64 of its first num rows
        (a view of the static buffer: valid until the bucket's next tail replay)."""
        bs = self._last_bucket
        self._tail_graphs[bs].replay()
        self.num_tail_replays += 1
        return self._tokens[bs][:num]
