"""KV transfer between a server and a client in the same process (`serve` mode, tests).

    LocalKVServer.start() -> registers itself under "local://<n>" in a module-level registry
    LocalKVClient.pull("local://<n>", ...)
        registry lookup -> layout check -> server.resolve_lease
        per layer: dst[:, dst_block_ids] = src[:, src_block_ids]   (index_select / index_copy_)

No bytes are serialized: blocks are copied tensor to tensor (across devices if the two caches
live on different ones). The lease, layout and length checks and the counters are the same as
for the network backends, so code written against `local` behaves the same on `tcp`/`ucx`.
"""

from __future__ import annotations

import itertools
import time

import torch

from pdserve.common.kv_transfer.base import KVClient, KVServer, KVTransferError

_SERVERS: dict[str, "LocalKVServer"] = {}
_SERVER_IDS = itertools.count(1)


class LocalKVServer(KVServer):
    """Makes its cache reachable to LocalKVClients of this process. host/port are unused."""

    scheme = "local"

    async def start(self) -> str:
        if self.address is not None:
            raise RuntimeError(f"LocalKVServer already serving at {self.address}")
        self.address = f"local://{next(_SERVER_IDS)}"
        _SERVERS[self.address] = self
        return self.address

    async def close(self) -> None:
        if self.address is not None:
            _SERVERS.pop(self.address, None)


class LocalKVClient(KVClient):
    """Copies leased blocks straight out of a LocalKVServer's cache."""

    scheme = "local"

    async def _pull(self, address, lease_id, dst_block_ids, src_block_offset, deadline) -> int:
        if not address.startswith("local://"):
            raise ValueError(f"address {address!r} is not a local KV address (local://<n>)")
        server = _SERVERS.get(address)
        if server is None:
            raise KVTransferError(f"no local KV server at {address}: closed or never started")
        self.layout.check_peer(server.layout, f"local KV server {address}")
        start = time.perf_counter()
        try:
            src_block_ids = server.src_block_ids_for(lease_id, src_block_offset,
                                                     len(dst_block_ids))
        except (KVTransferError, ValueError) as e:
            server.num_failures += 1
            raise KVTransferError(f"local KV server {address}: {e}") from e
        if dst_block_ids:
            self._copy(server.kv_caches, src_block_ids, dst_block_ids)
        nbytes = len(dst_block_ids) * self.layout.bytes_per_block
        server.record(nbytes, time.perf_counter() - start)
        return nbytes

    def _copy(self, src_caches: list[torch.Tensor], src_block_ids: list[int],
              dst_block_ids: list[int]) -> None:
        src_device = src_caches[0].device
        dst_device = self.kv_caches[0].device
        src_index = torch.tensor(src_block_ids, dtype=torch.long, device=src_device)
        dst_index = torch.tensor(dst_block_ids, dtype=torch.long, device=dst_device)
        for src, dst in zip(src_caches, self.kv_caches):
            blocks = src.index_select(1, src_index).to(dst_device)  # [2, n, bs, H, D]
            dst.index_copy_(1, dst_index, blocks)
        for device in {src_device, dst_device}:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    async def close(self) -> None:
        return None


SERVER = LocalKVServer
CLIENT = LocalKVClient
