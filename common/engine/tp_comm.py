"""TPComm: one rank's handle on the tensor-parallel group (torch.distributed; NCCL on CUDA, gloo on CPU).

Every rank makes the same calls in the same order (the model's all-reduces and logits gather,
the runner's token broadcast and KV sizing), so the collectives pair up without tags:

    model forward      all_reduce(x)            after each Attention and MLP, and the embedding
    compute_logits     gather_to_first(logits)  rank 0 gets [N, vocab], the others None
    runner, sampling   broadcast_from_first(t)  rank 0's sampled tokens -> every rank (their
                                                next step's inputs fill from them on the device)
    greedy tail        all_gather_stacked(x)    each rank's (max, vocab id) per row -> every rank
                                                (engine/greedy_tail.py; also inside CUDA graphs)
    runner, start-up   all_gather_int(n)        KV blocks each rank could hold -> the min is used

All-reduce on CUDA is NCCL's, or with `all_reduce="symm_mem"` torch's one-shot kernel for tensors
up to SYMM_MEM_MAX_BYTES (decode batches): each rank copies its part into a peer-mapped buffer,
and after a barrier reads and sums every rank's (one kernel, CUDA-graph safe, a barrier at its end
before the buffer is reused); larger tensors and fp16 go to NCCL.

The layers' all-reduces are followed by the residual add and RMSNorm (models/parallel.py calls
`all_reduce_add_rms_norm`); with `all_reduce="fused"` (what "auto", the default, picks on CUDA
when every rank can map the others' memory) that is one kernel over NVLink peer memory for up to
FUSED_REGION_BYTES per rank (kernels/allreduce_norm.py, `FusedAllReduceNorm`), and NCCL's
all-reduce plus the norm kernel above it. On 2 x H200 at batch 1: 5.0 us per call vs 9.1 for
NCCL + norm (docs/benchmarks.md).

The group is torch.distributed's default one, joined through a TCPStore that rank 0 hosts: one
tensor-parallel engine per process at a time (`close` ends it, and a new engine may start another).
"""

from __future__ import annotations

import datetime
import logging
import threading

import torch
import torch.distributed as dist

from pdserve.common.config import ConfigError

log = logging.getLogger("pdserve.tp")

SYMM_MEM_MAX_BYTES = 1 << 20  # torch's one-shot all-reduce (all_reduce="symm_mem") up to this size
CLOSE_TIMEOUT_S = 10.0  # NCCL teardown at shutdown, at most
FUSED_REGION_BYTES = 2 << 20  # per rank's slot of a region (two alternate): 256 rows of hidden 4096 in bf16
# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; the GPU image has 2.11
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


_peer_memory_groups = 0  # groups of this process that mapped peer memory (symm_mem rendezvous)


def peer_memory_used() -> bool:
    """A tensor-parallel group of this process has mapped peer memory before. torch's symmetric
    memory rendezvous does not pair up again in a later group of the same process (seen on 2 x
    H200: the second engine's rendezvous waited forever while the fresh worker's ran), so a
    later engine here must take NCCL's all-reduce (TPWorkers decides it for every rank)."""
    return _peer_memory_groups > 0


