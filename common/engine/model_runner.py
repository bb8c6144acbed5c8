"""ModelRunner: SchedulerOutput -> one forward pass over the paged KV cache -> RunnerOutput.

    scheduled requests --> StepInputs (numpy, decodes first, then prefill chunks; no per-token loop)
                       --> backend inputs: input_ids [T], positions [T], attention metadata, rows
                       --> model.forward (or a captured CUDA graph for decode-only steps)
                       --> hidden [T, h] -> logits only at sampled rows -> Sampler -> tokens

The backend is chosen once, at start-up, from the device and `--kernels`: CPU runs `CpuOps`
(models/cpu_ops.py: oneDNN-packed weights, batched paged attention; threads and malloc set up by
`configure_cpu_runtime`), `--kernels reference` runs `TorchOps` (HF-exact eager torch,
`TorchPagedAttention`) on any device; CUDA runs `TritonOps` (fused kernels, one decode and one varlen
prefill attention call per layer), its inputs staged in pinned memory and sent in one copy, and
decode-only steps replay CUDA graphs (`cuda_graphs.py`) unless `enforce_eager`. On CUDA the KV
pool is sized from a profiling step (`_blocks_for_gpu_memory`).

The runner owns the model, the KV tensors and per-request generators; it never touches the
scheduler or the block pool (block ids arrive in the SchedulerOutput).

Tensor parallel (`tp`, this rank's TPComm): every rank runs a runner on its shard of the model
and KV heads and the same steps (engine/tp_workers.py); rank 0 samples and broadcasts the
tokens, the other ranks only take part in the collectives and keep the tokens for the next
step's device-side input fill. The KV pool is the smallest any rank can hold.

Plain-greedy steps (`greedy_tail.py`, unless --no-graph-sampler) skip the Sampler: LM head ->
argmax, in a tail CUDA graph after a decode graph, else eagerly; under tensor parallelism every
rank takes its vocab shard's argmax and the ranks all-gather (value, id) pairs instead of the
logits gather and the token broadcast.

With speculative decoding the runner also owns the proposer (`spec_decode.decoder.SpecDecoder`):
drafts are appended to the inputs before the forward pass and verified on its logits.
"""

from __future__ import annotations

import gc
import itertools
import logging
import operator
import threading
import time
import weakref
from typing import Callable

import numpy as np
import torch

from pdserve.common.config import (ArchConfig, CacheConfig, ConfigError, ModelConfig, SchedulerConfig,
                                   SpeculativeConfig, cpu_has_bf16)
from pdserve.common.engine.greedy_tail import GreedyTail, plain_greedy
from pdserve.common.engine.outputs import PLACEHOLDER_TOKEN, RunnerOutput, ScheduledRequest, SchedulerOutput
from pdserve.common.engine.sampler import Sampler, top_logprobs
from pdserve.common.models.attention import AttentionMetadata, PrefillSeq, StepInputs
from pdserve.common.models.llama import TORCH_OPS
from pdserve.common.models.packed_upload import PackedUpload, record_on_current_stream
from pdserve.common.models.loader import checkpoint_dtype, load_model, resolve_dtype
from pdserve.common.models.quantization.kv_cache import (attach_kv_scales, calibrate_kv_scales, checkpoint_scales,
                                                         kv_cache_dtype)
from pdserve.common.sampling_params import SamplingParams

log = logging.getLogger("pdserve.engine")

