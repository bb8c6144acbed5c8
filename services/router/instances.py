"""InstancePool: the router's view of live prefill/decode instances, refreshed from Redis.

Every `refresh_s` the pool reads the registry (instances + live load). If Redis is down, the last
known list is kept (logged once) so serving continues; an instance whose RPC failed is avoided
for `failure_backoff_s`. Choice is least-loaded: running + waiting + requests this router
has sent since the last refresh, then KV usage. gRPC channels are cached per address. Torch-free.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.services.router.registry import InstanceInfo, Load, Registry

log = logging.getLogger("pdserve.router.instances")


class InstancePool:
    def __init__(self, registry: Registry, refresh_s: float = 0.5, failure_backoff_s: float = 5.0,
                 default_max_model_len: int = 8192):
        self.registry = registry
        self.refresh_s = refresh_s
        self.failure_backoff_s = failure_backoff_s
        self.instances: list[tuple[InstanceInfo, Load | None]] = []
        self.max_model_len = default_max_model_len
        self._known_len: dict[str, int] = {}
        self._inflight: dict[str, int] = {}
        self._failed_at: dict[str, float] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.redis_ok = True
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for ch in self._channels.values():
            await ch.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    async def refresh(self) -> None:
        try:
            self.instances = await self.registry.list_instances()
            if not self.redis_ok:
                log.warning("Redis is back: instance list refreshed")
            self.redis_ok = True
            self._inflight.clear()
        except Exception as e:  # keep serving with the last known instances
            if self.redis_ok:
                log.warning("Redis unavailable (%s): routing with the last known %d instances",
                            e, len(self.instances))
            self.redis_ok = False
        for info, _ in self.instances:
            if info.instance_id not in self._known_len:
                await self._learn_max_len(info)

    async def _learn_max_len(self, info: InstanceInfo) -> None:
        try:
            stub = pb_grpc.DecodeStub(self._channel(info.grpc_address)) if info.serves("decode") and \
                info.role == "decode" else pb_grpc.PrefillStub(self._channel(info.grpc_address))
            h = await stub.Health(pb.HealthRequest(), timeout=2)
            self._known_len[info.instance_id] = h.max_model_len
            self.max_model_len = min(self._known_len.values())
        except grpc.aio.AioRpcError:
            pass

    def live(self, role: str) -> list[tuple[InstanceInfo, Load | None]]:
        now = time.monotonic()
        return [(i, l) for i, l in self.instances if i.serves(role) and i.status == "serving"
                and now - self._failed_at.get(i.instance_id, -1e9) > self.failure_backoff_s]

    def choose(self, role: str, exclude: set[str] = frozenset()) -> InstanceInfo | None:
        candidates = [(i, l) for i, l in self.live(role) if i.instance_id not in exclude]
        if not candidates:
            return None

        def cost(item):
            info, load = item
            busy = (load.num_running + load.num_waiting) if load else 0
            return (busy + self._inflight.get(info.instance_id, 0), load.kv_usage if load else 0.0)
        best = min(candidates, key=cost)[0]
        self._inflight[best.instance_id] = self._inflight.get(best.instance_id, 0) + 1
        return best

    def mark_failed(self, instance_id: str) -> None:
        self._failed_at[instance_id] = time.monotonic()

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc.aio.insecure_channel(
                address, options=[("grpc.max_receive_message_length", 64 << 20)])
        return ch

    def prefill_stub(self, info: InstanceInfo) -> pb_grpc.PrefillStub:
        return pb_grpc.PrefillStub(self._channel(info.grpc_address))

    def decode_stub(self, info: InstanceInfo) -> pb_grpc.DecodeStub:
        return pb_grpc.DecodeStub(self._channel(info.grpc_address))

    def stub_for_address(self, address: str) -> pb_grpc.PrefillStub:
        return pb_grpc.PrefillStub(self._channel(address))
