"""The CPU fast path: `CpuOps`, chosen by the model runner at start-up on CPU (`--kernels auto`).

`TorchOps` (llama.py) stays the HF-exact reference (`--kernels reference`); `CpuOps` has the same
members and differs where the profile of SmolLM2-135M on 2 cores said the time went
(docs/benchmarks.md, "CPU fast path"). Per layer and step:

    qkv = linear(x)            oneDNN matmul on the weight packed ONCE at load (`pack`); F.linear
                               repacks bf16 weights (or runs MKL sgemm for fp32) on every call
    rotary_store_kv            q and k rotated in place, K/V stored at their slots: one C++ pass
    attention                  decodes: C++ paged decode attention reading K/V blocks in place;
                               prefills: C++ prefill attention per sequence (torch's flash SDPA's
                               roundings), a cached prefix gathered with one index_select per tensor
    o_proj, rms_norm+residual  packed matmul; one C++ pass (residual updated in place)
    gate_up, silu_and_mul,     packed matmul; one C++ pass; packed matmul
    down
    logits                     the (tied) head on its packed weight

The C++ kernels (kernels/cpu.py) are compiled for the machine on first use. Where that is
impossible (no compiler) `CpuPagedAttention` and eager element-wise ops run instead (logged at
start-up): decodes gather their blocks with ONE index_select per tensor and attend with two
batched matmuls under the step's additive mask (torch's SDPA with a mask took a slow path:
15-20 ms a layer at 64 x 240 in bf16).

Numerics: bf16 GEMMs are bit-identical to F.linear (both oneDNN) and the element-wise kernels
round where HF's bf16 code rounds; fp32 GEMMs differ from MKL's in the last bits (oneDNN's
blocking) and attention sums in another order, so greedy output can leave HF's on a near tie
(the tests compare both kernel sets with HF token for token in fp32 and bf16's agreement). The
prompt attention keeps SDPA's roundings (bf16 softmax weights): normalised in fp32 instead, it
changed SmolLM2's bf16 chat answer, whose first token is a near tie.

`configure_cpu_runtime` (the runner calls it once on CPU): OpenMP threads = the cores this
process may use, and glibc's malloc told to keep freed activations instead of unmapping them
(a [2048, 576] temporary otherwise page-faults on every op: 4-6x slower elementwise ops).
`advise_huge_pages` puts the KV pool in transparent huge pages; `populate_in_background` faults
its pages in after start-up, so that the first bursts do not pay for them inside their steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pdserve.common.models.attention import AttentionMetadata, PrefillSeq, TorchPagedAttention
from pdserve.kernels import cpu as cpu_kernels

log = logging.getLogger("pdserve.cpu")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MADV_HUGEPAGE, _MADV_POPULATE_WRITE = 14, 23  # madvise advice (linux/mman.h)
_HUGE, _PAGE = 2 << 20, 4096  # x86-64 huge and base page sizes
MMAP_THRESHOLD = 64 << 20  # allocations below this come from the heap and are reused
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before it is returned
# KV pool bytes faulted in after start (populate_in_background): a first burst of 64 x 264 tokens of
# SmolLM2 writes 389 MB; later blocks fault in on first use (the pool's size in memory within
# seconds of start would weigh on hosts running several engines, tests among them)
POPULATE_BYTES = 512 << 20
POPULATE_POLL_S = 0.05  # how often the populating thread looks at the block pool's frontier
PACK_BATCH_HINT = 64  # oneDNN picks the packed layout for this M; measured fine from M=1 to 2048


def cpu_threads(tensor_parallel_size: int = 1) -> int:
    """Threads for one rank: the cores this process may run on, shared by the ranks."""
    return max(1, len(os.sched_getaffinity(0)) // tensor_parallel_size)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): its allocator and madvise have their own policies
        return None


def configure_cpu_runtime(num_threads: int) -> None:
    torch.set_num_threads(num_threads)
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(MMAP_THRESHOLD))
        libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(TRIM_THRESHOLD))


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Advise the 2 MiB-aligned interior of a CPU tensor's memory into transparent huge pages
    (where THP is `madvise` or `always`); call it before the first touch (the runner's
    `zeros_on_demand` KV pool): decode attention visits the pool's blocks in table order and
    otherwise takes a TLB miss per block (measured 10-14% of the attention kernel's time).
    A refused advice leaves ordinary pages, nothing else changes."""
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first = (start + _HUGE - 1) & ~(_HUGE - 1)
    length = (start + size - first) & ~(_HUGE - 1)
    libc = _libc()
    if length > 0 and libc is not None:
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), _MADV_HUGEPAGE)


