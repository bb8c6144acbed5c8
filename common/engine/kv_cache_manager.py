"""KVCacheManager: per-request block allocation on top of the BlockPool, with prefix hits.

    request tokens:  [ block 0 | block 1 | block 2 | block 3 (partial) ]
    req.block_ids:   [   12    |    4    |    30   |    7              ]
                       ^ hit      ^ hit     ^ new     ^ new   (hits come from the chained hashes)

The manager owns `req.block_ids`; the scheduler decides *whether* to allocate (policy), the pool
decides *which* blocks (LRU). A block is registered under its hash as soon as the tokens that
fill it are scheduled: within one forward pass every layer stores all tokens' K/V before any
attention reads, so a request scheduled in the same step may already reuse it.
"""

from __future__ import annotations

from pdserve.common.engine.block_pool import BlockPool, KVBlock
from pdserve.common.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        # request id -> leading blocks already registered under their hash: a decoding request's
        # step looks only at blocks past them (walking all of them per step was O(length) per
        # request per step, a few % of a decode worker's engine thread at a batch of 250)
        self._num_hashed: dict[str, int] = {}
        self.num_prefix_queries = 0  # prompt tokens looked up (for vllm:prefix_cache_queries)
        self.num_prefix_hits = 0  # prompt tokens found (for vllm:prefix_cache_hits)
        self.leases: dict[str, tuple[list[KVBlock], float]] = {}
        self.num_expired_leases = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def num_blocks_handed_out(self) -> int:
        """Distinct blocks allocated at least once (they are handed out in id order: 0 .. n-1)."""
        return len(self.pool.blocks)

    def usage(self) -> float:
        return self.pool.usage()

    def get_computed_blocks(self, req: Request) -> list[KVBlock]:
        """Longest run of leading full blocks already in the cache. The last token is never
        served from the cache: its logits are needed to sample the next token."""
        if not self.pool.enable_caching or req.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt token's logits
        max_hit_blocks = (req.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in req.block_hashes(self.block_size)[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def count_prefix_lookup(self, req: Request, num_hit_blocks: int) -> None:
        """The prefix-cache counters (vllm:prefix_cache_queries / _hits), once per request where its
        first lookup was used: a lookup whose allocation failed is repeated at the next step, and
        counting each would inflate the hit rate under KV pressure (vLLM counts the same way)."""
        if self.pool.enable_caching and req.params.prompt_logprobs is None:
            self.num_prefix_queries += req.num_tokens
            self.num_prefix_hits += num_hit_blocks * self.block_size

    def num_blocks_needed(self, req: Request, num_new_tokens: int, computed: list[KVBlock] = ()) -> int:
        """Blocks to take from the free queue to hold `num_new_tokens` more tokens (a cached-free
        prefix hit also leaves the free queue, so it counts)."""
        held = len(self._blocks.get(req.request_id, ())) + len(computed)
        total_tokens = req.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        revived = sum(1 for b in computed if b.ref_cnt == 0) if computed else 0
        return max(cdiv(total_tokens, self.block_size) - held, 0) + revived

    def allocate_slots(self, req: Request, num_new_tokens: int, computed: list[KVBlock] = ()) -> bool:
        """Reserve room for `num_new_tokens` beyond the computed ones; False (nothing changed) if the
        pool is short. `computed` are prefix hits from `get_computed_blocks` (first schedule only)."""
        blocks = self._blocks.get(req.request_id)
        if not computed and blocks is not None:  # a decode step: usually room in its last block
            total_tokens = req.num_computed_tokens + num_new_tokens
            if total_tokens <= len(blocks) * self.block_size and len(req.block_ids) == len(blocks):
                if self.pool.enable_caching and total_tokens // self.block_size > self._num_hashed.get(req.request_id, 0):
                    self._cache_full_blocks(req, blocks, total_tokens)  # (its early return, checked here)
                return True
        if self.num_blocks_needed(req, num_new_tokens, computed) > self.pool.num_free_blocks:
            return False
        blocks = self._blocks.setdefault(req.request_id, [])
        if computed:
            self.pool.touch(list(computed))
            blocks.extend(computed)
            req.num_computed_tokens += len(computed) * self.block_size
        total_tokens = req.num_computed_tokens + num_new_tokens
        num_new_blocks = cdiv(total_tokens, self.block_size) - len(blocks)
        if num_new_blocks > 0:
            blocks.extend(self.pool.allocate(num_new_blocks))
        if computed or num_new_blocks > 0 or len(req.block_ids) != len(blocks):
            req.block_ids = [b.block_id for b in blocks]  # a new list: a step in flight keeps its own
        self._cache_full_blocks(req, blocks, total_tokens)
        return True

    def _cache_full_blocks(self, req: Request, blocks: list[KVBlock], num_tokens: int) -> None:
        if not self.pool.enable_caching:
            return
        num_full = num_tokens // self.block_size
        start = self._num_hashed.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes = req.block_hashes(self.block_size)
        end = min(num_full, len(hashes))
        for i in range(start, end):
            if blocks[i].block_hash is None:
                self.pool.cache_block(blocks[i], hashes[i])
        self._num_hashed[req.request_id] = max(start, end)

    def free_tail(self, req: Request, num_tokens: int) -> None:
        """Free the blocks past those holding the first `num_tokens` tokens (speculative decoding:
        blocks reserved for drafts that were rejected). They never carry a hash: only full
        blocks of known tokens are hashed."""
        blocks = self._blocks.get(req.request_id)
        keep = cdiv(num_tokens, self.block_size)
        if blocks is None or len(blocks) <= keep:
            return
        tail = blocks[keep:]
        del blocks[keep:]
        assert all(b.block_hash is None for b in tail), tail
        self.pool.free(list(reversed(tail)))
        req.block_ids = [b.block_id for b in blocks]

    def free(self, req: Request) -> None:
        self._num_hashed.pop(req.request_id, None)
        blocks = self._blocks.pop(req.request_id, [])
        self.pool.free(list(reversed(blocks)))
        req.block_ids = []

    # ---- leases: a finished prefill's blocks kept for a decode worker to pull ------------------
    def lease(self, req: Request, lease_id: str, num_tokens: int, expires_at: float) -> list[int]:
        """Keep the blocks holding the first `num_tokens` tokens of `req` until released or
        expired (they stay referenced, so neither eviction nor reuse can touch them)."""
        blocks = self._blocks[req.request_id][:cdiv(num_tokens, self.block_size)]
        self.pool.touch(blocks)
        self.leases[lease_id] = (blocks, expires_at)
        return [b.block_id for b in blocks]

    def lease_block_ids(self, lease_id: str, now: float) -> list[int] | None:
        entry = self.leases.get(lease_id)
        if entry is None or entry[1] < now:
            return None
        return [b.block_id for b in entry[0]]

    def release_lease(self, lease_id: str) -> bool:
        entry = self.leases.pop(lease_id, None)
        if entry is None:
            return False
        self.pool.free(list(reversed(entry[0])))
        return True

    def expire_leases(self, now: float) -> int:
        expired = [lid for lid, (_, exp) in self.leases.items() if exp < now]
        for lid in expired:
            self.release_lease(lid)
        self.num_expired_leases += len(expired)
        return len(expired)

    # ---- pulled KV: blocks reserved now, filled by a transfer, admitted later ----------------
    def reserve_for_pull(self, req: Request, num_tokens: int) -> tuple[list[int], int]:
        """Blocks for the first `num_tokens` tokens: prefix hits + fresh ones to be filled by a pull.
        Hashes are registered only when the pull lands (`commit_pulled`). Returns (block ids to
        fill, number of leading blocks already here), or ([], -1) when the pool is short."""
        hits = self.get_computed_blocks(req)
        hits = hits[:num_tokens // self.block_size]
        needed = self.num_blocks_needed(req, num_tokens - len(hits) * self.block_size, hits)
        if needed > self.pool.num_free_blocks:
            return [], -1
        blocks = self._blocks.setdefault(req.request_id, [])
        self.pool.touch(hits)
        blocks.extend(hits)
        blocks.extend(self.pool.allocate(cdiv(num_tokens, self.block_size) - len(blocks)))
        req.block_ids = [b.block_id for b in blocks]
        self.count_prefix_lookup(req, len(hits))
        return req.block_ids[len(hits):], len(hits)

    def commit_pulled(self, req: Request, num_tokens: int) -> None:
        req.num_computed_tokens = num_tokens
        self._cache_full_blocks(req, self._blocks[req.request_id], num_tokens)

    def num_requests(self) -> int:
        return len(self._blocks)
