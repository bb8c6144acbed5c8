"""KV transfer between a server and a client in the same process (`serve` mode, tests).

    LocalKVServer.start() -> registers itself under "local://<n>" in a module-level registry
    LocalKVClient.pull("local://<n>", ...)
        registry lookup -> layout check -> server.resolve_lease
        server's copier gathers src_block_ids -> staging -> client's copier scatters dst_block_ids

No bytes are serialized: the blocks go through one staging tensor with the same copy kernels as
the network backends (blocks.py), plus one device-to-device copy if the caches live on
different devices. The lease, layout and length checks and the counters are the same as
for the network backends, so code written against `local` behaves the same on `tcp`/`ucx`.
"""

from __future__ import annotations

import itertools
import time

from pdserve.common.kv_transfer.base import KVClient, KVServer, KVTransferError
from pdserve.common.kv_transfer.blocks import BlockCopier, StagingBuffer

_SERVERS: dict[str, "LocalKVServer"] = {}
_SERVER_IDS = itertools.count(1)


class LocalKVServer(KVServer):
    """Makes its cache reachable to LocalKVClients of this process. host/port are unused."""

    scheme = "local"

    def __init__(self, kv_caches, resolve_lease, host: str = "127.0.0.1", port: int = 0,
                 kv_heads=None):
        super().__init__(kv_caches, resolve_lease, host, port, kv_heads)
        self.copier = BlockCopier(kv_caches, self.layout, self.phases)

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

    def __init__(self, kv_caches, kv_heads=None):
        super().__init__(kv_caches, kv_heads)
        self._copier = BlockCopier(kv_caches, self.layout, self.phases)

    async def _pull(self, address, lease_id, dst_block_ids, src_block_offset, deadline,
                    copier) -> int:
        if not address.startswith("local://"):
            raise ValueError(f"address {address!r} is not a local KV address (local://<n>)")
        server = _SERVERS.get(address)
        if server is None:
            raise KVTransferError(f"no local KV server at {address}: closed or never started")
        copier.layout.check_peer(server.layout, f"local KV server {address}")
        start = time.perf_counter()
        try:
            src_block_ids = await server.src_block_ids_for(lease_id, src_block_offset,
                                                           len(dst_block_ids))
        except (KVTransferError, ValueError) as e:
            server.num_failures += 1
            raise KVTransferError(f"local KV server {address}: {e}") from e
        if dst_block_ids:
            self._copy(server.copier, copier, src_block_ids, dst_block_ids)
        nbytes = len(dst_block_ids) * copier.layout.bytes_per_block
        server.record(nbytes, time.perf_counter() - start)
        return nbytes

    def _copy(self, src_copier: BlockCopier, dst_copier: BlockCopier, src_block_ids: list[int],
              dst_block_ids: list[int]) -> None:
        layers = range(self.layout.num_layers)
        staging = StagingBuffer(dst_copier.device, host_mirror=False)
        if src_copier.device == dst_copier.device:
            src_copier.gather(src_block_ids, staging, layers)
        else:
            src_staging = StagingBuffer(src_copier.device, host_mirror=False)
            payload = src_copier.gather(src_block_ids, src_staging, layers)
            staging.device_bytes(payload.numel()).copy_(payload)
        dst_copier.scatter(dst_block_ids, staging, layers)

    async def close(self) -> None:
        return None


SERVER = LocalKVServer
CLIENT = LocalKVClient
