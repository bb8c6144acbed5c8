"""Operators' controls of the fleet: HTTP routes on the router and the `pdserve admin` command.

    GET  /admin/instances               every instance: record (role, status, addresses), load, KV
                                        usage, blocks cached / indexed, this router's traffic, and
                                        what the worker itself reports over gRPC Health
    POST /admin/instances/{id}/drain    status=draining: routers stop sending it new work
    POST /admin/instances/{id}/resume   status=serving
    POST /admin/instances/{id}/role     {"role": "prefill"|"decode"|"both", "timeout_s": 120}
                                        drain -> wait until idle -> set the role -> serving

A role switch needs no restart: every worker serves both gRPC services (services/worker/) and
its registry record's role decides what routers send it. The switch waits `ROUTER_SETTLE_S`
(longer than a router's refresh, so every router has seen the drain), then until the worker
reports no running or waiting request and this router has nothing in flight there; then it
writes the role, resumes, and waits for the worker to report the new role (its Heartbeater
reads the record every ttl/3). A drain that does not finish in time answers 409 and leaves the
instance draining. Registry changes need Redis: 503 while it is down.

The `pdserve admin list|drain|resume|set-role` command that calls these routes is in
admin_cli.py (it imports neither FastAPI nor Redis, so `pdserve` starts fast).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time

import grpc
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from redis.exceptions import RedisError

from pdserve.proto import pdserve_pb2 as pb
from pdserve.services.router.instances import InstancePool
from pdserve.common.registry import ROLES, InstanceNotFoundError, Registry

ROUTER_SETTLE_S = 1.5  # > a router's refresh interval (0.5 s), with margin
POLL_S = 0.2
_ROLE_NAMES = {v: k for k, v in pb.Role.items()}
_STATUS_NAMES = {v: k for k, v in pb.ServingStatus.items()}


def add_admin_routes(app: FastAPI, pool: InstancePool, registry: Registry, api_key: str | None = None) -> None:
    admin = APIRouter(prefix="/admin/instances", dependencies=[Depends(admin_guard(api_key))])

    @admin.get("")
    async def list_instances() -> dict:
        return {"redis_up": pool.redis_ok, "routing": pool.config.mode,
                "instances": await asyncio.gather(*(_describe(pool, i, l) for i, l in pool.instances))}

    @admin.post("/{instance_id}/drain")
    async def drain(instance_id: str) -> dict:
        async with _registry_errors(instance_id):
            info = await registry.set_status(instance_id, "draining")
        await pool.refresh()  # this router acts on it at once; the others at their next refresh
        return info.__dict__

    @admin.post("/{instance_id}/resume")
    async def resume(instance_id: str) -> dict:
        async with _registry_errors(instance_id):
            info = await registry.set_status(instance_id, "serving")
        await pool.refresh()
        return info.__dict__

    @admin.post("/{instance_id}/role")
    async def set_role(instance_id: str, request: Request) -> dict:
        role, timeout_s = _role_body(await request.body())
        async with _registry_errors(instance_id):
            result = await switch_role(pool, registry, instance_id, role, timeout_s)
        await pool.refresh()
        return result

    app.include_router(admin)


async def switch_role(pool: InstancePool, registry: Registry, instance_id: str, role: str, timeout_s: float) -> dict:
    """Drain, wait until idle, flip the role, resume; see the module doc."""
    started = time.monotonic()
    info = await registry.set_status(instance_id, "draining")
    await asyncio.sleep(ROUTER_SETTLE_S)
    num_busy = None
    while True:
        try:
            load = (await pool.health(info, timeout_s=2)).load
            num_busy = load.num_running + load.num_waiting + pool.active(instance_id)
        except grpc.aio.AioRpcError as e:
            raise HTTPException(502, f"instance {instance_id} does not answer Health ({e.code().name}); "
                                     "it stays draining") from None
        if num_busy == 0:
            break
        if time.monotonic() - started > timeout_s:
            raise HTTPException(409, f"instance {instance_id} still has {num_busy} requests after {timeout_s:.0f} s; "
                                     f"it stays draining: retry, or POST /admin/instances/{instance_id}/resume")
        await asyncio.sleep(POLL_S)
    drained_s = time.monotonic() - started
    await registry.set_role(instance_id, role)
    info = await registry.set_status(instance_id, "serving")
    reported = None
    while time.monotonic() - started < timeout_s:  # the worker sees its record at its next heartbeat
        try:
            reported = _ROLE_NAMES[(await pool.health(info, timeout_s=2)).role].removeprefix("ROLE_").lower()
        except grpc.aio.AioRpcError:
            reported = None
        if reported == role:
            break
        await asyncio.sleep(POLL_S)
    return {**info.__dict__, "drained_s": round(drained_s, 3), "reported_role": reported}


async def _describe(pool: InstancePool, info, load) -> dict:
    out = {"instance_id": info.instance_id, "role": info.role, "status": info.status,
           "grpc_address": info.grpc_address, "kv_address": info.kv_address, "num_blocks": info.num_blocks,
           "load": None if load is None else load.__dict__, "kv_usage": load.kv_usage if load else None,
           "cached_blocks": load.num_cached_blocks if load else None, "indexed_blocks": None,
           "prefix_hit_rate": (round(load.prefix_hits / load.prefix_queries, 4)
                               if load and load.prefix_queries else None),
           "requests_estimate": pool.requests(info, load), "in_flight": pool.active(info.instance_id),
           "routed": pool.num_routed.get(info.instance_id, 0), "reported_role": None, "reported_status": None}
    if pool.index is not None and pool.redis_ok:
        try:
            out["indexed_blocks"] = await pool.index.num_blocks(info.instance_id)
        except RedisError:
            pass
    try:
        h = await pool.health(info, timeout_s=1)
        out["reported_role"] = _ROLE_NAMES[h.role].removeprefix("ROLE_").lower()
        out["reported_status"] = _STATUS_NAMES[h.status].lower()
    except grpc.aio.AioRpcError:
        pass
    return out


class _registry_errors:
    """Registry failures as HTTP answers: 404 unknown instance, 503 Redis down."""

    def __init__(self, instance_id: str):
        self.instance_id = instance_id

    async def __aenter__(self):
        return self

    async def __aexit__(self, kind, error, tb):
        if isinstance(error, InstanceNotFoundError):
            raise HTTPException(404, f"no live instance {self.instance_id!r}") from None
        if isinstance(error, RedisError):
            raise HTTPException(503, f"Redis is unavailable, the registry cannot be changed: {error}") from None
        return False


def _role_body(body: bytes) -> tuple[str, float]:
    """{"role": ..., "timeout_s": ...} or a 400 naming what is wrong."""
    try:
        data = json.loads(body or b"{}")
    except ValueError as e:
        raise HTTPException(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise HTTPException(400, 'the body must be a JSON object: {"role": ..., "timeout_s": ...}')
    role, timeout_s = data.get("role"), data.get("timeout_s", 120)
    if role not in ROLES:
        raise HTTPException(400, f"role must be one of {list(ROLES)}, got {role!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 3600:
        raise HTTPException(400, f"timeout_s must be a number of seconds in (0, 3600], got {timeout_s!r}")
    return role, float(timeout_s)


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def admin_guard(api_key: str | None):
    """The admin routes' rule: with --api-key every one needs `Authorization: Bearer KEY`;
    without it, reads are open and changes (drain, resume, role) are taken from loopback only."""
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is not None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
                raise HTTPException(401, "Incorrect API key provided: send `Authorization: Bearer <key>`.")
        elif request.method != "GET" and (request.client is None or request.client.host not in LOOPBACK):
            raise HTTPException(403, "admin changes without --api-key are accepted from this host only")
    return check
