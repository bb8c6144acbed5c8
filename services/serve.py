"""`pdserve serve [MODEL]`: the OpenAI API and the engine in one process (no Redis, no services).

    AsyncLLM (engine thread) <-- EngineClient -- build_app (FastAPI) <-- uvicorn <-- clients

With no MODEL it serves the packaged SmolLM2-135M-Instruct. The port is bound before the model
loads (a busy port fails at once); once it listens, two lines say so: "pdserve serve: ready in
X s (...)" (seconds since the process started) and "pdserve serving MODEL on http[s]://HOST:PORT"
(`--port 0` picks a free port and prints it). /metrics is on the API port, or only on
`--metrics-port` when given (a scrape network apart from the API's); `--no-enable-metrics`
serves none.
SIGINT / SIGTERM: uvicorn stops accepting, lets open requests finish for a few seconds (those still
open 1 s before the end are aborted: they end with finish_reason "abort"), then the engine thread
is stopped and the command exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time

from pdserve.common.config import ConfigError
from pdserve.common.model_path import served_names

log = logging.getLogger("pdserve.serve")

GRACEFUL_SHUTDOWN_S = 5
ABORT_MARGIN_S = 1.0  # open requests are aborted this long before uvicorn cancels their handlers


def add_parser(sub, add_engine_args) -> None:
    from pdserve.services.router.limits import add_limit_args
    p = sub.add_parser("serve", help="OpenAI-compatible server: router and engine in one process")
    p.add_argument("model_path", nargs="?", metavar="MODEL", default=None,
                   help="HF folder or .gguf file (or --model; default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address the HTTP server binds to (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port; 0: any free port (printed when ready)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    add_limit_args(p)
    from pdserve.services.router.http_options import add_http_args
    add_http_args(p)
    add_metrics_args(p)
    from pdserve.common.stat_logger import add_stat_log_args
    add_stat_log_args(p)
    add_request_log_args(p)
    add_engine_args(p)  # includes --model and --served-model-name
    from pdserve.services.router.tool_calls import add_tool_args
    add_tool_args(p)
    p.set_defaults(func=cmd_serve)


def add_request_log_args(p: argparse.ArgumentParser) -> None:
    """vLLM's request-logging flags, on serve and the router."""
    p.add_argument("--enable-log-requests", action="store_true",
                   help="log each request as it arrives (its prompt, up to --max-log-len characters / token "
                        "ids, and its sampling parameters) and as it ends")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="accepted for vLLM's command lines: requests are logged only with --enable-log-requests")
    p.add_argument("--max-log-len", type=int, default=None,
                   help="characters of the prompt and token ids --enable-log-requests prints (default: all)")


def add_metrics_args(p: argparse.ArgumentParser) -> None:
    """`--enable-metrics` / `--metrics-port` of serve and the router."""
    p.add_argument("--enable-metrics", action=argparse.BooleanOptionalAction, default=True,
                   help="serve Prometheus metrics (vllm:* and pdserve:* names) at /metrics")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve /metrics on this port only, not on the API port (default: on the API port)")


def serve_metrics_apart(app, args: argparse.Namespace, host: str):
    """Start /metrics on --metrics-port (returns the server, `shutdown()` at exit) or None."""
    if not args.enable_metrics or args.metrics_port is None:
        return None
    try:
        return app.state.server.metrics.serve_http(host, args.metrics_port)
    except OSError as e:
        raise ConfigError(f"--metrics-port {args.metrics_port}: cannot listen on {host}: {e.strerror or e}") from None