def populate_in_background(pool: torch.Tensor, block_dim: int, num_blocks: int | None = None,
                           frontier=None, ahead: int = 0) -> threading.Thread | None:
    """Fault in the pages of a `zeros_on_demand` KV pool on a low-priority thread, block by block
    in the order the block pool hands blocks out (ids ascending), without changing their contents
    (madvise MADV_POPULATE_WRITE: safe while the engine writes the same pages).

    pool: [..., NB, ...] with the block index at `block_dim`; the dimensions before it are slabs
    (layer, K/V) of NB contiguous blocks each. `num_blocks`: blocks [0, num_blocks) first (the
    runner passes what its scheduler can hold at once, at most POPULATE_BYTES). Without
    `frontier` the thread ends there. `frontier`: a callable giving how many blocks the block pool
    has handed out so far, or None while the engine is busy; the thread then works only while it
    is idle (it re-asks before each huge page) and keeps `ahead` blocks past the frontier
    populated as it moves, polling every POPULATE_POLL_S, until the whole pool is in.

    Why: the first write to a page of the pool pays its fault, and on a VM whose host has not
    backed that memory yet, far more: a 2048-token prompt's rotary_store_kv took 9.8-10.2 ms per
    layer into such pages, 1.1 ms into recycled ones and 0.72 ms into touched ones; 2 GB took 3.9 s
    to fault in. The LRU free queue hands out untouched blocks until the pool has been used once,
    so a server's successive bursts paid it inside their steps (64 x 200 / 64 bursts on one server:
    573 / 547 / 528 output tok/s, docs/benchmarks.md, twelfth session); vLLM zeroes its pool at
    start-up. Why only while idle: on two cores even a nice-19 thread that takes a core stalls the
    step's OpenMP team (the first burst with population alongside ran 506-552 tok/s against
    573-579). Returns the thread, or None without glibc (the pages then fault in on first use)."""
    libc = _libc()
    if libc is None or pool.device.type != "cpu" or pool.numel() == 0:
        return None
    madvise = libc.madvise
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    slabs, pool_blocks = math.prod(pool.shape[:block_dim]), pool.shape[block_dim]
    num_blocks = pool_blocks if num_blocks is None else min(num_blocks, pool_blocks)
    block_bytes = math.prod(pool.shape[block_dim + 1:]) * pool.element_size()
    base, chunk = pool.data_ptr(), max(1, _HUGE // block_bytes)  # blocks of one huge page per slab
    ref = weakref.ref(pool)  # a released pool stops the thread (a populate of a freed range is harmless)

    def run() -> None:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only (Linux)
        done, slab, target = 0, 0, num_blocks  # blocks [0, done) are in; of the next chunk, slabs [0, slab)
        while done < pool_blocks:
            if ref() is None:
                return
            handed_out = None if frontier is None else frontier()
            if frontier is not None:
                if handed_out is None:  # the engine is busy
                    time.sleep(POPULATE_POLL_S)
                    continue
                target = max(target, min(pool_blocks, handed_out + ahead))
            if done >= target:
                if frontier is None:
                    return
                time.sleep(POPULATE_POLL_S)
                continue
            n = min(chunk, target - done)
            start = base + (slab * pool_blocks + done) * block_bytes
            first = start & ~(_PAGE - 1)
            if madvise(first, start + n * block_bytes - first, _MADV_POPULATE_WRITE) != 0:
                return  # a kernel before 5.14 (EINVAL), or the pool is gone: first use faults them
            slab += 1
            if slab == slabs:
                done, slab = done + n, 0
    thread = threading.Thread(target=run, name="pdserve-kv-populate", daemon=True)
    thread.start()
    return thread


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN packs fp32 everywhere, bf16 with AVX-512 (or AMX); fp16 needs AVX512-FP16."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), PACK_BATCH_HINT)
    except RuntimeError:
        return False
    return True


def pack_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a `dtype` weight is packed in for oneDNN, or None (not packed: F.linear runs).

    bf16 on a CPU whose oneDNN packs no bf16 (AVX2 without AVX-512, e.g. the 2-core AMD EPYC of
    docs/benchmarks.md's seventeenth session) packs the weight widened to fp32: bf16 -> fp32 is
    exact, the product sums in fp32 as a bf16 GEMM does and its output is rounded to bf16, so the
    layer computes what a bf16 GEMM computes (in another summation order) at fp32 GEMM speed, for
    twice the weight's memory. There F.linear in bf16 ran 3-6x slower than fp32 from 64 rows on
    (SmolLM2's gate_up at 512 rows: 112 vs 19 ms). Rows decoded one or two at a time still read
    the bf16 weight (the C++ GEMV, `CpuOps.linear`)."""
    if can_pack(dtype):
        return dtype
    if dtype == torch.bfloat16 and can_pack(torch.float32):
        return torch.float32
    return None


class CpuPagedAttention(TorchPagedAttention):
    """Same constructor and `forward` as `TorchPagedAttention`; `CpuMetadata` carries the step's
    decode gather index and mask (built once per step by `CpuInputs`)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: "CpuMetadata", rotary, positions: torch.Tensor) -> torch.Tensor:
        # q [T, H, D], k/v [T, KVH, D], kv_cache [2, NB, BS, KVH, D] -> out [T, H, D]
        if self.kv_scale is not None:
            return self._fp8_reference().forward(q, k, v, kv_cache, meta, rotary, positions)
        q, k = rotary(positions, q, k)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, meta.slot_mapping, v)
        nd = meta.num_decode_tokens
        if nd and not meta.prefills:
            return self._decode(q, k_cache, v_cache, meta)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        for seq in meta.prefills:
            sl = slice(seq.q_start, seq.q_start + seq.q_len)
            out[sl] = self._prefill(q[sl], k[sl], v[sl], k_cache, v_cache, seq)
        return out

    def _fp8_reference(self) -> TorchPagedAttention:
        """An fp8 cache (`kv_scale` set): the reference backend runs it (quantized store,
        dequantized gathers); neither this torch path nor the C++ kernels read e4m3."""
        ref = getattr(self, "_reference", None)
        if ref is None or ref.kv_scale is not self.kv_scale:
            ref = TorchPagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.block_size,
                                      self.sliding_window)
            ref.kv_scale = self.kv_scale
            self._reference = ref
        return ref

    def _decode(self, q, k_cache, v_cache, meta: "CpuMetadata") -> torch.Tensor:
        # q [B, H, D]; the step's blocks [B * M, BS, KVH, D] -> [B, KVH, L, D], L = M * BS
        b, kvh, d = q.shape[0], self.num_kv_heads, self.head_dim
        keys = k_cache.index_select(0, meta.decode_blocks).view(b, -1, kvh, d).transpose(1, 2)
        values = v_cache.index_select(0, meta.decode_blocks).view(b, -1, kvh, d).transpose(1, 2)
        qg = q.view(b, kvh, -1, d)  # [B, KVH, G, D]: the query heads of each KV head
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float()  # [B, KVH, G, L]
        scores.mul_(self.scale).add_(meta.decode_mask)  # [B, 1, 1, L]: 0 visible, -inf not
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, values).view(b, -1, d)  # [B, H, D]

    def _prefill(self, q, k, v, k_cache, v_cache, seq: PrefillSeq) -> torch.Tensor:
        # q [Lq, H, D]: this chunk's keys alone, or the whole context gathered from its blocks.
        # torch's flash SDPA as the reference calls it (so a prompt computes the same numbers
        # fresh or after a prefix hit); with a mask it beat two bmm and a softmax at every size
        lq, lk = seq.q_len, seq.context_len
        if lk != lq:
            k = k_cache.index_select(0, seq.block_table).view(-1, self.num_kv_heads, self.head_dim)[:lk]
            v = v_cache.index_select(0, seq.block_table).view(-1, self.num_kv_heads, self.head_dim)[:lk]
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, heads, L, D]
        if lk == lq and self.sliding_window is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            q_pos = torch.arange(lk - lq, lk)[:, None]
            k_pos = torch.arange(lk)[None, :]
            visible = k_pos <= q_pos
            if self.sliding_window is not None:
                visible &= k_pos > q_pos - self.sliding_window
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)


