"""`pdserve serve [MODEL]`: the OpenAI API and the engine in one process (no Redis, no services).

    AsyncLLM (engine thread) <-- EngineClient -- build_app (FastAPI) <-- uvicorn <-- clients

With no MODEL it serves the packaged SmolLM2-135M-Instruct. Once the socket listens it prints one
line, "pdserve serving MODEL on http://HOST:PORT" (`--port 0` picks a free port and prints it).
SIGINT / SIGTERM: uvicorn stops accepting, lets open requests finish for a few seconds, then the
engine thread is stopped and the command exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from pdserve.common.config import ConfigError

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
GRACEFUL_SHUTDOWN_S = 5


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible server: router and engine in one process")
    p.add_argument("model_path", nargs="?", metavar="MODEL", default=None,
                   help="HF folder or .gguf file (or --model; default: packaged SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (printed when ready)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    add_engine_args(p)  # includes --model and --served-model-name
    p.set_defaults(func=cmd_serve)


def served_model_name(args: argparse.Namespace) -> str:
    if args.served_model_name:
        return args.served_model_name
    if not args.model:
        return DEFAULT_SERVED_NAME
    name = os.path.basename(os.path.normpath(args.model))
    return name[:-len(".gguf")] if name.endswith(".gguf") else name


def cmd_serve(args: argparse.Namespace) -> None:
    if args.model_path and args.model and args.model_path != args.model:
        raise ConfigError(f"two models given: {args.model_path} and --model {args.model}")
    args.model = args.model_path or args.model
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")

    import uvicorn

    from pdserve.common.engine.async_llm import AsyncLLM
    from pdserve.common.engine.llm import LLM
    from pdserve.services.cli import engine_kwargs
    from pdserve.services.router.app import build_app

    name = served_model_name(args)
    engine = AsyncLLM(core=LLM(**engine_kwargs(args)).engine)  # LLM builds the EngineConfig from the flags
    try:
        app = build_app(engine, name, api_key=args.api_key, stats=engine.core.stats)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                                access_log=args.uvicorn_log_level in ("info", "debug", "trace"),
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        server = uvicorn.Server(config)
        # uvicorn handles SIGINT/SIGTERM while serving and re-raises them once it has stopped; these
        # handlers make that re-raise a no-op, so the engine below is always shut down cleanly.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        asyncio.run(_serve(server, name, args.host))
    finally:
        engine.shutdown()


async def _serve(server, name: str, host: str) -> None:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        port = server.servers[0].sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"pdserve serving {name} on http://{shown}:{port}", flush=True)
    await task
    if not server.started:
        raise ConfigError(f"cannot listen on {host}:{server.config.port} (is the port in use?)")
