"""Instance registry in Redis: which prefill/decode instances are alive, where, and how loaded.

Keys (namespace `ns`, default "pdserve"):

    {ns}:instances         SET     ids ever registered; ids whose instance key expired are pruned
                                   lazily (by register and list_instances)
    {ns}:instance:{id}     STRING  InstanceInfo as JSON, PX ttl. The instance is live while it exists.
    {ns}:load:{id}         HASH    num_running, num_waiting, kv_usage, num_free_blocks, updated_at
                                   (Unix seconds, writer's clock), num_cached_blocks, prefix_queries,
                                   prefix_hits; PX ttl, refreshed with the instance key

Life of an instance (a worker runs `Heartbeater`):

    register ------> heartbeat every ttl/3 --+---> deregister              (clean shutdown)
      Lua, atomic: refuse a model or block    +---> keys expire after ttl    (crash, partition)
      size that differs from any live one     +---> key gone: re-register    (Redis restarted)

A heartbeat only refreshes the TTL and the load, and returns the current record, so an operator's
`set_status("draining")` or `set_role(...)` survives heartbeats and reaches the worker.

Errors: RegistrationError (mismatch), InstanceNotFoundError (not live). Redis failures propagate as
redis.exceptions.RedisError (ConnectionError, TimeoutError); every call is bounded by the socket
timeout given to `open_redis`, with one immediate retry (a pooled connection may be stale).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")
STATUSES = ("serving", "draining")
DEFAULT_TIMEOUT_S = 1.0
REDIS_MAX_CONNECTIONS = 64  # per client; more calls at once wait for one (open_redis)


class RegistryError(RuntimeError):
    pass


class RegistrationError(RegistryError):
    """The instance's model or block size differs from the live fleet's."""


class InstanceNotFoundError(RegistryError):
    """No live instance has this id (never registered, deregistered, or its TTL expired)."""


def open_redis(redis_url: str, timeout_s: float = DEFAULT_TIMEOUT_S,
               decode_responses: bool = True) -> aioredis.Redis:
    """The one place that sets how the router's Redis clients time out, retry and pool.

    The pool blocks (up to timeout_s) for a free connection instead of failing: redis-py's
    default pool raises "Too many connections" past 100 at once, which a router at 100
    requests/s reached (prefix lookups of concurrent requests), and routing fell back to load
    alone for a while."""
    pool = aioredis.BlockingConnectionPool.from_url(
        redis_url, max_connections=REDIS_MAX_CONNECTIONS, timeout=timeout_s,
        decode_responses=decode_responses, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1))
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    role: str  # "prefill" | "decode" | "both"
    grpc_address: str  # "host:port" of its Prefill / Decode service
    kv_address: str  # KV transport endpoint, e.g. "tcp://10.0.0.5:4000"
    model: str  # served model name; equal across the fleet
    block_size: int  # tokens per KV block; equal across the fleet (prefix hashes depend on it)
    num_blocks: int  # KV capacity in blocks
    status: str = "serving"  # "serving" | "draining"
    metrics_address: str = ""  # the worker's /metrics URL
    started_at: float = field(default_factory=time.time)  # Unix seconds

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ValueError("instance_id must be non-empty")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")
        if not self.model:
            raise ValueError("model must be non-empty")
        if self.block_size < 1 or self.num_blocks < 0:
            raise ValueError(f"block_size must be >= 1 and num_blocks >= 0, got "
                             f"{self.block_size} and {self.num_blocks}")

    def serves(self, role: str) -> bool:
        return self.role == role or self.role == "both"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str) -> "InstanceInfo":
        data = json.loads(raw)
        known = {f.name for f in dataclasses.fields(cls)}  # a newer writer may add fields
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Load:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_free_blocks: int = 0
    updated_at: float | None = None  # Unix seconds; stamped by heartbeat when None
    num_cached_blocks: int = 0  # blocks in its prefix cache (what it publishes to the prefix index)
    prefix_queries: int = 0  # prompt tokens looked up in its prefix cache, since start
    prefix_hits: int = 0  # prompt tokens found there, since start

    def to_mapping(self) -> dict[str, str]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {name: str(value) for name, value in values.items() if value is not None}

    @classmethod
    def from_mapping(cls, mapping: dict[str, str]) -> "Load":
        return cls(num_running=int(mapping.get("num_running", 0)),
                   num_waiting=int(mapping.get("num_waiting", 0)),
                   kv_usage=float(mapping.get("kv_usage", 0.0)),
                   num_free_blocks=int(mapping.get("num_free_blocks", 0)),
                   updated_at=float(mapping["updated_at"]) if "updated_at" in mapping else None,
                   num_cached_blocks=int(mapping.get("num_cached_blocks", 0)),
                   prefix_queries=int(mapping.get("prefix_queries", 0)),
                   prefix_hits=int(mapping.get("prefix_hits", 0)))


# KEYS: instances set, instance key, instance key prefix (+ id = another instance's key; standalone Redis)
# ARGV: id, info json, model, block_size, ttl_ms
_REGISTER = """
for _, other in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if other ~= ARGV[1] then
    local raw = redis.call('GET', KEYS[3] .. other)
    if not raw then
      redis.call('SREM', KEYS[1], other)
    else
      local info = cjson.decode(raw)
      if info.model ~= ARGV[3] or tostring(info.block_size) ~= ARGV[4] then
        return {other, info.model, tostring(info.block_size)}
      end
    end
  end
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[5])
redis.call('SADD', KEYS[1], ARGV[1])
return {}
"""

# KEYS: instance key, load key, instances set. ARGV: ttl_ms, id, load field/value pairs...
# Returns the instance's record, or false when its key is gone.
_HEARTBEAT = """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then return false end
redis.call('HSET', KEYS[2], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
return redis.call('GET', KEYS[1])
"""

# KEYS: instances set, instance key prefix. ARGV: ids to drop if their instance key is gone.
_PRUNE = """
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[2] .. ARGV[i]) == 0 then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
"""


class Registry:
    def __init__(self, redis_url: str, namespace: str = "pdserve", ttl_s: float = 5.0,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._redis = open_redis(redis_url, timeout_s)
        self._ids_key = f"{namespace}:instances"
        self._instance_prefix = f"{namespace}:instance:"
        self._load_prefix = f"{namespace}:load:"
        self._register = self._redis.register_script(_REGISTER)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._prune = self._redis.register_script(_PRUNE)

    async def register(self, info: InstanceInfo) -> None:
        conflict = await self._register(
            keys=[self._ids_key, self._instance_prefix + info.instance_id, self._instance_prefix],
            args=[info.instance_id, info.to_json(), info.model, info.block_size, self._ttl_ms])
        if conflict:
            other_id, other_model, other_block_size = conflict
            if other_model != info.model:
                raise RegistrationError(
                    f"instance {info.instance_id!r} serves model {info.model!r} but live instance "
                    f"{other_id!r} serves {other_model!r}; every instance must serve the same model")
            raise RegistrationError(
                f"instance {info.instance_id!r} has block_size {info.block_size} but live instance "
                f"{other_id!r} has block_size {other_block_size}; every instance must use the same "
                f"block size")

    async def heartbeat(self, instance_id: str, load: Load) -> InstanceInfo:
        """Refresh the TTL and publish `load`; returns the instance's current record."""
        if load.updated_at is None:
            load = dataclasses.replace(load, updated_at=time.time())
        pairs = [item for pair in load.to_mapping().items() for item in pair]
        raw = await self._heartbeat(
            keys=[self._instance_prefix + instance_id, self._load_prefix + instance_id, self._ids_key],
            args=[self._ttl_ms, instance_id, *pairs])
        if raw is None:
            raise InstanceNotFoundError(f"instance {instance_id!r} is not registered (or its TTL expired)")
        return InstanceInfo.from_json(raw)

    async def deregister(self, instance_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._instance_prefix + instance_id, self._load_prefix + instance_id)
            pipe.srem(self._ids_key, instance_id)
            await pipe.execute()

    async def get(self, instance_id: str) -> tuple[InstanceInfo, Load | None] | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._instance_prefix + instance_id)
            pipe.hgetall(self._load_prefix + instance_id)
            raw, load = await pipe.execute()
        if raw is None:
            return None
        return InstanceInfo.from_json(raw), Load.from_mapping(load) if load else None

    async def list_instances(self, role: str | None = None) -> list[tuple[InstanceInfo, Load | None]]:
        """Live instances sorted by id. `role` keeps those that can serve it ("both" serves either)."""
        if role is not None and role not in ROLES:
            raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
        ids = sorted(await self._redis.smembers(self._ids_key))
        if not ids:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for instance_id in ids:
                pipe.get(self._instance_prefix + instance_id)
                pipe.hgetall(self._load_prefix + instance_id)
            replies = await pipe.execute()
        result, dead_ids = [], []
        for instance_id, raw, load in zip(ids, replies[0::2], replies[1::2]):
            if raw is None:
                dead_ids.append(instance_id)
                continue
            info = InstanceInfo.from_json(raw)
            if role is None or info.serves(role):
                result.append((info, Load.from_mapping(load) if load else None))
        if dead_ids:
            await self._prune(keys=[self._ids_key, self._instance_prefix], args=dead_ids)
        return result

    async def set_status(self, instance_id: str, status: str) -> InstanceInfo:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        return await self._update(instance_id, status=status)

    async def set_role(self, instance_id: str, role: str) -> InstanceInfo:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        return await self._update(instance_id, role=role)

    async def _update(self, instance_id: str, **changes) -> InstanceInfo:
        """Rewrite fields of a live record, keeping its TTL (optimistic WATCH transaction)."""
        key = self._instance_prefix + instance_id
        async with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        raise InstanceNotFoundError(f"instance {instance_id!r} is not live")
                    info = dataclasses.replace(InstanceInfo.from_json(raw), **changes)
                    pipe.multi()
                    pipe.set(key, info.to_json(), keepttl=True)
                    await pipe.execute()
                    return info
                except WatchError:
                    continue  # a heartbeat or another operator wrote in between: read again

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> "Registry":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


