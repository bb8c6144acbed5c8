"""A pdserve worker process: engine start-up, one gRPC server with BOTH services, registration in
Redis, the publication of its prefix cache to the router's prefix index, and its own /metrics.

    python -m pdserve.services.prefill|decode --redis-url URL [--grpc-port P] [--kv-transport tcp|ucx|nccl|ipc] [engine flags]
    (also `pdserve prefill|decode ...`)

Lifecycle:
    start:  AsyncLLM (engine thread) with the two KV connectors (common/kv_transfer/connector.py:
            LeaseConnector for the prefill half, PullConnector for the decode half) -> KV server
            and client of --kv-transport on every tensor-parallel rank (kv_ranks.py) -> grpc.aio
            server with Prefill + Decode services ->
            /metrics on --metrics-port -> Heartbeater (registry record + live load in Redis) and
            KVEventPublisher (prefix index) -> one ready line (and --ready-file)
    run:    until SIGINT / SIGTERM, or until the engine dies
    stop:   stop publishing (the index forgets this worker) -> deregister -> gRPC stops with a
            grace period -> KV transport closes -> engine thread stops
    engine died (its thread raised, a tensor-parallel rank died): its open requests failed at
            once (UNAVAILABLE: the router retries the prefill elsewhere / resubmits to another
            decode), Health says NOT_SERVING, then the same stop without the grace wait, and
            the process exits with status 1 (`pdserve up` or the orchestrator restarts it)

Role: the command (`prefill` or `decode`) is only the role it registers with. Routers send each
instance the work its registry record's role says, so an operator's switch (`pdserve admin
set-role`, which drains first) needs no restart: the record changes, `Heartbeater.info` follows it,
and the worker, already serving both services, reports the new role in Health and logs it.
Draining is likewise a routing state: routers stop sending; the worker finishes what it has (a
request from a router that has not refreshed yet is still served, not refused, so a drain can
never race with the switch back to serving).
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

from pdserve.common.config import EngineConfig, add_engine_args, engine_config
from pdserve.common.engine.async_llm import AsyncLLM, call_soon
from pdserve.common.engine.kv_connector import KVConnector
from pdserve.common.kv_transfer.connector import LeaseConnector, PullConnector
from pdserve.common.metrics import ServerMetrics, StatsCollector
from pdserve.common.stats import TransferStats
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.services import grpc_auth
from pdserve.common.gc_policy import freeze_startup_objects
from pdserve.services.decode.server import DecodeServicer, LeaseReleaser
from pdserve.services.prefill.server import PrefillServicer
from pdserve.services.worker.events import KVEventPublisher
from pdserve.services.worker.kv_ranks import start_worker_kv
from pdserve.services.worker.state import WorkerState, model_id

log = logging.getLogger("pdserve.worker")


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def advertised_host(bind_host: str, advertise_host: str | None) -> str:
    """What to register in Redis: a wildcard bind address is not an address anyone can dial, so
    it becomes this machine's IP (a container's IP on its network, from its /etc/hosts)."""
    if advertise_host:
        return advertise_host
    if bind_host not in WILDCARD_HOSTS:
        return bind_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError as e:
        raise SystemExit(f"pdserve: --host {bind_host!r} is a wildcard and this machine's name "
                         f"{socket.gethostname()!r} does not resolve ({e}): pass --advertise-host") from e


class WorkerConnector(KVConnector):
    """Both halves on one engine: every worker serves prefill and decode (its role is routing)."""

    def __init__(self, lease: LeaseConnector, pull: PullConnector):
        self.lease, self.pull = lease, pull

    def bind(self, kv, wake) -> None:
        self.lease.bind(kv, wake)
        self.pull.bind(kv, wake)

    def request_finished(self, req):
        return self.lease.request_finished(req)

    def num_external_tokens(self, req) -> int:
        return self.pull.num_external_tokens(req)

    def skip_load(self, req) -> None:
        self.pull.skip_load(req)

    def start_load(self, req, block_ids, num_cached_blocks) -> None:
        self.pull.start_load(req, block_ids, num_cached_blocks)

    def finished_loads(self):
        return self.pull.finished_loads()

    def cancel_load(self, req) -> None:
        self.pull.cancel_load(req)

    def on_step(self) -> None:
        self.lease.on_step()


def transfer_stats(lease: LeaseConnector, pull: PullConnector, kv_server) -> TransferStats:
    """kv_server: the KV servers' counters (kv_ranks.WorkerKV: every tensor-parallel rank's)."""
    latencies, pull.pull_seconds = pull.pull_seconds, []
    return TransferStats(leases_granted=lease.num_leases, leases_released=lease.num_released,
                         leases_expired=lease.num_expired, leases_active=lease.num_active,
                         bytes_sent=kv_server.bytes_sent, pulls_served=kv_server.num_transfers,
                         serve_failures=kv_server.num_failures, pulls=pull.num_pulls,
                         pull_failures=pull.num_failures, bytes_received=pull.bytes_received,
                         pull_seconds=pull.seconds, new_pull_latencies=latencies)


async def serve_worker(args, role: str, config: EngineConfig) -> None:
    """Start everything (module docstring), run until SIGINT/SIGTERM, stop in order."""
    loop = asyncio.get_running_loop()
    lease = LeaseConnector(lease_ttl_s=args.lease_ttl)
    releaser = LeaseReleaser(args.internal_token)
    pull = PullConnector({}, loop, releaser, deadline_s=args.pull_deadline)
    engine = AsyncLLM(config, connector=WorkerConnector(lease, pull))
    state = WorkerState(engine, args.instance_id or f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}", role)
    args.advertise_host = advertised_host(args.host, args.advertise_host)

    kv = await start_worker_kv(engine.core, args.kv_transport, args.host, args.advertise_host, lease, pull)
    kv_address = kv.shards[0].address  # rank 0's: what decode workers dial
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20), *grpc_auth.SERVER_OPTIONS],
                             interceptors=grpc_auth.server_interceptors(args.internal_token))
    port = server.add_insecure_port(f"{args.host}:{args.grpc_port}")
    grpc_address = f"{args.advertise_host}:{port}"
    pb_grpc.add_PrefillServicer_to_server(
        PrefillServicer(state, lease, grpc_address, kv.shards, args.kv_transport), server)
    pb_grpc.add_DecodeServicer_to_server(DecodeServicer(state, pull, args.stream_interval_ms / 1000,
                                                             args.stream_messages_per_s), server)
    await server.start()

    name = engine.model_name
    from pdserve.common.gpu_metrics import gpu_stats_source
    metrics = ServerMetrics(name, engine.max_model_len, StatsCollector(
        name, engine=engine.core.stats, transfer=lambda: transfer_stats(lease, pull, kv),
        gpu=gpu_stats_source(engine.core.runner.device)))
    engine.request_metrics = metrics  # vLLM's request metrics from this worker's deltas
    metrics_server = metrics.serve_http(args.host, args.metrics_port)
    metrics_address = f"http://{args.advertise_host}:{metrics_server.server_port}/metrics"

    heartbeater = publisher = watcher = None
    if args.redis_url:
        from pdserve.common.prefix_index import PrefixIndex
        from pdserve.common.registry import Heartbeater, InstanceInfo, Load, Registry
        registry = Registry(args.redis_url)
        info = InstanceInfo(instance_id=state.instance_id, role=role, grpc_address=grpc_address,
                            kv_address=kv_address, model=model_id(engine), block_size=engine.core.kv.block_size,
                            num_blocks=engine.core.runner.num_blocks, metrics_address=metrics_address)

        def load_fn() -> Load:
            s = engine.core.stats()
            return Load(num_running=s.num_running, num_waiting=s.num_waiting, kv_usage=s.kv_usage,
                        num_free_blocks=s.num_free_blocks, num_cached_blocks=s.num_cached_blocks,
                        prefix_queries=s.prefix_queries, prefix_hits=s.prefix_hits)
        heartbeater = Heartbeater(registry, info, load_fn)
        await heartbeater.start()
        state.follow(heartbeater)
        publisher = KVEventPublisher(engine, PrefixIndex(args.redis_url), state.instance_id,
                                     interval_s=args.kv_events_interval,
                                     registrations=lambda: heartbeater.num_registrations)
        publisher.start()
        watcher = asyncio.create_task(state.watch())
    from pdserve.common.stat_logger import start_stat_logger
    stat_logger = start_stat_logger(args, engine.core.stats, f"Engine ({role})")
    freeze_startup_objects()  # common/gc_policy.py
    print(f"pdserve {role} {state.instance_id} grpc={grpc_address} kv={kv_address} metrics={metrics_address}",
          flush=True)
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            f.write(f"{grpc_address} {kv_address} {metrics_address}\n")
        os.replace(args.ready_file + ".tmp", args.ready_file)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # A dead engine (its thread raised, a tensor-parallel rank died) ends the worker: it must not
    # stay registered, answering Health and taking requests it can only fail. Its open requests
    # have failed already (AsyncLLM: UNAVAILABLE to the router, which retries / resubmits them).
    engine.on_death(lambda error: call_soon(loop, stop.set))
    await stop.wait()
    died = engine.dead is not None
    if died:
        log.error("%s: the engine died (%s): leaving the registry and exiting", state.instance_id, engine.dead)
    # Graceful: say NOT_SERVING (routers drop this worker at their next refresh), leave the
    # registry and the prefix index, let running requests and unpulled leases finish (up to
    # --shutdown-grace), then stop serving gRPC and the KV transport.
    state.shutting_down = True
    if watcher is not None:
        watcher.cancel()
    if publisher is not None:
        await publisher.stop()
    if heartbeater is not None:
        await heartbeater.stop()
    deadline = loop.time() + (0 if died else args.shutdown_grace)  # a dead engine finishes nothing
    while loop.time() < deadline and (engine.core.has_unfinished() or lease.num_active):
        await asyncio.sleep(0.1)
    if stat_logger is not None:
        stat_logger.stop()
    await server.stop(grace=2)
    for client in pull.clients.values():
        await client.close()
    await releaser.close()
    await kv.close()
    metrics_server.shutdown()
    try:
        engine.shutdown()
    except Exception:
        if not died:
            raise
        log.exception("shutting down the dead engine failed")
    if died:
        raise EngineDiedExit(f"pdserve {role} {state.instance_id}: exiting: the engine died: {engine.dead}")


class EngineDiedExit(SystemExit):
    """The worker's engine died: the process ends with status 1 and this message on stderr."""


def run_worker(args: argparse.Namespace, role: str) -> None:
    from pdserve.services.worker.kv_transfer_config import config_for_transport, resolve_kv_flags
    resolve_kv_flags(args, role)
    asyncio.run(serve_worker(args, role, config_for_transport(engine_config(args), args.kv_transport)))


def main(role: str, argv: list[str] | None = None) -> int:
    """`python -m pdserve.services.prefill|decode`: the same process as `pdserve prefill|decode`."""
    from pdserve.services.entry import run_main
    from pdserve.services.worker.args import add_worker_args

    def add_args(parser: argparse.ArgumentParser) -> None:
        add_worker_args(parser)
        add_engine_args(parser)
    return run_main(f"pdserve {role}", f"a {role} worker (gRPC + KV transport, registers in Redis)", add_args,
                    lambda args: run_worker(args, role), argv)
