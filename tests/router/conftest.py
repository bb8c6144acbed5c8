"""Fixtures for router tests: a real redis-server per test (tests/redis_server.py)."""

import sys
from pathlib import Path

import pytest

# tests/ is not a package: make its helper modules importable from this folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis_server import RedisServer  # noqa: E402


@pytest.fixture
def redis_server():
    """A running server the test may stop / restart (same port, data lost)."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url
