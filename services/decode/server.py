"""Decode service: request + KV handle -> pull the prompt's KV -> continue in the batch -> tokens.

The request's queues on this worker:

    gRPC Decode --> PREALLOC (own prefix hits + fresh blocks reserved) --> TRANSFER (pull from the
    prefill's KV server, deadline) --> engine WAITING (computed = prompt) --> RUNNING --> streamed

A pull that fails (prefill gone, lease expired, deadline) frees the reserved blocks and the
request is admitted without KV: the engine recomputes the prompt here. A request without a
handle (short prompt sent straight to decode, or a resubmission) is recomputed the same way.
Every worker carries this service next to the Prefill service (services/worker.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from pdserve.common.engine.async_llm import AsyncLLM
from pdserve.common.engine.disagg import DecodeHandoff
from pdserve.common.kv_transfer.base import KVTransferError, make_client
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import (finish_reason_to_proto, set_stop_reason,
                                   token_logprobs_to_proto)
from pdserve.services import worker

log = logging.getLogger("pdserve.decode")


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(self, engine: AsyncLLM, state: worker.WorkerState, kv_clients: dict, pull_deadline_s: float = 10.0):
        self.engine = engine
        self.handoff = DecodeHandoff(engine.core)
        self.state = state
        self.kv_clients = kv_clients  # transport name -> KVClient
        self.pull_deadline_s = pull_deadline_s
        self.num_pull_failures = 0

    async def Decode(self, request: pb.DecodeRequest, context):
        params, prompt = await worker.checked_request(self.engine, request, context)
        rid = request.request_id
        seqs = sorted(request.sequences, key=lambda s: s.index)
        outputs = [list(s.output_token_ids) for s in seqs] if seqs else None
        first = pb.DecodeChunk(request_id=rid)
        add_fn = None
        if request.HasField("handle") and outputs:
            try:
                add_fn = await self._pull(rid, prompt, params, outputs, request.handle, first)
            except asyncio.CancelledError:  # the router gave up during the pull
                await self.engine.call_in_engine(lambda core: self.handoff.abort_pending(rid))
                raise
        sent = [len(o) for o in outputs] if outputs else [0] * params.n
        given = list(sent)  # tokens that arrived with the request have no logprobs here
        stream = self.engine.generate(prompt, params, rid, output_token_ids=outputs, add_fn=add_fn)
        first_chunk = True
        try:
            async for out in stream:
                chunk = first if first_chunk else pb.DecodeChunk(request_id=rid)
                if first_chunk:
                    chunk.num_prompt_tokens_computed = out.metrics.num_computed_prompt_tokens if out.metrics else 0
                first_chunk = False
                for c in out.outputs:
                    new = c.token_ids[sent[c.index]:]
                    if not new and c.finish_reason is None:
                        continue
                    delta = pb.SequenceDelta(index=c.index, new_token_ids=new,
                                             finish_reason=finish_reason_to_proto(c.finish_reason))
                    if c.logprobs:
                        for tok, entry in zip(new, c.logprobs[sent[c.index] - given[c.index]:]):
                            delta.new_logprobs.append(token_logprobs_to_proto(tok, entry))
                    set_stop_reason(delta, c.stop_reason)
                    sent[c.index] = len(c.token_ids)
                    chunk.sequences.append(delta)
                chunk.finished = out.finished
                if out.error:
                    chunk.error = out.error
                    chunk.finished = True
                yield chunk
        finally:
            await stream.aclose()

    async def _pull(self, rid, prompt, params, outputs, handle: pb.KVHandle, first: pb.DecodeChunk):
        """Reserve, pull and return the admission function; on failure, a recompute admission."""
        n_kv = handle.num_tokens
        client = self.kv_clients.get(handle.transport)
        if client is None or n_kv != len(prompt) or handle.block_size != self.engine.core.kv.block_size:
            first.kv_transfer_error = f"handle not usable here (transport {handle.transport!r})"
            return None
        reserved = await self.engine.call_in_engine(
            lambda core: self.handoff.prepare_pull(rid, prompt, params, outputs, n_kv))
        if reserved is None:
            first.kv_transfer_error = "no free KV blocks for the pull; recomputing"
            return lambda core: self.handoff.admit_pulled(rid, False, n_kv)
        dst, num_hits = reserved
        ok = True
        t0 = time.perf_counter()
        try:
            if dst:
                first.kv_bytes_received = await client.pull(handle.transfer_address, handle.lease_id, dst,
                                                            self.pull_deadline_s, src_block_offset=num_hits)
        except (KVTransferError, OSError) as e:
            ok = False
            self.num_pull_failures += 1
            first.kv_transfer_error = str(e)
            log.warning("pull for %s failed, recomputing: %s", rid, e)
        first.kv_transfer_seconds = time.perf_counter() - t0
        asyncio.create_task(self._release(handle))
        return lambda core: self.handoff.admit_pulled(rid, ok, n_kv)

    async def _release(self, handle: pb.KVHandle) -> None:
        try:
            async with grpc.aio.insecure_channel(handle.control_address) as ch:
                await pb_grpc.PrefillStub(ch).ReleaseLease(pb.ReleaseLeaseRequest(lease_id=handle.lease_id), timeout=2)
        except grpc.RpcError as e:  # the lease expires by itself
            log.info("could not release lease %s: %s", handle.lease_id, e.code())

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        await self.engine.abort(request.request_id)
        return pb.AbortResponse()

    async def Health(self, request, context) -> pb.HealthResponse:
        return worker.health(self.engine, self.state)


def add_decode_service(args, engine: AsyncLLM, state: worker.WorkerState, server) -> list:
    """The Decode service and the KV client it pulls with; -> closers."""
    clients = {args.kv_transport: make_client(args.kv_transport, engine.core.runner.kv_caches)}
    servicer = DecodeServicer(engine, state, clients)
    pb_grpc.add_DecodeServicer_to_server(servicer, server)
    return [c.close for c in clients.values()]
