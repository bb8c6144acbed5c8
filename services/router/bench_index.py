"""Latency of PrefixIndex.longest_prefix on a loaded index (what the router pays per request).

    python -m pdserve.services.router.bench_index --redis-url redis://127.0.0.1:6379/0

Fills a private namespace with `num_blocks` distinct block hashes: chains of `prompt_blocks`
blocks, each chain held by two of `num_instances` instances (one holds the whole chain, one a
random leading part). Then times three kinds of lookup over all instances:

    full_hit   a stored chain: some instance holds all blocks, the Lua walk visits every block
    partial    the first half of a stored chain, then new blocks: the walk stops midway
    miss       a new prompt: the walk stops after the first block

Prints p50 / p99 / mean client-side latency in milliseconds and the mean time Redis itself spent
per lookup (from INFO commandstats: separates Redis's cost from client and scheduling noise) as
JSON, and removes what it wrote.

`--decision` times the router's whole per-request decision instead, `InstancePool.route(prompt
token ids)` as DisaggClient calls it: hash the prompt's blocks (BLAKE2b chain), one
longest_prefix over every instance (half prefill, half decode, each with a load), and the cost
function with conditional disaggregation. The same fill, but chains are kept as token ids; the
three parts are also timed on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import uuid

from pdserve.common.block_hash import hash_blocks
from pdserve.common.prefix_index import PrefixIndex
from pdserve.common.registry import open_redis

BLOCK_SIZE = 16


def _chain(rng: random.Random, num_blocks: int) -> list[bytes]:
    return hash_blocks([rng.randrange(50_000) for _ in range(num_blocks * BLOCK_SIZE)], BLOCK_SIZE)


def _summary(latencies_s: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_s)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50_ms": round(pick(0.50), 4), "p99_ms": round(pick(0.99), 4),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 4)}


async def _evalsha_stats(client) -> tuple[int, int]:
    """(calls, microseconds) Redis has spent in EVALSHA: the server's share of a lookup."""
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    return stats.get("calls", 0), stats.get("usec", 0)


