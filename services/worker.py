"""A pdserve worker: engine start-up, one gRPC server with BOTH services, registration in Redis,
and the publication of its prefix cache to the router's prefix index.

    pdserve prefill|decode --redis-url URL [--grpc-port P] [--kv-transport tcp|ucx|nccl] [engine flags]

One process runs one AsyncLLM (engine thread), one grpc.aio server carrying the Prefill *and* the
Decode service, the KV transport's server (prefill side) and client (decode side), a Heartbeater
that keeps its record and live load in Redis, and a KVEventPublisher (below).

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
import math
import os
import queue
import signal
import socket
import time
import uuid

import grpc
from redis.exceptions import RedisError

from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import ROLES, STATUSES

log = logging.getLogger("pdserve.worker")


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address the gRPC and KV servers bind to")
    p.add_argument("--advertise-host", default=None,
                   help="address the router and other workers reach this one at (default: --host, or this "
                        "machine's IP when --host is a wildcard such as 0.0.0.0, e.g. in a container)")
    p.add_argument("--grpc-port", type=int, default=0, help="0: pick a free port")
    p.add_argument("--kv-transport", default="tcp", choices=["tcp", "ucx", "nccl"],
                   help="how decode workers pull KV blocks from prefill workers (nccl: a 2-rank NCCL group per "
                        "prefill-decode pair on GPUs, gloo on CPU)")
    p.add_argument("--redis-url", default=None, help="register in this Redis (pdserve router finds it there)")
    p.add_argument("--instance-id", default=None)
    p.add_argument("--lease-ttl", type=float, default=30.0, help="seconds a prefilled KV stays pinned for decode")
    p.add_argument("--kv-events-interval", type=float, default=0.1,
                   help="seconds between publications of prefix-cache changes to the prefix index")
    p.add_argument("--ready-file", default=None, help="write 'grpc_address kv_address' here once serving")


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


def model_id(engine: AsyncLLM) -> str:
    """Identity of the weights, equal across a fleet serving the same model."""
    path = engine.core.model_path
    return os.path.basename(os.path.normpath(path))


class WorkerState:
    """Who this worker is told to be: id, role and status, following its registry record."""

    def __init__(self, instance_id: str, role: str):
        self.instance_id = instance_id
        self._role = role
        self.heartbeater = None  # set by follow(); without Redis the role is fixed

    def follow(self, heartbeater) -> None:
        self.heartbeater = heartbeater

    @property
    def role(self) -> str:
        return self.heartbeater.info.role if self.heartbeater else self._role

    @property
    def status(self) -> str:
        return self.heartbeater.info.status if self.heartbeater else "serving"

    async def watch(self, engine: AsyncLLM, interval_s: float = 0.5) -> None:
        """Log the operator's changes as the Heartbeater brings them, and when a drain is complete."""
        seen = (self.role, self.status)
        drained_logged = False
        while True:
            await asyncio.sleep(interval_s)
            now = (self.role, self.status)
            if now != seen:
                log.warning("%s: registry says role=%s status=%s (was role=%s status=%s)",
                            self.instance_id, *now, *seen)
                seen, drained_logged = now, False
            s = engine.core.stats()
            if now[1] == "draining" and not drained_logged and s["num_running"] + s["num_waiting"] == 0:
                log.warning("%s: drained (no request running or waiting)", self.instance_id)
                drained_logged = True


def load_proto(engine: AsyncLLM) -> pb.Load:
    s = engine.core.stats()
    return pb.Load(num_running=s["num_running"], num_waiting=s["num_waiting"], kv_usage=s["kv_usage"],
                   num_free_blocks=s["num_free_blocks"], num_total_blocks=s["num_blocks"])


def health(engine: AsyncLLM, state: WorkerState) -> pb.HealthResponse:
    return pb.HealthResponse(instance_id=state.instance_id, role=ROLES[state.role], model=model_id(engine),
                             block_size=engine.core.kv.block_size, load=load_proto(engine),
                             status=STATUSES[state.status], max_model_len=engine.max_model_len)


