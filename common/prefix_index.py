"""Prefix locality index in Redis: which instances hold which KV blocks, by chained block hash.

Workers publish what their prefix cache stores and evicts; the router asks, for a prompt's block
hashes (common/block_hash.py), how many leading blocks each candidate instance already holds.
Living in Redis, the index survives router restarts: a new router routes with full knowledge.

Keys (namespace `ns`, default "pdserve"):

    {ns}:held:{id}   HASH  raw 16-byte block hash -> expiry (Unix ms, Redis clock);
                           PX ttl on the key, refreshed by every publish

One hash per instance, not one set of instances per block: the router's question is "how far
along this chain does instance X go", which is then one HMGET per instance instead of one Redis
call per block (Redis time for a 64-block full hit: 178 vs 322 us, docs/decisions/control-plane.md),
and forgetting an instance is one UNLINK. Each entry expires `ttl` after its instance last stored
it (a field value, since Redis 6 cannot expire hash fields); workers re-publish blocks they hit,
so hot prefixes never age out.
An expired entry stays in the hash, ignored, until the block's eviction removes it.

    prompt:   h0 -> h1 -> h2 -> h3       longest_prefix = leading run per instance, one Lua call:
    A holds   h0    h1    h2             A = 3
    B holds   h0          h2             B = 1 (h2 alone does not count: no h1)
    C holds         h1    h2    h3       C = 0

If a worker's publish fails (Redis down), its view and the index diverge: it should call
`replace` (clear_instance + publish of everything it holds, in one transaction) once Redis answers
again (Redis may have restarted empty anyway); services/worker/ `KVEventPublisher` does. Redis
failures propagate as redis.exceptions.RedisError within the client's socket timeout; the router
then routes by load alone.
"""

from __future__ import annotations

from pdserve.common.registry import DEFAULT_TIMEOUT_S, open_redis

HASH_SIZE = 16  # bytes per block hash (BLAKE2b-128, common/block_hash.py)
# Hashes per script call: bounds Lua's unpack and keeps each atomic call short.
PUBLISH_CHUNK = 2048
LOOKUP_SLICE = 128  # blocks per HMGET after the first block

# Hash lists travel packed into one string (HASH_SIZE bytes each) and are split in Lua: redis-py
# takes ~105 us to encode 64 separate arguments and ~34 us for the packed one (measured).
_SPLIT = """
local function split(packed, size)
  local hashes = {}
  for i = 1, #packed / size do hashes[i] = string.sub(packed, size * (i - 1) + 1, size * i) end
  return hashes
end
"""

# KEYS: [1] the instance's held hash. ARGV: [1] ttl ms, [2] hash size, [3] stored hashes (packed),
# [4] removed hashes (packed). Stored entries are written before removed ones are deleted.
_PUBLISH = _SPLIT + """
local t = redis.call('TIME')
local ttl = tonumber(ARGV[1])
local expires = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl)
local stored = split(ARGV[3], tonumber(ARGV[2]))
if #stored > 0 then
  local fields = {}
  for i = 1, #stored do
    fields[2 * i - 1] = stored[i]
    fields[2 * i] = expires
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('PEXPIRE', KEYS[1], ttl)
end
local removed = split(ARGV[4], tonumber(ARGV[2]))
if #removed > 0 then redis.call('HDEL', KEYS[1], unpack(removed)) end
return 0
"""

# KEYS: held hashes of the candidate instances. ARGV: [1] hash size, [2] slice length, [3] the
# prompt's block hashes in chain order (packed). Returns each instance's leading run. A first
# HGET settles most instances (a miss); one that holds the first block fetches the rest of the
# chain a slice per HMGET (one HMGET for a usual prompt; slices keep Lua's unpack small and stop
# early on long prompts).
_LONGEST_PREFIX = _SPLIT + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local slice = tonumber(ARGV[2])
local hashes = split(ARGV[3], tonumber(ARGV[1]))
local n = #hashes
local lengths = {}
for j = 1, #KEYS do
  local run = 0
  local first = redis.call('HGET', KEYS[j], hashes[1])
  if first and tonumber(first) > now then
    run = 1
    while run < n do
      local last = math.min(n, run + slice)
      local expiries = redis.call('HMGET', KEYS[j], unpack(hashes, run + 1, last))
      local start = run
      while run < last and expiries[run - start + 1] and tonumber(expiries[run - start + 1]) > now do
        run = run + 1
      end
      if run < last then break end
    end
  end
  lengths[j] = run
