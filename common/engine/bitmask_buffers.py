"""Host buffers of the steps' token bitmasks, reused without a per-step allocation.

    acquire(B) -> host [B, W] int32, all bits set      the manager fills it (xgrammar, numpy)
    to_device(host) -> [B, W] on the device            one non_blocking copy; the sampler applies it

CPU: one buffer, reused every step (the sampler applies a step's mask before the next step is
filled). CUDA: a ring of pinned buffers. A buffer's copy to the device is queued behind the
forward pass, so the host must not overwrite it before that copy has run: each slot keeps the
event recorded behind its copy, and `acquire` waits on it (at most NUM_SLOTS - 1 steps are in
flight when a slot comes round again: with overlapped steps the engine has already waited for
two steps back, so the wait returns at once; the event makes that an invariant, not an
assumption about the engine's loop).

    slot:      0        1        2        3        0 ...
    step:      k        k+1      k+2      k+3      k+4 (waits for step k's copy: long done)
"""

from __future__ import annotations

import torch

NUM_SLOTS = 4  # steps whose masks may be in flight at once (overlapped steps keep two)
MIN_ROWS = 64  # first allocation; a slot grows to the next power of two above a larger batch


class BitmaskBuffers:
    def __init__(self, num_words: int, device: torch.device):
        self.num_words = num_words  # W = ceil(vocab / 32)
        self.device = device
        self._pinned = device.type == "cuda"
        num_slots = NUM_SLOTS if self._pinned else 1
        self._slots: list[torch.Tensor | None] = [None] * num_slots  # [rows, W] int32 each
        self._events: list[torch.cuda.Event | None] = [None] * num_slots
        self._next = 0
        self._current: int | None = None  # the slot handed out by the last acquire
        self.num_allocations = 0  # host buffers ever allocated (tests: no allocation per step)

    def acquire(self, num_rows: int) -> torch.Tensor:
        """The next free host buffer as [num_rows, W] int32 with every bit set."""
        slot = self._next
        self._next = (slot + 1) % len(self._slots)
        event = self._events[slot]
        if event is not None:
            event.synchronize()  # its last copy to the device has run (normally long ago)
            self._events[slot] = None
        buf = self._slots[slot]
        if buf is None or buf.shape[0] < num_rows:
            rows = max(MIN_ROWS, 1 << (num_rows - 1).bit_length())
            buf = self._slots[slot] = torch.empty((rows, self.num_words), dtype=torch.int32, pin_memory=self._pinned)
            self.num_allocations += 1
        self._current = slot
        view = buf[:num_rows]
        view.numpy().fill(-1)  # numpy: torch's fill_ of 1 MB took 1-2 ms (its thread pool), numpy's 25 us
        return view

    def to_device(self, host: torch.Tensor) -> torch.Tensor:
        """The last acquired buffer on the device: a non_blocking copy from pinned memory on
        CUDA, whose event guards the slot's next reuse; the host tensor itself on the CPU."""
        if not self._pinned:
            return host
        out = host.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[self._current] = event
        return out
