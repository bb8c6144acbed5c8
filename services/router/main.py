"""`pdserve router` / `python -m pdserve.services.router`: the OpenAI API over a disaggregated fleet.

Lifecycle:
    start:  tokenizer of --model (torch-free: common/tokenizer.py) -> Registry + PrefixIndex
            clients of --redis-url -> InstancePool (refreshes the fleet every 0.5 s) ->
            DisaggClient (the EngineClient) -> FastAPI app (OpenAI routes, /admin, /metrics) ->
            uvicorn; one ready line once it listens
    run:    until SIGINT / SIGTERM (uvicorn stops accepting, lets open requests finish for
            --shutdown-grace seconds; those still open 1 s before its end are aborted: each ends
            with finish_reason "abort", a stream with its finishing chunk and [DONE])
    stop:   lease releases still on their way awaited; pool, index and registry clients closed

This process never imports torch or numpy (tests/router/test_router_process.py checks it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal

from pdserve.common.config import ConfigError, check_max_logprobs, env_flag
from pdserve.services.router.limits import add_limit_args, limits_of

INDEX_TIMEOUT_S = 0.25  # a prefix lookup slower than this is worth less than routing by load alone


def add_router_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", required=True, help="the fleet's Redis (instances register there)")
    p.add_argument("--model", default=None, help="model whose tokenizer the router uses (default: SmolLM2)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or .gguf (default: the model's)")
    p.add_argument("--chat-template", default=None,
                   help="chat template: a Jinja file, or the template itself (default: the tokenizer's)")
    p.add_argument("--served-model-name", default=None, nargs="+",
                   help="name(s) in the API: answers carry the first, requests may name any (default: the model's)")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds to")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: any free port)")
    p.add_argument("--workers", type=int, default=1,
                   help="router processes sharing the port (SO_REUSEPORT; the kernel spreads connections over "
                        "them): each routes, tokenizes and streams its connections' requests. /metrics sums the "
                        "request metrics over the processes; its routing counters and /admin/stats describe "
                        "the process that answers")
    p.add_argument("--worker-of", default=None, help=argparse.SUPPRESS)  # internal: a child of --workers
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/* and /admin/*")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds a SIGTERM lets open requests finish; those still open 1 s before its end are "
                        "aborted and answered (finish_reason abort)")
    p.add_argument("--routing", default="prefix", choices=["prefix", "load", "round_robin"],
                   help="prefix: cached-prefix overlap vs load (docs/routing.md); load: least loaded; "
                        "round_robin: rotation (a baseline)")
    add_limit_args(p)
    from pdserve.services.router.http_options import add_http_args
    add_http_args(p)
    p.add_argument("--internal-token", default=env_flag("PDSERVE_INTERNAL_TOKEN"),
                   help="shared secret sent on every gRPC call to the workers (default: $PDSERVE_INTERNAL_TOKEN)")
    p.add_argument("--disagg-min-prompt-tokens", type=int, default=64,
                   help="prompts shorter than this, or whose uncached part on the chosen decode instance is, "
                        "skip prefill and are computed by decode (0: always prefill)")
    p.add_argument("--decode-streams", default="shared", choices=["shared", "per-request"],
                   help="shared: one DecodeStream per decode worker carries every request's tokens, a "
                        "message per step for all (fewer messages and wake-ups on both ends); per-request: "
                        "a Decode call per request (the older protocol)")
    from pdserve.common.sampling_params import DEFAULT_MAX_LOGPROBS
    p.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS,
                   help="most logprobs a request may ask for per token (-1: no cap); give the workers the same")
    p.add_argument("--generation-config", default="auto",
                   help="default sampling parameters of requests that set none: auto: the model folder's "
                        "generation_config.json (vLLM's default); vllm: none; or a folder holding one")
    p.add_argument("--response-store-ttl", type=float, default=None,
                   help="seconds a stored /v1/responses answer stays in Redis for previous_response_id and GET "
                        "(default: 3600)")
    from pdserve.services.router.tool_calls import add_tool_args
    add_tool_args(p)
    from pdserve.services.serve import add_metrics_args, add_request_log_args
    add_metrics_args(p)
    add_request_log_args(p)


def fleet_stats(pool):
    """The fleet's gauges for /metrics: sums over the live instances' last reported load."""
    from pdserve.common.stats import EngineStats
    loads = [load for _, load in pool.instances if load is not None]
    return EngineStats(num_running=sum(x.num_running for x in loads), num_waiting=sum(x.num_waiting for x in loads),
                       kv_usage=max((x.kv_usage for x in loads), default=0.0),
                       num_free_blocks=sum(x.num_free_blocks for x in loads),
                       prefix_queries=sum(x.prefix_queries for x in loads),
                       prefix_hits=sum(x.prefix_hits for x in loads))


def run_router(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise ConfigError(f"--workers must be positive, got {args.workers}")
    if args.shutdown_grace <= 0:
        raise ConfigError(f"--shutdown-grace must be positive, got {args.shutdown_grace}")
    if args.response_store_ttl is not None and args.response_store_ttl <= 0:
        raise ConfigError(f"--response-store-ttl must be positive, got {args.response_store_ttl}")
    check_max_logprobs(args.max_logprobs)
    limits_of(args)  # refuses limits of 0 or less before anything starts
    from pdserve.services.router.http_options import check_http_args
    check_http_args(args)
    if args.workers > 1:
        if args.metrics_port is not None:
            raise ConfigError("--metrics-port cannot be shared by --workers processes: /metrics is served on "
                              "the API port (the request metrics summed over the processes)")
        from pdserve.services.router.workers import run_workers
        return run_workers(args, _worker_main)
    _run_one(args)


def _worker_main(args: argparse.Namespace, ready) -> None:
    """A child of `--workers`: one router on the shared port; it writes to `ready` (a pipe's end)
    once it listens."""
    import sys

    from pdserve.services.entry import run_parsed
    from pdserve.services.local_stack import terminate_with_parent
    terminate_with_parent(args.parent_pid)  # a SIGKILLed parent leaves no router holding the port
    args.ready_event = ready
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the children with SIGTERM
    sys.exit(run_parsed(f"pdserve router (worker {args.worker_of})", _run_one, args))


def _run_one(args: argparse.Namespace) -> None:
    import uvicorn

    from pdserve.common.metrics import StatsCollector
    from pdserve.common.model_path import resolve_model_path, served_names
    from pdserve.common.prefix_index import PrefixIndex
    from pdserve.common.registry import Registry
    from pdserve.common.tokenizer import load_tokenizer
    from fastapi import Depends

    from pdserve.services.router.admin import add_admin_routes, admin_guard
    from pdserve.services.router.app import build_app
    from pdserve.services.router.disagg_client import DisaggClient
    from pdserve.services.router.http_options import add_cors, scheme, uvicorn_options
    from pdserve.services.router.instances import InstancePool
    from pdserve.services.router.routing import RoutingConfig

    from pdserve.common.uptime import process_age_s
    from pdserve.services.router.tool_calls import check_tool_args
    from pdserve.services.entry import latch_stop_signals, until_serving
    from pdserve.services.serve import abort_before_grace_ends, serve_metrics_apart

    check_tool_args(args)
    from pdserve.common.generation_config import sampling_defaults
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path, args.tokenizer, args.chat_template)
    defaults = sampling_defaults(model_path, args.generation_config)
    name, *aliases = served_names(args.served_model_name, args.model)
    try:
        config = RoutingConfig(mode=args.routing, disagg_min_prompt_tokens=args.disagg_min_prompt_tokens)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    stop_requested = latch_stop_signals()  # the clients below are closed and the process exits 0

    from pdserve.services.router.responses import STORE_TTL_S, RedisResponseStore

    async def main():
        registry = Registry(args.redis_url)
        index = PrefixIndex(args.redis_url, timeout_s=INDEX_TIMEOUT_S)
        pool = InstancePool(registry, index, config, internal_token=args.internal_token)
        await pool.start()
        client = DisaggClient(tokenizer, name, pool, shared_decode_streams=args.decode_streams == "shared")
        collector = StatsCollector(name, engine=lambda: fleet_stats(pool), router=lambda: client.stats,
                                   redis_up=lambda: pool.redis_ok)
        store = RedisResponseStore(args.redis_url, STORE_TTL_S if args.response_store_ttl is None
                                   else args.response_store_ttl)
        app = build_app(client, name, api_key=args.api_key, collector=collector, limits=limits_of(args),
                        tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
                        metrics_route=args.enable_metrics and args.metrics_port is None,
                        metrics_dir=getattr(args, "metrics_dir", None), response_store=store,
                        log_requests=args.enable_log_requests, max_log_len=args.max_log_len,
                        sampling_defaults=defaults, fastapi_docs=not args.disable_fastapi_docs,
                        max_logprobs=args.max_logprobs, model_root=args.model, model_aliases=tuple(aliases))
        metrics_apart = serve_metrics_apart(app, args, args.host)
        add_admin_routes(app, pool, registry, api_key=args.api_key)

        @app.get("/admin/stats", dependencies=[Depends(admin_guard(args.api_key))])
        async def admin_stats():
            return {**dataclasses.asdict(client.stats), "recent": list(client.recent), "redis_ok": pool.redis_ok,
                    "redis_up": int(pool.redis_ok),
                    "redis_outages": pool.num_redis_outages, "routing": pool.config.mode,
                    "blocks_per_request": round(pool.blocks_per_request, 3), "max_model_len": pool.max_model_len,
                    "instances": [{"instance_id": i.instance_id, "role": i.role, "grpc_address": i.grpc_address,
                                   "metrics_address": i.metrics_address, "status": i.status,
                                   "load": None if load is None else load.__dict__}
                                  for i, load in pool.instances]}
        add_cors(app, args)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                               timeout_graceful_shutdown=args.shutdown_grace, **uvicorn_options(args)))
        abort_before_grace_ends(server, client, args.shutdown_grace)
        ready = getattr(args, "ready_event", None)
        if ready is None:
            task = asyncio.create_task(server.serve())
        else:  # one of --workers: its own socket on the shared port
            from pdserve.services.router.workers import shared_port_socket
            task = asyncio.create_task(server.serve(sockets=[shared_port_socket(args.host, args.port)]))
        if await until_serving(server, task, stop_requested):
            if ready is not None:  # the parent prints the ready lines once every child listens
                try:
                    ready.send_bytes(b"1")
                except OSError:  # the parent is gone; its death signal stops this process
                    pass
                ready.close()
            else:
                port = server.servers[0].sockets[0].getsockname()[1]
                apart = "" if metrics_apart is None else \
                    f", metrics on http://{args.host}:{metrics_apart.server_port}/metrics"
                print(f"pdserve router: ready in {process_age_s():.2f} s{apart}", flush=True)
                print(f"pdserve router serving {name} on {scheme(args)}://{args.host}:{port} (routing: {config.mode})",
                      flush=True)
        await task
        if metrics_apart is not None:
            metrics_apart.shutdown()
        await client.close()
        if client.decode_muxes is not None:
            client.decode_muxes.close()
        await pool.close()
        await index.close()
        await registry.close()
        await store.close()
    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    from pdserve.services.entry import run_main
    return run_main("pdserve router", __doc__.splitlines()[0], add_router_args, run_router, argv)
