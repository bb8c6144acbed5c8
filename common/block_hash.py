"""Chained block hashes for prefix caching (torch-free: the router computes the same hashes).

    tokens:  | t0 .. t15 | t16 .. t31 | t32 .. t40 (partial: never hashed)
    hashes:  h0 = H(SEED, block0, extra)   h1 = H(h0, block1, extra)

A block's hash names its content *and* everything before it, so equal hashes mean equal prefixes.
H is BLAKE2b-128 over a fixed byte encoding: stable across processes, machines and Python
versions (never Python's `hash()`, which is salted per process). `extra` carries anything else
that changes the KV content for the same tokens (e.g. a LoRA or model id).
"""

from __future__ import annotations

import hashlib
import struct
from typing import Sequence

SEED_HASH = hashlib.blake2b(b"pdserve-prefix-v1", digest_size=16).digest()

BlockHash = bytes  # 16 bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra: bytes = b"") -> BlockHash:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else SEED_HASH)
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    if extra:
        h.update(b"\x00extra")
        h.update(extra)
    return h.digest()


def hash_blocks(token_ids: Sequence[int], block_size: int, extra: bytes = b"",
                parent: BlockHash | None = None, start_block: int = 0) -> list[BlockHash]:
    """Hashes of every *full* block of `token_ids`, starting at block `start_block` whose parent
    hash is `parent` (lets a caller extend a list incrementally as tokens are generated)."""
    hashes = []
    num_full = len(token_ids) // block_size
    for i in range(start_block, num_full):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra)
        hashes.append(parent)
    return hashes