def cmd_serve(args: argparse.Namespace) -> None:
    if args.model_path and args.model and args.model_path != args.model:
        raise ConfigError(f"two models given: {args.model_path} and --model {args.model}")
    args.model = args.model_path or args.model
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    from pdserve.services.router.tool_calls import check_tool_args
    check_tool_args(args)
    from pdserve.services.router.http_options import add_cors, check_http_args, scheme, uvicorn_options
    check_http_args(args)
    from pdserve.services.router.limits import limits_of
    limits = limits_of(args)
    from pdserve.common.uptime import process_age_s

    import uvicorn

    from pdserve.common.config import engine_config
    from pdserve.common.engine.async_llm import AsyncLLM
    from pdserve.common.metrics import StatsCollector
    from pdserve.services.router.app import build_app
    from pdserve.services.entry import latch_stop_signals

    name, *aliases = served_names(args.served_model_name, args.model)
    with _bind(args.host, args.port) as sock:
        t0 = time.perf_counter()
        engine = AsyncLLM(engine_config(args))
        engine_s = time.perf_counter() - t0
        metrics_apart = stat_logger = None
        try:
            from pdserve.common.gpu_metrics import gpu_stats_source
            collector = StatsCollector(name, engine=engine.core.stats, gpu=gpu_stats_source(engine.core.runner.device))
            app = build_app(engine, name, api_key=args.api_key, collector=collector, limits=limits,
                            tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
                            metrics_route=args.enable_metrics and args.metrics_port is None,
                            log_requests=args.enable_log_requests, max_log_len=args.max_log_len,
                            sampling_defaults=engine.core.sampling_defaults,
                            fastapi_docs=not args.disable_fastapi_docs,
                            max_logprobs=engine.core.config.model.max_logprobs, model_root=args.model,
                            model_aliases=tuple(aliases))
            add_cors(app, args)
            metrics_apart = serve_metrics_apart(app, args, args.host)
            config = uvicorn.Config(app, host=args.host, port=args.port,
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, **uvicorn_options(args))
            server = uvicorn.Server(config)
            from pdserve.common.stat_logger import start_stat_logger
            stat_logger = start_stat_logger(args, engine.core.stats, "Engine")
            stop_requested = latch_stop_signals()  # the engine is always shut down cleanly
            ready = f"pdserve serve: ready in {{:.2f}} s (engine {engine_s:.2f} s)"
            if metrics_apart is not None:
                ready += f", metrics on http://{args.host}:{metrics_apart.server_port}/metrics"
            asyncio.run(_serve(server, sock, name, f"{scheme(args)}://", args.host,
                               lambda: ready.format(process_age_s()), stop_requested, engine))
        finally:
            if stat_logger is not None:
                stat_logger.stop()
            if metrics_apart is not None:
                metrics_apart.shutdown()
            engine.shutdown()


def _bind(host: str, port: int) -> socket.socket:
    # proto IPPROTO_TCP, not 0: accepted sockets inherit it, and asyncio turns Nagle off (TCP_NODELAY)
    # only on sockets whose proto says TCP. With Nagle on, a stream's first chunk waited for the
    # client's delayed ACK of the headers: +40 ms TTFT for a request sent right after another one on
    # a keep-alive connection (docs/benchmarks.md, twelfth session)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


async def _serve(server, sock: socket.socket, name: str, scheme: str, host: str, ready_line, stop_requested,
                 engine=None) -> None:
    from pdserve.services.entry import until_serving
    if engine is not None:
        abort_before_grace_ends(server, engine, GRACEFUL_SHUTDOWN_S)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    if await until_serving(server, task, stop_requested):
        print(ready_line(), flush=True)
        shown = f"[{host}]" if ":" in host else host
        print(f"pdserve serving {name} on {scheme}{shown}:{sock.getsockname()[1]}", flush=True)
    await task


def abort_before_grace_ends(server, engine, grace_s: float) -> None:
    """Requests still open ABORT_MARGIN_S before uvicorn's grace period (`grace_s`, its
    timeout_graceful_shutdown) ends are aborted by `engine.abort_all()` (AsyncLLM for serve,
    DisaggClient for the router), so each ends as an answer (finish_reason "abort"; a stream's
    last chunks and [DONE]). Before, uvicorn cancelled their handlers at the deadline: a
    non-streaming client got a plain-text 500, a stream was cut without an error event or [DONE],
    and each logged a traceback. A timer armed when uvicorn's shutdown starts (after a stop
    signal), cancelled when it ends. A grace period shorter than twice the margin aborts at its
    half."""
    shutdown = server.shutdown
    abort_after_s = max(grace_s - ABORT_MARGIN_S, grace_s / 2)

    def abort_open() -> None:
        if engine.abort_all():
            log.warning("aborted the requests still open %.1f s after the stop signal", abort_after_s)

    async def shutdown_aborting(sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(abort_after_s, abort_open)
        try:
            await shutdown(sockets=sockets)
        finally:
            timer.cancel()
    server.shutdown = shutdown_aborting