class _Snapshot:
    """Queue marker: everything the pool held at this point (a resync replaces the index entry)."""

    def __init__(self, held: list[bytes]):
        self.held = held


class KVEventPublisher:
    """The worker's half of the prefix index (services/router/prefix_index.py).

        engine thread, step hook (after every step, and while idle):
            pool.take_events() -> {hash: still held?} for each hash stored or removed --> SimpleQueue
        event loop, every interval_s:
            drain the queue in order, later states win -> PrefixIndex.publish(stored, removed)
        resync: call_in_engine(snapshot) puts a _Snapshot(held) marker into the same queue (events
            after it apply on top) -> PrefixIndex.replace(instance, held), one transaction. When:
            at start; after a failed publish (Redis down: retried every retry_s until it answers);
            when the Heartbeater re-registered (Redis restarted empty); and every refresh_s
            (index ttl / 3), which re-publishes every block held -- hit blocks included -- so
            nothing still cached expires from the index, while a dead worker's entries do.
        stop(): clear_instance, so routers forget this worker's blocks at once.

    Redis is never called from the engine thread; the hook only swaps a list and builds a dict.
    """

    def __init__(self, engine: AsyncLLM, index, instance_id: str, interval_s: float = 0.1,
                 refresh_s: float | None = None, retry_s: float = 1.0, registrations=lambda: 0):
        self.engine = engine
        self.index = index
        self.instance_id = instance_id
        self.interval_s = interval_s
        self.refresh_s = refresh_s if refresh_s is not None else index.ttl_s / 3
        self.retry_s = retry_s
        self.registrations = registrations  # () -> Heartbeater.num_registrations
        self.redis_ok = True
        self.num_publishes = 0
        self.num_resyncs = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._want_resync = True  # the first publication replaces what an earlier run left
        self._last_resync = -math.inf
        self._last_attempt = -math.inf
        self._seen_registrations = registrations()
        self._task: asyncio.Task | None = None
        engine.step_hooks.append(self.hook)

    def hook(self, core) -> None:  # engine thread
        events = core.kv.pool.take_events()
        if events.stored or events.removed:
            cached = core.kv.pool.cached
            self._queue.put({h: h in cached for h in (*events.stored, *events.removed)})

    def _snapshot(self, core) -> None:  # engine thread
        core.kv.pool.take_events()  # older than the snapshot: superseded by it
        self._queue.put(_Snapshot(list(core.kv.pool.cached)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events-{self.instance_id}")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the publisher die; the next resync repairs the index
                log.exception("publishing KV events failed")
                self._want_resync = True

    async def flush(self) -> None:
        """Publish what changed since the last flush (or resync); see the class doc."""
        now = time.monotonic()
        registrations = self.registrations()
        if registrations != self._seen_registrations or now - self._last_resync >= self.refresh_s:
            self._seen_registrations = registrations
            self._want_resync = True
        resync = self._want_resync and now - self._last_attempt >= (self.retry_s if not self.redis_ok else 0)
        if resync:
            self._last_attempt = now
            await asyncio.wait_for(self.engine.call_in_engine(self._snapshot), timeout=10)
        pending, replace = self._drain()
        if self._want_resync and replace is None:
            return  # these changes would be superseded by the resync's snapshot anyway
        if replace is None and not pending:
            return
        try:
            if replace is not None:
                await self.index.replace(self.instance_id, [h for h, held in {**replace, **pending}.items() if held])
            else:
                await self.index.publish(self.instance_id, stored=[h for h, held in pending.items() if held],
                                         removed=[h for h, held in pending.items() if not held])
        except RedisError as e:  # the changes are lost: a resync republishes everything held
            if self.redis_ok:
                log.warning("%s: prefix index unreachable (%s); will resync when Redis answers", self.instance_id, e)
            self.redis_ok = False
            self._want_resync = True
            return
        self.num_publishes += 1
        if replace is not None:
            self.num_resyncs += 1
            self._last_resync = now
            self._want_resync = False
            if not self.redis_ok:
                log.warning("%s: prefix index resynced (%d blocks)", self.instance_id, len(replace))
            self.redis_ok = True

    def _drain(self) -> tuple[dict[bytes, bool], dict[bytes, bool] | None]:
        """(changes, snapshot) from the queue; changes queued before a snapshot are dropped."""
        pending: dict[bytes, bool] = {}
        replace = None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return pending, replace
            if isinstance(item, _Snapshot):
                replace, pending = dict.fromkeys(item.held, True), {}
            else:
                pending.update(item)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self.index.clear_instance(self.instance_id)
        except Exception as e:  # shutting down anyway: the entries expire
            log.warning("could not clear %s from the prefix index: %s", self.instance_id, e)
        await self.index.close()


async def serve_worker(args, role: str) -> None:
    """Start engine + gRPC (both services) + registration + KV events; run until SIGINT/SIGTERM."""
    from pdserve.services.decode.server import add_decode_service
    from pdserve.services.prefill.server import add_prefill_service

    from pdserve.common.engine.llm import LLM
    from pdserve.services.cli import engine_kwargs
    engine = AsyncLLM(core=LLM(**engine_kwargs(args)).engine)  # LLM builds the EngineConfig from flags
    state = WorkerState(args.instance_id or f"{role}-{socket.gethostname()}-{uuid.uuid4().hex[:6]}", role)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    args.advertise_host = advertised_host(args.host, args.advertise_host)
    port = server.add_insecure_port(f"{args.host}:{args.grpc_port}")
    grpc_address = f"{args.advertise_host}:{port}"
    kv_address, closers = await add_prefill_service(args, engine, state, grpc_address, server)
    closers += add_decode_service(args, engine, state, server)
    await server.start()

    heartbeater = publisher = watcher = None
    if args.redis_url:
        from pdserve.services.router.prefix_index import PrefixIndex
        from pdserve.services.router.registry import Heartbeater, InstanceInfo, Load, Registry
        registry = Registry(args.redis_url)
        info = InstanceInfo(instance_id=state.instance_id, role=role, grpc_address=grpc_address,
                            kv_address=kv_address, model=model_id(engine), block_size=engine.core.kv.block_size,
                            num_blocks=engine.core.runner.num_blocks)

        def load_fn() -> Load:
            s = engine.core.stats()
            return Load(num_running=s["num_running"], num_waiting=s["num_waiting"], kv_usage=s["kv_usage"],
                        num_free_blocks=s["num_free_blocks"], num_cached_blocks=len(engine.core.kv.pool.cached),
                        prefix_queries=s["prefix_queries"], prefix_hits=s["prefix_hits"])
        heartbeater = Heartbeater(registry, info, load_fn)
        await heartbeater.start()
        state.follow(heartbeater)
        publisher = KVEventPublisher(engine, PrefixIndex(args.redis_url), state.instance_id,
                                     interval_s=args.kv_events_interval,
                                     registrations=lambda: heartbeater.num_registrations)
        publisher.start()
        watcher = asyncio.create_task(state.watch(engine))
    print(f"pdserve {role} {state.instance_id} grpc={grpc_address} kv={kv_address}", flush=True)
    if args.ready_file:
        with open(args.ready_file + ".tmp", "w") as f:
            f.write(f"{grpc_address} {kv_address}\n")
        os.replace(args.ready_file + ".tmp", args.ready_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    if publisher is not None:
        await publisher.stop()
    if heartbeater is not None:
        await heartbeater.stop()
    await server.stop(grace=2)
    for close in closers:
        await close()
    engine.shutdown()


async def checked_request(engine: AsyncLLM, request, context):
    """(SamplingParams, prompt ids) of a Prefill/Decode request, or INVALID_ARGUMENT naming the bad field."""
    from pdserve.common.sampling_params import ParameterError
    from pdserve.proto.convert import sampling_params_from_proto
    try:
        params = sampling_params_from_proto(request.params)
        prompt = list(request.prompt_token_ids)
        engine.core.validate(prompt, params)
    except ParameterError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{e.param}: {e}")
    return params, prompt
