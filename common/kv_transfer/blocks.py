"""Gathering blocks into one staging buffer and scattering them back out, chunk by chunk.

A pull moves as ONE contiguous payload. The staging buffer holds the requested blocks of all
layers, K before V, in request order:

    staging (uint8, viewed as the cache dtype) = [L, 2, n, block_size, num_kv_heads, head_dim]
    [ layer 0: K blk0..blk(n-1) | V blk0..blk(n-1) ][ layer 1: K ... | V ... ] ... [ layer L-1 ]
    |<------------- chunk 0 (layers 0..3) -------------->|<--- chunk 1 ... (layer_chunks) --->

Being layer-major, a run of layers is a contiguous byte range, so the payload can be sent in
chunks of layers without any framing. How many is the server's choice (`num_chunks`, announced
in the PullReply; both ends split the layers the same way with `layer_chunks`):

    staging in host memory (CPU caches, tcp)   several chunks (>= 4 MiB each, at most 8): the
                                               server gathers chunk i+1 while chunk i is on the
                                               wire, the client scatters chunk i meanwhile
    staging in device memory (CUDA caches, ucx) one chunk: cuda_ipc moves 256 MiB in ~0.2 ms,
                                               so every extra message (a rendezvous round trip
                                               and a Python wake-up) costs more than it hides

The engine allocates its cache as ONE tensor [L, 2, N, block_size, H, D] (model_runner.py) and
hands out per-layer views; BlockCopier sees that the views are consecutive slices of one
allocation (`stacked_view`) and then copies the blocks of a whole chunk of layers in one op:

    CUDA   one copy_blocks Triton kernel (kernels/copy_blocks.py; torch's index_select /
           index_copy_ along dim 2 where triton is missing), a slice copy when the ids are one run
    CPU    a slice copy per run of consecutive ids over all layers (about twice as fast as
           index_select), one index_select when the ids are scattered; scatter always copies
           slices per run (CPU index_copy_ is slow)

Separate per-layer tensors (tests build some) take the same paths one layer at a time.

On CUDA the copies run on a side stream that first waits for the calling thread's current
stream; the calling thread then waits for an event recorded after them (not for the whole
stream or device, which other pulls may be using) before the bytes go to the network or the
pull returns. The copies run in worker threads (asyncio.to_thread), whose current stream is
the default stream: a worker that writes KV on another stream must synchronize it before it
grants the lease (the prefill worker does so anyway when it reads the sampled first token).
Backends that send from host memory (tcp) keep a pinned host mirror of the staging buffer.

Each copy adds its host time (and on CUDA its GPU time, from the same events) to the owner's
PullPhases (base.py), which bench.py breaks down per pull.
"""

from __future__ import annotations

import contextlib
import threading
import time

import torch

from pdserve.common.kv_transfer.base import KVLayout, PullPhases

# On CPU, more runs than this and one index_select per layer beats a slice copy per run.
# On CUDA every copy is a kernel launch: a single run is sliced, anything else indexed.
_MAX_SLICE_RUNS = 8
# Pipelining host-memory payloads: chunks of at least 4 MiB (smaller ones cost more in
# hand-offs than they hide), at most 8 of them.
_MIN_CHUNK_BYTES = 4 * 2**20
_MAX_CHUNKS = 8


def block_runs(block_ids: list[int]) -> list[tuple[int, int, int]]:
    """Splits ids into runs of consecutive ids: (position in list, first id, run length)."""
    runs: list[tuple[int, int, int]] = []
    for pos, block_id in enumerate(block_ids):
        if runs and runs[-1][1] + runs[-1][2] == block_id:
            start_pos, first_id, length = runs[-1]
            runs[-1] = (start_pos, first_id, length + 1)
        else:
            runs.append((pos, block_id, 1))
    return runs


class StagingBuffer:
    """A reusable byte buffer on the cache's device (plus a pinned host mirror when asked).

    One per transfer in flight (pipeline.StagingPool), so it is never shared. It grows to the
    largest pull seen and stays allocated for the next one: on GPU, UCX's cuda_ipc maps a peer's
    buffer once and keeps the mapping while the same buffer comes back.
    """

    def __init__(self, device: torch.device, host_mirror: bool):
        self.device = device
        self.host_mirror = host_mirror and device.type == "cuda"
        self._device_buffer = torch.empty(0, dtype=torch.uint8, device=device)
        self._host_buffer: torch.Tensor | None = None

    @property
    def payload_on_device(self) -> bool:
        """True when the payload is sent and received in GPU memory (no host mirror)."""
        return self.device.type == "cuda" and not self.host_mirror

    def device_bytes(self, nbytes: int) -> torch.Tensor:
        """A [nbytes] uint8 tensor on the cache's device."""
        if self._device_buffer.numel() < nbytes:
            self._device_buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return self._device_buffer[:nbytes]

    def host_bytes(self, nbytes: int) -> torch.Tensor:
        """A [nbytes] uint8 CPU tensor: the device buffer on CPU, the pinned mirror on CUDA."""
        if not self.host_mirror:
            return self.device_bytes(nbytes)
        if self._host_buffer is None or self._host_buffer.numel() < nbytes:
            self._host_buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return self._host_buffer[:nbytes]


