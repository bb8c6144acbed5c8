"""Shared helpers of the KV transfer tests: deterministic caches and a server in another process.

`ServerProcess` starts a KV server in a spawned process (so tcp/ucx cross a real process
boundary), with caches generated from a seed so the test can rebuild the expected bytes:

    parent (test, KVClient)                     child (spawn, KVServer)
      ServerProcess(...).__enter__  -- args -->  make caches(seed), make_server, start()
                                   <-- address   serve until the "close" command or a kill
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import time

import torch

from pdserve.common.kv_transfer.base import make_server

# A lease whose resolution blocks the server's event loop: the server looks hung.
STALL_LEASE = "stall"
STALL_SECONDS = 5.0
# ipc: a lease of LEASES["lease"] whose first resolution answers at once and every later one
# (the check after the client's copy) stalls like STALL_LEASE.
STALL_AFTER_COPY_LEASE = "stall-after-copy"


def make_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                head_dim: int, dtype: torch.dtype, seed: int, device: str = "cpu",
                stacked: bool = True) -> list[torch.Tensor]:
    """Random caches, one [2, num_blocks, block_size, H, D] tensor per layer, from a seed.

    stacked: the layers are views of one [L, 2, ...] tensor, as the engine allocates them (the
    transports then copy all layers in one op); else separate tensors (one op per layer).
    """
    generator = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    layers = [torch.randn(shape, generator=generator).to(dtype).to(device)
              for _ in range(num_layers)]
    layers = list(torch.stack(layers).unbind(0)) if stacked else layers
    if dtype == torch.float8_e4m3fn:  # fp8 caches carry [2, H] scales per layer (equal on every worker)
        for layer, kv in enumerate(layers):
            kv.kv_scale = torch.arange(2 * num_kv_heads, dtype=torch.float32).view(2, -1) / 8 + layer + 1
    return layers


def shareable(caches):
    """The same caches (values, stacking, fp8 scales) in memfd memory that the ipc backend's peers
    can map (host_shm.py): a stacked cache stays one tensor, separate layers stay separate.
    CUDA caches are returned as they are (the ipc server shares them through CUDA IPC)."""
    from pdserve.common.kv_transfer.blocks import stacked_view
    from pdserve.common.kv_transfer.host_shm import shared_zeros

    def moved(tensor):
        out = shared_zeros(tuple(tensor.shape), tensor.dtype)
        out.view(torch.uint8).copy_(tensor.view(torch.uint8))
        if hasattr(tensor, "kv_scale"):
            out.kv_scale = tensor.kv_scale
        return out
    if isinstance(caches, torch.Tensor):
        return caches if caches.is_cuda else moved(caches)
    if caches[0].is_cuda:
        return caches
    stacked = stacked_view(list(caches))
    if stacked is None:
        return [moved(t) for t in caches]
    layers = list(moved(stacked.contiguous()).unbind(0))
    for layer, original in zip(layers, caches):
        if hasattr(original, "kv_scale"):
            layer.kv_scale = original.kv_scale
    return layers


def lease_table(leases: dict[str, list[int]]):
    """A resolve_lease over a fixed table, plus the stalling lease."""
    resolved = set()

    def resolve_lease(lease_id: str) -> list[int] | None:
        if lease_id == STALL_AFTER_COPY_LEASE and lease_id not in resolved:
            resolved.add(lease_id)
            return leases["lease"]
        if lease_id in (STALL_LEASE, STALL_AFTER_COPY_LEASE):
            time.sleep(STALL_SECONDS)
            return None
        return leases.get(lease_id)
    return resolve_lease


def _serve(backend: str, cache_args: dict, leases: dict, addresses, commands,
           gather_delay_s: float | None) -> None:
    async def main():
        caches = make_caches(**cache_args)
        server = make_server(backend, shareable(caches) if backend == "ipc" else caches,
                             lease_table(leases))
        if gather_delay_s is not None:
            _delay_gathers(server, gather_delay_s)
        addresses.put(await server.start())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, commands.get)  # "close"
        await server.close()
    asyncio.run(main())


def _delay_gathers(server, delay_s: float) -> None:
    """Makes each gather of the server take delay_s longer. The server sends its PullReply
    while the first gather runs, so the client then waits for the payload: a test can kill
    the server mid-pull, after the reply and before the payload."""
    copier = server._copier
    gather = copier.gather

    def slow_gather(*args, **kwargs):
        time.sleep(delay_s)
        return gather(*args, **kwargs)
    copier.gather = slow_gather


class ServerProcess:
    """A KV server in a spawned process; `address` once entered; close() or kill() it.

    gather_delay_s: each gather of the server takes that much longer (see _delay_gathers).
    """

    def __init__(self, backend: str, cache_args: dict, leases: dict[str, list[int]],
                 gather_delay_s: float | None = None):
        context = multiprocessing.get_context("spawn")
        self._addresses = context.Queue()
        self._commands = context.Queue()
        self.process = context.Process(
            target=_serve, args=(backend, cache_args, leases, self._addresses, self._commands,
                                 gather_delay_s),
            daemon=True)
        self.address: str | None = None

    def __enter__(self) -> ServerProcess:
        self.process.start()
        try:
            self.address = self._addresses.get(timeout=30)
        except queue.Empty:
            self.process.kill()
            raise RuntimeError("KV server process did not start within 30 s") from None
        return self

    def close(self) -> None:
        """Asks the server to close and waits for the process to exit."""
        self._commands.put("close")
        self.process.join(timeout=10)
        if self.process.exitcode != 0:
            raise RuntimeError(f"KV server process exited with {self.process.exitcode}")

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=10)

    def __exit__(self, *exc) -> None:
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