LoadFn = Callable[[], "Load | Awaitable[Load]"]
RETRY_S = 0.2  # heartbeat retry interval while Redis is unreachable


class Heartbeater:
    """Keeps one worker registered: register, heartbeat every ttl/3, re-register when the key
    vanished (a long stall, or Redis restarted empty). Redis outages are logged and retried at
    the next beat, never fatal. `info` follows the record in Redis, so a worker sees an
    operator's drain or role switch there (and a re-registration keeps it)."""

    def __init__(self, registry: Registry, info: InstanceInfo, load_fn: LoadFn,
                 interval_s: float | None = None):
        self.registry = registry
        self.info = info
        self.load_fn = load_fn
        self.interval_s = interval_s if interval_s is not None else registry.ttl_s / 3
        self.num_registrations = 0
        self.last_error: str | None = None  # None while healthy
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Register (raising RegistrationError on a fleet mismatch), then beat in the background.
        Redis unreachable at start (a worker restarted during a Redis outage) is not fatal: the
        worker starts unregistered and the background beats register it as soon as Redis
        answers (every RETRY_S), as after a Redis restart; dying here only made a supervisor
        restart it again and again, each time later (its backoff), while Redis was down."""
        try:
            await self.registry.register(self.info)
            self.num_registrations += 1
            await self.beat()
        except RedisError as error:
            logger.warning("%s: Redis unreachable at start (%s): serving unregistered, registering "
                           "when it answers (every %.2f s)", self.info.instance_id, error,
                           min(self.interval_s, RETRY_S))
            self.last_error = f"{type(error).__name__}: {error}"
        self._task = asyncio.create_task(self._run(), name=f"heartbeat-{self.info.instance_id}")

    async def beat(self) -> None:
        load = self.load_fn()
        if inspect.isawaitable(load):
            load = await load
        try:
            self.info = await self.registry.heartbeat(self.info.instance_id, load)
        except InstanceNotFoundError:
            logger.warning("instance %s vanished from the registry; registering again", self.info.instance_id)
            await self.registry.register(self.info)
            self.num_registrations += 1
            self.info = await self.registry.heartbeat(self.info.instance_id, load)

    async def _run(self) -> None:
        while True:
            # After a failure, retry quickly: a restarted Redis must learn of this worker within
            # a fraction of a second (routers keep it meanwhile: services/router/instances.py).
            await asyncio.sleep(self.interval_s if self.last_error is None else min(self.interval_s, RETRY_S))
            try:
                await self.beat()
            except (RedisError, RegistryError) as error:
                if self.last_error is None:
                    logger.warning("heartbeat of %s failed (retrying every %.2f s): %s",
                                   self.info.instance_id, min(self.interval_s, RETRY_S), error)
                self.last_error = f"{type(error).__name__}: {error}"
                continue
            if self.last_error is not None:
                logger.info("heartbeat of %s recovered", self.info.instance_id)
                self.last_error = None

    async def stop(self, deregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if deregister:
            try:
                await self.registry.deregister(self.info.instance_id)
            except RedisError as error:  # shutting down anyway: the TTL cleans up
                logger.warning("could not deregister %s: %s", self.info.instance_id, error)