GiB = 1 << 30
_REQ_ID, _INPUT_IDS, _START_POS, _SAMPLE = map(operator.attrgetter, ("req_id", "input_token_ids", "start_pos",
                                                                    "sample"))  # ScheduledRequest fields


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    shared: bool = False) -> torch.Tensor:
    """torch.zeros; on the CPU backed by an anonymous private mapping, whose pages the kernel
    zero-fills on first touch: a KV pool of gigabytes costs no start-up time (zeroing 2 GB took
    ~1.5 s here) and no memory until its blocks are used. shared (the ipc KV transport): a memfd
    mapping instead, which another process of the host can map (kv_transfer/host_shm.py)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import math
    import mmap
    from pdserve.common.models.cpu_ops import advise_huge_pages
    if shared:
        from pdserve.common.kv_transfer.host_shm import shared_zeros
        out = shared_zeros(shape, dtype)
    else:
        buf = mmap.mmap(-1, math.prod(shape) * dtype.itemsize, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        out = torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the mapping alive
    advise_huge_pages(out)  # before the first touch: decode attention reads blocks all over the pool
    return out


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cache_cfg: CacheConfig, arch: ArchConfig, path: str,
                 max_model_len: int, scheduler_cfg: SchedulerConfig | None = None, enforce_eager: bool = True,
                 attention_backend: str | None = None, tp=None, speculative: SpeculativeConfig | None = None):
        """`attention_backend` ("torch" | "triton" | "cpu" | "cpu_eager") overrides the choice by
        device and --kernels (tests only)."""
        self.arch = arch
        self.tp = tp
        self.model_cfg = model_cfg
        self.enforce_eager = enforce_eager
        self.block_size = cache_cfg.block_size
        self.shared_host_kv = cache_cfg.shared_host_kv
        self.max_model_len = max_model_len
        self.scheduler_cfg = scheduler_cfg or SchedulerConfig(max_model_len=max_model_len)
        self.device = resolve_device(model_cfg.device)
        self._bound_thread: int | None = None
        self._bind_device()  # `--device cuda:1`: Triton launches on the current device, which must be ours
        self.dtype = model_dtype(model_cfg.dtype, path, self.device)
        if attention_backend is None and model_cfg.kernels == "reference":
            attention_backend = "torch"
        ops, self.inputs = _select_backend(self.device, attention_backend, self.block_size, arch.sliding_window)
        if self.device.type == "cuda":
            _prefer_cublaslt()
            from pdserve.kernels import pdl
            pdl.set_enabled(model_cfg.pdl)  # before any launch or graph capture of this process
        else:
            from pdserve.common.models.cpu_ops import configure_cpu_runtime, cpu_threads
            configure_cpu_runtime(cpu_threads(1 if tp is None else tp.world_size))
        self.model = load_model(model_cfg, path, arch, self.block_size, max_model_len + 1, self.dtype, self.device,
                                ops, tp=tp)
        if hasattr(ops, "pack"):  # CpuOps: weights packed for oneDNN once, now that they are loaded
            ops.pack(self.model, batch_invariant=model_cfg.batch_invariant)
        self.num_kv_heads = self.model.layers[0].self_attn.num_kv_heads  # this rank's under tensor parallelism
        self.gemv_choice: dict = {}  # weight -> (cuBLAS us, gemv us, chosen) at batch 1, measured here
        if self.device.type == "cuda" and ops is not TORCH_OPS:
            from pdserve.common.models.triton_attention import choose_gemv
            with torch.inference_mode():
                self.gemv_choice = choose_gemv(ops, self.model)
        self.sampler = Sampler(self.device, model_cfg.seed)
        self._generators: dict[str, torch.Generator] = {}
        self._tables = BlockTableCache()
        self._last_sampled: tuple[torch.Tensor, dict[str, int]] = (torch.empty(0), {})  # tokens, req_id -> row
        self.fill_runs = False  # a draft model's ahead round: a request's k-th placeholder reads its index + k
        self._last_pending: PendingOutput | None = None  # the last launched step that sampled
        self._deferred: PendingOutput | None = None  # ...if its sampler waits for its token mask
        self._fill_upload = PackedUpload(self.device, 1024)
        self.kv_cache: torch.Tensor | None = None  # [L, 2, num_blocks, block_size, KVH, D], one allocation
        self.kv_caches: list[torch.Tensor] = []  # its per-layer views [2, num_blocks, block_size, KVH, D]
        self.graphs = None  # captured after the KV cache exists
        self.greedy_tail = None  # set once the KV cache exists (the sizing step samples with the Sampler)
        self.kv_populate: threading.Thread | None = None  # CPU: faults the KV pool's pages in (cpu_ops.py)
        # CPU: blocks the engine's block pool has handed out so far (set by EngineCore): the
        # populating thread stays POPULATE_BYTES ahead of it
        self.kv_frontier = None
        self.spec = None  # the SpecDecoder, set below with --speculative-config
        # --kv-cache-dtype fp8: e4m3 tensors, per-layer [2, KVH] scales calibrated here (quantization/kv_cache.py)
        self.kv_dtype = kv_cache_dtype(cache_cfg.fp8_kv, self.dtype)
        self.kv_scales, self.kv_scales_source = self._kv_scales(cache_cfg)
        attach_kv_scales(self.model, self.kv_scales)
        if speculative is not None:  # a draft model's KV shares the pool's block ids: sized together
            from pdserve.common.engine.spec_decode.decoder import SpecDecoder
            self.spec = SpecDecoder(speculative, self, follower=tp is not None and tp.rank != 0)
        self.extra_bytes_per_block = 0 if self.spec is None else self.spec.draft_bytes_per_block(self.block_size)
        if cache_cfg.num_blocks:
            self.num_blocks = cache_cfg.num_blocks
        elif self.device.type == "cuda":
            self.num_blocks = self._blocks_for_gpu_memory(cache_cfg)
        else:
            self.num_blocks = self._blocks_for_memory(cache_cfg)
        # blocks each rank could hold (its memory, its KV heads); every rank allocates the smallest
        self.num_blocks_by_rank = [self.num_blocks] if tp is None else tp.all_gather_int(self.num_blocks)
        self.num_blocks = min(self.num_blocks_by_rank)
        try:
            self._allocate_kv(self.num_blocks)
        except torch.OutOfMemoryError as e:
            raise ConfigError(f"a KV cache of {self.num_blocks} blocks does not fit on {self.device}: "
                              "lower --num-gpu-blocks-override or --gpu-memory-utilization") from e
        if self.kv_scales is not None:  # an fp8 cache carries its scales into the KV transport's layout
            self.kv_cache.kv_scale = torch.stack(self.kv_scales)  # [L, 2, KVH]
            for kv, scale in zip(self.kv_caches, self.kv_scales):
                kv.kv_scale = scale
        # plain-greedy steps: LM head -> argmax, no Sampler, no logits gather (greedy_tail.py)
        # (a speculative engine's plain steps too; its verify and bridge steps sample in spec.verify)
        self.greedy_tail = GreedyTail(self.model, tp) if model_cfg.graph_sampler else None
        self.num_greedy_tail_steps = 0  # steps sampled by it, in a tail graph or eagerly
        self._step_graphed = False  # the step in _forward replayed a decode graph
        if self.device.type == "cuda" and ops is not TORCH_OPS and not enforce_eager:
            from pdserve.common.engine.cuda_graphs import DecodeGraphs
            extra, group_rows = [], 0
            if self.spec is not None:  # verify rows of 1..3 requests fill their graphs exactly, as groups
                from pdserve.common.engine.spec_decode import verify_graph_sizes
                extra = verify_graph_sizes(self.spec.config.num_speculative_tokens)
                group_rows = self.spec.config.num_speculative_tokens + 1
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.num_kv_heads, self.block_size,
                                       self.scheduler_cfg.max_num_seqs, max_model_len, self.device, extra, group_rows)
            with torch.inference_mode():
                self.graphs.capture(self.greedy_tail)
        if self.spec is not None:
            self.spec.start()

    def check_alive(self) -> None:
        """Raises EngineDeadError when the runner cannot go on (a tensor-parallel rank died)."""

    def shutdown(self) -> None:
        """Release the device memory this runner holds (KV cache, CUDA graphs, weights, a draft
        model's): another engine in the same process can then size its pool from it. The runner
        is unusable afterwards. (A tensor-parallel runner also stops its worker processes.)"""
        if self.spec is not None and self.spec.draft is not None:
            self.spec.draft.runner.shutdown()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no graph replay still running when its graph is freed
        self.graphs, self.kv_cache, self.kv_caches, self.model = None, None, [], None
        self._last_sampled, self._last_pending, self._deferred = (torch.empty(0), {}), None, None
        if self.device.type == "cuda":
            gc.collect()  # graphs or buffers held in reference cycles go now, not at some later collection
            torch.cuda.empty_cache()

    def _allocate_kv(self, num_blocks: int) -> None:
        """The KV cache as ONE tensor, so a KV handoff gathers the blocks of all layers in one op
        (common/kv_transfer/blocks.py); the model reads it through per-layer views."""
        a = self.arch
        self.kv_cache = None
        self.kv_caches = []
        self.kv_cache = zeros_on_demand((a.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, a.head_dim),
                                        self.kv_dtype, self.device, shared=self.shared_host_kv)
        self.kv_caches = list(self.kv_cache.unbind(0))
        if self.device.type == "cpu" and num_blocks > 1:  # pages faulted in after start, then ahead of use
            from pdserve.common.models.cpu_ops import POPULATE_BYTES, populate_in_background
            at_once = self.scheduler_cfg.max_num_seqs * -(-self.max_model_len // self.block_size)
            ahead = min(at_once, max(1, POPULATE_BYTES // self.bytes_per_block()))  # one full batch, <= 512 MB
            me = weakref.ref(self)  # the thread must not keep the runner (and its pool) alive

            def frontier() -> int | None:
                runner = me()
                return None if runner is None or runner.kv_frontier is None else runner.kv_frontier()
            self.kv_populate = populate_in_background(self.kv_cache, block_dim=2, num_blocks=ahead,
                                                      frontier=frontier, ahead=ahead)

    def bytes_per_block(self) -> int:
        a = self.arch
        return 2 * a.num_layers * self.block_size * self.num_kv_heads * a.head_dim * self.kv_dtype.itemsize

    def _kv_scales(self, cache_cfg: CacheConfig) -> tuple[list[torch.Tensor] | None, str | None]:
        """An fp8 cache's [2, KVH] scales per layer and where they came from: the checkpoint's
        k_scale / v_scale where it has them, else a calibration prefill (quantization/kv_cache.py).
        Under tensor parallelism each rank keeps its KV heads' scales (calibrated: every rank runs
        the calibration prefill in step, as the profiling step; per tensor: the max over all ranks,
        so every rank stores with the same scale)."""
        per_tensor = cache_cfg.kv_cache_scale == "per-tensor"
        found = checkpoint_scales(self.model, per_tensor)
        if not cache_cfg.fp8_kv:
            if found is not None:
                log.info("the checkpoint carries fp8 KV-cache scales; --kv-cache-dtype fp8 would use them")
            return None, None
        if found is not None:
            log.info("fp8 KV cache: the checkpoint's k_scale / v_scale")
            if self.tp is not None:  # this rank's KV heads
                from pdserve.common.models.parallel import head_shard
                hs = head_shard(self.arch, self.tp.rank, self.tp.world_size)
                found = [s[:, hs.kv_start:hs.kv_start + hs.num_kv].contiguous() for s in found]
            return found, "checkpoint"
        log.info("fp8 KV cache: scales calibrated on a %s prefill", "per-tensor" if per_tensor else "per-head")
        scales = calibrate_kv_scales(self, per_tensor)
        if per_tensor and self.tp is not None:
            stacked = self.tp.all_reduce_max(torch.stack(scales))
            scales = list(stacked.unbind(0))
        return scales, "calibrated"

    def _blocks_for_memory(self, cache_cfg: CacheConfig) -> int:
        num = int(cache_cfg.kv_cache_memory_gb * GiB) // (self.bytes_per_block() + self.extra_bytes_per_block)
        if num < 1:
            raise ConfigError(f"--kv-cache-memory {cache_cfg.kv_cache_memory_gb} GB holds no KV block")
        return num

    def _blocks_for_gpu_memory(self, cache_cfg: CacheConfig) -> int:
        """KV blocks = (total * gpu_memory_utilization - peak of a profiling step) / bytes_per_block.

        The profiling step is a real `execute` of max_num_batched_tokens dummy tokens over
        max_num_seqs requests that all sample (top-k/top-p, so the sampler's sort is counted),
        against a one-block KV cache every slot maps into. Memory the allocator does not see (CUDA
        context, cuBLAS workspaces, other processes) is counted from the driver's numbers."""
        weights = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._allocate_kv(1)
        num_tokens = self.scheduler_cfg.token_budget
        try:
            self.execute(self._profile_step(num_tokens, self.scheduler_cfg.max_num_seqs))
            torch.cuda.synchronize(self.device)
        except torch.OutOfMemoryError as e:
            raise ConfigError(f"a step of --max-num-batched-tokens {num_tokens} does not fit on {self.device} "
                              f"next to the weights ({weights / GiB:.1f} GiB): lower it") from e
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        outside_torch = total - free - torch.cuda.memory_reserved(self.device)
        self.kv_cache, self.kv_caches = None, []
        self._generators.clear()
        self._tables = BlockTableCache()
        torch.cuda.empty_cache()
        free_now, _ = torch.cuda.mem_get_info(self.device)
        budget = min(total * cache_cfg.gpu_memory_utilization - peak - outside_torch, free_now)
        if self.spec is not None:  # the draft's weights, and the verify step's extra logits rows
            budget -= self.spec.reserved_bytes() + self._verify_bytes()
        num = max(int(budget // (self.bytes_per_block() + self.extra_bytes_per_block)), 0)
        needed = -(-self.max_model_len // self.block_size)
        if num < needed:
            raise ConfigError(
                f"--gpu-memory-utilization {cache_cfg.gpu_memory_utilization} of {total / GiB:.1f} GiB leaves "
                f"{max(budget, 0) / GiB:.2f} GiB for the KV cache ({num} blocks of {self.block_size} tokens) after "
                f"the weights ({weights / GiB:.1f} GiB), a {num_tokens}-token step (peak {peak / GiB:.1f} GiB) and "
                f"{outside_torch / GiB:.1f} GiB outside torch; --max-model-len {self.max_model_len} needs {needed} "
                "blocks: raise --gpu-memory-utilization or lower --max-model-len / --max-num-batched-tokens")
        return num

    def _verify_bytes(self) -> int:
        """A verify step computes logits at k + 1 rows per request (the profile step: one), and
        keeps about four [rows, vocab] float32 tensors (logits, probabilities, noise, residual)."""
        rows = min(self.scheduler_cfg.max_num_seqs * (self.spec.config.num_speculative_tokens + 1),
                   self.scheduler_cfg.token_budget)
        return 4 * rows * self.arch.vocab_size * 4

    def _profile_step(self, num_tokens: int, max_num_seqs: int) -> SchedulerOutput:
        num_reqs = max(1, min(max_num_seqs, num_tokens))
        per_req = num_tokens // num_reqs
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=1)
        scheduled = []
        for i in range(num_reqs):
            n = per_req + (1 if i < num_tokens - per_req * num_reqs else 0)
            tokens = [0] * n
            scheduled.append(ScheduledRequest(
                req_id=f"profile-{i}", input_token_ids=tokens, start_pos=0, block_ids=[0] * -(-n // self.block_size),
                sample=True, params=params, prompt_token_ids=tokens, output_token_ids=[]))
        return SchedulerOutput(scheduled=scheduled, num_batched_tokens=num_tokens)

    # ---- one step -----------------------------------------------------------------------------
    def execute(self, sched: SchedulerOutput, token_masks=None) -> RunnerOutput:
        return self.launch(sched, token_masks).result()

    def launch(self, sched: SchedulerOutput, token_masks=None) -> "PendingOutput":
        """`_launch`; a speculative engine's draft budget (spec_decode/budget.py) gets the step's wall
        time, which on CPU is its cost (the forward and sampler ran here); a draft model then
        takes the step's prompt chunks (DraftModelProposer.prefill) and, behind a verify step,
        drafts the next proposals' first tokens (DraftModelProposer.draft_ahead)."""
        if self.spec is None or self.spec.budget is None:
            pending = self._launch(sched, token_masks)
        else:
            t0 = time.perf_counter()
            pending = self._launch(sched, token_masks)
            self.spec.observe_step(time.perf_counter() - t0)
        if self.spec is not None:
            self.spec.prefill_draft(sched)  # a draft model: the step's prompt chunks, into its KV
            self.spec.draft_ahead()  # ... and the next first drafts behind a verify step (draft_model.py)
        return pending

    @torch.inference_mode()
    def _launch(self, sched: SchedulerOutput, token_masks=None) -> "PendingOutput":
        """Queue one step on the device; `result()` of the return value waits for its tokens.
        Steps whose requests need logprobs, and verify steps, wait here (they read results on
        the host). `token_masks` (a StructuredOutputManager) fills the sampled rows' token bitmask
        on its worker threads, started when the previous step's tokens reach the host (that
        step's result(): its rows accept them there); the sampler is then queued only when the mask is needed: at the
        next launch, before its inputs read this step's tokens, or at `result()`. Meanwhile the
        engine thread completes the previous step and schedules the next."""
        self._bind_device()
        out = RunnerOutput(sampled_token_ids={})
        if self.spec is not None and (rounds := self._launch_rounds(sched, out)) is not None:
            return rounds
        ordered, step, hidden, sample_rows = self._forward(sched)
        if not ordered:
            return PendingOutput(out)
        if sched.any_host_history:  # (prompt logprobs are host history)
            for st, s in zip(step.query_start_loc.tolist(), ordered):
                if s.params.prompt_logprobs is not None and s.start_pos < len(s.prompt_token_ids):
                    out.prompt_logprobs[s.req_id] = self._prompt_logprobs(hidden[st:st + s.num_tokens], s)
        sample_reqs = [s for s in ordered if s.sample]
        if not sample_reqs:
            return PendingOutput(out)
        greedy = self.greedy_tail is not None and (plain_greedy(sched) if sched.all_greedy is None else sched.all_greedy)
        if self.spec is not None and self.spec.verifies():  # one readback; result() finishes on the host
            if self.spec.follower:  # tensor-parallel rank > 0: rank 0's collectives, nothing sampled
                self.spec.follow(hidden, step, ordered, greedy)
                return PendingOutput(out)
            readback, finish = self.spec.verify(hidden, step, ordered, out, token_masks, greedy)
            self._last_sampled = (readback, self.spec.sampled_index)  # a next launch may fill from it
            self._last_pending = PendingOutput(out, tokens=readback, finish=finish)
            return self._last_pending
        if greedy:
            return self._launch_greedy(out, step, hidden, sample_rows, sample_reqs)
        logits = self.model.compute_logits(hidden.index_select(0, sample_rows))  # [S, V]
        index = {s.req_id: i for i, s in enumerate(sample_reqs)}
        if logits is None:  # tensor-parallel rank > 0: rank 0 samples; keep its tokens for the next inputs
            tokens = torch.empty(len(sample_reqs), dtype=torch.int64, device=self.device)
            self._last_sampled = (self.tp.broadcast_from_first(tokens), index)
            return PendingOutput(out)
        gens = [None if s.params.seed is None or s.params.temperature == 0 else self.generator(s) for s in sample_reqs]
        previous = self._last_pending
        masks = None if token_masks is None else token_masks.start_fill(
            sample_reqs, None if previous is None else lambda req_id: previous.result().sampled_token_ids[req_id])
        if masks is not None and previous is not None:  # the accept, and the fill's start, where its tokens land
            previous.when_result(masks.tokens_arrived)

        @torch.inference_mode()
        def sample() -> torch.Tensor:  # [S] on the device
            bitmask = masks.join() if masks is not None else None
            tokens = self.sampler.sample(logits, sample_reqs, self.arch.eos_token_ids, gens, bitmask,
                                         history=sched.any_host_history)
            if self.tp is not None:
                self.tp.broadcast_from_first(tokens)
            self._last_sampled = (tokens, index)
            if sched.any_host_history:
                out.logprobs = self.sampler.logprobs(logits, tokens, sample_reqs)
            return tokens
        self._last_pending = PendingOutput(out, [s.req_id for s in sample_reqs], sample=sample)
        if masks is None:
            self._last_pending.flush()  # nothing to wait for: the sampler is queued now
        else:
            self._deferred = self._last_pending
        return self._last_pending

    def _launch_rounds(self, sched: SchedulerOutput, out: RunnerOutput) -> "PendingOutput | None":
        """A lone request's verify rounds chained on the device (spec_decode/device_rounds.py),
        when the scheduler reserved slots for them; None for any other step."""
        num_rounds = self.spec.rounds_in(sched)
        if not num_rounds:
            return None
        self.forget(sched.finished_req_ids | sched.preempted_req_ids)
        self._flush_deferred()
        readback, finish = self.spec.launch_rounds(sched, num_rounds, out)
        self._last_sampled = (torch.empty(0), {})  # nothing fills from it: the next step waits for its result
        self._last_pending = PendingOutput(out, tokens=readback, finish=finish)
        return self._last_pending

    def _launch_greedy(self, out: RunnerOutput, step: StepInputs, hidden: torch.Tensor, sample_rows: torch.Tensor,
                       sample_reqs: list[ScheduledRequest]) -> "PendingOutput":
        """A plain-greedy step's tokens by the greedy tail: its graph after a decode graph whose
        rows all sample, else eagerly; every rank has them (rank 0 copies them to the host)."""
        num = len(sample_reqs)
        if self._step_graphed and num == step.num_reqs and self.graphs.can_run_tail():
            tokens = self.graphs.run_tail(num)  # [num] int64, rows 0..num-1 (decode-only: one per request)
        else:
            tokens = self.greedy_tail(hidden.index_select(0, sample_rows))
        self.num_greedy_tail_steps += 1
        self._last_sampled = (tokens, {s.req_id: i for i, s in enumerate(sample_reqs)})
        if self.tp is not None and self.tp.rank != 0:
            return PendingOutput(out)
        self._last_pending = PendingOutput(out, [s.req_id for s in sample_reqs], tokens=tokens)
        return self._last_pending

    def _flush_deferred(self) -> None:
        """Queue the sampler of the step whose mask was being filled (its tokens feed the inputs
        of the step being launched); an error stays with that step's PendingOutput."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred.flush()
            if deferred._error is not None:  # no tokens: an input in flight from it must not be filled
                self._last_sampled = (torch.empty(0), {})

    def _bind_device(self) -> None:
        """Make this runner's GPU the calling thread's current CUDA device (once per thread: the
        engine steps on its own thread). Triton kernels and CUDA graphs run on the current device,
        so a runner on cuda:1 would otherwise launch them against cuda:0."""
        if self.device.type != "cuda":
            return
        thread = threading.get_ident()
        if thread != self._bound_thread:
            # `cuda` (no index) means the process's current device, which set_device refuses
            torch.cuda.set_device(self.device if self.device.index is not None
                                  else torch.cuda.current_device())
            self._bound_thread = thread

    def _forward(self, sched: SchedulerOutput):
        """The forward pass of a step -> (requests in row order: decodes first, StepInputs,
        hidden [T, h], sample_rows [S]); ([], None, None, None) for an empty step."""
        self.forget(sched.finished_req_ids | sched.preempted_req_ids)
        if sched.is_empty():
            return [], None, None, None
        scheduled = sched.scheduled if self.spec is None else self.spec.prepare(sched)
        decodes = [s for s in scheduled if len(s.input_token_ids) == 1]
        prefills = [s for s in scheduled if len(s.input_token_ids) > 1]
        ordered = decodes + prefills
        step = flatten_step(ordered, len(decodes), self.block_size, self._tables)
        self._flush_deferred()  # the previous step's tokens, which this step's inputs may read
        fill = self._placeholder_fill(ordered, step)
        run = step if self.spec is None else self.spec.as_rows(step)  # verify chunks as one-token rows
        self._step_graphed = self.graphs is not None and self.graphs.can_run(run)
        if self._step_graphed:
            hidden, sample_rows = self.graphs.run(run, fill)
        else:
            input_ids, positions, meta, sample_rows = self.inputs.prepare(run)
            if fill is not None:
                fill(input_ids)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return ordered, step, hidden, sample_rows

    @torch.inference_mode()
    def forward_only(self, sched: SchedulerOutput) -> None:
        """A forward pass that only writes the KV cache (a draft model's prompt: nothing sampled)."""
        self._forward(sched)

    @torch.inference_mode()
    def forward_logits(self, sched: SchedulerOutput) -> tuple[list[ScheduledRequest], torch.Tensor]:
        """A forward pass without sampling (a draft model's): the requests with sample=True in row
        order, and the logits [S, V] at their last tokens."""
        ordered, _, hidden, sample_rows = self._forward(sched)
        return [s for s in ordered if s.sample], self.model.compute_logits(hidden.index_select(0, sample_rows))

    @torch.inference_mode()
    def forward_greedy(self, sched: SchedulerOutput) -> tuple[list[ScheduledRequest], torch.Tensor]:
        """A forward pass whose sampled rows take the plain argmax (a draft model's greedy rounds):
        the requests with sample=True in row order and their tokens [S] int64 on the device, by
        the tail graph after a decode graph (greedy_tail.py), else the greedy tail eagerly."""
        ordered, step, hidden, sample_rows = self._forward(sched)
        if self._step_graphed and self.graphs.can_run_tail():
            tokens = self.graphs.run_tail(step.num_tokens).index_select(0, sample_rows)
        else:
            tokens = self.greedy_tail(hidden.index_select(0, sample_rows))
        return [s for s in ordered if s.sample], tokens

    def forget(self, req_ids) -> None:
        """Drop the cached state of finished or preempted requests."""
        for req_id in req_ids:
            self._generators.pop(req_id, None)
        self._tables.drop(req_ids)
        if self.spec is not None:
            self.spec.forget(req_ids)

    def _placeholder_fill(self, ordered: list[ScheduledRequest], step: StepInputs):
        """The device-side fill of PLACEHOLDER_TOKEN inputs from the last launched step's sampled
        tokens, as fill(input_ids); None when every input is known on the host."""
        holes = np.flatnonzero(step.input_ids == PLACEHOLDER_TOKEN)
        if not holes.size:
            return None
        tokens, index = self._last_sampled
        req_of_hole = np.searchsorted(step.query_start_loc, holes, side="right") - 1
        try:  # index[ordered[r].req_id] per hole, iterated in C (once per decoding request per step)
            src = np.fromiter(map(index.__getitem__, map(_REQ_ID, map(ordered.__getitem__, req_of_hole.tolist()))),
                              np.int32, holes.size)
        except KeyError as e:
            raise RuntimeError(f"request {e.args[0]} has an input token in flight that no launched step samples") from e
        n = holes.size
        if self.fill_runs or (self.spec is not None and self.spec.fills_runs()):
            # a request's k-th hole reads its index + k: its holes are consecutive and share an index
            # (in one chunk, or in one-token rows of the same req_id), another request's differ
            first = np.ones(n, bool)
            first[1:] = src[1:] != src[:-1]
            arange = np.arange(n, dtype=np.int32)
            src += arange - np.maximum.accumulate(np.where(first, arange, 0))
        if holes[-1] == n - 1 and np.array_equal(src, np.arange(n)):  # steady decode: same requests, same order
            return lambda input_ids: input_ids[:n].copy_(tokens[:n])
        dst_dev, src_dev = self._fill_upload.upload([holes.astype(np.int32), src])

        def fill(input_ids: torch.Tensor) -> None:
            input_ids[dst_dev.long()] = tokens.index_select(0, src_dev).to(input_ids.dtype)
        return fill

    def generator(self, s: ScheduledRequest) -> torch.Generator | None:
        """The generator of a seeded request, re-seeded for the position it samples now.

        The rule that makes a seeded request's tokens independent of the route it takes (one
        engine, or a prefill worker sampling the first token and a decode worker the rest, or a
        resubmission after a failure): the draws for the token at absolute position p come from
        a generator seeded with position_seed(seed, p), never from a stream shared by earlier
        positions."""
        if s.params.seed is None or s.params.temperature == 0:
            return None
        gen = self._generators.get(s.req_id)
        if gen is None:
            gen = self._generators[s.req_id] = torch.Generator(device=self.device)
        gen.manual_seed(position_seed(s.params.seed, s.start_pos + s.num_tokens))
        return gen

    def _prompt_logprobs(self, hidden: torch.Tensor, s: ScheduledRequest) -> list:
        """Entries for the prompt tokens predicted inside this chunk (token 0 has none)."""
        prompt = s.prompt_token_ids
        entries: list = [None] if s.start_pos == 0 else []
        # position p predicts token p + 1; only prompt tokens get entries
        last = min(s.start_pos + s.num_tokens, len(prompt) - 1)
        if last > s.start_pos:
            logits = self.model.compute_logits(hidden[:last - s.start_pos])
            if logits is None:  # tensor-parallel rank > 0: it only took part in the gather
                return []
            lp = torch.log_softmax(logits, dim=-1)
            for row, pos in enumerate(range(s.start_pos, last)):
                entries.append(top_logprobs(lp[row], prompt[pos + 1], s.params.prompt_logprobs)[1])
        return entries


class PendingOutput:
    """A launched step: its RunnerOutput once the sampled tokens are on the host.

    On CUDA the tokens are copied into pinned memory behind the step and an event marks the
    copy; `result()` waits for that event only, never for steps queued after it. `sample`: the
    step's sampler, not queued yet (it waits for the step's token mask): `flush()` queues it
    (the runner, at the next launch; else `ready()` / `result()`); `when_result(fn)` runs fn where
    the tokens first land on the host (the next step's grammar accept). Thread-safe."""

    def __init__(self, out: RunnerOutput, req_ids: list[str] | None = None, tokens: torch.Tensor | None = None,
                 sample: Callable[[], torch.Tensor] | None = None, finish=None):
        """`tokens` [S] are req_ids' sampled tokens, or, with `finish`, values that
        finish(host list) turns into the output (a verify step's, spec_decode/decoder.py)."""
        self._out = out
        self._finish = finish
        self._req_ids = req_ids or []
        self._host = None
        self._event = None
        self._sample = sample
        self._error: Exception | None = None  # the deferred sampler's
        self._resolved = False  # the tokens are on the host, in self._out
        self._callbacks: list[Callable[[], None]] = []  # when_result's, not run yet
        self._lock = threading.Lock()
        if tokens is not None:
            self._copy(tokens)

    def _copy(self, tokens: torch.Tensor) -> None:
        self._host = tokens
        if tokens.device.type == "cuda":
            self._host_device = tokens.device
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            record_on_current_stream(self._event, tokens.device.index)

    def flush(self) -> None:
        with self._lock:
            sample, self._sample = self._sample, None
            if sample is not None:
                try:
                    self._copy(sample())
                except Exception as e:  # the step's failure, raised by result()
                    self._error = e

    def when_result(self, fn: Callable[[], None]) -> None:
        """fn() once, on the thread whose result() first has the tokens on the host (after it
        returns from the wait; now if that happened already); never if the step fails."""
        with self._lock:
            if not self._resolved:
                self._callbacks.append(fn)
                return
        fn()

    def ready(self) -> bool:
        """True once result() would not wait."""
        self.flush()
        return self._event is None or self._event.query()

    def result(self) -> RunnerOutput:
        self.flush()
        with self._lock:
            if self._error is not None:
                raise self._error
            if self._host is not None:
                if self._event is not None:
                    with torch.cuda.device(self._host_device):  # a grammar worker: not device 0's context
                        self._event.synchronize()
                if self._finish is not None:
                    self._finish(self._host.tolist())
                else:
                    self._out.sampled_token_ids = dict(zip(self._req_ids, self._host.tolist()))
                self._host = None
            self._resolved = True
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:  # outside the lock: they read this result
            fn()
        return self._out


# ---- step inputs ------------------------------------------------------------------------------
class BlockTableCache:
    """Block tables of the running requests, one row each of a persistent numpy table.

    A decode adds a block every block_size steps, so converting every request's Python list each
    step (~2 ms for 256 requests of 160 blocks) would be wasted: a row is extended by the new
    tail only, and a step's [B, M] table is one gather of rows. Rows are freed when the scheduler
    reports the request finished or preempted (its blocks are freed then); the first and last
    cached ids are also checked against the list, and a mismatch rebuilds the row."""

    def __init__(self):
        self._table = np.zeros((64, 64), np.int32)  # [rows, max blocks]; grows in both dimensions
        self._entries: dict[str, list] = {}  # req_id -> [row, num_valid, first id, last id, block_ids list]
        self._free_rows = list(range(63, -1, -1))

    def rows(self, ordered: list[ScheduledRequest], blocks_needed: list[int]) -> np.ndarray:
        """Row of each request, its first blocks_needed[i] ids filled in."""
        if max(blocks_needed) > self._table.shape[1]:
            self._grow(self._table.shape[0], 2 * max(blocks_needed))
        rows = []
        entries = self._entries
        for s, n in zip(ordered, blocks_needed):
            ids = s.block_ids
            entry = entries.get(s.req_id)
            if entry is not None and entry[4] is ids and entry[1] >= n:  # the list it was filled from
                rows.append(entry[0])  # (the manager replaces a request's list on every change)
                continue
            entry = entry or self._new_entry(s.req_id)
            row, have, first, last, _ = entry
            if have and (have > len(ids) or ids[0] != first or ids[have - 1] != last):
                have = 0
            if have < n:
                self._table[row, have:n] = ids[have:n]
                entry[1:4] = n, ids[0], ids[n - 1]
            entry[4] = ids
            rows.append(row)
        return np.array(rows)

    def gather(self, rows: np.ndarray, width: int) -> np.ndarray:
        return self._table[rows, :width]  # [B, width], a copy

    def _new_entry(self, req_id: str) -> list[int]:
        if not self._free_rows:
            num = self._table.shape[0]
            self._grow(2 * num, self._table.shape[1])
            self._free_rows = list(range(2 * num - 1, num - 1, -1))
        entry = self._entries[req_id] = [self._free_rows.pop(), 0, 0, 0, None]  # + the block_ids list seen last
        return entry

    def _grow(self, num_rows: int, width: int) -> None:
        table = np.zeros((num_rows, width), np.int32)
        table[:self._table.shape[0], :self._table.shape[1]] = self._table
        self._table = table

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            entry = self._entries.pop(req_id, None)
            if entry is not None:
                self._free_rows.append(entry[0])


def model_dtype(requested: str, path: str, device: torch.device) -> torch.dtype:
    """--dtype: "auto" is bf16 on a CPU that computes it natively, fp32 on other CPUs, the
    checkpoint's dtype on CUDA."""
    if requested == "auto" and device.type == "cpu":
        requested = "bfloat16" if cpu_has_bf16() else "float32"
    return resolve_dtype(requested, checkpoint_dtype(path))


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is CUDA when a GPU is present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from e


def position_seed(seed: int, position: int) -> int:
    """A 63-bit seed for one (request seed, token position) pair: splitmix64 of their mix."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def flatten_step(ordered: list[ScheduledRequest], num_decodes: int, block_size: int,
                 tables: BlockTableCache) -> StepInputs:
    """Flatten a step's requests (decodes first) into host arrays with numpy, no per-token loop."""
    num_reqs = len(ordered)  # the per-request reads below iterate in C (map + attrgetter): once per request
    lens = np.fromiter(map(len, map(_INPUT_IDS, ordered)), np.int32, num_reqs)
    starts = np.fromiter(map(_START_POS, ordered), np.int32, num_reqs)
    query_start_loc = np.zeros(num_reqs + 1, np.int32)
    np.cumsum(lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    input_ids = np.fromiter(itertools.chain.from_iterable(map(_INPUT_IDS, ordered)), np.int32, num_tokens)
    context_lens = starts + lens
    blocks_needed = (context_lens + block_size - 1) // block_size
    rows = tables.rows(ordered, blocks_needed.tolist())
    # zero past each request's needed blocks (kernels never read there; the torch path gathers block 0)
    block_table = tables.gather(rows, int(blocks_needed.max()))
    block_table[np.arange(block_table.shape[1])[None, :] >= blocks_needed[:, None]] = 0
    req_of_token = np.repeat(np.arange(num_reqs), lens)  # [T]
    positions = (np.arange(num_tokens, dtype=np.int32) - query_start_loc[req_of_token] + starts[req_of_token])
    slot_mapping = block_table[req_of_token, positions // block_size] * block_size + positions % block_size
    sampled = np.fromiter(map(_SAMPLE, ordered), bool, num_reqs)
    return StepInputs(num_decodes=num_decodes, input_ids=input_ids, positions=positions.astype(np.int32),
                      slot_mapping=slot_mapping.astype(np.int32), query_start_loc=query_start_loc,
                      context_lens=context_lens, block_table=block_table,
                      sample_rows=(query_start_loc[1:] - 1)[sampled].astype(np.int32))


class TorchInputs:
    """StepInputs -> long tensors and the `AttentionMetadata` of `TorchPagedAttention`."""

    def __init__(self, device: torch.device, block_size: int):
        self.device = device
        self.block_size = block_size

    def prepare(self, step: StepInputs):
        dev = self.device
        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev)  # noqa: E731
        nd = step.num_decodes
        meta = AttentionMetadata(slot_mapping=as_long(step.slot_mapping), num_decode_tokens=nd,
                                 decode_block_tables=None, decode_context_lens=None, decode_max_context=0)
        if nd:
            lens = step.context_lens[:nd]
            meta.decode_max_context = int(lens.max())
            width = -(-meta.decode_max_context // self.block_size)
            meta.decode_block_tables = as_long(step.block_table[:nd, :width])
            meta.decode_context_lens = as_long(lens)
        qsl, ctx = step.query_start_loc.tolist(), step.context_lens.tolist()
        for b in range(nd, len(ctx)):
            num_blocks = -(-ctx[b] // self.block_size)
            meta.prefills.append(PrefillSeq(q_start=qsl[b], q_len=qsl[b + 1] - qsl[b], context_len=ctx[b],
                                            block_table=as_long(step.block_table[b, :num_blocks])))
        return as_long(step.input_ids), as_long(step.positions), meta, as_long(step.sample_rows)


def _select_backend(device: torch.device, name: str | None, block_size: int, sliding_window: int | None = None):
    """(ops, inputs) of the backend: Triton kernels on CUDA, the CPU fast path on CPU, eager torch
    (the reference) when asked or when neither applies."""
    if name is None:
        name = "cpu" if device.type == "cpu" else "triton" if device.type == "cuda" and _triton_available() else "torch"
    if name == "triton":
        from pdserve.common.models.triton_attention import TRITON_OPS, TritonInputs
        return TRITON_OPS, TritonInputs(device)
    if name in ("cpu", "cpu_eager"):  # cpu_eager: the CPU path without its C++ kernels (tests)
        from pdserve.common.models.cpu_ops import CpuInputs, create_cpu_ops
        ops = create_cpu_ops(use_kernels=name == "cpu")
        return ops, CpuInputs(block_size, sliding_window, ops.kernels)
    if name != "torch":
        raise ConfigError(f"attention backend must be torch, triton, cpu or cpu_eager, got {name!r}")
    return TORCH_OPS, TorchInputs(device, block_size)


def _prefer_cublaslt() -> None:
    """Route torch's GEMMs through cuBLASLt. On an H100 (docs/gpu.md) it was faster than the
    default for every Llama-3-8B weight at M = 1 in isolation (the 4096x4096 o_proj 26 vs 29 us);
    inside the engine's CUDA graphs the profiler showed the same kernels either way, so the
    measured engine numbers do not depend on it. Process-wide (torch logs once that the switch
    is experimental)."""
    torch.backends.cuda.preferred_blas_library("cublaslt")


def _triton_available() -> bool:
    from pdserve.kernels import triton_available
    return triton_available()
