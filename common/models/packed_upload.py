"""PackedUpload: several small int32 host arrays sent to the device in one copy per step.

    pinned host int32:  | array 0 | array 1 | ... |   each segment starts 16-byte aligned
                              | one non_blocking copy
    device int32:       the same layout; the returned tensors are views of it

Torch only (no Triton), so the CPU path and the CUDA path share it.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 4  # int32 elements per 16 bytes
_STREAMS: dict[tuple[int, int, int], "torch.cuda.Stream"] = {}  # (stream id, device index, device type) -> Stream


def record_on_current_stream(event: "torch.cuda.Event", device_index: int) -> None:
    """event.record() on the calling thread's current stream of the device, as Event.record()
    does, without building a Stream object through torch.cuda.current_stream's Python on every
    call (~5 % of tensor-parallel rank 0's engine thread in a py-spy of batch-1 decode, once per
    step for each upload and readback)."""
    key = torch._C._cuda_getCurrentStream(device_index)
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = torch.cuda.Stream(stream_id=key[0], device_index=key[1], device_type=key[2])
    event.record(stream)


class PackedUpload:
    """Pinned int32 host buffers and their device twin: several int arrays, one copy.

    The host buffers are a ring of DEPTH, each reused every DEPTH uploads: before writing one the
    host waits for the event recorded after that buffer's last copy (a step that samples nothing
    never syncs the stream otherwise). So the host may queue up to DEPTH steps ahead of the
    device (a draft model's rounds and the verify step behind them, spec_decode/decoder.py)
    instead of one. One device buffer: copies and the kernels reading it run in stream order."""

    DEPTH = 4

    def __init__(self, device: torch.device, size: int = 1 << 16):
        self.device = device
        self._cuda = device.type == "cuda"
        depth = self.DEPTH if self._cuda else 1  # (the CPU copies synchronously)
        self._hosts = [torch.empty(0, dtype=torch.int32) for _ in range(depth)]
        self._host_np = [h.numpy() for h in self._hosts]  # numpy views of the ring, made once
        self._dev = torch.empty(0, dtype=torch.int32, device=device)
        self._copied = [torch.cuda.Event() for _ in range(depth)] if self._cuda else None
        self._slot = 0
        self._index = (device.index if device.index is not None else torch.cuda.current_device()) if self._cuda else None
        self._reserve(size)

    def _reserve(self, size: int) -> None:
        if len(self._hosts[0]) >= size:
            return
        if self._cuda:
            for event in self._copied:
                event.synchronize()
        size = max(size, 2 * len(self._hosts[0]))
        self._hosts = [torch.empty(size, dtype=torch.int32, pin_memory=self._cuda) for _ in self._hosts]
        self._host_np = [h.numpy() for h in self._hosts]
        self._dev = torch.empty(size, dtype=torch.int32, device=self.device)

    def upload(self, arrays: list[np.ndarray], views: bool = True) -> list[torch.Tensor] | None:
        """Device views of `arrays` (flattened), each starting 16-byte aligned; `views=False`: none
        (a caller that keeps the views of an earlier upload of the same layout, as the CUDA graphs'
        static inputs do, saves making them: ~10 us a step, a py-spy of batch-1 decode on an H200
        had this method at 8-11 % of the engine's step)."""
        offsets, end = [], 0
        for a in arrays:
            offsets.append(end)
            end += -(-a.size // _ALIGN) * _ALIGN
        self._reserve(end)
        slot = self._slot = (self._slot + 1) % len(self._hosts)
        if self._cuda:
            self._copied[slot].synchronize()
        pinned, host = self._hosts[slot], self._host_np[slot]
        for a, o in zip(arrays, offsets):
            host[o:o + a.size] = a.reshape(-1)
        self._dev[:end].copy_(pinned[:end], non_blocking=True)
        if self._cuda:
            record_on_current_stream(self._copied[slot], self._index)
        if not views:
            return None
        return [self._dev[o:o + a.size] for a, o in zip(arrays, offsets)]
