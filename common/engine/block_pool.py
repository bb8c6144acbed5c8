"""BlockPool: the fixed set of KV blocks, their ref counts, the free queue and the prefix-hash map.

    free queue (LRU order, head evicted first):
      head <-> b7 <-> b2 <-> b9 <-> tail
                     (b2 still holds hash h2: a "cached free" block, reusable until evicted)

A block with ref_cnt == 0 sits in the free queue. If it still carries a hash it can be revived by
a prefix hit (`touch`), which must unlink it from the *middle* of the queue: that is why the queue
is a doubly linked list and not a deque (O(1) removal anywhere). Allocation pops the head; if that
block carries a hash, the hash is evicted first (a BlockRemoved event). Freed blocks go to the tail,
so the least recently used cached block is the next to be evicted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdserve.common.block_hash import BlockHash


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev", "next")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev: KVBlock | None = None
        self.next: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hashed={self.block_hash is not None})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with sentinel ends; O(1) popleft, append and remove.

    The blocks never allocated yet stand before the list's head as a range of ids, made into
    KVBlocks (by `make`) only when popped: a small model on a large GPU has millions of blocks
    (SmolLM2-135M on an H200: ~15 M), whose objects took ~10 s and gigabytes to build at start-up.
    They are the oldest entries of the queue (nothing is appended before them, and only cached
    blocks — never these — are removed from the middle), so the order is that of a list that
    held every block from the start."""

    def __init__(self, num_fresh: int, make):
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self._make = make  # block id -> its new KVBlock
        self._next_fresh, self._num_fresh = 0, num_fresh
        self.num_free = num_fresh

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev
        last.next, block.prev, block.next, self._tail.prev = block, last, self._tail, block
        self.num_free += 1

    def popleft(self) -> KVBlock:
        if self._next_fresh < self._num_fresh:
            block = self._make(self._next_fresh)
            self._next_fresh += 1
            self.num_free -= 1
            return block
        block = self._head.next
        if block is self._tail:
            raise RuntimeError("no free KV blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_free -= 1

    def block_ids(self) -> list[int]:
        ids, node = list(range(self._next_fresh, self._num_fresh)), self._head.next
        while node is not self._tail:
            ids.append(node.block_id)
            node = node.next
        return ids


@dataclass
class KVEvents:
    """Prefix-cache changes since the last `take_events()`, published for the router's index."""
    stored: list[BlockHash] = field(default_factory=list)
    removed: list[BlockHash] = field(default_factory=list)


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks: list[KVBlock] = []  # made on first allocation, in id order: blocks[i].block_id == i
        self.free_queue = FreeBlockQueue(num_blocks, self._make_block)
        self.cached: dict[BlockHash, KVBlock] = {}
        self.events = KVEvents()

    def _make_block(self, block_id: int) -> KVBlock:
        block = KVBlock(block_id)
        self.blocks.append(block)
        return block

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def allocate(self, num: int) -> list[KVBlock]:
        if num > self.free_queue.num_free:
            raise RuntimeError(f"asked for {num} blocks, {self.free_queue.num_free} free")
        blocks = []
        for _ in range(num):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: list[KVBlock]) -> None:
        """Take a reference on prefix-hit blocks, reviving those that sat in the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free(self, blocks: list[KVBlock]) -> None:
        """Drop one reference each; callers pass tail blocks first so prefixes outlive suffixes."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, block
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Register a full block under its chained hash. If another block already holds this hash
        (two requests computed the same prefix), the first one stays the canonical copy."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block
        self.events.stored.append(block_hash)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
            self.events.removed.append(block.block_hash)
        block.block_hash = None

    def take_events(self) -> KVEvents:
        events, self.events = self.events, KVEvents()
        return events