end
return lengths
"""


def _pack(hashes: list[bytes]) -> bytes:
    if any(len(h) != HASH_SIZE for h in hashes):
        bad = next(h for h in hashes if len(h) != HASH_SIZE)
        raise ValueError(f"block hashes must be {HASH_SIZE} bytes (common/block_hash.py), got {len(bad)}")
    return b"".join(hashes)


class PrefixIndex:
    def __init__(self, redis_url: str, namespace: str = "pdserve", ttl_s: float = 600,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._redis = open_redis(redis_url, timeout_s, decode_responses=False)  # fields are raw bytes
        self._held_prefix = f"{namespace}:held:"
        self._publish = self._redis.register_script(_PUBLISH)
        self._longest_prefix = self._redis.register_script(_LONGEST_PREFIX)

    async def publish(self, instance_id: str, stored: list[bytes], removed: list[bytes]) -> None:
        """Apply one batch of an instance's cache events: `stored` (re)claims blocks and refreshes
        their expiry, then `removed` drops claims. Pass the batch's net change: a hash evicted and
        then stored again within the batch belongs in `stored` only. One round trip."""
        if not stored and not removed:
            return
        key = self._held_prefix + instance_id
        if len(stored) <= PUBLISH_CHUNK and len(removed) <= PUBLISH_CHUNK:
            batches = [(stored, removed)]
        else:  # every stored chunk before any removed chunk: the order of a single call
            batches = ([(stored[i:i + PUBLISH_CHUNK], []) for i in range(0, len(stored), PUBLISH_CHUNK)]
                       + [([], removed[i:i + PUBLISH_CHUNK]) for i in range(0, len(removed), PUBLISH_CHUNK)])
        async with self._redis.pipeline(transaction=True) as pipe:  # all batches or none
            for batch_stored, batch_removed in batches:
                args = [self._ttl_ms, HASH_SIZE, _pack(batch_stored), _pack(batch_removed)]
                await self._publish(keys=[key], args=args, client=pipe)
            await pipe.execute()

    async def replace(self, instance_id: str, held: list[bytes]) -> None:
        """Make `held` the instance's whole entry set, atomically (UNLINK, then the publish script
        in one MULTI/EXEC): a worker's resync after an outage and its periodic refresh. Readers see
        the old set or the new one, never an empty instance in between."""
        key = self._held_prefix + instance_id
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.unlink(key)
            for i in range(0, len(held), PUBLISH_CHUNK):
                args = [self._ttl_ms, HASH_SIZE, _pack(held[i:i + PUBLISH_CHUNK]), b""]
                await self._publish(keys=[key], args=args, client=pipe)
            await pipe.execute()

    async def longest_prefix(self, block_hashes: list[bytes], instance_ids: list[str]) -> dict[str, int]:
        """Per instance: how many consecutive leading blocks of `block_hashes` it holds. One round trip."""
        if not block_hashes or not instance_ids:
            return {instance_id: 0 for instance_id in instance_ids}
        lengths = await self._longest_prefix(keys=[self._held_prefix + i for i in instance_ids],
                                             args=[HASH_SIZE, LOOKUP_SLICE, _pack(block_hashes)])
        return dict(zip(instance_ids, (int(n) for n in lengths)))

    async def num_blocks(self, instance_id: str) -> int:
        """Entries held for an instance, expired ones included (for metrics and tests)."""
        return await self._redis.hlen(self._held_prefix + instance_id)

    async def clear_instance(self, instance_id: str) -> None:
        """Forget every block of an instance (it died, deregistered, or resyncs after an outage).
        UNLINK frees a large hash in the background, so this never blocks Redis."""
        await self._redis.unlink(self._held_prefix + instance_id)

    async def close(self) -> None:
        await self._redis.aclose()

    async def __aenter__(self) -> "PrefixIndex":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
