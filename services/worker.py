"""What prefill and decode workers share: engine start-up, the gRPC server, registration in Redis.

    pdserve prefill|decode --redis-url URL [--grpc-port P] [--kv-transport tcp|ucx] [engine flags]

A worker runs one AsyncLLM (engine thread), one grpc.aio server (its role's service), its KV
transport endpoint, and a Heartbeater that keeps its record and live load in Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import uuid

import grpc

from pdserve.common.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.proto import pdserve_pb2 as pb

log = logging.getLogger("pdserve.worker")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=0, help="0: pick a free port")
    p.add_argument("--kv-transport", default="tcp", choices=["tcp", "ucx"])
    p.add_argument("--redis-url", default=None, help="register in this Redis (pdserve router finds it there)")
    p.add_argument("--instance-id", default=None)
    p.add_argument("--lease-ttl", type=float, default=30.0, help="seconds a prefilled KV stays pinned for decode")
    p.add_argument("--ready-file", default=None, help="write 'grpc_address kv_address' here once serving")


def engine_config(args) -> EngineConfig:
    from pdserve.services.cli import engine_kwargs
    kw = engine_kwargs(args)
    return EngineConfig(
        model=ModelConfig(model=kw["model"] or "default", dtype=kw["dtype"], max_model_len=kw["max_model_len"],
                          tokenizer=kw["tokenizer"], load_format=kw["load_format"], device=kw["device"],
                          served_model_name=args.served_model_name),
        cache=CacheConfig(block_size=kw["block_size"], num_blocks=kw["num_gpu_blocks_override"],
                          kv_cache_memory_gb=kw["kv_cache_memory_gb"], enable_prefix_caching=kw["enable_prefix_caching"],
                          gpu_memory_utilization=kw["gpu_memory_utilization"]),
        scheduler=SchedulerConfig(max_num_seqs=kw["max_num_seqs"], max_num_batched_tokens=kw["max_num_batched_tokens"],
                                  enable_chunked_prefill=kw["enable_chunked_prefill"],
                                  max_model_len=kw["max_model_len"] or kw["max_num_batched_tokens"]))


def model_id(engine: AsyncLLM) -> str:
    """Identity of the weights, equal across a fleet serving the same model."""
    path = engine.core.model_path
    return os.path.basename(os.path.normpath(path))


def load_proto(engine: AsyncLLM) -> pb.Load:
    s = engine.core.stats()
    return pb.Load(num_running=s["num_running"], num_waiting=s["num_waiting"], kv_usage=s["kv_usage"],
                   num_free_blocks=s["num_free_blocks"], num_total_blocks=s["num_blocks"])


def health(engine: AsyncLLM, instance_id: str, role: int, status: int = pb.SERVING) -> pb.HealthResponse:
    return pb.HealthResponse(instance_id=instance_id, role=role, model=model_id(engine),
                             block_size=engine.core.kv.block_size, load=load_proto(engine), status=status,
                             max_model_len=engine.max_model_len)


async def serve_worker(args, role: str, make_servicer) -> None:
    """Start engine + gRPC + registration; run until SIGINT/SIGTERM."""
    engine = AsyncLLM(engine_config(args))
    instance_id = args.instance_id or f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    port = server.add_insecure_port(f"{args.host}:{args.grpc_port}")
    grpc_address = f"{args.host}:{port}"
    kv_address, closers = await make_servicer(engine, instance_id, grpc_address, server)
    await server.start()

    heartbeater = None
    if args.redis_url:
        from pdserve.services.router.registry import InstanceInfo, Load, Registry, Heartbeater
        registry = Registry(args.redis_url)
        info = InstanceInfo(instance_id=instance_id, role=role, grpc_address=grpc_address, kv_address=kv_address,
                            model=model_id(engine), block_size=engine.core.kv.block_size,
                            num_blocks=engine.core.runner.num_blocks)

        def load_fn() -> Load:
            s = engine.core.stats()
            return Load(num_running=s["num_running"], num_waiting=s["num_waiting"], kv_usage=s["kv_usage"],
                        num_free_blocks=s["num_free_blocks"])
        heartbeater = Heartbeater(registry, info, load_fn)
        await heartbeater.start()
    print(f"pdserve {role} {instance_id} grpc={grpc_address} kv={kv_address}", flush=True)
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            f.write(f"{grpc_address} {kv_address}\n")
        os.replace(args.ready_file + ".tmp", args.ready_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if heartbeater is not None:
        await heartbeater.stop()
    await server.stop(grace=2)
    for close in closers:
        await close()
    engine.shutdown()
