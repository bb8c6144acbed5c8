"""Prefill service: prompt -> first token(s) + a KV handle that a decode worker pulls from.

The request's queues on this worker:

    gRPC Prefill --> engine WAITING --> RUNNING (chunked, prefix cache) --> first token sampled
                 --> LEASED (blocks pinned, lease ttl) --> pulled by decode --> ReleaseLease / expiry

The prompt's blocks are held by a lease, not by the request, so the request itself is finished
(and off the batch) as soon as its first token exists. Every worker carries this service next to
the Decode service (services/worker.py); its registry role decides what routers send it.
"""

from __future__ import annotations

import time

import grpc

from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine.disagg import PrefillHandoff
from pdserve.common.kv_transfer.base import KVLayout, make_server, split_address
from pdserve.common.sampling_params import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import (finish_reason_to_proto, set_stop_reason,
                                   token_logprobs_to_proto)
from pdserve.services import worker


def first_token_finish(token: int, params: SamplingParams, eos_ids: tuple[int, ...], num_tokens: int,
                       max_model_len: int) -> tuple[str | None, int | None]:
    """Whether the first token already ends its sequence, under the request's real params."""
    if num_tokens >= max_model_len:
        return "length", None
    if params.min_tokens < 1:
        if not params.ignore_eos and token in eos_ids:
            return "stop", None
        if token in params.stop_token_ids:
            return "stop", token
    if params.max_tokens == 1:
        return "length", None
    return None, None


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, engine: AsyncLLM, handoff: PrefillHandoff, state: worker.WorkerState, grpc_address: str,
                 kv_address: str, transport: str):
        self.engine = engine
        self.handoff = handoff
        self.state = state
        self.grpc_address = grpc_address
        self.kv_address = kv_address
        self.transport = transport
        self.layout = KVLayout.from_caches(engine.core.runner.kv_caches)

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        params, prompt = await worker.checked_request(self.engine, request, context)
        rid = request.request_id
        lease = {}

        def add(core):
            lease["id"] = self.handoff.add_prefill(rid, prompt, params)
        final = None
        async for out in self.engine.generate(prompt, params, rid, add_fn=add):
            final = out
        if final.error:
            await context.abort(grpc.StatusCode.INTERNAL, final.error)
        core = self.engine.core
        resp = pb.PrefillResponse(request_id=rid, num_cached_tokens=final.num_cached_tokens)
        all_done = True
        for c in final.outputs:
            if not c.token_ids:  # aborted before sampling (shutdown)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill aborted")
            token = c.token_ids[0]
            reason, stop_token = first_token_finish(token, params, core.eos_token_ids, len(prompt) + 1,
                                                    core.max_model_len)
            all_done &= reason is not None
            ft = pb.FirstToken(index=c.index, token_id=token, finish_reason=finish_reason_to_proto(reason))
            set_stop_reason(ft, stop_token)
            if c.logprobs:
                ft.logprobs.CopyFrom(token_logprobs_to_proto(token, c.logprobs[0]))
            resp.first_tokens.append(ft)
        if final.prompt_logprobs:
            for tok, entry in zip(prompt, final.prompt_logprobs):
                resp.prompt_logprobs.append(pb.TokenLogprobs() if entry is None else token_logprobs_to_proto(tok, entry))
        lease_id = lease["id"]
        block_ids = self.handoff.resolve_lease(lease_id)
        if all_done or block_ids is None:
            if block_ids is not None:
                await self.engine.call_in_engine(lambda core: self.handoff.release_lease(lease_id))
            return resp
        expires_ms = int((time.time() + self.handoff.lease_ttl_s) * 1000)
        resp.handle.CopyFrom(pb.KVHandle(
            instance_id=self.state.instance_id, transfer_address=self.kv_address, lease_id=lease_id,
            block_ids=block_ids,
            num_tokens=len(prompt), block_size=core.kv.block_size,
            layout=pb.KVLayout(num_layers=self.layout.num_layers, num_kv_heads=self.layout.num_kv_heads,
                               head_dim=self.layout.head_dim, dtype=self.layout.dtype),
            lease_expires_unix_ms=expires_ms, control_address=self.grpc_address, transport=self.transport))
        return resp

    async def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context) -> pb.ReleaseLeaseResponse:
        released = await self.engine.call_in_engine(lambda core: self.handoff.release_lease(request.lease_id))
        return pb.ReleaseLeaseResponse(released=released)

    async def Health(self, request, context) -> pb.HealthResponse:
        return worker.health(self.engine, self.state)


async def add_prefill_service(args, engine: AsyncLLM, state: worker.WorkerState, grpc_address: str, server):
    """The Prefill service and the KV server it leases blocks through; -> (kv address, closers)."""
    handoff = PrefillHandoff(engine.core, lease_ttl_s=args.lease_ttl)
    engine.step_hooks.append(lambda core: handoff.expire_leases())
    kv_server = make_server(args.kv_transport, engine.core.runner.kv_caches, handoff.resolve_lease, host=args.host)
    _, kv_port = split_address(await kv_server.start(), args.kv_transport)
    kv_address = f"{args.kv_transport}://{args.advertise_host}:{kv_port}"  # what decode workers dial
    servicer = PrefillServicer(engine, handoff, state, grpc_address, kv_address, args.kv_transport)
    pb_grpc.add_PrefillServicer_to_server(servicer, server)
    return kv_address, [kv_server.close]
