"""Prefill service: prompt -> first token of each sequence + a KV handle that decode pulls from.

The request's queues on this worker:

    gRPC Prefill --> engine WAITING --> RUNNING (chunked, prefix cache) --> first token sampled
                 --> LEASED (blocks pinned, lease ttl) --> pulled by decode --> ReleaseLease / expiry

The engine runs the request with max_tokens 1 and `kv_transfer=LEASE`: when it finishes, the
engine's KV connector (`LeaseConnector`, common/kv_transfer/connector.py) keeps the prompt's
blocks under a lease instead of freeing them, so the request itself is off the batch as soon as
its first token exists. Every worker carries this service next to the Decode service
(services/worker/); its registry role decides what routers send it.

A lease that no router will receive is released at once, not after its ttl: the call was
cancelled (the router gave up on a frozen worker and dropped its connection, or went away)
while the prefill ran or before its answer was sent.

A dead engine (services/worker/process.py: the worker then exits) answers UNAVAILABLE "engine
dead: ...": the router tries another prefill, as for a worker that is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc

from pdserve.common.engine_client import EngineDeadError
from pdserve.common.kv_transfer.connector import LEASE, LeaseConnector
from pdserve.common.kv_transfer.tp_pull import KVShardAddress
from pdserve.common.sampling_params import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import delta_to_proto, prompt_logprobs_to_proto
from pdserve.services.worker.state import WorkerState


def prefill_params(params: SamplingParams) -> SamplingParams:
    """The prefill samples only the first token of each sequence (stop strings are the router's)."""
    return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1), stop=[])


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, state: WorkerState, connector: LeaseConnector, grpc_address: str,
                 kv_shards: list[KVShardAddress], transport: str):
        """kv_shards: the KV server of each tensor-parallel rank (one without TP) and its KV heads."""
        self.state = state
        self.engine = state.engine
        self.connector = connector
        self.grpc_address = grpc_address
        self.kv_shards = [pb.KVShard(transfer_address=s.address, first_kv_head=s.first_kv_head,
                                     num_kv_heads=s.num_kv_heads) for s in kv_shards]
        self.transport = transport

    async def Prefill(self, request: pb.PrefillRequest, context) -> pb.PrefillResponse:
        params, prompt = await self.state.checked_request(request, context)
        rid = request.request_id
        try:
            resp, lease_id = await self._prefill(rid, params, prompt, context)
        except asyncio.CancelledError:  # the call went away: a lease made meanwhile goes back
            self._release_unsent(rid)
            raise
        except EngineDeadError as e:  # the router tries another prefill (the worker is exiting)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine dead: {e}")
        if lease_id is not None:  # ... also when it goes away before the answer reached the router
            context.add_done_callback(lambda ctx: ctx.cancelled() and self._release_soon(lease_id))
        return resp

    def _release(self, lease_id: str):
        """Awaitable: the lease released on the engine thread (-> whether it was held). A dead
        engine raises EngineDeadError here."""
        return self.engine.call_in_engine(lambda core: self.connector.release(lease_id))

    def _release_soon(self, lease_id: str) -> None:
        """`_release`, not waited for."""
        self._soon(lambda: self._release(lease_id))

    def _release_unsent(self, rid: str) -> None:
        """The lease of a request whose call went away, if it has one, goes back. Taken on the
        engine thread, behind the abort that the stream's close queued: by then the request
        was aborted (its blocks freed, no lease) or it had finished, leased, in the step that ran
        while the call went away (looked up here at once, it would have no lease yet and keep
        its blocks until the ttl)."""
        def release(core) -> bool:
            lease = self.connector.take_lease(rid)
            return lease is not None and self.connector.release(lease[0])
        self._soon(lambda: self.engine.call_in_engine(release))

    @staticmethod
    def _soon(engine_call) -> None:
        """engine_call() (an engine call's awaitable) started, not waited for; nothing on a dead
        engine (its leases go with the worker, which exits)."""
        try:
            asyncio.ensure_future(_ignore_dead(engine_call()))
        except EngineDeadError:
            pass

    async def _prefill(self, rid: str, params: SamplingParams, prompt, context) -> tuple[pb.PrefillResponse, str | None]:
        """(the answer, the lease id it hands out or None)."""
        resp = pb.PrefillResponse(request_id=rid)
        firsts = {}
        async for outs in self.engine.stream(rid, prompt, prefill_params(params), kv_transfer=LEASE):
            for out in outs:
                if out.error:
                    await context.abort(grpc.StatusCode.INTERNAL, out.error)
                if out.index == 0 and out.num_cached_tokens is not None:
                    resp.num_cached_tokens = out.num_cached_tokens
                    if out.prompt_logprobs is not None:
                        resp.prompt_logprobs.extend(prompt_logprobs_to_proto(prompt, out.prompt_logprobs))
                firsts[out.index] = out
        max_model_len = self.engine.core.max_model_len
        all_done = True
        for index in range(params.n):
            out = firsts.get(index)
            if out is None or not out.new_token_ids:  # aborted before sampling (shutdown)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill aborted")
            if out.finish_reason == "length" and params.max_tokens != 1 and len(prompt) + 1 < max_model_len:
                out.finish_reason = None  # only the prefill's max_tokens=1 ended it: decode goes on
            all_done &= out.finish_reason is not None
            resp.sequences.append(delta_to_proto(out))
        lease = self.connector.take_lease(rid)
        if lease is None:
            return resp, None
        lease_id, _ = lease
        if all_done:
            await self._release(lease_id)
            return resp, None
        resp.handle.CopyFrom(pb.KVHandle(
            transfer_address=self.kv_shards[0].transfer_address, lease_id=lease_id, num_tokens=len(prompt),
            block_size=self.engine.core.kv.block_size, control_address=self.grpc_address, transport=self.transport,
            shards=self.kv_shards, num_kv_heads=self.engine.core.arch.num_kv_heads))
        return resp, lease_id

    async def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context) -> pb.ReleaseLeaseResponse:
        try:
            released = await self._release(request.lease_id)
        except EngineDeadError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine dead: {e}")
        return pb.ReleaseLeaseResponse(released=released)

    async def Health(self, request, context) -> pb.HealthResponse:
        return self.state.health()


async def _ignore_dead(release) -> None:
    try:
        await release
    except EngineDeadError:
        pass  # the engine died meanwhile: the worker exits, its leases with it