def stacked_view(kv_caches: list[torch.Tensor]) -> torch.Tensor | None:
    """[L, 2, N, block_size, H, D] over the layer tensors when they are consecutive slices of one
    allocation (the engine's cache, or tensor.unbind(0)); None for separately allocated layers."""
    first = kv_caches[0]
    storage = first.untyped_storage().data_ptr()
    layer_bytes = first.numel() * first.element_size()
    for layer, kv in enumerate(kv_caches):
        if (kv.untyped_storage().data_ptr() != storage or not kv.is_contiguous()
                or kv.data_ptr() != first.data_ptr() + layer * layer_bytes):
            return None
    return first.as_strided((len(kv_caches), *first.shape), (first.numel(), *first.stride()),
                            first.storage_offset())


class BlockCopier:
    """Copies blocks of one worker's cache to and from staging buffers, a chunk of layers at a time.

    The client picks `num_chunks` for a pull and asks for it in the PullRequest; both ends split
    the layers with `layer_chunks(num_chunks)`, and since the staging layout is layer-major,
    each chunk is one contiguous byte range. `phases` receives the time of every copy.
    kernel: "triton" | "torch" picks the index copy (default: triton on CUDA where it imports,
    torch on CPU; "triton" on CPU runs under TRITON_INTERPRET=1, for tests).
    """

    def __init__(self, kv_caches: list[torch.Tensor], layout: KVLayout, phases: PullPhases,
                 kernel: str | None = None):
        # fp8 caches are copied as bytes (index_copy_ has no float8 kernel)
        self.kv_caches = [kv.view(torch.uint8) if kv.element_size() == 1 else kv for kv in kv_caches]
        self.layout = layout
        self.phases = phases
        self.device = kv_caches[0].device
        self.stacked = stacked_view(self.kv_caches)  # [L, 2, N, bs, H, D] or None
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if kernel is None:
            kernel = "triton" if self._stream is not None and _triton_available() else "torch"
        if kernel not in ("triton", "torch"):
            raise ValueError(f"kernel must be 'triton' or 'torch', got {kernel!r}")
        self.kernel = kernel
        # Slice copies per run of consecutive ids: always on CPU with torch (see the module doc).
        self._slices_on_host = self._stream is None and kernel == "torch"
        self._layer_bytes_per_block = layout.bytes_per_block // layout.num_layers
        self._lock = threading.Lock()  # copies of concurrent pulls add to phases from threads

    def nbytes(self, num_blocks: int) -> int:
        return num_blocks * self.layout.bytes_per_block

    def num_chunks(self, num_blocks: int, payload_on_device: bool) -> int:
        """How many layer chunks a pull of num_blocks is sent in (the client asks for it).

        One when the payload stays in GPU memory (StagingBuffer.payload_on_device); for host
        payloads, chunks of at least _MIN_CHUNK_BYTES, at most _MAX_CHUNKS (and at most one
        per layer).
        """
        if payload_on_device:
            return 1
        nbytes = max(1, self.nbytes(num_blocks))
        return max(1, min(_MAX_CHUNKS, self.layout.num_layers, nbytes // _MIN_CHUNK_BYTES))

    def layer_chunks(self, num_chunks: int) -> list[range]:
        """The layers split into num_chunks consecutive ranges of (nearly) equal length."""
        num_layers = self.layout.num_layers
        if not 1 <= num_chunks <= num_layers:
            raise ValueError(f"num_chunks must be in [1, {num_layers}], got {num_chunks}")
        bounds = [num_layers * i // num_chunks for i in range(num_chunks + 1)]
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]

    def gather(self, block_ids: list[int], staging: StagingBuffer, layers: range) -> torch.Tensor:
        """Copies the blocks of `layers` into the staging buffer; returns those bytes to send.

        Returns device bytes, or the host mirror's bytes when the staging buffer has one.
        """
        device_bytes = staging.device_bytes(self.nbytes(len(block_ids)))
        out = self._blocks_view(device_bytes, len(block_ids))  # [L, 2, n, bs, H, D]
        chunk = self._chunk_bytes(len(block_ids), layers)
        with self._copying():
            self._copy_out(block_ids, out, layers)
            result = device_bytes[chunk]
            if staging.host_mirror:
                host = staging.host_bytes(device_bytes.numel())[chunk]
                host.copy_(result, non_blocking=True)
                result = host
        return result

    def receive_view(self, num_blocks: int, staging: StagingBuffer, layers: range) -> torch.Tensor:
        """The staging bytes that the chunk `layers` of a pull must be received into."""
        nbytes = self.nbytes(num_blocks)
        buffer = staging.host_bytes(nbytes) if staging.host_mirror else staging.device_bytes(nbytes)
        return buffer[self._chunk_bytes(num_blocks, layers)]

    def scatter(self, block_ids: list[int], staging: StagingBuffer, layers: range) -> None:
        """Copies the received chunk `layers` from the staging buffer into block_ids."""
        nbytes = self.nbytes(len(block_ids))
        device_bytes = staging.device_bytes(nbytes)
        chunk = self._chunk_bytes(len(block_ids), layers)
        with self._copying():
            if staging.host_mirror:
                device_bytes[chunk].copy_(staging.host_bytes(nbytes)[chunk], non_blocking=True)
            self._copy_in(block_ids, self._blocks_view(device_bytes, len(block_ids)), layers)

    # ---- the copies: one op over all `layers` when the cache is stacked ----------------------
    def _layer_groups(self, out: torch.Tensor, layers: range) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cache, staging) pairs shaped [l, 2, *, bs, H, D]: one for a stacked cache, else per layer."""
        if self.stacked is not None:
            return [(self.stacked[layers.start:layers.stop], out[layers.start:layers.stop])]
        return [(self.kv_caches[layer][None], out[layer:layer + 1]) for layer in layers]

    def _copy_out(self, block_ids: list[int], out: torch.Tensor, layers: range) -> None:
        runs = block_runs(block_ids)
        groups = self._layer_groups(out, layers)
        if len(runs) == 1 or (self._slices_on_host and len(runs) <= _MAX_SLICE_RUNS):
            for cache, staged in groups:
                for pos, first_id, length in runs:
                    staged[:, :, pos:pos + length].copy_(cache[:, :, first_id:first_id + length])
            return
        index = self._index(block_ids)
        for cache, staged in groups:
            if self.kernel == "triton":
                from pdserve.kernels.copy_blocks import copy_blocks
                copy_blocks(_rows(cache), _rows(staged), index, None)
            else:
                torch.index_select(cache, 2, index, out=staged)

    def _copy_in(self, block_ids: list[int], src: torch.Tensor, layers: range) -> None:
        runs = block_runs(block_ids)
        groups = self._layer_groups(src, layers)
        # CPU index_copy_ runs at ~1 GB/s (torch 2.13), a slice copy per run at ~3.5 GB/s
        # even for single-block runs; on CUDA one kernel beats many launches.
        if len(runs) == 1 or self._slices_on_host:
            for cache, staged in groups:
                for pos, first_id, length in runs:
                    cache[:, :, first_id:first_id + length].copy_(staged[:, :, pos:pos + length])
            return
        index = self._index(block_ids)
        for cache, staged in groups:
            if self.kernel == "triton":
                from pdserve.kernels.copy_blocks import copy_blocks
                copy_blocks(_rows(staged), _rows(cache), None, index)
            else:
                cache.index_copy_(2, index, staged)

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        index = torch.tensor(block_ids, dtype=torch.long)
        if self._stream is None:
            return index
        # From pinned memory and non_blocking: a blocking (or pageable) copy may wait for the
        # side stream, i.e. for everything it was ordered after, before the kernels are queued.
        return index.pin_memory().to(self.device, non_blocking=True)

    def _chunk_bytes(self, num_blocks: int, layers: range) -> slice:
        layer_nbytes = num_blocks * self._layer_bytes_per_block
        return slice(layers.start * layer_nbytes, layers.stop * layer_nbytes)

    def _blocks_view(self, raw: torch.Tensor, num_blocks: int) -> torch.Tensor:
        layout = self.layout
        dtype = torch.uint8 if layout.itemsize == 1 else layout.torch_dtype
        return raw.view(dtype).view(layout.num_layers, 2, num_blocks,
                                                  *layout.block_shape)

    @contextlib.contextmanager
    def _copying(self):
        """Runs the with-block's copies (on the side stream on CUDA) and waits until they are done.

        On success adds their host time, and on CUDA their GPU time, to self.phases.
        """
        start = time.perf_counter()
        gpu_s = 0.0
        if self._stream is None:
            yield
        else:
            # Order after everything queued on this thread's current stream (see the module doc).
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            begin = torch.cuda.Event(enable_timing=True)
            done = torch.cuda.Event(enable_timing=True)
            try:
                with torch.cuda.stream(self._stream):
                    begin.record()
                    yield
            finally:
                # Also after a failure: no copy may still run once the staging buffer is let go.
                done.record(self._stream)
                done.synchronize()
            gpu_s = begin.elapsed_time(done) / 1e3
        with self._lock:
            self.phases.copy_s += time.perf_counter() - start
            self.phases.copy_gpu_s += gpu_s


def _rows(blocks: torch.Tensor) -> torch.Tensor:
    """[l, 2, N, bs, H, D] -> [l * 2, N, bs * H * D] (a view: rows and blocks keep their strides)."""
    l, kv, n = blocks.shape[:3]
    return blocks.view(l * kv, n, -1)


def _triton_available() -> bool:
    from pdserve.kernels import triton_available
    return triton_available()
