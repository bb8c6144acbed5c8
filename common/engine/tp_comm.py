"""TPComm: one rank's handle on the tensor-parallel group (torch.distributed; NCCL on CUDA, gloo on CPU).

Every rank makes the same calls in the same order (the model's all-reduces and logits gather,
the runner's token broadcast and KV sizing), so the collectives pair up without tags:

    model forward      all_reduce(x)            after each Attention and MLP, and the embedding
    compute_logits     gather_to_first(logits)  rank 0 gets [N, vocab], the others None
    runner, sampling   broadcast_from_first(t)  rank 0's sampled tokens -> every rank (their
                                                next step's inputs fill from them on the device)
    runner, start-up   all_gather_int(n)        KV blocks each rank could hold -> the min is used

The group is torch.distributed's default one, joined through a TCPStore that rank 0 hosts: one
tensor-parallel engine per process at a time (`close` ends it, and a new engine may start another).
"""

from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

log = logging.getLogger("pdserve.tp")


class TPComm:
    def __init__(self, rank: int, world_size: int, store: dist.Store, device: torch.device, timeout_s: float):
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed group already exists in this process: one tensor-parallel "
                               "engine per process")
        self.rank, self.world_size, self.device = rank, world_size, device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.set_device(device)
        self.backend = "nccl" if cuda else "gloo"
        dist.init_process_group(self.backend, store=store, rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., n] of every rank -> [..., world_size * n] on rank 0 (rank order); None elsewhere."""
        if self.rank != 0:
            dist.gather(x, None, dst=0)
            return None
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1)

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        dist.broadcast(x, src=0)
        return x

    def all_gather_int(self, value: int) -> list[int]:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return [int(p.item()) for p in parts]

    def abort(self) -> None:
        """From another thread, when a peer died: NCCL ops waiting for it end (with garbage) instead
        of spinning on the device forever. gloo needs nothing: its ops fail when the peer's socket closes."""
        if self.backend == "nccl" and dist.is_initialized():
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception as e:
                log.warning("aborting the NCCL group failed: %s", e)

    def close(self) -> None:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:  # a peer already gone: nothing left to tear down cleanly
                log.warning("tensor-parallel group teardown: %s", e)
