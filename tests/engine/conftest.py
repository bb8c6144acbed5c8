"""Fixtures shared by the engine tests."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """16 prompts of 1..290 tokens; every third one starts with the same 120 tokens (prefix hits)."""
    rng = random.Random(0)
    shared = [rng.randrange(3, 49152) for _ in range(120)]
    out = []
    for i in range(16):
        n = [1, 5, 17, 33, 64, 100, 150, 290][i % 8]
        p = [rng.randrange(3, 49152) for _ in range(n)]
        out.append(shared + p[:40] if i % 3 == 0 else p)
    return out
