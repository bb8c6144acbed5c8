"""CUDA graphs of decode-only steps, one per batch-size bucket.

A decode step of an 8B model launches ~15 kernels per layer; at small batches the GPU finishes
each before Python issues the next. Capturing the forward pass once per bucket and replaying it
leaves only one launch per step.

    buckets: 1 2 4 8 16 32 64 128 256 (those <= max_num_seqs, plus max_num_seqs itself), and
             past 256 one per 128 up to max_num_seqs (--max-num-seqs 512: 384, 512), so a
             larger batch still replays a graph instead of running ~500 eager launches; plus
             the sizes a speculative engine's verify steps fill (spec_decode.verify_graph_sizes),
             and for those engines a grouped graph of each size up to them: its decode attention
             reads a verify step's rows of one request as one group (StepInputs.row_groups),
             which as_rows marks from spec_decode.decoder.GROUPED_MIN_CONTEXT tokens of context on
    static device buffers (one int32 block, filled by one pinned copy per step):
        | ids maxB | positions maxB | slots maxB | context_lens maxB | sample rows maxB | row groups maxB | table maxB x M |
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
                 max_num_seqs: int, max_model_len: int, device: torch.device, extra_sizes=(), group_rows: int = 0):
        """extra_sizes: batch sizes captured beside the buckets (a speculative engine's verify rows);
        group_rows > 0: also a grouped graph of each size up to the largest extra one, for steps with
        row groups of up to group_rows rows (a verify step's rows: StepInputs.row_groups)."""
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.block_size = block_size
        self.sizes = sorted(set(bucket_sizes(max_num_seqs)) | set(extra_sizes))
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.num_splits = {bs: choose_num_splits(bs, num_kv_heads, max_model_len, device) for bs in self.sizes}
        self.group_rows = group_rows
        grouped_max = max(extra_sizes, default=0) if group_rows else 0
        # a grouped step launches a program per row, kv head and split, of which one row per group
        # works: four waves counted over all rows (9 rows of SmolLM2 on an H200: 20 splits; with 64,
        # chosen per group before, 8 of 9 rows' programs idled and the call took 2x as long)
        self.group_splits = {bs: choose_num_splits(bs, num_kv_heads, max_model_len, device, waves=4)
                             for bs in self.sizes if bs <= grouped_max}
        n, m = self.max_batch, self.max_blocks
        # host staging in the static layout; the device block is uploaded whole up to the table rows used
        self._host_arrays = [np.zeros(n, np.int32) for _ in range(6)] + [np.zeros((n, m), np.int32)]
        self._host_arrays[2][:] = -1
        self._host_arrays[5][:] = 1  # row groups: padding rows lead themselves
        self._upload = PackedUpload(device, 6 * n + n * m + 64)
        ids, pos, slots, ctx, rows, groups, table = self._upload.upload(self._host_arrays)
        self._static = dict(ids=ids, pos=pos, slots=slots, ctx=ctx, rows=rows, groups=groups, table=table.view(n, m))
        # keyed by (bucket, grouped)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self._tail_graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._tokens: dict[tuple[int, bool], torch.Tensor] = {}  # the tail graph's tokens [bs] int64
        self._last_bucket: tuple[int, bool] | None = None  # of the last forward replay, which run_tail follows
        self.num_replays = 0
        self.num_grouped_replays = 0
        self.num_tail_replays = 0

    def _metadata(self, bs: int, grouped: bool) -> TritonMetadata:
        st = self._static
        return TritonMetadata(slot_mapping=st["slots"][:bs], num_decodes=bs, decode_block_tables=st["table"][:bs],
                              decode_context_lens=st["ctx"][:bs], decode_max_context=0,
                              decode_num_splits=self.group_splits[bs] if grouped else self.num_splits[bs],
                              prefill_block_tables=None, prefill_query_start_loc=None, prefill_context_lens=None,
                              decode_row_groups=st["groups"][:bs] if grouped else None,
                              decode_group_rows=self.group_rows if grouped else 1)

    def capture(self, tail=None) -> None:
        """Warm up (compiles the kernels for this shape) and capture each bucket, largest first;
        with `tail` (hidden [bs, h] -> tokens [bs]) also its tail graph after each forward graph.
        The static buffers hold padding only, so neither run writes the KV cache."""
        pool = torch.cuda.graph_pool_handle()
        st = self._static
        keys = [(bs, grouped) for bs in reversed(self.sizes) for grouped in (False, True)
                if not grouped or bs in self.group_splits]
        for key in keys:
            bs = key[0]
            meta = self._metadata(*key)
            self.model(st["ids"][:bs], st["pos"][:bs], self.kv_caches, meta)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[key] = self.model(st["ids"][:bs], st["pos"][:bs], self.kv_caches, meta)
            self._graphs[key] = graph
            if tail is not None:
                tail(self._outputs[key])  # warm-up (every rank: its all-gather pairs up)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._tokens[key] = tail(self._outputs[key])
                self._tail_graphs[key] = graph
        torch.cuda.synchronize(self.device)

    def can_run(self, step: StepInputs) -> bool:
        return step.num_decodes == step.num_reqs <= self.max_batch

    def run(self, step: StepInputs, fill=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Replay the bucket of a decode-only step -> (hidden [bs, h], sample_rows [S]).
        `fill(input_ids)` writes the inputs sampled by the step in flight (ModelRunner)."""
        num = step.num_reqs
        bs = next(b for b in self.sizes if b >= num)
        key = (bs, step.row_groups is not None and bs in self.group_splits
               and int(step.row_groups.max()) <= self.group_rows)
        ids, pos, slots, ctx, rows, groups, table = self._host_arrays
        ids[:num], pos[:num], slots[:num], ctx[:num] = (step.input_ids, step.positions, step.slot_mapping,
                                                        step.context_lens)
        ids[num:bs], pos[num:bs], slots[num:bs], ctx[num:bs] = 0, 0, -1, 0
        if key[1]:
            groups[:num], groups[num:bs] = step.row_groups, 1
        rows[:len(step.sample_rows)] = step.sample_rows
        table[:num, :step.block_table.shape[1]] = step.block_table
        # one copy of the whole static block up to the last table row this bucket reads
        self._upload.upload(self._host_arrays[:6] + [table[:bs]], views=False)  # same layout as _static's
        if fill is not None:
            fill(self._static["ids"][:num])
        self._graphs[key].replay()
        self._last_bucket = key
        self.num_replays += 1
        self.num_grouped_replays += key[1]
        return self._outputs[key], self._static["rows"][:len(step.sample_rows)]

    def can_replay_rows(self, num: int) -> bool:
        """replay_rows of num rows: a bucket of exactly num rows with a tail graph."""
        return (num, False) in self._tail_graphs

    def groups_rows(self, num: int) -> bool:
        """num rows of one request can replay as one row group (the grouped graph of num rows)."""
        return (num, True) in self._tail_graphs and num <= self.group_rows

    def stage_rows(self, num: int, block_row: np.ndarray, grouped: bool) -> None:
        """Before replay_rows: num rows of one request, its blocks `block_row` in every row of the
        table (and the rows one group, if `grouped`); two device copies for the whole step."""
        st = self._static
        width = min(len(block_row), st["table"].shape[1])
        table = np.repeat(np.asarray(block_row[:width], np.int32)[None], num, 0)
        st["table"][:num, :width].copy_(torch.from_numpy(table))
        if grouped:
            groups = np.zeros(num, np.int32)
            groups[0] = num
            st["groups"][:num].copy_(torch.from_numpy(groups))

    def row_inputs(self, num: int) -> tuple[torch.Tensor, ...]:
        """The static int32 inputs (ids, positions, slots, contexts) of the first num rows, which a
        round of spec_decode/device_rounds.py writes on the device before replay_rows."""
        st = self._static
        return st["ids"][:num], st["pos"][:num], st["slots"][:num], st["ctx"][:num]

    def rows_tokens(self, num: int, grouped: bool) -> torch.Tensor:
        """The tail graph's tokens buffer [num] of the num-row bucket (what replay_rows fills)."""
        return self._tokens[(num, grouped)][:num]

    def replay_rows(self, num: int, grouped: bool) -> torch.Tensor:
        """Replay the num-row bucket and its tail on the inputs in row_inputs -> rows_tokens."""
        key = (num, grouped)
        self._graphs[key].replay()
        self._tail_graphs[key].replay()
        self._last_bucket = key
        self.num_replays += 1
        self.num_grouped_replays += grouped
        self.num_tail_replays += 1
        return self._tokens[key][:num]

    def can_run_tail(self) -> bool:
        """The last `run` has a tail graph (captured with one)."""
        return self._last_bucket in self._tail_graphs

    def run_tail(self, num: int) -> torch.Tensor:
        """Replay the tail of the last `run`'s bucket -> tokens [num] int64 of its first num rows
        (a view of the static buffer: valid until the bucket's next tail replay)."""
        key = self._last_bucket
        self._tail_graphs[key].replay()
        self.num_tail_replays += 1
        return self._tokens[key][:num]
