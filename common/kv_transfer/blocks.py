"""Gathering blocks into one staging buffer and scattering them back out.

Every backend moves a pull as ONE contiguous message. The staging buffer holds the requested
blocks of all layers, K before V, in request order:

    staging (uint8, viewed as the cache dtype)
    [ layer 0: K blk0..blk(n-1) | V blk0..blk(n-1) ][ layer 1: K ... | V ... ] ... [ layer L-1 ]
      = [L, 2, n, block_size, num_kv_heads, head_dim]

Gather copies runs of consecutive block ids as slices (about twice as fast as index_select on
CPU) and falls back to one index_select per layer when the ids are scattered. Scatter mirrors
it with slice copies or index_copy_.

On CUDA the copies run on a side stream that first waits for the worker's current stream, so
the KV that the model wrote is complete; the side stream is synchronized before the bytes are
handed to the network or the pull returns. Backends that send from host memory (tcp) keep a
pinned host mirror of the staging buffer.

The copies release the GIL, so callers run them with asyncio.to_thread to keep the event loop
free while hundreds of megabytes move.
"""

from __future__ import annotations

import contextlib

import torch

from pdserve.common.kv_transfer.base import KVLayout

# More runs than this and one index_select per layer beats a slice copy per run.
_MAX_SLICE_RUNS = 8


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

    One per connection: a connection serves one pull at a time, so its buffer is never shared.
    It grows to the largest pull seen and stays allocated for the next one.
    """

    def __init__(self, device: torch.device, host_mirror: bool):
        self.device = device
        self.host_mirror = host_mirror and device.type == "cuda"
        self._device_buffer = torch.empty(0, dtype=torch.uint8, device=device)
        self._host_buffer: torch.Tensor | None = None

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


class BlockCopier:
    """Copies blocks of one worker's cache to and from staging buffers."""

    def __init__(self, kv_caches: list[torch.Tensor], layout: KVLayout):
        self.kv_caches = kv_caches
        self.layout = layout
        self.device = kv_caches[0].device
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def nbytes(self, num_blocks: int) -> int:
        return num_blocks * self.layout.bytes_per_block

    def gather(self, block_ids: list[int], staging: StagingBuffer) -> torch.Tensor:
        """Copies the blocks into the staging buffer; returns the bytes to send.

        Returns the device bytes, or the host mirror's when the staging buffer has one.
        """
        nbytes = self.nbytes(len(block_ids))
        device_bytes = staging.device_bytes(nbytes)
        out = self._blocks_view(device_bytes, len(block_ids))  # [L, 2, n, bs, H, D]
        with self._side_stream():
            runs = block_runs(block_ids)
            if len(runs) <= _MAX_SLICE_RUNS:
                for kv, out_layer in zip(self.kv_caches, out):
                    for pos, first_id, length in runs:
                        out_layer[:, pos:pos + length].copy_(kv[:, first_id:first_id + length])
            else:
                index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
                for kv, out_layer in zip(self.kv_caches, out):
                    torch.index_select(kv, 1, index, out=out_layer)
            result = device_bytes
            if staging.host_mirror:
                result = staging.host_bytes(nbytes)
                result.copy_(device_bytes, non_blocking=True)
        self._synchronize()
        return result

    def receive_buffer(self, num_blocks: int, staging: StagingBuffer) -> torch.Tensor:
        """The bytes a transport should receive a pull of num_blocks into (see gather)."""
        nbytes = self.nbytes(num_blocks)
        return staging.host_bytes(nbytes) if staging.host_mirror else staging.device_bytes(nbytes)

    def scatter(self, block_ids: list[int], staging: StagingBuffer) -> None:
        """Copies the received blocks from the staging buffer into block_ids of the cache."""
        nbytes = self.nbytes(len(block_ids))
        device_bytes = staging.device_bytes(nbytes)
        with self._side_stream():
            if staging.host_mirror:
                device_bytes.copy_(staging.host_bytes(nbytes), non_blocking=True)
            src = self._blocks_view(device_bytes, len(block_ids))  # [L, 2, n, bs, H, D]
            runs = block_runs(block_ids)
            if len(runs) <= _MAX_SLICE_RUNS:
                for kv, src_layer in zip(self.kv_caches, src):
                    for pos, first_id, length in runs:
                        kv[:, first_id:first_id + length].copy_(src_layer[:, pos:pos + length])
            else:
                index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
                for kv, src_layer in zip(self.kv_caches, src):
                    kv.index_copy_(1, index, src_layer)
        self._synchronize()

    def _blocks_view(self, raw: torch.Tensor, num_blocks: int) -> torch.Tensor:
        layout = self.layout
        return raw.view(layout.torch_dtype).view(layout.num_layers, 2, num_blocks,
                                                  *layout.block_shape)

    def _side_stream(self):
        if self._stream is None:
            return contextlib.nullcontext()
        # Order after everything the worker queued on its stream (the model's KV writes).
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._stream)

    def _synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