class CpuKernelAttention(CpuPagedAttention):
    """`CpuPagedAttention` with the C++ kernels (kernels/cpu.py): rotary and the KV store in one
    pass, decodes read K/V in place through the block table (no gather, no score tensor), prompt
    chunks attend in the prefill kernel."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: "CpuMetadata", rotary, positions: torch.Tensor) -> torch.Tensor:
        # q [T, H, D], k/v [T, KVH, D] (views of the qkv output), kv_cache [2, NB, BS, KVH, D] -> [T, H, D]
        if self.kv_scale is not None:
            return self._fp8_reference().forward(q, k, v, kv_cache, meta, rotary, positions)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        cpu_kernels.rotary_store_kv(q, k, v, positions, rotary.cos_sin, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        if nd and not meta.prefills:
            return self._decode(q, k_cache, v_cache, meta)
        out = torch.empty(q.shape, dtype=q.dtype)
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        for seq in meta.prefills:
            sl = slice(seq.q_start, seq.q_start + seq.q_len)
            out[sl] = self._prefill(q[sl], k[sl], v[sl], k_cache, v_cache, seq)
        return out

    def _prefill(self, q, k, v, k_cache, v_cache, seq: PrefillSeq) -> torch.Tensor:
        # q [Lq, H, D], k/v [Lq, KVH, D] (views of the qkv output): this chunk's keys, or the whole
        # context gathered from its blocks when a prefix is cached
        if seq.context_len != seq.q_len:
            k = k_cache.index_select(0, seq.block_table).view(-1, self.num_kv_heads, self.head_dim)[:seq.context_len]
            v = v_cache.index_select(0, seq.block_table).view(-1, self.num_kv_heads, self.head_dim)[:seq.context_len]
        return cpu_kernels.prefill_attention(q, k, v, self.scale, self.sliding_window)

    def _decode(self, q, k_cache, v_cache, meta: "CpuMetadata") -> torch.Tensor:
        return cpu_kernels.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                  meta.decode_context_lens, self.scale, self.sliding_window)


@dataclass
class CpuMetadata(AttentionMetadata):
    """`AttentionMetadata` plus the decode rows' gather: decode_blocks [B * M] long (row-major
    block table, padded with block 0) and decode_mask [B, 1, 1, M * BS] fp32 (0 or -inf)."""
    decode_blocks: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None


class CpuInputs:
    """StepInputs -> (input_ids, positions, CpuMetadata, sample_rows) as long CPU tensors: the
    decodes' block table and lengths for the kernel, or their gather index and mask for the
    torch path (`kernels` False)."""

    def __init__(self, block_size: int, sliding_window: int | None, kernels: bool):
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.kernels = kernels

    def prepare(self, step):
        as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        nd = step.num_decodes
        meta = CpuMetadata(slot_mapping=as_long(step.slot_mapping), num_decode_tokens=nd, decode_block_tables=None,
                           decode_context_lens=None, decode_max_context=0)
        if nd:
            lens = step.context_lens[:nd]
            width = -(-int(lens.max()) // self.block_size)
            meta.decode_max_context = int(lens.max())
            # the kernel's inputs (and the reference's, which runs an fp8 cache)
            meta.decode_block_tables = as_long(step.block_table[:nd, :width])
            meta.decode_context_lens = as_long(lens)
            if self.kernels:
                return self._finish(step, meta, as_long)
            meta.decode_blocks = as_long(step.block_table[:nd, :width].reshape(-1))
            pos = np.arange(width * self.block_size)[None, :]
            hidden = pos >= lens[:, None]
            if self.sliding_window is not None:
                hidden |= pos <= lens[:, None] - 1 - self.sliding_window
            meta.decode_mask = torch.from_numpy(np.where(hidden, np.float32(-np.inf), np.float32(0))[:, None, None, :])
        return self._finish(step, meta, as_long)

    def _finish(self, step, meta: "CpuMetadata", as_long):
        nd = step.num_decodes
        qsl, ctx = step.query_start_loc.tolist(), step.context_lens.tolist()
        for b in range(nd, len(ctx)):
            num_blocks = -(-ctx[b] // self.block_size)
            meta.prefills.append(PrefillSeq(q_start=qsl[b], q_len=qsl[b + 1] - qsl[b], context_len=ctx[b],
                                            block_table=as_long(step.block_table[b, :num_blocks])))
        return as_long(step.input_ids), as_long(step.positions), meta, as_long(step.sample_rows)


BATCH_INVARIANT_ROWS = 32  # --batch-invariant: the most rows one oneDNN product gets (CpuOps.linear)
# bf16 products of 1-2 rows (decoding one or two requests) read W once through the C++ GEMV
# (kernels/cpu.py gemv_bf16): oneDNN's one-row kernel read SmolLM2's weights at 12-21 GB/s on the
# AMX Xeon, the GEMV at 20-38 (2 threads, 30 layers' weights: qkv 0.52x, o 0.45x, gate_up 0.65x,
# down 0.67x of oneDNN's time for one row, 0.61-0.93x for two; from three rows oneDNN wins; a
# request decoding alone: 0.90x the ms per token; docs/benchmarks.md, eleventh session). It needs
# the weights row-major beside oneDNN's packed copy, so only where that second copy is at most
# GEMV_COPY_MAX_BYTES (small models, which is what a CPU serves); not with --batch-invariant (a
# request alone would sum in another order than in a batch).
GEMV_MAX_ROWS = 2
GEMV_COPY_MAX_BYTES = 1 << 30


class CpuOps:
    """`TorchOps`' members for the CPU fast path (module docstring). One instance per model: it
    holds that model's packed weights (`pack`, after the weights are loaded)."""
    uses_triton = False  # quantized modules run their torch code

    def __init__(self, kernels: bool):
        """`kernels`: use the C++ kernels (kernels/cpu.py, loaded by the caller)."""
        self.kernels = kernels
        self.attention_backend = CpuKernelAttention if kernels else CpuPagedAttention
        self._packed: dict[nn.Module, torch.Tensor] = {}  # Linear -> its oneDNN-packed weight
        self._two_rows: set[nn.Module] = set()  # bf16 Linears whose one-row product runs as two (linear)
        self._row_block = 0  # --batch-invariant: products of more rows run in blocks of this many (linear)
        self._head: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits weight, packed)
        self._widened: dict[nn.Module | None, torch.Tensor | None] = {}  # bf16 packed as fp32 -> fp32 bias (pack_dtype; None: the head)
        self._rows: dict[nn.Module, torch.Tensor] = {}  # bf16 Linear -> its weight row-major (GEMV_MAX_ROWS)
        self._head_rows: torch.Tensor | None = None  # the logits weight row-major, for the GEMV
        self._cos_sin: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None

    def pack(self, model: nn.Module, batch_invariant: bool = False) -> int:
        """Pack every nn.Linear weight of `model` and its logits weight for oneDNN; a Linear's own
        weight is then dropped for a meta tensor (it would be a second copy; the tied embedding
        stays, it embeds; `--kernels reference` keeps them all). Quantized modules (IntLinear,
        Fp8Linear) are not nn.Linear: they keep their own kernels. `batch_invariant`: see `linear`.
        Returns the number packed."""
        self._row_block = BATCH_INVARIANT_ROWS if batch_invariant else 0
        head = model.embed_tokens.weight if model.lm_head is None else None  # tied: the embedding is the head
        dtypes = {m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)} | \
            ({head.dtype} if head is not None else set())
        pack_as = {dtype: pack_dtype(dtype) for dtype in dtypes}  # one oneDNN probe per dtype
        linears = [m for m in model.modules() if isinstance(m, nn.Linear) and pack_as[m.weight.dtype] is not None]
        gemv = not batch_invariant and self.kernels and cpu_kernels.gemv_bf16_available() and sum(
            m.weight.numel() * m.weight.element_size() for m in linears) <= GEMV_COPY_MAX_BYTES
        gemv_ok = lambda w: gemv and w.dtype == torch.bfloat16 and w.shape[1] % 32 == 0  # noqa: E731
        for module in linears:
            if gemv_ok(module.weight):
                self._rows[module] = module.weight.detach().contiguous()
            if module is model.lm_head:
                continue
            if batch_invariant and module.weight.dtype == torch.bfloat16 and \
                    module.in_features > module.out_features:
                self._two_rows.add(module)
            if pack_as[module.weight.dtype] != module.weight.dtype:
                self._widened[module] = None if module.bias is None else module.bias.detach().float()
            self._packed[module] = _pack_and_drop(module, pack_as[module.weight.dtype])
        if head is not None:
            if pack_as[head.dtype] is not None:
                self._head = (head, torch.ops.mkldnn._reorder_linear_weight(head.detach().to(pack_as[head.dtype]),
                                                                            PACK_BATCH_HINT))
                self._head_rows = head.detach() if gemv_ok(head) and head.is_contiguous() else None
                if pack_as[head.dtype] != head.dtype:
                    self._widened[None] = None
        elif isinstance(model.lm_head, nn.Linear) and pack_as[model.lm_head.weight.dtype] is not None:
            self._head_rows = self._rows.pop(model.lm_head, None)
            if pack_as[model.lm_head.weight.dtype] != model.lm_head.weight.dtype:
                self._widened[None] = None  # no bias: compute_logits passes none
            packed = _pack_and_drop(model.lm_head, pack_as[model.lm_head.weight.dtype])
            self._head = (model.lm_head.weight, packed)  # compute_logits passes the (now meta) weight
        return len(self._packed) + (self._head is not None)

    def _onednn(self, key: nn.Module | None, x: torch.Tensor, packed: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        """x times a packed weight (+ bias): a bf16 weight packed as fp32 (`pack_dtype`) takes x
        widened and its output rounded to x's dtype."""
        if key in self._widened:
            y = torch.ops.mkldnn._linear_pointwise(x.float(), packed, self._widened[key], "none", [], "")
            return y.to(x.dtype)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed.get(layer)
        if packed is None:  # not packable (fp16), or a quantized module with its own kernels
            return layer(x)
        if self._row_block and x.dim() == 2 and x.shape[0] > self._row_block:
            # --batch-invariant: oneDNN picks another kernel, with another order over K, for many rows
            # than for a few (Xeon with AMX, bf16: rows of a 33+-row product differ from the same rows
            # alone, while 1..32-row products agree), so a prompt prefilled beside others got other
            # roundings than alone; in blocks of 32 rows every row takes the few-rows kernel
            # (SmolLM2's gate_up over 1,426 rows: 7.4 ms in blocks against 8.4 ms whole, same box)
            return torch.cat([self.linear(layer, x[s:s + self._row_block])
                              for s in range(0, x.shape[0], self._row_block)])
        if x.dim() == 2 and x.shape[0] <= GEMV_MAX_ROWS and x.stride(1) == 1 and layer in self._rows:
            return cpu_kernels.gemv_bf16(x, self._rows[layer], layer.bias)
        if x.dim() == 2 and x.shape[0] == 1 and layer in self._two_rows:
            # --batch-invariant: oneDNN's one-row kernel sums over K in another order than its kernel
            # for two rows or more where K > N (the MLP's down projection), so a request decoding
            # alone gets other bf16 roundings than in a batch, and may get other tokens (SmolLM2: 5
            # of 16 prompts); the row twice gives the batch's roundings for ~4-10 % of a batch-1
            # step (docs/benchmarks.md, ninth session). fp32's tokens did not move in the same check.
            return self._onednn(layer, x.expand(2, -1).contiguous(), packed, layer.bias)[:1]
        return self._onednn(layer, x, packed, layer.bias)

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._head is not None and self._head[0] is weight:
            if self._head_rows is not None and hidden.dim() == 2 and hidden.shape[0] <= GEMV_MAX_ROWS \
                    and hidden.stride(1) == 1:
                return cpu_kernels.gemv_bf16(hidden, self._head_rows, None)
            return self._onednn(None, hidden, self._head[1], None)
        return hidden @ weight.t()

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
        if self.kernels and x.stride(-1) == 1:
            if residual is not None:  # x [T, h], residual [T, h] (updated in place) -> (out, residual)
                return cpu_kernels.rms_norm(x, weight, eps, residual)
            return cpu_kernels.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)  # Qwen3: [T, H, D]
        # HF's numerics: (x + residual) in x's dtype, normalised in fp32, cast back, then scaled
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True).add_(eps))
        out = h.to(x.dtype).mul_(weight) if x.dtype == weight.dtype else weight * h.to(x.dtype)
        return out if residual is None else (out, residual)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
        # q [T, H, D], k [T, KVH, D] -> rotated (new tensors); HF's rotate_half products in q's dtype
        cos, sin = self._step_cos_sin(positions, cos_sin, q.dtype)  # [T, 1, D/2] each
        t, h, d = q.shape
        joint = _adjacent(q, k)
        if joint is not None:
            out = _rotate(joint, cos, sin)
            return out[:, :h], out[:, h:]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def _step_cos_sin(self, positions: torch.Tensor, cos_sin: torch.Tensor, dtype: torch.dtype):
        """cos and sin of this step's positions, cached for the step's layers (same positions tensor)."""
        cached = self._cos_sin
        if cached is None or cached[0] is not positions or cached[1] != dtype:
            cos, sin = cos_sin[positions].to(dtype).chunk(2, dim=-1)
            cached = self._cos_sin = (positions, dtype, cos[:, None, :], sin[:, None, :])
        return cached[2], cached[3]

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels:
            return cpu_kernels.silu_and_mul(x)  # [T, 2I] -> [T, I]
        gate, up = x.chunk(2, dim=-1)  # x [T, 2I]
        return F.silu(gate).mul_(up)

    def silu_mul_linear(self, layer: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
        return self.linear(layer, self.silu_and_mul(gate_up))  # the MLP's down projection


def create_cpu_ops(use_kernels: bool = True) -> CpuOps:
    """The CPU ops of one model: with the C++ kernels when they build on this machine (the first
    time takes ~20-50 s; a failure is logged and the torch path runs)."""
    if use_kernels and not cpu_kernels.load():
        log.warning("CPU kernels unavailable (%s): running the torch CPU path", cpu_kernels.load_error())
    return CpuOps(kernels=use_kernels and cpu_kernels.load())


def _pack_and_drop(layer: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """The weight packed in `dtype` (`pack_dtype`); the layer's own becomes a meta tensor of its shape
    and dtype (no second copy in memory; its shape, dtype and size stay readable, reading its values
    raises)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach().to(dtype), PACK_BATCH_HINT)
    layer.weight = nn.Parameter(layer.weight.to("meta"), requires_grad=False)
    return packed


def _adjacent(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, H, D] and k [T, KVH, D] as ONE [T, H + KVH, D] view when k's heads follow q's in
    memory (the split qkv output), else None."""
    t, h, d = q.shape
    if (q.stride(1), q.stride(2), k.stride()) != (d, 1, q.stride()) or \
            k.data_ptr() != q.data_ptr() + h * d * q.element_size():
        return None
    return q.as_strided((t, h + k.shape[1], d), q.stride())


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, N, D]: (x1 cos - x2 sin, x2 cos + x1 sin), the same roundings as HF's x*cos + rotate_half(x)*sin
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
