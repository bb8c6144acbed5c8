"""BlockPool / KVCacheManager: exact block ids, ref counts and LRU eviction order."""

from pdserve.common.block_hash import hash_blocks
from pdserve.common.engine.block_pool import BlockPool
from pdserve.common.engine.kv_cache_manager import KVCacheManager
from pdserve.common.request import Request
from pdserve.common.sampling_params import SamplingParams


def make_req(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_allocate_pops_in_id_order_and_free_appends_to_tail():
    pool = BlockPool(6)
    a = pool.allocate(2)
    b = pool.allocate(1)
    assert [x.block_id for x in a] == [0, 1] and [x.block_id for x in b] == [2]
    assert pool.free_queue.block_ids() == [3, 4, 5]
    pool.free(list(reversed(a)))  # tail block first
    assert pool.free_queue.block_ids() == [3, 4, 5, 1, 0]
    assert [x.block_id for x in pool.allocate(4)] == [3, 4, 5, 1]


def test_cached_free_block_is_revived_from_the_middle_of_the_queue():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    pool.cache_block(blocks[1], b"h1" * 8)
    pool.free(blocks)
    assert pool.free_queue.block_ids() == [3, 0, 1, 2]
    hit = pool.get_cached_block(b"h1" * 8)
    assert hit is blocks[1]
    pool.touch([hit])
    assert hit.ref_cnt == 1 and pool.free_queue.block_ids() == [3, 0, 2]
    assert pool.num_free_blocks == 3


def test_eviction_is_lru_and_emits_events():
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.cache_block(b, bytes([i]) * 16)
    assert pool.take_events().stored == [bytes([0]) * 16, bytes([1]) * 16, bytes([2]) * 16]
    pool.free([blocks[2]])
    pool.free([blocks[0]])
    pool.free([blocks[1]])
    # LRU order is the free order: 2, 0, 1 -> evicted in that order
    first = pool.allocate(1)[0]
    assert first.block_id == 2 and pool.get_cached_block(bytes([2]) * 16) is None
    assert pool.get_cached_block(bytes([0]) * 16) is blocks[0]
    second = pool.allocate(1)[0]
    assert second.block_id == 0
    assert pool.take_events().removed == [bytes([2]) * 16, bytes([0]) * 16]


def test_manager_prefix_hit_shares_blocks_and_keeps_last_token_uncached():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = make_req("a", list(range(10)))  # 2 full blocks + 2 tokens
    assert kv.get_computed_blocks(a) == []
    assert kv.allocate_slots(a, a.num_tokens)
    assert a.block_ids == [0, 1, 2]
    a.num_computed_tokens = 10
    b = make_req("b", list(range(8)) + [99, 98, 97])
    hits = kv.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1]
    assert kv.allocate_slots(b, b.num_tokens - 8, hits)
    assert b.block_ids == [0, 1, 3] and b.num_computed_tokens == 8
    assert [kv.pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    # a prompt that is exactly 2 full blocks may hit only the first: its last token must run
    c = make_req("c", list(range(8)))
    assert [h.block_id for h in kv.get_computed_blocks(c)] == [0]
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10
    # freed tail first: the private tails (2, 3) are evicted before the shared prefix (1, 0)
    assert kv.pool.free_queue.block_ids() == [4, 5, 6, 7, 8, 9, 2, 3, 1, 0]


def test_manager_refuses_when_short_and_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = make_req("a", list(range(9)))
    assert not kv.allocate_slots(a, 13)  # needs 4 blocks
    assert a.block_ids == [] and kv.num_free_blocks == 3
    assert kv.allocate_slots(a, 9)
    assert kv.num_free_blocks == 0


def test_block_hashes_are_chained_and_stable():
    h = hash_blocks(list(range(8)), 4)
    assert h == hash_blocks(list(range(8)), 4)
    assert hash_blocks([9, 9, 9, 9] + list(range(4, 8)), 4)[1] != h[1]  # same block, other parent
    assert h[0].hex() == hash_blocks(list(range(4)), 4)[0].hex()


def test_a_large_pool_makes_block_objects_only_as_they_are_allocated():
    """15 M blocks (a small model on a large GPU) start at once; the blocks never allocated come
    first in the queue, in id order, then the freed ones in free order."""
    import time

    t0 = time.perf_counter()
    pool = BlockPool(15_000_000)
    assert time.perf_counter() - t0 < 0.5 and len(pool.blocks) == 0
    assert pool.num_free_blocks == 15_000_000 and pool.usage() == 0.0
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [0, 1, 2] and len(pool.blocks) == 3 and pool.blocks[2] is a[2]
    pool.cache_block(a[1], b"h" * 16)
    pool.free(list(reversed(a)))
    assert pool.num_free_blocks == 15_000_000
    small = BlockPool(6)
    small.free(small.allocate(6)[::-1])  # every block made, freed tail first
    assert small.free_queue.block_ids() == [5, 4, 3, 2, 1, 0]
    hit = pool.get_cached_block(b"h" * 16)
    pool.touch([hit])  # revived from the queue's middle: never from the fresh range
    assert hit is a[1] and pool.num_free_blocks == 15_000_000 - 1
    assert [b.block_id for b in pool.allocate(2)] == [3, 4]