class TPComm:
    def __init__(self, rank: int, world_size: int, store: dist.Store, device: torch.device, timeout_s: float,
                 all_reduce: str = "auto"):
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed group already exists in this process: one tensor-parallel "
                               "engine per process")
        self.rank, self.world_size, self.device = rank, world_size, device
        cuda = device.type == "cuda"
        if all_reduce in ("symm_mem", "fused") and not cuda:
            raise ConfigError(f"the {all_reduce} all-reduce needs CUDA devices")
        if cuda:
            torch.cuda.set_device(device)
        self.backend = "nccl" if cuda else "gloo"
        auto = all_reduce == "auto"
        if auto:
            all_reduce = "fused" if cuda else "nccl"
        dist.init_process_group(self.backend, store=store, rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if cuda else None)
        self._symm_buffer = None  # uint8 [SYMM_MEM_MAX_BYTES], mapped on every rank
        self._fused: FusedAllReduceNorm | None = None
        if all_reduce in ("symm_mem", "fused"):
            global _peer_memory_groups
            _peer_memory_groups += 1
            try:
                import torch.distributed._symmetric_memory as symm_mem
                self._group_name = dist.group.WORLD.group_name
                if all_reduce == "symm_mem":
                    self._symm_buffer = symm_mem.empty(SYMM_MEM_MAX_BYTES, dtype=torch.uint8, device=device)
                    symm_mem.rendezvous(self._symm_buffer, self._group_name)  # collective, once
                else:
                    self._fused = FusedAllReduceNorm(rank, self._group_name, device)
            except Exception as e:
                if not auto:
                    self.close()  # the group would outlive this object and block the next engine
                    raise
                log.warning("tensor parallelism: peer memory unavailable (%s: %s); the all-reduce is NCCL's",
                            type(e).__name__, e)
            except BaseException:
                self.close()
                raise
            if auto and min(self.all_gather_int(int(self._fused is not None))) == 0:
                self._fused = None  # one rank could not map the others: all use NCCL
        if rank == 0 and world_size > 1:
            log.info("tensor parallelism: %d ranks, all-reduce %s", world_size, "fused" if self._fused is not None
                     else "symm_mem" if self._symm_buffer is not None else self.backend)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; returns the result (x itself with NCCL, a new tensor with symm_mem)."""
        if (self._symm_buffer is not None and x.dtype in (torch.bfloat16, torch.float32)
                and x.numel() * x.element_size() <= SYMM_MEM_MAX_BYTES and x.is_contiguous()):
            peer_view = self._symm_buffer.view(x.dtype)[:x.numel()].view(x.shape)
            return torch.ops.symm_mem.one_shot_all_reduce_copy(peer_view, x, "sum", self._group_name)
        dist.all_reduce(x)
        return x

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                                region: int, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """ops.rms_norm(all_reduce(x), weight, eps, residual) -> (out, new residual). `region` (0 or 1)
        must alternate from call to call on every rank (the model's norms fix it: module doc of
        kernels/allreduce_norm.py)."""
        if self._fused is not None and self._fused.fits(x, residual):
            return self._fused(x, residual, weight, eps, region)
        return ops.rms_norm(self.all_reduce(x), weight, eps, residual)

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

    def all_gather_stacked(self, x: torch.Tensor) -> torch.Tensor:
        """x [...] of every rank -> [world_size, ...] on every rank (rank order); no host sync,
        graph-safe with NCCL."""
        out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x.contiguous())  # (gloo wants the ranks along dim 0)
        return out.view(self.world_size, *x.shape)

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max over ranks, in place (start-up values: fp8 KV scales)."""
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
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

    def close(self, peers_alive: bool = False) -> None:
        """End the group. `peers_alive`: every rank is closing it now (an orderly shutdown), so NCCL's
        teardown can meet its peers; otherwise (a peer died, or this rank leaves alone) abort: a
        destroy would wait for the missing peers. Either gets CLOSE_TIMEOUT_S in a daemon thread
        (an abort was seen blocking for good on 2 x H200 once the peers had exited), then the
        shutdown goes on and the group is left to the process's exit."""
        if self.backend == "nccl":
            end = dist.destroy_process_group if peers_alive else self.abort
            closer = threading.Thread(target=self._quietly, args=(end,), name="tp-nccl-close", daemon=True)
            closer.start()
            closer.join(CLOSE_TIMEOUT_S)
            if closer.is_alive():
                log.warning("tensor parallelism: the NCCL group's %s did not return within %.0f s; "
                            "shutting down without it", "teardown" if peers_alive else "abort", CLOSE_TIMEOUT_S)
            return
        if dist.is_initialized():
            self._quietly(dist.destroy_process_group)

    @staticmethod
    def _quietly(end) -> None:
        try:
            end()
        except Exception as e:  # a peer already gone: nothing left to tear down cleanly
            log.warning("tensor-parallel group teardown: %s", e)


class FusedAllReduceNorm:
    """A symmetric buffer of two regions of W slots of FUSED_REGION_BYTES, its signal pad and (push
    mode, the default) this rank's call counters, mapped on every rank, for kernels/allreduce_norm.py.
    Rendezvous is collective: every rank builds one, in order, with the same mode."""

    def __init__(self, rank: int, group_name: str, device: torch.device, push: bool = True):
        import torch.distributed._symmetric_memory as symm_mem

        from pdserve.kernels.allreduce_norm import SIGNAL_SLOTS

        self.rank = rank
        world = dist.get_world_size()
        self.buffer = symm_mem.empty(2 * world * FUSED_REGION_BYTES, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(self.buffer, group_name)
        self.buffer_addrs = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
        self.pad_addrs = torch.tensor(list(handle.signal_pad_ptrs), dtype=torch.int64, device=device)
        self.epochs = torch.zeros(SIGNAL_SLOTS // world, dtype=torch.int32, device=device) if push else None
        self._handle = handle  # keeps the peers' mappings alive

    def fits(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return (x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
                and x.numel() * x.element_size() <= FUSED_REGION_BYTES and x.stride(1) == 1
                and residual.stride(1) == 1)

    def __call__(self, x, residual, weight, eps, region):
        from pdserve.kernels.allreduce_norm import allreduce_add_rms_norm

        return allreduce_add_rms_norm(x, residual, weight, eps, self.buffer, self.buffer_addrs, self.pad_addrs,
                                      region, FUSED_REGION_BYTES, self.rank, self.epochs)