async def bench_longest_prefix(redis_url: str, num_blocks: int = 100_000, num_instances: int = 16,
                               prompt_blocks: int = 64, num_queries: int = 2000, seed: int = 0) -> dict:
    rng = random.Random(seed)
    instance_ids = [f"instance-{i}" for i in range(num_instances)]
    index = PrefixIndex(redis_url, namespace=f"pdserve-bench-{uuid.uuid4().hex[:8]}")
    stats_client = open_redis(redis_url)
    try:
        chains = [_chain(rng, prompt_blocks) for _ in range(num_blocks // prompt_blocks)]
        started = time.perf_counter()
        num_entries = 0
        for chain in chains:
            full, partial = rng.sample(instance_ids, 2)
            held = chain[:rng.randrange(1, prompt_blocks + 1)]
            await index.publish(full, stored=chain, removed=[])
            await index.publish(partial, stored=held, removed=[])
            num_entries += len(chain) + len(held)
        publish_s = time.perf_counter() - started

        queries = {
            "full_hit": lambda: rng.choice(chains),
            "partial": lambda: rng.choice(chains)[:prompt_blocks // 2] + _chain(rng, prompt_blocks // 2),
            "miss": lambda: _chain(rng, prompt_blocks),
        }
        results = {}
        for name, make_prompt in queries.items():
            prompts = [make_prompt() for _ in range(num_queries)]
            for prompt in prompts[:50]:  # warm-up: script load, connection
                await index.longest_prefix(prompt, instance_ids)
            latencies = []
            calls_before, usec_before = await _evalsha_stats(stats_client)
            for prompt in prompts:
                t0 = time.perf_counter()
                await index.longest_prefix(prompt, instance_ids)
                latencies.append(time.perf_counter() - t0)
            calls_after, usec_after = await _evalsha_stats(stats_client)
            results[name] = _summary(latencies)
            num_calls = calls_after - calls_before
            results[name]["redis_server_us"] = round((usec_after - usec_before) / num_calls, 1)
        for instance_id in instance_ids:
            await index.clear_instance(instance_id)
    finally:
        await index.close()
        await stats_client.aclose()
    return {"num_blocks": len(chains) * prompt_blocks, "num_entries": num_entries,
            "num_instances": num_instances, "prompt_blocks": prompt_blocks, "num_queries": num_queries,
            "publish_entries_per_s": round(num_entries / publish_s), "longest_prefix": results}


def _token_chain(rng: random.Random, num_blocks: int) -> list[int]:
    return [rng.randrange(50_000) for _ in range(num_blocks * BLOCK_SIZE)]


async def bench_decision(redis_url: str, num_blocks: int = 100_000, num_instances: int = 16,
                         prompt_blocks: int = 64, num_queries: int = 2000, seed: int = 0) -> dict:
    """p50 / p99 of InstancePool.route: hashing + prefix lookup + scoring (see the module doc)."""
    from pdserve.services.router import routing
    from pdserve.services.router.instances import InstancePool
    from pdserve.common.registry import InstanceInfo, Load, Registry

    rng = random.Random(seed)
    namespace = f"pdserve-bench-{uuid.uuid4().hex[:8]}"
    index = PrefixIndex(redis_url, namespace=namespace)
    infos = [InstanceInfo(f"instance-{i}", "prefill" if i % 2 == 0 else "decode", f"127.0.0.1:{i + 1}", "", "bench",
                          BLOCK_SIZE, 1 << 16) for i in range(num_instances)]
    pool = InstancePool(Registry(redis_url, namespace=namespace), index, routing.RoutingConfig())
    now = time.time()  # loads as a heartbeat left them (no refresh runs here: no workers)
    pool.instances = [(info, Load(num_running=rng.randrange(8), num_waiting=rng.randrange(4),
                                  kv_usage=rng.random(), updated_at=now)) for info in infos]
    ids = [info.instance_id for info in infos]
    try:
        chains = [_token_chain(rng, prompt_blocks) for _ in range(num_blocks // prompt_blocks)]
        for tokens in chains:
            chain = hash_blocks(tokens, BLOCK_SIZE)
            full, partial = rng.sample(ids, 2)
            await index.publish(full, stored=chain, removed=[])
            await index.publish(partial, stored=chain[:rng.randrange(1, prompt_blocks + 1)], removed=[])
        prompts = {"full_hit": [rng.choice(chains) + [7] * 5 for _ in range(num_queries)],
                   "miss": [_token_chain(rng, prompt_blocks) + [7] * 5 for _ in range(num_queries)]}
        results = {}
        for name, queries in prompts.items():
            for tokens in queries[:50]:  # warm-up
                await pool.route(tokens)
            route_s, hash_s, lookup_s, score_s, reasons = [], [], [], [], {}
            for tokens in queries:
                t0 = time.perf_counter()
                route = await pool.route(tokens)
                route_s.append(time.perf_counter() - t0)
                reasons[route.reason] = reasons.get(route.reason, 0) + 1
            for tokens in queries[:500]:  # the parts, one at a time
                t0 = time.perf_counter()
                hashes = hash_blocks(tokens, BLOCK_SIZE)
                t1 = time.perf_counter()
                hits = await index.longest_prefix(hashes, ids)
                t2 = time.perf_counter()
                routing.plan_route(len(tokens), BLOCK_SIZE, pool.candidates("prefill", hits, ()),
                                   pool.candidates("decode", hits, ()), pool.blocks_per_request, pool.config)
                t3 = time.perf_counter()
                hash_s.append(t1 - t0)
                lookup_s.append(t2 - t1)
                score_s.append(t3 - t2)
            results[name] = {"route": _summary(route_s), "hash": _summary(hash_s),
                             "longest_prefix": _summary(lookup_s), "score": _summary(score_s), "reasons": reasons}
        for instance_id in ids:
            await index.clear_instance(instance_id)
    finally:
        await pool.close()
        await pool.registry.close()
        await index.close()
    return {"num_blocks": len(chains) * prompt_blocks, "num_instances": num_instances,
            "prompt_tokens": prompt_blocks * BLOCK_SIZE + 5, "num_queries": num_queries, "decision": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pdserve.services.router.bench_index",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--num-blocks", type=int, default=100_000)
    parser.add_argument("--num-instances", type=int, default=16)
    parser.add_argument("--prompt-blocks", type=int, default=64)
    parser.add_argument("--num-queries", type=int, default=2000)
    parser.add_argument("--decision", action="store_true",
                        help="time the router's whole decision (hash + lookup + scoring), not the lookup alone")
    args = parser.parse_args(argv)
    bench = bench_decision if args.decision else bench_longest_prefix
    result = asyncio.run(bench(args.redis_url, args.num_blocks, args.num_instances, args.prompt_blocks,
                               args.num_queries))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
