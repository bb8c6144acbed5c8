"""InstancePool: the router's view of the fleet (registry + prefix index in Redis) and its routing.

    every refresh_s:  Registry.list_instances() --> instances (role, status, address, last load)
    per request:      route(prompt ids) --> block hashes --> PrefixIndex.longest_prefix (one call,
                      every live instance) --> routing.plan_route (cost: hits vs load) --> Route
    per RPC:          begin(id) / end(id) count what this router has in flight on each instance

Load of an instance = requests this router has in flight there (exact, now) + the others' share
of its last heartbeat: running + waiting reported at `updated_at`, minus what this router had in
flight there at that moment (kept as a short history of its own counts). With one router the
load is exact; with several, the other routers' part is as old as the heartbeat (~ttl/3).

Redis down: the last known instance list is kept, prefix lookups are skipped (load-only routing),
one warning is logged per outage and `redis_ok` is False until a refresh succeeds again. Redis
back but empty (restarted): instances missing from it are kept while they answer Health as
serving, until their heartbeat registers them again (`_still_alive`). An
instance whose RPC failed is avoided for `failure_backoff_s` (a request's decode: while another
decode serves, else it is tried again after RETRY_FAILED_AFTER_S). gRPC channels are cached per
address. Torch-free.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque

import grpc
from redis.exceptions import RedisError

from pdserve.common.block_hash import hash_blocks
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.services import grpc_auth
from pdserve.services.router import routing
from pdserve.common.prefix_index import PrefixIndex
from pdserve.common.registry import InstanceInfo, Load, Registry

log = logging.getLogger("pdserve.router.instances")

RETRY_FAILED_AFTER_S = 1.0  # a failed instance, the only one of its role left, is tried again after this

EMA_WEIGHT = 0.1  # weight of the newest request in the mean uncached blocks per request
HISTORY_S = 10.0  # how far back this router remembers its own in-flight counts (> a live heartbeat's age)


class InstancePool:
    def __init__(self, registry: Registry, index: PrefixIndex | None = None,
                 config: routing.RoutingConfig | None = None, refresh_s: float = 0.5,
                 failure_backoff_s: float = 5.0, default_max_model_len: int = 8192, gap_grace_s: float = 30.0,
                 internal_token: str | None = None):
        self.registry = registry
        self.index = index
        self.config = config or routing.RoutingConfig()
        self.refresh_s = refresh_s
        self.failure_backoff_s = failure_backoff_s
        self.gap_grace_s = gap_grace_s
        self.internal_token = internal_token
        self.instances: list[tuple[InstanceInfo, Load | None]] = []
        self.max_model_len = default_max_model_len
        self.redis_ok = True
        self.num_redis_outages = 0
        self.blocks_per_request = self.config.initial_blocks_per_request
        self._known_len: dict[str, int] = {}
        self._active: dict[str, int] = {}  # requests in flight from this router
        self._history: dict[str, deque[tuple[float, int]]] = {}  # (Unix time, active from then on)
        self._active_at_report: dict[str, tuple[float, int]] = {}
        self.num_routed: dict[str, int] = {}
        self._failed_at: dict[str, float] = {}
        self._missing_since: dict[str, float] = {}  # live instances missing from the registry
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._rotation = itertools.count()
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

    # ---- the fleet -------------------------------------------------------------------------
    async def refresh(self) -> None:
        try:
            instances = await self.registry.list_instances()
        except Exception as e:  # Redis down (or a bad record): keep serving with the last known list
            self._redis_failed(e)
        else:
            self.instances = instances + await self._still_alive(instances)
            if not self.redis_ok:
                log.warning("Redis is back: %d instances, prefix-aware routing resumed", len(instances))
            self.redis_ok = True
        for info, _ in self.instances:
            if info.instance_id not in self._known_len:
                await self._learn_max_len(info)

    async def _still_alive(self, listed: list[tuple[InstanceInfo, Load | None]]) -> list:
        """Known instances missing from a fresh listing that still answer Health as serving.

        A Redis that restarted empty lists nobody until each worker's next heartbeat
        re-registers it; dropping them meanwhile would fail every request with "no instance".
        A worker that left on purpose deregisters and answers Health NOT_SERVING (or not at
        all) while it shuts down, so it is dropped at once. Kept at most `gap_grace_s`."""
        ids = {i.instance_id for i, _ in listed}
        now = time.monotonic()
        missing = [(i, load) for i, load in self.instances if i.instance_id not in ids]
        for i, _ in listed:
            self._missing_since.pop(i.instance_id, None)
        if not missing:
            return []
        checks = await asyncio.gather(*(self._serving(i) for i, _ in missing))
        kept = []
        for (info, load), serving in zip(missing, checks):
            since = self._missing_since.setdefault(info.instance_id, now)
            if serving and now - since < self.gap_grace_s:
                kept.append((info, load))
            else:
                self._missing_since.pop(info.instance_id, None)
        if kept:
            log.info("keeping %d live instance(s) missing from the registry (Redis restarted?)", len(kept))
        return kept

    async def _serving(self, info: InstanceInfo) -> bool:
        try:
            return (await self.health(info, timeout_s=0.5)).status == pb.SERVING
        except grpc.aio.AioRpcError:
            return False

    def _redis_failed(self, error: Exception) -> None:
        if self.redis_ok:
            self.num_redis_outages += 1
            log.warning("Redis unavailable (%s): routing by load alone over the last known %d instances",
                        error, len(self.instances))
        self.redis_ok = False

    async def _learn_max_len(self, info: InstanceInfo) -> None:
        try:
            h = await self.health(info)
            self._known_len[info.instance_id] = h.max_model_len
            self.max_model_len = min(self._known_len.values())
        except grpc.aio.AioRpcError:
            pass

    def get(self, instance_id: str) -> tuple[InstanceInfo, Load | None] | None:
        return next(((i, l) for i, l in self.instances if i.instance_id == instance_id), None)

    def live(self, role: str, retry_failed: bool = False) -> list[tuple[InstanceInfo, Load | None]]:
        """Serving instances of a role, without those whose RPC failed in the last
        `failure_backoff_s`. `retry_failed` (a decode for a request, which has no other way to
        finish): where that leaves none, the failed ones too from RETRY_FAILED_AFTER_S after their
        failure (a worker restarted under the same id, or thawed, serves again at once; a dead one
        fails the next call fast and is backed off again)."""
        now = time.monotonic()
        serving = [(i, l) for i, l in self.instances if i.serves(role) and i.status == "serving"]
        since = [now - self._failed_at.get(i.instance_id, -1e9) for i, _ in serving]
        fresh = [x for x, t in zip(serving, since) if t > self.failure_backoff_s]
        if fresh or not retry_failed:
            return fresh
        return [x for x, t in zip(serving, since) if t > RETRY_FAILED_AFTER_S]

    def requests(self, info: InstanceInfo, load: Load | None) -> int:
        """This router's estimate of the requests on an instance (see the module doc)."""
        iid = info.instance_id
        active = self._active.get(iid, 0)
        if load is None or load.updated_at is None:
            return active
        others = load.num_running + load.num_waiting - self._active_at(iid, load.updated_at)
        return active + max(others, 0)

    def _active_at(self, instance_id: str, when: float) -> int:
        """What this router had in flight on an instance at Unix time `when` (a report's time;
        looked up once per report, then remembered: the past does not change)."""
        memo = self._active_at_report.get(instance_id)
        if memo is not None and memo[0] == when:
            return memo[1]
        value = 0
        for t, active in self._history.get(instance_id, ()):
            if t > when:
                break
            value = active
        self._active_at_report[instance_id] = (when, value)
        return value

    def _set_active(self, instance_id: str, active: int) -> None:
        self._active[instance_id] = active
        history = self._history.setdefault(instance_id, deque())
        now = time.time()
        history.append((now, active))
        while len(history) > 1 and history[1][0] < now - HISTORY_S:  # keep the value in force at now - HISTORY_S
            history.popleft()

    def active(self, instance_id: str) -> int:
        return self._active.get(instance_id, 0)

    # ---- routing ---------------------------------------------------------------------------
    def candidates(self, role: str, hits: dict[str, int], exclude=(), retry_failed: bool = False) -> list[routing.Candidate]:
        """The live, serving instances of a role as the cost function sees them (`live`)."""
        return [routing.Candidate(i.instance_id, self.requests(i, l), l.kv_usage if l else 0.0,
                                  hits.get(i.instance_id, 0), self.num_routed.get(i.instance_id, 0))
                for i, l in self.live(role, retry_failed) if i.instance_id not in exclude]

    async def lookup_hits(self, prompt_token_ids: list[int]) -> dict[str, int]:
        """Leading prompt blocks each live instance holds; {} when unknown (Redis down, no index)."""
        if self.index is None or not self.redis_ok or self.config.mode != "prefix" or not self.instances:
            return {}
        block_size = self.instances[0][0].block_size  # equal across the fleet (registry checks)
        hashes = hash_blocks(prompt_token_ids, block_size)
        if not hashes:
            return {}
        ids = [i.instance_id for i, _ in self.instances if i.status == "serving"]
        try:
            return await self.index.longest_prefix(hashes, ids)
        except RedisError as e:
            self._redis_failed(e)
            return {}

    async def route(self, prompt_token_ids: list[int]) -> routing.Route:
        """Where this prompt goes: the prefix lookup then the cost function (routing.plan_route)."""
        hits = await self.lookup_hits(prompt_token_ids)
        block_size = self.instances[0][0].block_size if self.instances else 16
        rotation = next(self._rotation) if self.config.mode == "round_robin" else 0
        return routing.plan_route(len(prompt_token_ids), block_size, self.candidates("prefill", hits, ()),
                                  self.candidates("decode", hits, ()), self.blocks_per_request, self.config,
                                  rotation)

    def choose(self, role: str, exclude=frozenset(), retry_failed: bool = False) -> InstanceInfo | None:
        """Least-loaded instance of a role (retries after a failure: no prefix lookup; `live`)."""
        cands = self.candidates(role, {}, exclude, retry_failed)
        chosen = routing.best(routing.score(cands, 0, 0, 1.0, 1.0, self.config))
        return None if chosen is None else self.info(chosen.candidate.instance_id)

    async def wait_for(self, role: str, exclude=frozenset(), timeout_s: float = 5.0,
                       retry_failed: bool = False, give_up=lambda: False) -> InstanceInfo | None:
        """`choose`, waiting up to `timeout_s` for an instance of the role to (re)appear (None
        at once when `give_up()` says so)."""
        deadline = time.monotonic() + timeout_s
        while True:
            chosen = self.choose(role, exclude, retry_failed)
            if chosen is not None or time.monotonic() >= deadline or give_up():
                return chosen
            await asyncio.sleep(min(0.1, max(deadline - time.monotonic(), 0)))

    def info(self, instance_id: str | None) -> InstanceInfo | None:
        found = self.get(instance_id) if instance_id else None
        return found[0] if found else None

    def observe_prefill(self, num_prompt_tokens: int, num_cached_tokens: int, block_size: int) -> None:
        """Update the running mean of uncached prompt blocks per request (the price of a queued request)."""
        uncached = -(-(num_prompt_tokens - num_cached_tokens) // block_size)
        self.blocks_per_request += EMA_WEIGHT * (uncached - self.blocks_per_request)

    def begin(self, instance_id: str) -> None:
        self._set_active(instance_id, self._active.get(instance_id, 0) + 1)
        self.num_routed[instance_id] = self.num_routed.get(instance_id, 0) + 1

    def end(self, instance_id: str) -> None:
        self._set_active(instance_id, max(self._active.get(instance_id, 0) - 1, 0))

    def mark_failed(self, instance_id: str) -> None:
        self._failed_at[instance_id] = time.monotonic()

    # ---- gRPC ------------------------------------------------------------------------------
    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = grpc_auth.channel(
                address, self.internal_token, options=[("grpc.max_receive_message_length", 64 << 20)])
        return ch

    def prefill_stub(self, info: InstanceInfo) -> pb_grpc.PrefillStub:
        return pb_grpc.PrefillStub(self._channel(info.grpc_address))

    def decode_stub(self, info: InstanceInfo) -> pb_grpc.DecodeStub:
        return pb_grpc.DecodeStub(self._channel(info.grpc_address))

    def stub_for_address(self, address: str) -> pb_grpc.PrefillStub:
        return pb_grpc.PrefillStub(self._channel(address))

    async def health(self, info: InstanceInfo, timeout_s: float = 2.0) -> pb.HealthResponse:
        """The worker's own view (role and status it has seen, live load). Every worker serves both
        services, so the Prefill service's Health answers for either role."""
        return await self.prefill_stub(info).Health(pb.HealthRequest(), timeout=timeout_s)
