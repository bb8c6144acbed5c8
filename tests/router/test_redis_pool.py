"""The router's Redis clients wait for a pooled connection instead of failing when more calls
run at once than the pool holds (redis-py's default pool raised "Too many connections" past 100
concurrent calls; a router at 100 requests/s hit it and routed by load alone meanwhile)."""

from __future__ import annotations

import asyncio

from pdserve.common.registry import REDIS_MAX_CONNECTIONS, open_redis


def test_more_concurrent_calls_than_connections_all_succeed(redis_url):
    async def main():
        client = open_redis(redis_url)
        try:
            n = 2 * REDIS_MAX_CONNECTIONS
            # BLPOP with a short timeout holds its connection for a while: the calls overlap, and the
            # second half waits for the first half's connections (two rounds of 0.1 s, well inside
            # the pool's 1 s wait even on a loaded machine; four rounds of 0.2 s failed once in five)
            results = await asyncio.gather(*(client.blpop([f"pool-test-{i}"], timeout=0.1)
                                             for i in range(n)))
            assert results == [None] * n
            assert await client.ping()
        finally:
            await client.aclose()
    asyncio.run(main())
